//! Prompt templates: how a [`Record`] becomes a prompt text and a response text.
//!
//! The response text (what trains) is the response itself plus the template's end marker, if it
//! has one (`<|im_end|>` in ChatML); the tokenizer's EOS token follows it unless that marker is
//! already the EOS token. The built-in templates, byte for byte (`I` instruction, `N` input,
//! `R` response):
//!
//! | name | prompt without input | prompt with input | response |
//! |---|---|---|---|
//! | `alpaca_modified` (default) | `I### Response:` | `I\n\nN### Response:` | `R` |
//! | `alpaca_modified_nl` | `I\n\n### Response:\n` | `I\n\nN\n\n### Response:\n` | `R` |
//! | `alpaca_instruction` | `### Instruction:\nI\n\n### Response:\n` | `### Instruction:\nI\n\n### Input:\nN\n\n### Response:\n` | `R` |
//! | `alpaca` | preamble + `\n\n### Instruction:\nI\n\n### Response:\n` | preamble (with input) + `\n\n### Instruction:\nI\n\n### Input:\nN\n\n### Response:\n` | `R` |
//! | `chatml` | `<\|im_start\|>user\nI<\|im_end\|>\n<\|im_start\|>assistant\n` | `I` becomes `I\n\nN` | `R<\|im_end\|>` |
//! | `raw` | `I` | `I\n\nN` | `R` |
//!
//! `alpaca_modified` is the paper's modified Alpaca prompt exactly as printed in section 5.3 (no
//! preamble, no `### Instruction:` header, nothing between the instruction and `### Response:`);
//! `alpaca_modified_nl` restores the newlines the original Alpaca prompt has, in case the printed
//! text lost them. A custom template is a string with `{instruction}`, optional `{input}` and
//! `{response}` (`{{`/`}}` for braces): the prompt is what precedes `{response}`, and what follows
//! it trains with the response. Templates without an input slot join the input to the
//! instruction as `I\n\nN`.
//!
//! Context: a system message becomes `S\n\n` before the prompt (ChatML and chat templates have
//! their own system turn); earlier turns of a conversation are rendered with the same template,
//! each as prompt + response + `\n\n` (ChatML: complete turns), and do not train.
//!
//! `chat_template` renders the model's own Jinja chat template (from `tokenizer_config.json` or
//! `chat_template.jinja`) with minijinja the way `transformers` does (`trim_blocks`,
//! `lstrip_blocks`, `add_generation_prompt`): the prompt is the conversation up to the
//! generation prompt, the response is the rest of the full rendering, cut after the last EOS.
use std::path::Path;

use minijinja::value::Value as JValue;
use minijinja::{Environment, ErrorKind};

use crate::config::TemplateSpec;
use crate::error::{DataError, Result};
use crate::record::Record;

const ALPACA_PREAMBLE: &str = "Below is an instruction that describes a task. Write a response that appropriately completes the request.";
const ALPACA_PREAMBLE_INPUT: &str = "Below is an instruction that describes a task, paired with an input that provides further context. Write a response that appropriately completes the request.";
const IM_START: &str = "<|im_start|>";
const IM_END: &str = "<|im_end|>";

/// A rendered example.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendered {
    /// Everything the model reads before it answers; never trains.
    pub prompt: String,
    /// The trained text: the response (plus the template's end marker).
    pub response: String,
    /// Whether the tokenizer's EOS token follows the response text.
    pub append_eos: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    Text(String),
    Instruction,
    Input,
}

