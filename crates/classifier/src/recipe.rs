//! The tone classifier's training data, by the paper's recipe (arXiv 2307.03692, §3.2) plus the
//! failure shapes real base models produce.
//!
//! Each instruction I and its response R are joined and cut: R alone is answer-like (1); the
//! continuation Ic of a cut instruction, and Ic followed by R, are continuation-like (0). The
//! classifier sees the text alone, as in the paper. Added, as continuation-like: an empty
//! answer, the Alpaca template continued (`### Instruction:` again, or a `{next}### Response:`
//! turn), `### Response:` echoed, a list of further questions, one line repeated or an empty list
//! skeleton, and the start of a next instruction (another instruction, or requirements of a
//! response: "The response must ...", "The task is to ..."). Added, as answer-like: R cut to a
//! word budget (what `max_new_tokens` leaves of an answer), the (Ip, R) case of the paper, a reply
//! asking for the rest of a cut-off question (or what is wanted), and R in other answer forms: a
//! list, a text quoting the instruction or a sentence and its revision, or stating its final line
//! twice, and a short final answer. Every random choice comes from a generator seeded by the config's seed and
//! the pair's own text, so a pair gives the same examples whatever else is in the set.
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::sources::Pair;

/// The kind of text an example is; its label follows from it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Shape {
    /// R: the response (1).
    Response,
    /// R cut after a number of words, as a generation budget leaves it (1).
    ResponseTruncated,
    /// A reply to a fragment Ip asking for the rest of the question (1).
    Clarification,
    /// R laid out as a list: its sentences as numbered or bulleted items (1).
    ResponseList,
    /// An answer that quotes the instruction, or a sentence and its revision, or restates its
    /// final line once (1): quoting is not repeating.
    ResponseQuoting,
    /// A short final answer, under eight words (1).
    ResponseShort,
    /// Ic: the rest of a cut instruction (0).
    Continuation,
    /// Ic + R: the rest of the instruction, then the answer (0).
    ContinuationResponse,
    /// Another instruction: the model starts the next turn (0).
    NextInstruction,
    /// Nothing, or whitespace (0).
    Empty,
    /// The Alpaca template continued: `### Instruction:` or a new `### Response:` turn (0).
    TemplateContinued,
    /// `### Response:` echoed at the start (0).
    ResponseEcho,
    /// A list of further questions (0).
    QuestionList,
    /// One line over and over (0).
    RepeatedLine,
}

impl Shape {
    pub fn label(self) -> u8 {
        match self {
            Shape::Response
            | Shape::ResponseTruncated
            | Shape::Clarification
            | Shape::ResponseList
            | Shape::ResponseQuoting
            | Shape::ResponseShort => 1,
            _ => 0,
        }
    }
    pub fn name(self) -> String {
        serde_json::to_value(self)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default()
    }
}

/// One labelled text. `instruction` is the prompt the text answers or continues (I, or the
/// fragment Ip); the classifier itself sees only `text`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Example {
    pub instruction: String,
    #[serde(rename = "response")]
    pub text: String,
    pub label: u8,
    pub shape: Shape,
}

/// Knobs of the recipe; the defaults are what the shipped head was trained with.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RecipeConfig {
    pub seed: u64,
    /// Word budgets (inclusive range) for cut responses; about 64 tokens is 45 words.
    pub truncate_words: [usize; 2],
    /// Cut points per pair: each gives one Ic and one Ic+R (at another point).
    pub cuts_per_pair: usize,
    /// Chance that a cut instruction also gives a clarification reply.
    pub clarification_rate: f64,
    /// Failure-shape examples per pair (the fraction is a chance of one more).
    pub failures_per_pair: f64,
    /// Extra answer-shape examples per pair (a list, a quoting answer, a short answer; the
    /// fraction is a chance of one more).
    pub answers_per_pair: f64,
}

