//! Tokenization with an exact prompt/response boundary.
//!
//! An example's ids are `prefix + P + R + [EOS]`, where `prefix` is what the tokenizer's
//! post-processor puts before a sequence (a BOS such as `<s>`, nothing for SmolLM2), `P` the
//! prompt's tokens and `R` the response's. Only `R + [EOS]` train.
//!
//! The boundary: the prompt and the concatenation prompt+response are both tokenized (without
//! special tokens). When the prompt's tokens are a prefix of the concatenation's, the example is
//! the concatenation's tokens, split there. When a token straddles the boundary (the prompt's
//! last characters merge with the response's first: with SmolLM2 and `alpaca_modified`, a
//! response that starts with `"` or a backtick joins the `:` of `### Response:`), the response
//! is tokenized on its own and appended to the prompt's tokens; such examples are counted
//! (`boundary_retokenized`). Either way the prompt's ids are exactly
//! [`Encoder::encode_prompt`] of the prompt text, the ids a generation prompt gets, and the
//! trained ids are a tokenization of the response text alone followed by EOS: the model learns
//! to continue the very token sequence it is given at generation time.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use tokenizers::Tokenizer;

use crate::error::{DataError, Result};
use crate::hub::{self, HubOptions};
use crate::template::Rendered;

/// A tokenizer's files: `tokenizer.json` and, when present, `tokenizer_config.json` (EOS/BOS
/// names, chat template) and `chat_template.jinja`.
#[derive(Debug, Clone)]
pub struct TokenizerFiles {
    pub tokenizer_json: PathBuf,
    pub tokenizer_config: Option<PathBuf>,
    pub chat_template: Option<PathBuf>,
}

impl TokenizerFiles {
    /// From a Hugging Face folder.
    pub fn from_dir(dir: &Path) -> Result<TokenizerFiles> {
        let tokenizer_json = dir.join("tokenizer.json");
        if !tokenizer_json.is_file() {
            return Err(DataError::Tokenizer {
                path: tokenizer_json,
                detail: "no tokenizer.json in the model folder".into(),
            });
        }
        let opt = |name: &str| Some(dir.join(name)).filter(|p| p.is_file());
        Ok(TokenizerFiles {
            tokenizer_json,
            tokenizer_config: opt("tokenizer_config.json"),
            chat_template: opt("chat_template.jinja"),
        })
    }

    /// From `model.source`: an existing folder (also tried relative to `base`), else a hub model
    /// id whose files are fetched (or found in the hub cache).
    pub fn from_model_source(
        source: &str,
        revision: Option<&str>,
        base: Option<&Path>,
        hub: &HubOptions,
    ) -> Result<TokenizerFiles> {
        let direct = PathBuf::from(source);
        if direct.is_dir() {
            return Self::from_dir(&direct);
        }
        if let Some(b) = base {
            let rel = b.join(source);
            if rel.is_dir() {
                return Self::from_dir(&rel);
            }
        }
        if source.split('/').count() != 2 || source.starts_with('.') || source.starts_with('/') {
            return Err(DataError::Tokenizer {
                path: direct,
                detail: "model.source is neither a folder nor a hub id `org/name`".into(),
            });
        }
        let rev = revision.unwrap_or("main");
        let tokenizer_json =
            hub::model_file(source, rev, "tokenizer.json", hub)?.ok_or_else(|| {
                DataError::Tokenizer {
                    path: PathBuf::from(format!("hub:{source}@{rev}/tokenizer.json")),
                    detail: "the repository has no tokenizer.json (or it is not cached offline)"
                        .into(),
                }
            })?;
        Ok(TokenizerFiles {
            tokenizer_json,
            tokenizer_config: hub::model_file(source, rev, "tokenizer_config.json", hub)?,
            chat_template: hub::model_file(source, rev, "chat_template.jinja", hub)?,
        })
    }
}

/// One tokenized example: ids and how many of them (from the start) are the prompt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoded {
    pub ids: Vec<u32>,
    pub prompt_len: usize,
    /// The boundary fell inside a token and the response was tokenized on its own.
    pub retokenized: bool,
}

/// A loaded tokenizer with its EOS and sequence prefix.
pub struct Encoder {
    tokenizer: Tokenizer,
    pub eos_id: u32,
    pub eos_token: String,
    pub bos_token: Option<String>,
    /// Ids the post-processor puts before a sequence (BOS), added to every prompt.
    pub prefix_ids: Vec<u32>,
    prefix_text: String,
    /// The id used for padding (masked out; the tokenizer's pad token, else EOS).
    pub pad_id: u32,
    /// SHA-256 of tokenizer.json (cache key).
    pub tokenizer_hash: String,
    path: PathBuf,
}

impl std::fmt::Debug for Encoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Encoder")
            .field("path", &self.path)
            .field("eos", &(&self.eos_token, self.eos_id))
            .field("prefix_ids", &self.prefix_ids)
            .finish()
    }
}

