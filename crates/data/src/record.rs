//! A row of any supported shape, mapped to one training example: an instruction (plus optional
//! input, system message and earlier turns) and the response that trains.
use serde_json::{Map, Value};

use crate::config::Columns;

/// Why a row was skipped: the keys of [`crate::DataReport::skipped`].
pub mod reason {
    pub const NOT_JSON: &str = "not_json";
    pub const INVALID_UTF8: &str = "invalid_utf8";
    pub const NOT_OBJECT: &str = "not_object";
    pub const MISSING_FIELD: &str = "missing_field";
    pub const NON_STRING_FIELD: &str = "non_string_field";
    pub const EMPTY_INSTRUCTION: &str = "empty_instruction";
    pub const EMPTY_RESPONSE: &str = "empty_response";
    pub const BAD_MESSAGES: &str = "bad_messages";
    /// Not bad input, filters: these never stop a run under `on_bad_row: fail`.
    pub const OVER_MAX_CHARS: &str = "over_max_chars";
    pub const OVER_MAX_LENGTH: &str = "over_max_length";
    pub const PROMPT_OVER_MAX_LENGTH: &str = "prompt_over_max_length";

    /// Whether a reason is a filter rather than malformed input.
    pub fn is_filter(r: &str) -> bool {
        matches!(r, OVER_MAX_CHARS | OVER_MAX_LENGTH | PROMPT_OVER_MAX_LENGTH)
    }
}

/// A malformed row: the reason (one of [`reason`]) and what exactly was wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadRow {
    pub reason: &'static str,
    pub detail: String,
}

impl BadRow {
    pub fn new(reason: &'static str, detail: impl Into<String>) -> Self {
        BadRow {
            reason,
            detail: detail.into(),
        }
    }
}

/// One training example before templating. Only `response` trains.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Record {
    pub system: Option<String>,
    /// Earlier (user, assistant) turns of a conversation, rendered as context.
    pub history: Vec<(String, String)>,
    pub instruction: String,
    /// Alpaca's optional input (context) section.
    pub input: Option<String>,
    pub response: String,
}

impl Record {
    pub fn new(instruction: impl Into<String>, response: impl Into<String>) -> Self {
        Record {
            instruction: instruction.into(),
            response: response.into(),
            ..Default::default()
        }
    }

    /// Characters of the instruction, input and response (the paper's 2,000-character filter).
    pub fn chars(&self) -> usize {
        self.instruction.chars().count()
            + self.input.as_deref().map_or(0, |s| s.chars().count())
            + self.response.chars().count()
    }
}

fn field<'a>(obj: &'a Map<String, Value>, name: &str) -> Result<&'a str, BadRow> {
    match obj.get(name) {
        None | Some(Value::Null) => Err(BadRow::new(
            reason::MISSING_FIELD,
            format!("no field `{name}`"),
        )),
        Some(Value::String(s)) => Ok(s),
        Some(v) => Err(BadRow::new(
            reason::NON_STRING_FIELD,
            format!("field `{name}` is {}, expected a string", kind(v)),
        )),
    }
}

fn optional_field<'a>(obj: &'a Map<String, Value>, name: &str) -> Result<Option<&'a str>, BadRow> {
    match obj.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.is_empty() => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(v) => Err(BadRow::new(
            reason::NON_STRING_FIELD,
            format!("field `{name}` is {}, expected a string", kind(v)),
        )),
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Maps a parsed row to a [`Record`]. Without `columns` the shape is recognised by its keys:
/// `messages`/`conversations` (chat), `instruction` + `output` (Alpaca, optional `input`),
/// `prompt` + `response` (gpt4all).
pub fn to_record(row: &Value, columns: Option<&Columns>) -> Result<Record, BadRow> {
    let obj = match row {
        Value::Object(o) => o,
        v => {
            return Err(BadRow::new(
                reason::NOT_OBJECT,
                format!("the row is {}, expected an object", kind(v)),
            ))
        }
    };
    let record = match columns {
        Some(c) => {
            if let Some(m) = &c.messages {
                from_messages(obj, m, c.system.as_deref())?
            } else {
                // Columns were validated: prompt and response are set.
                let p = c.prompt.as_deref().unwrap_or("prompt");
                let r = c.response.as_deref().unwrap_or("response");
                flat(obj, p, c.input.as_deref(), r, c.system.as_deref())?
            }
        }
        None => {
            if obj.contains_key("messages") {
                from_messages(obj, "messages", Some("system"))?
            } else if obj.contains_key("conversations") {
                from_messages(obj, "conversations", Some("system"))?
            } else if obj.contains_key("instruction") {
                let r = if obj.contains_key("output") {
                    "output"
                } else {
                    "response"
                };
                flat(obj, "instruction", Some("input"), r, Some("system"))?
            } else if obj.contains_key("prompt") {
                let r = if obj.contains_key("response") {
                    "response"
                } else if obj.contains_key("completion") {
                    "completion"
                } else {
                    "response"
                };
                flat(obj, "prompt", None, r, Some("system"))?
            } else {
                return Err(BadRow::new(
                    reason::MISSING_FIELD,
                    "no field `prompt`, `instruction` or `messages` (set `columns` for other names)",
                ));
            }
        }
    };
    if record.instruction.trim().is_empty() {
        return Err(BadRow::new(
            reason::EMPTY_INSTRUCTION,
            "the instruction is empty",
        ));
    }
    if record.response.trim().is_empty() {
        return Err(BadRow::new(reason::EMPTY_RESPONSE, "the response is empty"));
    }
    Ok(record)
}