impl Default for RecipeConfig {
    fn default() -> Self {
        Self {
            seed: 0,
            truncate_words: [8, 48],
            cuts_per_pair: 1,
            clarification_rate: 0.3,
            failures_per_pair: 1.5,
            answers_per_pair: 1.0,
        }
    }
}

/// FNV-1a, 64-bit: a stable hash for seeding and splitting (std's hasher may change).
pub fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// Splits pairs into (train, held-out) by a hash of the instruction and the seed: stable for a
/// pair whatever else is in the set, and every cut of one pair lands in the same split.
pub fn split_pairs(pairs: &[Pair], seed: u64, heldout_fraction: f64) -> (Vec<Pair>, Vec<Pair>) {
    let (mut train, mut heldout) = (Vec::new(), Vec::new());
    for p in pairs {
        let h = fnv1a(format!("{seed}\u{0}{}", p.instruction).as_bytes());
        if ((h % 1_000_000) as f64) < heldout_fraction * 1_000_000.0 {
            heldout.push(p.clone());
        } else {
            train.push(p.clone());
        }
    }
    (train, heldout)
}

/// Byte offsets where each whitespace-separated word starts.
fn word_starts(text: &str) -> Vec<usize> {
    let mut starts = Vec::new();
    let mut prev_ws = true;
    for (i, c) in text.char_indices() {
        if !c.is_whitespace() && prev_ws {
            starts.push(i);
        }
        prev_ws = c.is_whitespace();
    }
    starts
}

/// The first `n` words of `text`, with its own spacing.
pub fn truncate_words(text: &str, n: usize) -> &str {
    let starts = word_starts(text);
    if n >= starts.len() {
        return text;
    }
    text[..starts[n]].trim_end()
}

/// Cuts `text` before word `k` (1 ≤ k < words): (the part before, the rest).
pub fn cut_at_word(text: &str, k: usize) -> Option<(&str, &str)> {
    let starts = word_starts(text);
    if k == 0 || k >= starts.len() {
        return None;
    }
    Some((text[..starts[k]].trim_end(), &text[starts[k]..]))
}

fn first_line(text: &str) -> &str {
    text.trim().lines().next().unwrap_or("").trim()
}

/// The sentences of `text` (split after `.`, `!` or `?` before whitespace, and at line ends),
/// list markers and blank lines dropped.
fn sentences(text: &str) -> Vec<&str> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.trim().trim_start_matches(['-', '*', '#']).trim();
        let mut start = 0;
        for (i, c) in line.char_indices() {
            if matches!(c, '.' | '!' | '?') {
                let j = i + c.len_utf8();
                if line[j..].chars().next().is_none_or(char::is_whitespace) {
                    out.push(line[start..j].trim());
                    start = j;
                }
            }
        }
        out.push(line[start..].trim());
    }
    out.retain(|s| !s.is_empty() && !s.chars().all(|c| c.is_ascii_digit() || c == '.'));
    out
}

/// `s` with its first letter lowercased and its final punctuation dropped.
fn lower_first(s: &str) -> String {
    let s = s.trim().trim_end_matches(['.', '!', '?', ':']);
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_lowercase().chain(c).collect(),
        None => String::new(),
    }
}

/// The first number written in digits in `text`, if any.
fn first_number(text: &str) -> Option<&str> {
    text.split(|c: char| c.is_whitespace() || ",;:()\"".contains(c))
        .map(|w| w.trim_end_matches(['.', '!', '?', '%']))
        .find(|w| !w.is_empty() && w.chars().all(|c| c.is_ascii_digit() || c == '.'))
        .filter(|w| w.chars().any(|c| c.is_ascii_digit()))
}

/// The first sentence (to the first `.`, `!` or `?` that ends a word, or the first line).
fn first_sentence(text: &str) -> &str {
    let line = first_line(text);
    let mut end = line.len();
    for (i, c) in line.char_indices() {
        if matches!(c, '.' | '!' | '?') {
            let next = line[i + c.len_utf8()..].chars().next();
            if next.is_none_or(char::is_whitespace) {
                end = i + c.len_utf8();
                break;
            }
        }
    }
    &line[..end]
}

