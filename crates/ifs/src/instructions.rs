//! The IFS instruction set: full instructions and their fragments.
//!
//! The bundled set (`assets/instructions.jsonl`, written for this project) is compiled in;
//! users can pass their own JSONL with lines `{"instruction": ...}` (`id` and `category`
//! optional). Each instruction is evaluated twice, as the paper does: full (I) and as a
//! fragment (Ip), its first words. The cut is deterministic: a fraction in [0.35, 0.65] of the
//! words drawn from a hash of the text, at least two words kept and two cut.
use serde::{Deserialize, Serialize};
use std::path::Path;

const BUNDLED: &str = include_str!("../assets/instructions.jsonl");

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Instruction {
    #[serde(default)]
    pub id: String,
    pub instruction: String,
    #[serde(default)]
    pub category: String,
}

/// Full instruction or fragment.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Full,
    Partial,
}

/// One prompt of the evaluation.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Prompt {
    pub id: String,
    pub kind: Kind,
    pub text: String,
}

#[derive(Debug, thiserror::Error)]
pub enum InstructionError {
    #[error("{file}:{line}: {message}")]
    Bad {
        file: String,
        line: usize,
        message: String,
    },
    #[error("cannot read {file}: {cause}")]
    Io { file: String, cause: std::io::Error },
    #[error("{0}: no instructions")]
    Empty(String),
}

/// Parse JSONL instruction lines; `file` names the source in errors.
pub fn parse(text: &str, file: &str) -> Result<Vec<Instruction>, InstructionError> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let bad = |message: String| InstructionError::Bad {
            file: file.to_string(),
            line: i + 1,
            message,
        };
        let mut ins: Instruction = serde_json::from_str(line)
            .map_err(|e| bad(format!("expected {{\"instruction\": \"...\"}}: {e}")))?;
        if ins.instruction.trim().is_empty() {
            return Err(bad("empty instruction".into()));
        }
        if ins.id.is_empty() {
            ins.id = format!("line-{}", i + 1);
        }
        out.push(ins);
    }
    if out.is_empty() {
        return Err(InstructionError::Empty(file.to_string()));
    }
    Ok(out)
}

/// The bundled instruction set.
pub fn bundled() -> Vec<Instruction> {
    parse(BUNDLED, "assets/instructions.jsonl").unwrap_or_default()
}

/// A user's instruction file.
pub fn load(path: &Path) -> Result<Vec<Instruction>, InstructionError> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| InstructionError::Io {
        file: file.clone(),
        cause: source,
    })?;
    parse(&text, &file)
}

fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// The fragment Ip of an instruction: its first words, cut deterministically.
pub fn fragment(instruction: &str) -> String {
    let words: Vec<&str> = instruction.split_whitespace().collect();
    let n = words.len();
    if n < 2 {
        return words.concat();
    }
    let frac = 0.35 + 0.30 * (fnv1a(instruction) % 1000) as f64 / 999.0;
    // Keep at least two words and cut at least two, where the instruction is long enough.
    let (lo, hi) = if n < 4 { (1, n - 1) } else { (2, n - 2) };
    let keep = ((n as f64 * frac).round() as usize).clamp(lo, hi);
    words[..keep].join(" ")
}

/// Full and partial prompts of the first `limit` instructions (0 = all), full ones first.
pub fn prompts(set: &[Instruction], limit: usize) -> Vec<Prompt> {
    let take = if limit == 0 {
        set.len()
    } else {
        limit.min(set.len())
    };
    let set = &set[..take];
    let full = set.iter().map(|i| Prompt {
        id: i.id.clone(),
        kind: Kind::Full,
        text: i.instruction.trim().to_string(),
    });
    let partial = set.iter().map(|i| Prompt {
        id: i.id.clone(),
        kind: Kind::Partial,
        text: fragment(i.instruction.trim()),
    });
    full.chain(partial).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bundled_set_is_large_and_unique() {
        let set = bundled();
        assert!(set.len() >= 200, "{}", set.len());
        let mut ids: Vec<&str> = set.iter().map(|i| i.id.as_str()).collect();
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), set.len());
    }

    #[test]
    fn fragments_are_deterministic_strict_prefixes() {
        for ins in bundled() {
            let f = fragment(&ins.instruction);
            assert_eq!(f, fragment(&ins.instruction));
            let nf = f.split_whitespace().count();
            let n = ins.instruction.split_whitespace().count();
            assert!(nf >= 2 && nf <= n - 2, "{} -> {}", ins.instruction, f);
            assert!(ins.instruction.starts_with(&f));
        }
        assert_eq!(fragment("Explain photosynthesis"), "Explain");
    }

    #[test]
    fn prompts_hold_both_kinds() {
        let p = prompts(&bundled(), 10);
        assert_eq!(p.len(), 20);
        assert_eq!(p.iter().filter(|x| x.kind == Kind::Partial).count(), 10);
    }

    #[test]
    fn bad_lines_name_file_and_line() {
        let e = parse("{\"instruction\": \"a b c\"}\nnot json\n", "mine.jsonl").unwrap_err();
        assert!(e.to_string().starts_with("mine.jsonl:2:"), "{e}");
        let e = parse("{\"instruction\": \" \"}\n", "x.jsonl").unwrap_err();
        assert!(e.to_string().contains("x.jsonl:1: empty"), "{e}");
    }
}