#[derive(Debug, Clone)]
enum Kind {
    Builtin(TemplateSpec),
    Custom {
        prompt: Vec<Piece>,
        suffix: String,
        has_input: bool,
    },
    Chat(Box<Environment<'static>>),
}

/// A prompt template ready to render. Build it once; rendering is cheap.
#[derive(Debug, Clone)]
pub struct Template {
    spec: TemplateSpec,
    kind: Kind,
    eos_token: String,
    /// The chat template's source, when `chat_template` (part of the cache key).
    chat_source: Option<String>,
}

impl Template {
    /// `eos_token` is the text of the tokenizer's EOS token; `chat_template` the model's Jinja
    /// source (needed for [`TemplateSpec::ChatTemplate`] only); `bos_token` is passed to it.
    pub fn new(
        spec: &TemplateSpec,
        eos_token: &str,
        bos_token: Option<&str>,
        chat_template: Option<&str>,
    ) -> Result<Template> {
        let kind = match spec {
            TemplateSpec::Custom(s) => parse_custom(s)?,
            TemplateSpec::ChatTemplate => {
                let source = chat_template.ok_or_else(|| {
                    DataError::Template(
                        "`chat_template` needs the model's chat template (tokenizer_config.json \
                         `chat_template` or chat_template.jinja next to tokenizer.json)"
                            .into(),
                    )
                })?;
                Kind::Chat(Box::new(chat_env(source, eos_token, bos_token)?))
            }
            other => Kind::Builtin(other.clone()),
        };
        Ok(Template {
            spec: spec.clone(),
            kind,
            eos_token: eos_token.to_string(),
            chat_source: match spec {
                TemplateSpec::ChatTemplate => chat_template.map(str::to_string),
                _ => None,
            },
        })
    }

    pub fn spec(&self) -> &TemplateSpec {
        &self.spec
    }

    /// Text that identifies this template's output (for cache keys).
    pub fn fingerprint(&self) -> String {
        format!(
            "{}|{}",
            String::from(self.spec.clone()),
            self.chat_source.as_deref().unwrap_or("")
        )
    }

    /// The prompt for a bare instruction, exactly as training renders it: what the evaluators
    /// give the model so that their prompts match the tuned format.
    pub fn render_prompt(&self, instruction: &str) -> Result<String> {
        self.render_prompt_of(&Record::new(instruction, ""))
    }

    /// The prompt part of a record (system, earlier turns, instruction, input).
    pub fn render_prompt_of(&self, r: &Record) -> Result<String> {
        match &self.kind {
            Kind::Chat(env) => chat_render(env, r, false).map(|(p, _)| p),
            _ => Ok(self.render_flat(r).0),
        }
    }

    /// Prompt and response of a record.
    pub fn render(&self, r: &Record) -> Result<Rendered> {
        match &self.kind {
            Kind::Chat(env) => {
                let (prompt, full) = chat_render(env, r, true)?;
                let full = full.unwrap_or_default();
                let Some(rest) = full.strip_prefix(&prompt) else {
                    return Err(DataError::Template(format!(
                        "the chat template's rendering of a conversation does not start with its \
                         rendering up to the generation prompt, so the response cannot be \
                         separated (prompt: {prompt:?}, full: {full:?})"
                    )));
                };
                let (response, append_eos) = match rest.rfind(&self.eos_token) {
                    Some(i) if !self.eos_token.is_empty() => {
                        (rest[..i + self.eos_token.len()].to_string(), false)
                    }
                    _ => (rest.to_string(), true),
                };
                Ok(Rendered {
                    prompt,
                    response,
                    append_eos,
                })
            }
            _ => {
                let (prompt, suffix) = self.render_flat(r);
                let response = format!("{}{suffix}", r.response);
                let append_eos =
                    self.eos_token.is_empty() || !response.ends_with(self.eos_token.as_str());
                Ok(Rendered {
                    prompt,
                    response,
                    append_eos,
                })
            }
        }
    }

    /// (prompt, response suffix) of the non-Jinja templates.
    fn render_flat(&self, r: &Record) -> (String, &str) {
        let mut out = String::with_capacity(r.instruction.len() + r.response.len() + 64);
        if matches!(self.kind, Kind::Builtin(TemplateSpec::Chatml)) {
            if let Some(s) = &r.system {
                push_chatml(&mut out, "system", s);
            }
            for (u, a) in &r.history {
                push_chatml(&mut out, "user", u);
                push_chatml(&mut out, "assistant", a);
            }
            push_chatml(
                &mut out,
                "user",
                &joined(&r.instruction, r.input.as_deref()),
            );
            out.push_str(IM_START);
            out.push_str("assistant\n");
            return (out, IM_END);
        }
        if let Some(s) = &r.system {
            out.push_str(s);
            out.push_str("\n\n");
        }
        let suffix = self.suffix();
        for (u, a) in &r.history {
            self.push_prompt(&mut out, u, None);
            out.push_str(a);
            out.push_str(suffix);
            out.push_str("\n\n");
        }
        self.push_prompt(&mut out, &r.instruction, r.input.as_deref());
        (out, suffix)
    }