fn flat(
    obj: &Map<String, Value>,
    prompt: &str,
    input: Option<&str>,
    response: &str,
    system: Option<&str>,
) -> Result<Record, BadRow> {
    let instruction = field(obj, prompt)?.to_string();
    let response = field(obj, response)?.to_string();
    let input = match input {
        Some(k) => optional_field(obj, k)?.map(str::to_string),
        None => None,
    };
    let system = match system {
        Some(k) => optional_field(obj, k)?.map(str::to_string),
        None => None,
    };
    Ok(Record {
        system,
        history: Vec::new(),
        instruction,
        input,
        response,
    })
}

#[derive(PartialEq, Eq, Clone, Copy)]
enum Role {
    System,
    User,
    Assistant,
}

fn role_of(s: &str) -> Option<Role> {
    match s.to_ascii_lowercase().as_str() {
        "system" => Some(Role::System),
        "user" | "human" | "prompter" => Some(Role::User),
        "assistant" | "gpt" | "bot" | "model" => Some(Role::Assistant),
        _ => None,
    }
}

/// A conversation: an optional system message, then user/assistant turns alternating, ending
/// on the assistant. The last assistant message trains; earlier turns are context.
fn from_messages(
    obj: &Map<String, Value>,
    key: &str,
    system_key: Option<&str>,
) -> Result<Record, BadRow> {
    let list = match obj.get(key) {
        None | Some(Value::Null) => {
            return Err(BadRow::new(
                reason::MISSING_FIELD,
                format!("no field `{key}`"),
            ))
        }
        Some(Value::Array(a)) => a,
        Some(v) => {
            return Err(BadRow::new(
                reason::BAD_MESSAGES,
                format!("field `{key}` is {}, expected a list of messages", kind(v)),
            ))
        }
    };
    let mut system = match system_key {
        Some(k) => optional_field(obj, k)?.map(str::to_string),
        None => None,
    };
    let mut turns: Vec<(Role, String)> = Vec::with_capacity(list.len());
    for (i, m) in list.iter().enumerate() {
        let m = m.as_object().ok_or_else(|| {
            BadRow::new(
                reason::BAD_MESSAGES,
                format!("{key}[{i}] is {}, expected an object", kind(m)),
            )
        })?;
        let role_key = if m.contains_key("role") {
            "role"
        } else {
            "from"
        };
        let content_key = ["content", "value", "text"]
            .into_iter()
            .find(|k| m.contains_key(*k))
            .unwrap_or("content");
        let role_name = field(m, role_key).map_err(|e| in_message(e, key, i))?;
        let role = role_of(role_name).ok_or_else(|| {
            BadRow::new(
                reason::BAD_MESSAGES,
                format!(
                    "{key}[{i}]: unknown role `{role_name}` (expected system, user or assistant)"
                ),
            )
        })?;
        let content = field(m, content_key).map_err(|e| in_message(e, key, i))?;
        turns.push((role, content.to_string()));
    }
    let mut it = turns.into_iter().peekable();
    if let Some((Role::System, _)) = it.peek() {
        let (_, s) = it.next().unwrap_or((Role::System, String::new()));
        system = Some(s);
    }
    let rest: Vec<(Role, String)> = it.collect();
    if rest.len() < 2 || !rest.len().is_multiple_of(2) {
        return Err(BadRow::new(
            reason::BAD_MESSAGES,
            format!(
                "{key}: expected user/assistant pairs ending on the assistant, got {} message(s) after the system message",
                rest.len()
            ),
        ));
    }
    let mut pairs = Vec::with_capacity(rest.len() / 2);
    for (j, pair) in rest.chunks(2).enumerate() {
        if pair[0].0 != Role::User || pair[1].0 != Role::Assistant {
            return Err(BadRow::new(
                reason::BAD_MESSAGES,
                format!("{key}: turn {j} is not a user message followed by an assistant message"),
            ));
        }
        pairs.push((pair[0].1.clone(), pair[1].1.clone()));
    }
    let (instruction, response) = pairs.pop().unwrap_or_default();
    Ok(Record {
        system,
        history: pairs,
        instruction,
        input: None,
        response,
    })
}