fn token_name(v: &serde_json::Value) -> Option<String> {
    match v {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

impl Encoder {
    /// Loads `tokenizer.json`; the EOS is `eos_override`, else `tokenizer_config.json`'s
    /// `eos_token`, else the first of `</s>`, `<|endoftext|>`, `<|im_end|>`,
    /// `<|end_of_text|>`, `<eos>`, `[SEP]` that the vocabulary has.
    pub fn load(files: &TokenizerFiles, eos_override: Option<&str>) -> Result<Encoder> {
        let path = files.tokenizer_json.clone();
        let terr = |detail: String| DataError::Tokenizer {
            path: path.clone(),
            detail,
        };
        let bytes = std::fs::read(&path).map_err(|e| DataError::io(&path, e))?;
        let tokenizer_hash = hex(&Sha256::digest(&bytes));
        let mut tokenizer = Tokenizer::from_bytes(&bytes).map_err(|e| terr(e.to_string()))?;
        // Some tokenizer.json files carry truncation/padding settings (MiniLM's: 128 tokens):
        // lengths are this crate's business, never the tokenizer's.
        tokenizer
            .with_truncation(None)
            .map_err(|e| terr(e.to_string()))?;
        tokenizer.with_padding(None);
        let config: Option<serde_json::Value> = match &files.tokenizer_config {
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|e| DataError::io(p, e))?;
                Some(serde_json::from_str(&text).map_err(|e| DataError::Format {
                    path: p.clone(),
                    detail: format!("not JSON: {e}"),
                })?)
            }
            None => None,
        };
        let from_config = |key: &str| {
            config
                .as_ref()
                .and_then(|c| c.get(key))
                .and_then(token_name)
        };
        let eos_token = match eos_override.map(str::to_string).or_else(|| from_config("eos_token")) {
            Some(t) => t,
            None => ["</s>", "<|endoftext|>", "<|im_end|>", "<|end_of_text|>", "<eos>", "[SEP]"]
                .iter()
                .find(|t| tokenizer.token_to_id(t).is_some())
                .map(|t| t.to_string())
                .ok_or_else(|| {
                    terr("no EOS token: set data.eos_token (no tokenizer_config.json eos_token and no usual EOS in the vocabulary)".into())
                })?,
        };
        let eos_id = tokenizer.token_to_id(&eos_token).ok_or_else(|| {
            terr(format!(
                "the EOS token `{eos_token}` is not in the vocabulary"
            ))
        })?;
        let bos_token = from_config("bos_token");
        let pad_id = from_config("pad_token")
            .and_then(|t| tokenizer.token_to_id(&t))
            .unwrap_or(eos_id);
        // What the post-processor adds in front of a sequence.
        let with = tokenizer
            .encode("a", true)
            .map_err(|e| terr(e.to_string()))?
            .get_ids()
            .to_vec();
        let without = tokenizer
            .encode("a", false)
            .map_err(|e| terr(e.to_string()))?
            .get_ids()
            .to_vec();
        let prefix_ids = if !without.is_empty() {
            (0..=with.len().saturating_sub(without.len()))
                .find(|&i| with[i..].starts_with(&without))
                .map(|i| with[..i].to_vec())
                .unwrap_or_default()
        } else {
            Vec::new()
        };
        let prefix_text = prefix_ids
            .iter()
            .filter_map(|&i| tokenizer.id_to_token(i))
            .collect::<String>();
        Ok(Encoder {
            tokenizer,
            eos_id,
            eos_token,
            bos_token,
            prefix_ids,
            prefix_text,
            pad_id,
            tokenizer_hash,
            path,
        })
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// The prefix for a prompt text: none when the text already starts with it (a chat
    /// template that writes `{{ bos_token }}` itself).
    fn prefix_for(&self, prompt: &str) -> &[u32] {
        if !self.prefix_text.is_empty() && prompt.starts_with(&self.prefix_text) {
            &[]
        } else {
            &self.prefix_ids
        }
    }

    /// The ids of a generation prompt, exactly as training tokenizes a prompt.
    pub fn encode_prompt(&self, prompt: &str) -> Result<Vec<u32>> {
        let enc = self
            .tokenizer
            .encode_fast(prompt, false)
            .map_err(|e| self.err(e.to_string()))?;
        let mut ids = self.prefix_for(prompt).to_vec();
        ids.extend_from_slice(enc.get_ids());
        Ok(ids)
    }

    fn err(&self, detail: String) -> DataError {
        DataError::Tokenizer {
            path: self.path.clone(),
            detail,
        }
    }

    /// Tokenizes a batch of rendered examples (in parallel).
    pub fn encode_batch(&self, items: &[Rendered]) -> Result<Vec<Encoded>> {
        let prompts: Vec<&str> = items.iter().map(|r| r.prompt.as_str()).collect();
        let fulls: Vec<String> = items
            .iter()
            .map(|r| {
                let mut s = String::with_capacity(r.prompt.len() + r.response.len());
                s.push_str(&r.prompt);
                s.push_str(&r.response);
                s
            })
            .collect();
        let p_enc = self
            .tokenizer
            .encode_batch_fast(prompts, false)
            .map_err(|e| self.err(e.to_string()))?;
        let f_enc = self
            .tokenizer
            .encode_batch_fast(fulls.iter().map(|s| s.as_str()).collect::<Vec<_>>(), false)
            .map_err(|e| self.err(e.to_string()))?;
        let mut out = Vec::with_capacity(items.len());
        for ((item, p), f) in items.iter().zip(&p_enc).zip(&f_enc) {
            let (p, f) = (p.get_ids(), f.get_ids());
            let prefix = self.prefix_for(&item.prompt);
            let mut ids = Vec::with_capacity(prefix.len() + f.len() + 1);
            ids.extend_from_slice(prefix);
            ids.extend_from_slice(p);
            let prompt_len = ids.len();
            let retokenized = if f.starts_with(p) {
                ids.extend_from_slice(&f[p.len()..]);
                false
            } else {
                let r = self
                    .tokenizer
                    .encode_fast(item.response.as_str(), false)
                    .map_err(|e| self.err(e.to_string()))?;
                ids.extend_from_slice(r.get_ids());
                true
            };
            if item.append_eos {
                ids.push(self.eos_id);
            }
            out.push(Encoded {
                ids,
                prompt_len,
                retokenized,
            });
        }
        Ok(out)
    }

    /// Text of ids (special tokens kept, so the EOS shows).
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.tokenizer
            .decode(ids, false)
            .map_err(|e| self.err(e.to_string()))
    }
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