    fn suffix(&self) -> &str {
        match &self.kind {
            Kind::Custom { suffix, .. } => suffix,
            _ => "",
        }
    }

    fn push_prompt(&self, out: &mut String, i: &str, input: Option<&str>) {
        let spec = match &self.kind {
            Kind::Builtin(s) => s,
            Kind::Custom {
                prompt, has_input, ..
            } => {
                for p in prompt {
                    match p {
                        Piece::Text(t) => out.push_str(t),
                        Piece::Instruction if *has_input => out.push_str(i),
                        Piece::Instruction => out.push_str(&joined(i, input)),
                        Piece::Input => out.push_str(input.unwrap_or("")),
                    }
                }
                return;
            }
            Kind::Chat(_) => unreachable!("chat templates render through minijinja"),
        };
        match (spec, input) {
            (TemplateSpec::AlpacaModified, None) => {
                out.push_str(i);
                out.push_str("### Response:");
            }
            (TemplateSpec::AlpacaModified, Some(n)) => {
                out.push_str(i);
                out.push_str("\n\n");
                out.push_str(n);
                out.push_str("### Response:");
            }
            (TemplateSpec::AlpacaModifiedNl, None) => {
                out.push_str(i);
                out.push_str("\n\n### Response:\n");
            }
            (TemplateSpec::AlpacaModifiedNl, Some(n)) => {
                out.push_str(i);
                out.push_str("\n\n");
                out.push_str(n);
                out.push_str("\n\n### Response:\n");
            }
            (TemplateSpec::AlpacaInstruction | TemplateSpec::Alpaca, _) => {
                if *spec == TemplateSpec::Alpaca {
                    out.push_str(if input.is_some() {
                        ALPACA_PREAMBLE_INPUT
                    } else {
                        ALPACA_PREAMBLE
                    });
                    out.push_str("\n\n");
                }
                out.push_str("### Instruction:\n");
                out.push_str(i);
                if let Some(n) = input {
                    out.push_str("\n\n### Input:\n");
                    out.push_str(n);
                }
                out.push_str("\n\n### Response:\n");
            }
            (TemplateSpec::Raw, _) => out.push_str(&joined(i, input)),
            (TemplateSpec::Chatml | TemplateSpec::ChatTemplate | TemplateSpec::Custom(_), _) => {
                unreachable!("handled by the caller")
            }
        }
    }
}

fn joined(instruction: &str, input: Option<&str>) -> String {
    match input {
        Some(n) => format!("{instruction}\n\n{n}"),
        None => instruction.to_string(),
    }
}

fn push_chatml(out: &mut String, role: &str, content: &str) {
    out.push_str(IM_START);
    out.push_str(role);
    out.push('\n');
    out.push_str(content);
    out.push_str(IM_END);
    out.push('\n');
}

fn parse_custom(s: &str) -> Result<Kind> {
    let mut pieces = Vec::new();
    let mut text = String::new();
    let mut chars = s.char_indices().peekable();
    let mut response_at: Option<usize> = None;
    let (mut n_instr, mut n_input) = (0, 0);
    while let Some((pos, c)) = chars.next() {
        match c {
            '{' if chars.peek().map(|p| p.1) == Some('{') => {
                chars.next();
                text.push('{');
            }
            '}' if chars.peek().map(|p| p.1) == Some('}') => {
                chars.next();
                text.push('}');
            }
            '{' => {
                let rest = &s[pos + 1..];
                let end = rest.find('}').ok_or_else(|| {
                    DataError::Template(format!("custom template: unclosed `{{` at byte {pos}"))
                })?;
                let name = &rest[..end];
                for _ in 0..=end {
                    chars.next();
                }
                if !text.is_empty() {
                    pieces.push(Piece::Text(std::mem::take(&mut text)));
                }
                match name {
                    "instruction" => {
                        n_instr += 1;
                        pieces.push(Piece::Instruction)
                    }
                    "input" => {
                        n_input += 1;
                        pieces.push(Piece::Input)
                    }
                    "response" => {
                        if response_at.is_some() {
                            return Err(DataError::Template(
                                "custom template: `{response}` appears twice".into(),
                            ));
                        }
                        response_at = Some(pieces.len());
                    }
                    other => {
                        return Err(DataError::Template(format!(
                            "custom template: unknown placeholder `{{{other}}}` (expected \
                             {{instruction}}, {{input}} or {{response}}; write {{{{ for a brace)"
                        )))
                    }
                }
            }
            '}' => {
                return Err(DataError::Template(format!(
                    "custom template: lone `}}` at byte {pos} (write }}}} for a brace)"
                )))
            }
            c => text.push(c),
        }
    }
    if !text.is_empty() {
        pieces.push(Piece::Text(text));
    }
    let at = response_at
        .ok_or_else(|| DataError::Template("custom template: no `{response}`".into()))?;
    if n_instr != 1 || n_input > 1 {
        return Err(DataError::Template(
            "custom template: `{instruction}` must appear once and `{input}` at most once".into(),
        ));
    }
    let after = pieces.split_off(at);
    let mut suffix = String::new();
    for p in after {
        match p {
            Piece::Text(t) => suffix.push_str(&t),
            _ => {
                return Err(DataError::Template(
                    "custom template: `{instruction}` and `{input}` must come before `{response}`"
                        .into(),
                ))
            }
        }
    }
    Ok(Kind::Custom {
        prompt: pieces,
        suffix,
        has_input: n_input == 1,
    })
}

/// A minijinja environment set up like `transformers`' chat-template rendering.
fn chat_env(source: &str, eos: &str, bos: Option<&str>) -> Result<Environment<'static>> {
    let mut env = Environment::new();
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.add_function(
        "raise_exception",
        |msg: String| -> std::result::Result<JValue, minijinja::Error> {
            Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
        },
    );
    env.add_global("eos_token", eos.to_string());
    env.add_global("bos_token", bos.unwrap_or("").to_string());
    env.set_unknown_method_callback(py_method);
    env.add_template_owned("chat", source.to_string())
        .map_err(|e| DataError::Template(format!("chat template does not parse: {e}")))?;
    Ok(env)
}