fn in_message(e: BadRow, key: &str, i: usize) -> BadRow {
    BadRow::new(e.reason, format!("{key}[{i}]: {}", e.detail))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn recognises_shapes() {
        let g = to_record(
            &json!({"prompt": "p", "response": "r", "source": "x"}),
            None,
        )
        .unwrap();
        assert_eq!(g, Record::new("p", "r"));
        let a = to_record(
            &json!({"instruction": "i", "input": "ctx", "output": "o"}),
            None,
        )
        .unwrap();
        assert_eq!(a.instruction, "i");
        assert_eq!(a.input.as_deref(), Some("ctx"));
        assert_eq!(a.response, "o");
        let a = to_record(
            &json!({"instruction": "i", "input": "", "output": "o"}),
            None,
        )
        .unwrap();
        assert_eq!(a.input, None);
        let c = to_record(
            &json!({"messages": [
                {"role": "system", "content": "sys"},
                {"role": "user", "content": "u1"},
                {"role": "assistant", "content": "a1"},
                {"role": "user", "content": "u2"},
                {"role": "assistant", "content": "a2"}]}),
            None,
        )
        .unwrap();
        assert_eq!(c.system.as_deref(), Some("sys"));
        assert_eq!(c.history, vec![("u1".to_string(), "a1".to_string())]);
        assert_eq!((c.instruction.as_str(), c.response.as_str()), ("u2", "a2"));
        let s = to_record(
            &json!({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}),
            None,
        )
        .unwrap();
        assert_eq!(s, Record::new("q", "a"));
    }

    #[test]
    fn user_named_columns() {
        let cols = Columns {
            prompt: Some("question".into()),
            response: Some("answer".into()),
            input: Some("context".into()),
            ..Default::default()
        };
        let r = to_record(
            &json!({"question": "q", "answer": "a", "context": "c"}),
            Some(&cols),
        )
        .unwrap();
        assert_eq!(r.input.as_deref(), Some("c"));
        let e = to_record(&json!({"question": "q", "response": "a"}), Some(&cols)).unwrap_err();
        assert_eq!(e.reason, reason::MISSING_FIELD);
        assert!(e.detail.contains("`answer`"), "{}", e.detail);
        let cols = Columns {
            messages: Some("dialog".into()),
            ..Default::default()
        };
        let r = to_record(
            &json!({"dialog": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}),
            Some(&cols),
        )
        .unwrap();
        assert_eq!(r, Record::new("q", "a"));
    }

    #[test]
    fn bad_rows_have_reasons() {
        let cases = [
            (json!({"prompt": "p"}), reason::MISSING_FIELD),
            (
                json!({"prompt": "p", "response": null}),
                reason::MISSING_FIELD,
            ),
            (
                json!({"prompt": "p", "response": 3}),
                reason::NON_STRING_FIELD,
            ),
            (
                json!({"prompt": ["p"], "response": "r"}),
                reason::NON_STRING_FIELD,
            ),
            (
                json!({"prompt": "p", "response": "  "}),
                reason::EMPTY_RESPONSE,
            ),
            (
                json!({"prompt": "", "response": "r"}),
                reason::EMPTY_INSTRUCTION,
            ),
            (json!([1, 2]), reason::NOT_OBJECT),
            (json!({"text": "t"}), reason::MISSING_FIELD),
            (json!({"messages": "hi"}), reason::BAD_MESSAGES),
            (
                json!({"messages": [{"role": "user", "content": "q"}]}),
                reason::BAD_MESSAGES,
            ),
            (
                json!({"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}]}),
                reason::BAD_MESSAGES,
            ),
            (
                json!({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": 1}]}),
                reason::NON_STRING_FIELD,
            ),
            (
                json!({"messages": [{"role": "user", "content": "q"}, {"role": "wizard", "content": "a"}]}),
                reason::BAD_MESSAGES,
            ),
            (
                json!({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]}),
                reason::EMPTY_RESPONSE,
            ),
        ];
        for (row, want) in cases {
            let got = to_record(&row, None).unwrap_err();
            assert_eq!(got.reason, want, "{row}: {}", got.detail);
        }
    }
}
