//! The `data` section of the trainer's YAML config.
//!
//! ```yaml
//! data:
//!   sources:
//!     - hub: nomic-ai/gpt4all-j-prompt-generations
//!       revision: v1.3-groovy
//!       split: train
//!     - path: "my-data/*.jsonl"
//!       columns: { prompt: question, response: answer }
//!   template: alpaca_modified      # or alpaca_modified_nl, alpaca_instruction, alpaca, chatml,
//!                                  # chat_template, raw, or a custom "…{instruction}…{response}…"
//!   max_length: 1024               # tokens, prompt + response + EOS
//!   truncation: drop               # or cut
//!   on_bad_row: skip               # or fail
//!   max_chars: 2000                # the paper's filter on instruction + response characters
//!   eval_split: 0.02               # fraction, or a count such as 500
//!   pack: false
//!   max_batch_tokens: 8192         # token budget of one batch, padding included
//!   seed: 0
//! ```
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

use crate::error::{DataError, Result};

/// The `data` section. Unknown keys are refused so that a typo never silently changes a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// Where the rows come from; read in this order.
    pub sources: Vec<SourceConfig>,
    /// How an instruction/response pair becomes text.
    #[serde(default)]
    pub template: TemplateSpec,
    /// Longest tokenized example (prompt + response + EOS).
    #[serde(default = "default_max_length")]
    pub max_length: usize,
    /// What to do with an example longer than `max_length`.
    #[serde(default)]
    pub truncation: Truncation,
    /// What to do with a malformed row.
    #[serde(default)]
    pub on_bad_row: OnBadRow,
    /// Drop rows whose instruction + input + response exceed this many characters (the paper
    /// filtered gpt4all v1.3-groovy at 2,000). Counted as skipped `over_max_chars`.
    #[serde(default)]
    pub max_chars: Option<usize>,
    /// Read at most this many rows in all (a quick run on the head of a big dataset).
    #[serde(default)]
    pub max_rows: Option<u64>,
    /// Held-out examples for the evaluation loss: a fraction in (0, 1) or a count.
    #[serde(default)]
    pub eval_split: Option<EvalSplit>,
    /// Pack several examples into each sequence of `max_length` tokens (attention stays inside
    /// each example: see [`crate::Batch`]).
    #[serde(default)]
    pub pack: bool,
    /// Token budget of one batch (rows x padded length); `None`: only the micro-batch size limits.
    #[serde(default)]
    pub max_batch_tokens: Option<usize>,
    /// Put examples of similar length together so that padding stays low.
    #[serde(default = "yes")]
    pub group_by_length: bool,
    /// Shuffle every epoch (from `seed` and the epoch number).
    #[serde(default = "yes")]
    pub shuffle: bool,
    /// Seed of the shuffles and of the held-out split.
    #[serde(default)]
    pub seed: u64,
    /// The token appended to every response; default: the tokenizer's `eos_token`.
    #[serde(default)]
    pub eos_token: Option<String>,
    /// Keep tokenized data on disk (`$SFT_CACHE/data/`) keyed by everything that shapes it.
    #[serde(default = "yes")]
    pub cache: bool,
    /// The folder relative `path` sources are read from (the run config's folder); `None`: the
    /// working folder. Not a key of the YAML.
    #[serde(skip)]
    pub base_dir: Option<std::path::PathBuf>,
}

fn default_max_length() -> usize {
    1024
}
fn yes() -> bool {
    true
}

/// One source: either `path` (a file or a glob) or `hub` (a dataset repository).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    /// A file or a glob (`data/*.jsonl`); a relative one is read from [`DataConfig::base_dir`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// A dataset repository on the Hugging Face hub, `org/name`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hub: Option<String>,
    /// Hub branch, tag or commit (default `main`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,
    /// Hub split: files whose path has this word (`data/train-0000.parquet`); default `train`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub split: Option<String>,
    /// File format; default from the extension (`.jsonl`, `.json`, `.parquet`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<FileFormat>,
    /// Which fields hold what; default: recognise gpt4all, Alpaca and chat rows by their keys.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub columns: Option<Columns>,
}