/// The few Python string/dict methods that Hugging Face chat templates call.
fn py_method(
    _state: &minijinja::State,
    value: &JValue,
    method: &str,
    args: &[JValue],
) -> std::result::Result<JValue, minijinja::Error> {
    let arg_str = |i: usize| args.get(i).and_then(|a| a.as_str().map(str::to_string));
    if let Some(s) = value.as_str() {
        let chars = arg_str(0);
        let pat = |c: char| match &chars {
            Some(set) => set.contains(c),
            None => c.is_whitespace(),
        };
        return Ok(match method {
            "strip" => JValue::from(s.trim_matches(pat)),
            "lstrip" => JValue::from(s.trim_start_matches(pat)),
            "rstrip" => JValue::from(s.trim_end_matches(pat)),
            "startswith" => JValue::from(s.starts_with(arg_str(0).unwrap_or_default().as_str())),
            "endswith" => JValue::from(s.ends_with(arg_str(0).unwrap_or_default().as_str())),
            "upper" => JValue::from(s.to_uppercase()),
            "lower" => JValue::from(s.to_lowercase()),
            "replace" => JValue::from(s.replace(
                arg_str(0).unwrap_or_default().as_str(),
                arg_str(1).unwrap_or_default().as_str(),
            )),
            "split" => match arg_str(0) {
                Some(sep) => JValue::from(
                    s.split(sep.as_str())
                        .map(str::to_string)
                        .collect::<Vec<_>>(),
                ),
                None => JValue::from(s.split_whitespace().map(str::to_string).collect::<Vec<_>>()),
            },
            _ => return Err(minijinja::Error::from(ErrorKind::UnknownMethod)),
        });
    }
    if value.kind() == minijinja::value::ValueKind::Map {
        let keys: Vec<JValue> = value.try_iter()?.collect();
        return Ok(match method {
            "keys" => JValue::from(keys),
            "values" => JValue::from(
                keys.iter()
                    .map(|k| value.get_item(k))
                    .collect::<std::result::Result<Vec<_>, _>>()?,
            ),
            "items" => JValue::from(
                keys.iter()
                    .map(|k| Ok(JValue::from(vec![k.clone(), value.get_item(k)?])))
                    .collect::<std::result::Result<Vec<_>, minijinja::Error>>()?,
            ),
            "get" => {
                let v = value.get_item(args.first().unwrap_or(&JValue::UNDEFINED))?;
                if v.is_undefined() {
                    args.get(1).cloned().unwrap_or(JValue::from(()))
                } else {
                    v
                }
            }
            _ => return Err(minijinja::Error::from(ErrorKind::UnknownMethod)),
        });
    }
    Err(minijinja::Error::from(ErrorKind::UnknownMethod))
}