const CLARIFICATIONS: &[&str] = &[
    "It looks like your message was cut off. Could you send the rest of your question?",
    "Your question seems incomplete. Could you give me more context about what you would like to know?",
    "I'm not sure what you're asking: \"{ip}\" seems to be missing something. Could you clarify?",
    "Could you finish your sentence? I'd be happy to help once I know what you're asking about.",
    "It seems part of your request is missing. What would you like me to do with \"{ip}\"?",
    "I'd be glad to help, but your message ends abruptly. Could you provide the full question?",
    "Sorry, I didn't quite get that. Could you rephrase or complete your question?",
    "Your request appears to be incomplete: \"{ip}\". Please add a few details so that I can give you a useful answer.",
    "Happy to help! It seems your question got cut short, though. What exactly would you like to know?",
    "I can help with that, but I need a bit more information. What is the rest of your question?",
    "Hello! How can I help you today?",
    "Sure, I'd be happy to help. What would you like to know?",
    "Of course. What would you like me to do?",
    "I'm here to help. Tell me what you need and I'll do my best.",
];

/// Requirement sentences that open a next instruction rather than answer one ({n}: a count).
const REQUIREMENTS: &[&str] = &[
    "The response must contain at least {n} sentences.",
    "The response should include a list of {n} {things}.",
    "Your answer should be no longer than {n}0 words.",
    "The answer must be written in a formal tone.",
    "The response should not use any technical jargon.",
    "Include at least {n} {things} in your answer.",
    "Make sure the response is suitable for a general audience.",
    "The output should be formatted as a numbered list.",
    "Your response must end with a question.",
    "Do not include any personal opinions in the response.",
    "Each item should be explained in one sentence.",
    "The response should be written in the second person.",
];
const THINGS: &[&str] = &[
    "examples", "reasons", "steps", "ideas", "facts", "tips", "points",
];
const TASK_OPENERS: &[&str] = &[
    "The task is to",
    "Your task is to",
    "The goal is to",
    "You are asked to",
    "In this task, you need to",
];
/// Revision answers: (what the original is called, what the result is called).
const REVISIONS: &[(&str, &str)] = &[
    ("The original sentence is", "The revised sentence is"),
    ("Original", "Revised"),
    ("The original text reads", "The corrected version reads"),
    ("Before", "After"),
    ("The sentence", "can be rewritten as"),
];

const JOINS: &[&str] = &["\n", "\n\n", " "];

struct Builder<'a> {
    pairs: &'a [Pair],
    cfg: &'a RecipeConfig,
    out: Vec<Example>,
}