/// Where a source lives, once validated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceKind<'a> {
    Path(&'a str),
    Hub {
        repo: &'a str,
        revision: &'a str,
        split: &'a str,
    },
}

impl SourceConfig {
    pub fn kind(&self) -> Result<SourceKind<'_>> {
        match (&self.path, &self.hub) {
            (Some(p), None) => {
                if self.revision.is_some() || self.split.is_some() {
                    return Err(DataError::Config(format!(
                        "source `{p}`: `revision` and `split` belong to `hub` sources"
                    )));
                }
                Ok(SourceKind::Path(p))
            }
            (None, Some(h)) => Ok(SourceKind::Hub {
                repo: h,
                revision: self.revision.as_deref().unwrap_or("main"),
                split: self.split.as_deref().unwrap_or("train"),
            }),
            (Some(_), Some(_)) => Err(DataError::Config(
                "a source has both `path` and `hub`; give one".into(),
            )),
            (None, None) => Err(DataError::Config(
                "a source needs `path: GLOB` or `hub: ORG/NAME`".into(),
            )),
        }
    }

    pub fn describe(&self) -> String {
        match self.kind() {
            Ok(SourceKind::Path(p)) => p.to_string(),
            Ok(SourceKind::Hub {
                repo,
                revision,
                split,
            }) => format!("hub:{repo}@{revision}[{split}]"),
            Err(_) => format!("{self:?}"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FileFormat {
    /// One JSON object per line.
    Jsonl,
    /// A JSON array of objects (or, if the file starts with `{`, JSON lines).
    Json,
    /// Parquet, read row group by row group.
    Parquet,
}

impl FileFormat {
    pub fn from_path(path: &std::path::Path) -> Option<FileFormat> {
        match path.extension()?.to_str()?.to_ascii_lowercase().as_str() {
            "jsonl" | "ndjson" => Some(FileFormat::Jsonl),
            "json" => Some(FileFormat::Json),
            "parquet" => Some(FileFormat::Parquet),
            _ => None,
        }
    }
}

/// Field names in the rows. Set `prompt` + `response` (+ optional `input`, `system`), or
/// `messages`. The Alpaca names `instruction` and `output` are accepted for `prompt`/`response`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Columns {
    #[serde(
        default,
        alias = "instruction",
        skip_serializing_if = "Option::is_none"
    )]
    pub prompt: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input: Option<String>,
    #[serde(default, alias = "output", skip_serializing_if = "Option::is_none")]
    pub response: Option<String>,
    /// A list of `{role, content}` (or ShareGPT's `{from, value}`) messages.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub messages: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system: Option<String>,
}

impl Columns {
    fn validate(&self) -> Result<()> {
        match (&self.messages, &self.prompt, &self.response) {
            (Some(_), None, None) if self.input.is_none() => Ok(()),
            (Some(_), _, _) => Err(DataError::Config(
                "columns: `messages` excludes `prompt`, `input` and `response`".into(),
            )),
            (None, Some(_), Some(_)) => Ok(()),
            (None, _, _) => Err(DataError::Config(
                "columns: give `prompt` and `response` (or `instruction` and `output`), or `messages`"
                    .into(),
            )),
        }
    }
}

/// A prompt template: a built-in name or a custom string with `{instruction}`, optional
/// `{input}`, and `{response}` (`{{`/`}}` for literal braces). See [`crate::template`].
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum TemplateSpec {
    /// The paper's modified Alpaca prompt as printed: `{instruction}### Response:` (default).
    #[default]
    AlpacaModified,
    /// The same with the newlines the original Alpaca has: `{instruction}\n\n### Response:\n`.
    AlpacaModifiedNl,
    /// `### Instruction:\n{instruction}\n\n### Response:\n` (no preamble).
    AlpacaInstruction,
    /// The original Stanford Alpaca prompt with its preamble and optional input section.
    Alpaca,
    /// `<|im_start|>user\n…<|im_end|>\n<|im_start|>assistant\n`.
    Chatml,
    /// The model's own chat template (tokenizer_config.json or chat_template.jinja).
    ChatTemplate,
    /// The instruction itself, the response right after it.
    Raw,
    Custom(String),
}