#[derive(serde::Serialize)]
struct Msg<'a> {
    role: &'a str,
    content: &'a str,
}

/// Renders (prompt with the generation prompt, and if `full`, the whole conversation).
fn chat_render(
    env: &Environment<'static>,
    r: &Record,
    full: bool,
) -> Result<(String, Option<String>)> {
    let user = joined(&r.instruction, r.input.as_deref());
    let mut msgs = Vec::with_capacity(2 * r.history.len() + 3);
    if let Some(s) = &r.system {
        msgs.push(Msg {
            role: "system",
            content: s,
        });
    }
    for (u, a) in &r.history {
        msgs.push(Msg {
            role: "user",
            content: u,
        });
        msgs.push(Msg {
            role: "assistant",
            content: a,
        });
    }
    msgs.push(Msg {
        role: "user",
        content: &user,
    });
    let tmpl = env
        .get_template("chat")
        .map_err(|e| DataError::Template(e.to_string()))?;
    let run = |msgs: &[Msg], gen: bool| {
        tmpl.render(minijinja::context! { messages => msgs, add_generation_prompt => gen })
            .map_err(|e| DataError::Template(format!("chat template: {e}")))
    };
    let prompt = run(&msgs, true)?;
    let whole = if full {
        msgs.push(Msg {
            role: "assistant",
            content: &r.response,
        });
        Some(run(&msgs, false)?)
    } else {
        None
    };
    Ok((prompt, whole))
}