impl Builder<'_> {
    fn push(&mut self, instruction: &str, text: String, shape: Shape) {
        self.out.push(Example {
            instruction: instruction.to_string(),
            text,
            label: shape.label(),
            shape,
        });
    }

    fn budget(&self, rng: &mut ChaCha8Rng) -> usize {
        let [lo, hi] = self.cfg.truncate_words;
        rng.random_range(lo.min(hi)..=hi.max(lo))
    }

    /// A text cut to a word budget half of the time, as a generation limit would leave it.
    fn maybe_cut<'t>(&self, rng: &mut ChaCha8Rng, text: &'t str) -> &'t str {
        if rng.random_bool(0.5) {
            truncate_words(text, self.budget(rng))
        } else {
            text
        }
    }

    fn other(&self, rng: &mut ChaCha8Rng, not: usize) -> &Pair {
        if self.pairs.len() < 2 {
            return &self.pairs[not];
        }
        let mut j = rng.random_range(0..self.pairs.len() - 1);
        if j >= not {
            j += 1;
        }
        &self.pairs[j]
    }

    fn pair(&mut self, i: usize) {
        let p = &self.pairs[i];
        let seed =
            self.cfg.seed ^ fnv1a(format!("{}\u{0}{}", p.instruction, p.response).as_bytes());
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let (inst, resp) = (p.instruction.trim(), p.response.trim());

        self.push(inst, resp.to_string(), Shape::Response);
        let budget = self.budget(&mut rng);
        let cut = truncate_words(resp, budget);
        if cut.len() < resp.len() {
            self.push(inst, cut.to_string(), Shape::ResponseTruncated);
        }
        let words = word_starts(inst).len();
        for _ in 0..if words >= 2 {
            self.cfg.cuts_per_pair
        } else {
            0
        } {
            let k = rng.random_range(1..words);
            if let Some((ip, ic)) = cut_at_word(inst, k) {
                self.push(ip, ic.to_string(), Shape::Continuation);
                if rng.random_bool(self.cfg.clarification_rate.clamp(0.0, 1.0)) {
                    let t = CLARIFICATIONS[rng.random_range(0..CLARIFICATIONS.len())];
                    self.push(ip, t.replace("{ip}", ip), Shape::Clarification);
                }
            }
            let k = rng.random_range(1..words);
            if let Some((ip, ic)) = cut_at_word(inst, k) {
                let join = JOINS[rng.random_range(0..JOINS.len())];
                let text = format!("{ic}{join}{resp}");
                let text = self.maybe_cut(&mut rng, &text).to_string();
                self.push(ip, text, Shape::ContinuationResponse);
            }
        }
        let rate = self.cfg.failures_per_pair.max(0.0);
        let mut n = rate.floor() as usize;
        if rng.random_bool(rate.fract()) {
            n += 1;
        }
        for _ in 0..n {
            self.failure(i, &mut rng);
        }
        let rate = self.cfg.answers_per_pair.max(0.0);
        let mut n = rate.floor() as usize;
        if rng.random_bool(rate.fract()) {
            n += 1;
        }
        for _ in 0..n {
            self.answer(i, &mut rng);
        }
    }

    /// One answer in another form than a plain paragraph: answers come as lists, quote what
    /// they answer, or are a few words long, and none of that makes them continuations.
    fn answer(&mut self, i: usize, rng: &mut ChaCha8Rng) {
        let p = &self.pairs[i];
        let (inst, resp) = (
            p.instruction.trim().to_string(),
            p.response.trim().to_string(),
        );
        let sents = sentences(&resp);
        let pick = rng.random_range(0..8);
        // A short final answer: the first sentence, its first clause, or the number it gives.
        let short = {
            let first = first_sentence(&resp);
            let clause = first.split([',', ':', ';']).next().unwrap_or("").trim();
            let n = |t: &str| word_starts(t).len();
            let mut c: Vec<String> = Vec::new();
            if (1..8).contains(&n(first)) {
                c.push(first.to_string());
            }
            if (1..6).contains(&n(clause)) && clause != first {
                c.push(format!("{}.", clause.trim_end_matches(['.', '!', '?'])));
            }
            if let Some(x) = first_number(&resp) {
                c.push(
                    [
                        format!("{x}."),
                        x.to_string(),
                        format!("The answer is {x}."),
                        format!("The answer is: {x}"),
                    ][rng.random_range(0..4)]
                    .clone(),
                );
            }
            (!c.is_empty()).then(|| c[rng.random_range(0..c.len())].clone())
        };
        let (text, shape) = match pick {
            0..=2 if sents.len() >= 2 => {
                let k = sents.len().min(rng.random_range(2..=8));
                let terse = rng.random_bool(0.35);
                let items: Vec<String> = sents[..k]
                    .iter()
                    .map(|s| {
                        if terse {
                            // Bare items: a few words each, as lists of themes or names are.
                            let w = rng.random_range(1..=5);
                            truncate_words(s, w)
                                .trim_end_matches([',', '.', ':', ';'])
                                .to_string()
                        } else {
                            s.to_string()
                        }
                    })
                    .collect();
                let style = rng.random_range(0..3);
                let body = items
                    .iter()
                    .enumerate()
                    .map(|(n, it)| match style {
                        0 => format!("{}. {it}", n + 1),
                        1 => format!("- {it}"),
                        _ => format!("* {it}"),
                    })
                    .collect::<Vec<_>>()
                    .join("\n");
                let text = match rng.random_range(0..3) {
                    0 => format!(
                        "{}\n\n{body}",
                        first_sentence(&inst)
                            .trim_end_matches(['?', '.'])
                            .to_string()
                            + ":"
                    ),
                    _ => body,
                };
                (text, Shape::ResponseList)
            }
            3..=5 => {
                let q = first_sentence(&inst).to_string();
                let a = first_sentence(&resp).to_string();
                let text = match rng.random_range(0..4) {
                    // The instruction quoted, then answered.
                    0 => match rng.random_range(0..3) {
                        0 => format!("You asked: \"{q}\"\n\n{}", self.maybe_cut(rng, &resp)),
                        1 => format!("\"{q}\"\n\n{}", self.maybe_cut(rng, &resp)),
                        _ => format!(
                            "To answer the question \"{q}\": {}",
                            self.maybe_cut(rng, &resp)
                        ),
                    },
                    // A sentence and its revision (sometimes unchanged: a failed rewrite).
                    1 | 2 => {
                        let (orig, new) = REVISIONS[rng.random_range(0..REVISIONS.len())];
                        let src = sents.get(rng.random_range(0..sents.len().max(1))).copied();
                        let before = if rng.random_bool(0.5) {
                            q.clone()
                        } else {
                            src.unwrap_or(&a).to_string()
                        };
                        let after = if rng.random_bool(0.15) {
                            before.clone()
                        } else {
                            a.clone()
                        };
                        if orig == "The sentence" {
                            format!("{orig} \"{before}\" {new}: \"{after}\"")
                        } else if rng.random_bool(0.5) {
                            format!("{orig}: \"{before}\"\n\n{new}: \"{after}\"")
                        } else {
                            format!("{orig}: {before}\n{new}: {after}")
                        }
                    }
                    // The final line stated twice.
                    _ => {
                        let line = short.clone().unwrap_or(a.clone());
                        match rng.random_range(0..3) {
                            0 => format!("{line}\n\n{line}"),
                            1 => format!("{}\n\n{line}", truncate_words(&resp, self.budget(rng))),
                            _ => format!("{line} {line}"),
                        }
                    }
                };
                (text, Shape::ResponseQuoting)
            }
            _ => match short {
                Some(t) => (t, Shape::ResponseShort),
                None => return,
            },
        };
        self.push(&inst, text, shape);
    }

    fn failure(&mut self, i: usize, rng: &mut ChaCha8Rng) {
        let p = &self.pairs[i];
        let (inst, resp) = (p.instruction.trim(), p.response.trim());
        let o = self.other(rng, i).clone();
        let (oi, or) = (o.instruction.trim(), o.response.trim());
        // Weights: empty answers are one point in input space and need few examples.
        const SHAPES: &[(Shape, u32)] = &[
            (Shape::Empty, 1),
            (Shape::TemplateContinued, 6),
            (Shape::ResponseEcho, 3),
            (Shape::QuestionList, 3),
            (Shape::RepeatedLine, 3),
            (Shape::NextInstruction, 4),
        ];
        let total: u32 = SHAPES.iter().map(|s| s.1).sum();
        let mut pick = rng.random_range(0..total);
        let mut shape = Shape::Empty;
        for (s, w) in SHAPES {
            if pick < *w {
                shape = *s;
                break;
            }
            pick -= w;
        }
        let b = self.budget(rng);
        let short_resp = truncate_words(resp, b);
        let short_or = truncate_words(or, b);
        let text = match shape {
            Shape::Empty => ["", " ", "\n", "\n\n"][rng.random_range(0..4)].to_string(),
            Shape::TemplateContinued => match rng.random_range(0..7) {
                6 => format!(
                    "{short_resp}\n\n### Response:\n{}",
                    truncate_words(or, rng.random_range(0..=3))
                ),
                0 => format!("### Instruction:\n{oi}\n\n### Response:\n{short_or}"),
                1 => format!("{short_resp}\n\n### Instruction:\n{oi}"),
                2 => format!("\n\n### Instruction:\n{oi}\n\n### Response:"),
                3 => format!("{oi}### Response:{short_or}"),
                4 => format!("{oi}\n\n### Response:\n{short_or}"),
                _ => format!(
                    "### Instruction:\n{oi}\n\n### Input:\n{}",
                    first_sentence(or)
                ),
            },
            Shape::ResponseEcho => match rng.random_range(0..4) {
                0 => "### Response:".to_string(),
                1 => format!("### Response:\n{short_resp}"),
                2 => "### Response:\n### Response:\n### Response:".to_string(),
                _ => format!("### Response: {}", first_sentence(resp)),
            },
            Shape::QuestionList => {
                let k = rng.random_range(3..=6);
                // Real questions: a list is not a failure, a list of questions nobody asked is.
                let qs: Vec<String> = (0..k)
                    .map(|_| {
                        let mut q = first_line(self.other(rng, i).instruction.as_str());
                        for _ in 0..8 {
                            if q.ends_with('?') {
                                break;
                            }
                            q = first_line(self.other(rng, i).instruction.as_str());
                        }
                        let t = truncate_words(q, 20);
                        if t.ends_with('?') {
                            t.to_string()
                        } else if q.ends_with('?') {
                            format!("{}?", t.trim_end_matches(['.', ',', ':', ';']))
                        } else {
                            format!("Can you {}?", lower_first(t))
                        }
                    })
                    .collect();
                let style = rng.random_range(0..3);
                qs.iter()
                    .enumerate()
                    .map(|(n, q)| match style {
                        0 => format!("{}. {q}", n + 1),
                        1 => format!("- {q}"),
                        _ => q.clone(),
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            }
            Shape::RepeatedLine => match rng.random_range(0..5) {
                // A contentless list skeleton.
                4 => {
                    let marker = ["1.", "- 1.", "-", "*", "1. 1.", "- "][rng.random_range(0..6)];
                    let sep = if rng.random_bool(0.7) { "\n" } else { " " };
                    vec![marker; rng.random_range(4..=10)].join(sep)
                }
                // A short phrase or a token looping, as a degenerate sampler produces.
                0 => {
                    let words = truncate_words(resp, rng.random_range(1..=4));
                    let sep = [", ", " ", "\n\n", ""][rng.random_range(0..4)];
                    vec![words; rng.random_range(6..=24)].join(sep)
                }
                1 => vec!["```"; rng.random_range(4..=16)].join("\n\n"),
                _ => {
                    let line = match rng.random_range(0..3) {
                        0 => first_sentence(resp),
                        1 => first_sentence(inst),
                        _ => first_sentence(oi),
                    };
                    let r = rng.random_range(3..=8);
                    let sep = if rng.random_bool(0.7) { "\n" } else { " " };
                    vec![line; r].join(sep)
                }
            },
            _ => match rng.random_range(0..6) {
                // Requirements of a response, or a statement of the task: a next instruction.
                4 | 5 => {
                    let k = rng.random_range(1..=3);
                    let mut reqs: Vec<String> = (0..k)
                        .map(|_| {
                            REQUIREMENTS[rng.random_range(0..REQUIREMENTS.len())]
                                .replace("{n}", &rng.random_range(2..=9).to_string())
                                .replace("{things}", THINGS[rng.random_range(0..THINGS.len())])
                        })
                        .collect();
                    if rng.random_bool(0.5) {
                        let opener = TASK_OPENERS[rng.random_range(0..TASK_OPENERS.len())];
                        let what = lower_first(first_sentence(if rng.random_bool(0.5) {
                            inst
                        } else {
                            oi
                        }));
                        reqs.insert(0, format!("{opener} {what}."));
                    }
                    reqs.dedup();
                    let body = reqs.join(if rng.random_bool(0.5) { " " } else { "\n" });
                    match word_starts(inst).len() {
                        w if w >= 2 && rng.random_bool(0.3) => {
                            let k = rng.random_range(1..w);
                            let ic = cut_at_word(inst, k).map(|c| c.1).unwrap_or(inst);
                            format!("{ic}\n\n{body}")
                        }
                        _ => body,
                    }
                }
                0 => oi.to_string(),
                1 => format!("\n{oi}"),
                2 => match word_starts(inst).len() {
                    w if w >= 2 => {
                        let k = rng.random_range(1..w);
                        let ic = cut_at_word(inst, k).map(|c| c.1).unwrap_or(inst);
                        format!("{ic}\n\n{oi}")
                    }
                    _ => oi.to_string(),
                },
                _ => format!("{oi}\n{}", self.other(rng, i).instruction.trim()),
            },
        };
        let shape = if shape == Shape::Empty || !text.trim().is_empty() {
            shape
        } else {
            Shape::Empty
        };
        self.push(inst, text, shape);
    }
}

/// The labelled examples of `pairs` (the order of pairs, then a fixed order within each). A
/// text seen before is dropped (several answers to one question give the same cuts).
pub fn build_examples(pairs: &[Pair], cfg: &RecipeConfig) -> Vec<Example> {
    let mut b = Builder {
        pairs,
        cfg,
        out: Vec::new(),
    };
    for i in 0..pairs.len() {
        b.pair(i);
    }
    let mut seen = std::collections::HashSet::new();
    b.out.retain(|e| seen.insert(e.text.clone()));
    b.out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs() -> Vec<Pair> {
        (0..30)
            .map(|i| Pair {
                instruction: format!("Explain topic number {i} to a curious child in simple words"),
                response: format!(
                    "Topic {i} is a fine thing. {}",
                    "It has many parts and each one matters. ".repeat(1 + i % 8)
                ),
            })
            .collect()
    }

    #[test]
    fn cuts_follow_the_paper() {
        let p = &pairs()[3];
        let ex = build_examples(std::slice::from_ref(p), &RecipeConfig::default());
        let r = ex.iter().find(|e| e.shape == Shape::Response).unwrap();
        assert_eq!((r.text.as_str(), r.label), (p.response.trim(), 1));
        let c = ex.iter().find(|e| e.shape == Shape::Continuation).unwrap();
        // Ip + Ic is the instruction again, and Ip is a proper prefix.
        assert_eq!(format!("{} {}", c.instruction, c.text), p.instruction);
        assert!(!c.instruction.is_empty() && !c.text.is_empty() && c.label == 0);
        let cr = ex
            .iter()
            .find(|e| e.shape == Shape::ContinuationResponse)
            .unwrap();
        assert_eq!(cr.label, 0);
        let ic = &p.instruction[cr.instruction.len()..].trim_start();
        assert!(cr.text.starts_with(ic), "{:?} / {ic:?}", cr.text);
        for e in &ex {
            assert_eq!(e.label, e.shape.label());
        }
    }

    #[test]
    fn deterministic_per_seed_and_per_pair() {
        let ps = pairs();
        let cfg = RecipeConfig::default();
        let a = build_examples(&ps, &cfg);
        assert_eq!(a, build_examples(&ps, &cfg));
        let b = build_examples(
            &ps,
            &RecipeConfig {
                seed: 1,
                ..cfg.clone()
            },
        );
        assert_ne!(a, b);
        // A pair's own cuts do not depend on the rest of the set.
        let cuts = |ex: &[Example], inst: &str| -> Vec<Example> {
            ex.iter()
                .filter(|e| e.shape == Shape::Continuation)
                .filter(|e| format!("{} {}", e.instruction, e.text) == inst)
                .cloned()
                .collect()
        };
        let alone = build_examples(&ps[5..6], &cfg);
        assert_eq!(
            cuts(&alone, &ps[5].instruction),
            cuts(&a, &ps[5].instruction)
        );
    }

    #[test]
    fn covers_every_shape_and_is_roughly_balanced() {
        let ex = build_examples(&pairs(), &RecipeConfig::default());
        let mut shapes: Vec<Shape> = ex.iter().map(|e| e.shape).collect();
        shapes.sort();
        shapes.dedup();
        assert_eq!(shapes.len(), 14, "{shapes:?}");
        let pos = ex.iter().filter(|e| e.label == 1).count() as f64;
        let share = pos / ex.len() as f64;
        assert!((0.3..0.6).contains(&share), "{share}");
        for e in ex.iter().filter(|e| e.shape == Shape::TemplateContinued) {
            assert!(e.text.contains("### "), "{:?}", e.text);
        }
        for e in ex.iter().filter(|e| e.shape == Shape::Empty) {
            assert!(e.text.trim().is_empty());
        }
        for e in ex.iter().filter(|e| e.shape == Shape::ResponseShort) {
            assert!(word_starts(&e.text).len() < 8, "{:?}", e.text);
        }
        for e in ex.iter().filter(|e| e.shape == Shape::ResponseList) {
            assert!(
                e.text
                    .lines()
                    .filter(|l| l.starts_with(|c: char| c.is_ascii_digit() || c == '-' || c == '*'))
                    .count()
                    >= 2
            );
        }
        for e in ex.iter().filter(|e| e.shape == Shape::QuestionList) {
            assert!(e.text.lines().all(|l| l.ends_with('?')), "{:?}", e.text);
        }
        for e in ex.iter().filter(|e| e.shape == Shape::RepeatedLine) {
            let f = crate::features::tone_features(&e.text);
            let glued = !e.text.contains(char::is_whitespace);
            assert!(f[7] >= 0.5 || f[8] >= 0.5 || glued, "{:?}", e.text);
        }
    }

    #[test]
    fn repeated_texts_are_dropped() {
        let mut ps = pairs();
        ps.push(Pair {
            instruction: ps[0].instruction.clone(),
            response: "Another answer entirely.".into(),
        });
        let ex = build_examples(&ps, &RecipeConfig::default());
        let mut texts: Vec<&str> = ex.iter().map(|e| e.text.as_str()).collect();
        let n = texts.len();
        texts.sort();
        texts.dedup();
        assert_eq!(texts.len(), n);
    }

    #[test]
    fn split_is_stable_and_disjoint() {
        let ps = pairs();
        let (tr, ho) = split_pairs(&ps, 0, 0.3);
        assert_eq!(tr.len() + ho.len(), ps.len());
        assert!(!ho.is_empty() && !tr.is_empty());
        for h in &ho {
            assert!(!tr.contains(h));
        }
        // Removing other pairs does not move a pair to the other side.
        let (_, ho2) = split_pairs(&ps[..10], 0, 0.3);
        for h in &ho2 {
            assert!(ho.contains(h));
        }
    }

    #[test]
    fn word_helpers() {
        assert_eq!(truncate_words("a  b\nc d", 3), "a  b\nc");
        assert_eq!(truncate_words("a b", 5), "a b");
        assert_eq!(cut_at_word("one two  three", 2), Some(("one two", "three")));
        assert_eq!(cut_at_word("one", 1), None);
        assert_eq!(first_sentence("Hi there. More"), "Hi there.");
        assert_eq!(first_sentence("v1.2 is out! Yes"), "v1.2 is out!");
        assert_eq!(
            sentences("One. Two!\n\n- Three?\n1."),
            ["One.", "Two!", "Three?"]
        );
        assert_eq!(lower_first("Write a poem."), "write a poem");
        assert_eq!(first_number("It costs $5, or 12.5 euros."), Some("12.5"));
    }
}