impl TemplateSpec {
    pub const NAMES: [&'static str; 7] = [
        "alpaca_modified",
        "alpaca_modified_nl",
        "alpaca_instruction",
        "alpaca",
        "chatml",
        "chat_template",
        "raw",
    ];
}

impl TryFrom<String> for TemplateSpec {
    type Error = String;
    fn try_from(s: String) -> std::result::Result<Self, String> {
        Ok(match s.as_str() {
            "alpaca_modified" => TemplateSpec::AlpacaModified,
            "alpaca_modified_nl" => TemplateSpec::AlpacaModifiedNl,
            "alpaca_instruction" => TemplateSpec::AlpacaInstruction,
            "alpaca" => TemplateSpec::Alpaca,
            "chatml" => TemplateSpec::Chatml,
            "chat_template" => TemplateSpec::ChatTemplate,
            "raw" => TemplateSpec::Raw,
            _ if s.contains("{response}") => TemplateSpec::Custom(s),
            _ => {
                return Err(format!(
                    "unknown template `{s}`: expected one of {} or a custom string containing \
                     {{instruction}} and {{response}}",
                    TemplateSpec::NAMES.join(", ")
                ))
            }
        })
    }
}

impl From<TemplateSpec> for String {
    fn from(t: TemplateSpec) -> String {
        match t {
            TemplateSpec::AlpacaModified => "alpaca_modified".into(),
            TemplateSpec::AlpacaModifiedNl => "alpaca_modified_nl".into(),
            TemplateSpec::AlpacaInstruction => "alpaca_instruction".into(),
            TemplateSpec::Alpaca => "alpaca".into(),
            TemplateSpec::Chatml => "chatml".into(),
            TemplateSpec::ChatTemplate => "chat_template".into(),
            TemplateSpec::Raw => "raw".into(),
            TemplateSpec::Custom(s) => s,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Truncation {
    /// Leave out examples over `max_length` (counted as skipped `over_max_length`).
    #[default]
    Drop,
    /// Keep the first `max_length` tokens (the response loses its end and its EOS).
    Cut,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnBadRow {
    /// Skip the row and count it by reason (reported in the run summary).
    #[default]
    Skip,
    /// Stop at the first bad row with its file and line.
    Fail,
}

/// Size of the held-out split.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum EvalSplit {
    Count(u64),
    Fraction(f64),
}

impl EvalSplit {
    /// Number of held-out examples out of `n`.
    pub fn count(&self, n: usize) -> Result<usize> {
        let k = match *self {
            EvalSplit::Count(c) => c as usize,
            EvalSplit::Fraction(f) => {
                if !(f > 0.0 && f < 1.0) {
                    return Err(DataError::Config(format!(
                        "eval_split: a fraction must be in (0, 1), got {f}"
                    )));
                }
                ((n as f64) * f).round().max(1.0) as usize
            }
        };
        if n > 0 && k >= n {
            return Err(DataError::Config(format!(
                "eval_split: {k} held-out examples leave none of the {n} kept examples to train on"
            )));
        }
        Ok(k)
    }
}

impl DataConfig {
    /// Parses the `data` section alone (a YAML mapping).
    pub fn from_yaml(text: &str) -> Result<DataConfig> {
        let cfg: DataConfig =
            serde_yaml::from_str(text).map_err(|e| DataError::Config(e.to_string()))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks what serde cannot: one of path/hub per source, sane lengths.
    pub fn validate(&self) -> Result<()> {
        if self.sources.is_empty() {
            return Err(DataError::Config(
                "data.sources: give at least one source".into(),
            ));
        }
        for (i, s) in self.sources.iter().enumerate() {
            s.kind()
                .map_err(|e| DataError::Config(format!("data.sources[{i}]: {e}")))?;
            if let Some(c) = &s.columns {
                c.validate()
                    .map_err(|e| DataError::Config(format!("data.sources[{i}]: {e}")))?;
            }
        }
        if self.max_length < 2 {
            return Err(DataError::Config(format!(
                "data.max_length: must be at least 2, got {}",
                self.max_length
            )));
        }
        if let Some(b) = self.max_batch_tokens {
            if b < self.max_length {
                return Err(DataError::Config(format!(
                    "data.max_batch_tokens ({b}) must be at least data.max_length ({}) so that \
                     every example fits in a batch",
                    self.max_length
                )));
            }
        }
        if let Some(EvalSplit::Fraction(f)) = self.eval_split {
            if !(f > 0.0 && f < 1.0) {
                return Err(DataError::Config(format!(
                    "data.eval_split: a fraction must be in (0, 1), got {f}"
                )));
            }
        }
        Ok(())
    }

    /// The batching options for a micro-batch of `micro_batch` examples (packed rows with
    /// `pack`).
    pub fn batch_options(&self, micro_batch: usize) -> crate::batch::BatchOptions {
        crate::batch::BatchOptions {
            micro_batch,
            max_tokens: self.max_batch_tokens,
            pack_length: self.pack.then_some(self.max_length),
            group_by_length: self.group_by_length,
            shuffle: self.shuffle,
            seed: self.seed,
        }
    }
}

/// Counts by reason, sorted by name.
pub type ReasonCounts = BTreeMap<String, u64>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_documented_keys() {
        let c = DataConfig::from_yaml(
            "sources:\n  - hub: nomic-ai/gpt4all-j-prompt-generations\n    revision: v1.3-groovy\n    split: train\n  - path: 'x/*.jsonl'\n    columns: {instruction: q, output: a}\ntemplate: alpaca_modified\nmax_length: 512\non_bad_row: fail\neval_split: 0.05\n",
        )
        .unwrap();
        assert_eq!(
            c.sources[0].kind().unwrap(),
            SourceKind::Hub {
                repo: "nomic-ai/gpt4all-j-prompt-generations",
                revision: "v1.3-groovy",
                split: "train"
            }
        );
        let cols = c.sources[1].columns.as_ref().unwrap();
        assert_eq!(
            (cols.prompt.as_deref(), cols.response.as_deref()),
            (Some("q"), Some("a"))
        );
        assert_eq!(c.template, TemplateSpec::AlpacaModified);
        assert_eq!((c.max_length, c.on_bad_row), (512, OnBadRow::Fail));
        assert_eq!(c.eval_split, Some(EvalSplit::Fraction(0.05)));
        let d = DataConfig::from_yaml("sources: [{path: a.jsonl}]\neval_split: 200").unwrap();
        assert_eq!(d.eval_split, Some(EvalSplit::Count(200)));
        assert_eq!(
            (d.truncation, d.on_bad_row, d.template.clone()),
            (
                Truncation::Drop,
                OnBadRow::Skip,
                TemplateSpec::AlpacaModified
            )
        );
        let t = DataConfig::from_yaml(
            "sources: [{path: a}]\ntemplate: \"Q: {instruction}\\nA: {response}\"",
        )
        .unwrap();
        assert_eq!(
            t.template,
            TemplateSpec::Custom("Q: {instruction}\nA: {response}".into())
        );
        // Round trip through YAML.
        let back = DataConfig::from_yaml(&serde_yaml::to_string(&c).unwrap()).unwrap();
        assert_eq!(back, c);
    }

    #[test]
    fn refuses_what_it_does_not_know() {
        for (text, needle) in [
            ("sources: [{path: a}]\nmax_lenght: 3", "max_lenght"),
            ("sources: [{pth: a}]", "pth"),
            ("sources: [{path: a, hub: b/c}]", "both"),
            ("sources: [{path: a, revision: x}]", "revision"),
            ("sources: []", "at least one"),
            ("sources: [{path: a}]\ntemplate: alpaka", "alpaka"),
            ("sources: [{path: a}]\ntruncation: chop", "chop"),
            ("sources: [{path: a}]\neval_split: 1.5", "eval_split"),
            (
                "sources: [{path: a}]\nmax_batch_tokens: 10",
                "max_batch_tokens",
            ),
            ("sources: [{path: a, columns: {prompt: q}}]", "columns"),
            (
                "sources: [{path: a, columns: {prompt: q, response: r, messages: m}}]",
                "messages",
            ),
        ] {
            let e = DataConfig::from_yaml(text).unwrap_err().to_string();
            assert!(e.contains(needle), "{text}: {e}");
        }
    }
}