/// The model's chat template: `chat_template.jinja` next to the tokenizer, else the
/// `chat_template` of `tokenizer_config.json` (a string, or a list of named templates whose
/// `default` is taken).
pub fn load_chat_template(
    tokenizer_config: Option<&Path>,
    jinja_file: Option<&Path>,
) -> Result<Option<String>> {
    if let Some(p) = jinja_file {
        if p.is_file() {
            return std::fs::read_to_string(p)
                .map(Some)
                .map_err(|e| DataError::io(p, e));
        }
    }
    let Some(p) = tokenizer_config else {
        return Ok(None);
    };
    if !p.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(p).map_err(|e| DataError::io(p, e))?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| DataError::Format {
        path: p.to_path_buf(),
        detail: format!("not JSON: {e}"),
    })?;
    Ok(match v.get("chat_template") {
        Some(serde_json::Value::String(s)) => Some(s.clone()),
        Some(serde_json::Value::Array(list)) => list
            .iter()
            .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
            .or_else(|| list.first())
            .and_then(|t| t.get("template"))
            .and_then(|t| t.as_str())
            .map(str::to_string),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(spec: TemplateSpec) -> Template {
        Template::new(&spec, "</s>", Some("<s>"), None).unwrap()
    }

    fn with_input() -> Record {
        Record {
            input: Some("N".into()),
            ..Record::new("I", "R")
        }
    }

    #[test]
    fn builtin_renderings_are_byte_exact() {
        let plain = Record::new("I", "R");
        let cases: [(TemplateSpec, &str, &str); 6] = [
            (TemplateSpec::AlpacaModified, "I### Response:", "I\n\nN### Response:"),
            (
                TemplateSpec::AlpacaModifiedNl,
                "I\n\n### Response:\n",
                "I\n\nN\n\n### Response:\n",
            ),
            (
                TemplateSpec::AlpacaInstruction,
                "### Instruction:\nI\n\n### Response:\n",
                "### Instruction:\nI\n\n### Input:\nN\n\n### Response:\n",
            ),
            (
                TemplateSpec::Alpaca,
                "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n### Instruction:\nI\n\n### Response:\n",
                "Below is an instruction that describes a task, paired with an input that provides further context. Write a response that appropriately completes the request.\n\n### Instruction:\nI\n\n### Input:\nN\n\n### Response:\n",
            ),
            (
                TemplateSpec::Chatml,
                "<|im_start|>user\nI<|im_end|>\n<|im_start|>assistant\n",
                "<|im_start|>user\nI\n\nN<|im_end|>\n<|im_start|>assistant\n",
            ),
            (TemplateSpec::Raw, "I", "I\n\nN"),
        ];
        for (spec, p, pi) in cases {
            let tm = t(spec.clone());
            let r = tm.render(&plain).unwrap();
            assert_eq!(r.prompt, p, "{spec:?}");
            assert_eq!(tm.render_prompt("I").unwrap(), p, "{spec:?}");
            assert_eq!(tm.render(&with_input()).unwrap().prompt, pi, "{spec:?}");
            let want_resp = if spec == TemplateSpec::Chatml {
                "R<|im_end|>"
            } else {
                "R"
            };
            assert_eq!(r.response, want_resp);
            assert!(r.append_eos);
        }
        // ChatML with <|im_end|> as the EOS: the marker is the EOS, nothing more is appended.
        let tm = Template::new(&TemplateSpec::Chatml, "<|im_end|>", None, None).unwrap();
        assert!(!tm.render(&plain).unwrap().append_eos);
    }

    #[test]
    fn context_rendering() {
        let r = Record {
            system: Some("S".into()),
            history: vec![("u1".into(), "a1".into())],
            ..Record::new("I", "R")
        };
        assert_eq!(
            t(TemplateSpec::AlpacaModified).render(&r).unwrap().prompt,
            "S\n\nu1### Response:a1\n\nI### Response:"
        );
        assert_eq!(
            t(TemplateSpec::Chatml).render(&r).unwrap().prompt,
            "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nu1<|im_end|>\n<|im_start|>assistant\na1<|im_end|>\n<|im_start|>user\nI<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn custom_templates() {
        let tm = t(TemplateSpec::Custom(
            "Q: {instruction}{{x}}\nA: {response}\n--".into(),
        ));
        let r = tm.render(&Record::new("I", "R")).unwrap();
        assert_eq!(r.prompt, "Q: I{x}\nA: ");
        assert_eq!(r.response, "R\n--");
        // No input slot: the input joins the instruction.
        assert_eq!(
            tm.render(&with_input()).unwrap().prompt,
            "Q: I\n\nN{x}\nA: "
        );
        let tm = t(TemplateSpec::Custom(
            "{instruction}|{input}|{response}".into(),
        ));
        assert_eq!(tm.render(&with_input()).unwrap().prompt, "I|N|");
        assert_eq!(tm.render(&Record::new("I", "R")).unwrap().prompt, "I||");
        for bad in [
            "{instruction}",
            "{response}",
            "{instruction}{response}{response}",
            "{response}{instruction}",
            "{instruction}{prompt}{response}",
            "{instruction} } {response}",
            "{instruction {response}",
        ] {
            let spec = TemplateSpec::Custom(bad.into());
            assert!(Template::new(&spec, "</s>", None, None).is_err(), "{bad}");
        }
        // Ending with the EOS text: not appended twice.
        let tm = t(TemplateSpec::Custom("{instruction}\n{response}</s>".into()));
        assert!(!tm.render(&Record::new("I", "R")).unwrap().append_eos);
    }

    #[test]
    fn chat_template_splits_at_the_generation_prompt() {
        let src = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nBe kind<|im_end|>\\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'].strip() + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";
        let tm = Template::new(&TemplateSpec::ChatTemplate, "<|im_end|>", None, Some(src)).unwrap();
        let r = tm.render(&Record::new(" I ", "R")).unwrap();
        assert_eq!(
            r.prompt,
            "<|im_start|>system\nBe kind<|im_end|>\n<|im_start|>user\nI<|im_end|>\n<|im_start|>assistant\n"
        );
        assert_eq!(r.response, "R<|im_end|>");
        assert!(!r.append_eos);
        assert_eq!(tm.render_prompt(" I ").unwrap(), r.prompt);
        // A template that raises.
        let bad = "{{ raise_exception('no') }}";
        let tm = Template::new(&TemplateSpec::ChatTemplate, "</s>", None, Some(bad)).unwrap();
        assert!(tm.render(&Record::new("I", "R")).is_err());
        assert!(Template::new(&TemplateSpec::ChatTemplate, "</s>", None, None).is_err());
    }
}
