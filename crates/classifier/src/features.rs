//! Hand-crafted surface features concatenated to the sentence embedding.
//!
//! The MiniLM tokenizer lowercases and the mean-pooled embedding keeps little of a text's form,
//! yet form is most of what separates a continuation from an answer: a text that starts
//! mid-sentence in lowercase, the Alpaca template's markers, one line over and over, a list of
//! questions. These few cheap features carry exactly that. They are computed on the text the
//! head classifies (the response), never on its prompt.
use serde::{Deserialize, Serialize};

/// Which features a head uses; recorded in its metadata so that loading reproduces them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FeatureSet {
    /// The embedding alone.
    #[default]
    None,
    /// The surface features of response tone (see [`TONE_FEATURES`]).
    Tone,
    /// Cues of an answer's stance on a question of taste (see [`STANCE_FEATURES`]).
    Stance,
}

/// Names of the tone features, in the order of [`tone_features`].
pub const TONE_FEATURES: &[&str] = &[
    "empty",
    "starts_mid_sentence",
    "instruction_marker",
    "response_marker",
    "first_sentence_question",
    "ends_with_question",
    "question_line_ratio",
    "repeated_line_ratio",
    "repeated_trigram_ratio",
    "log_chars",
];

impl FeatureSet {
    pub fn names(self) -> &'static [&'static str] {
        match self {
            FeatureSet::None => &[],
            FeatureSet::Tone => TONE_FEATURES,
            FeatureSet::Stance => STANCE_FEATURES,
        }
    }
    pub fn len(self) -> usize {
        self.names().len()
    }
    pub fn is_empty(self) -> bool {
        self.len() == 0
    }
    pub fn compute(self, text: &str) -> Vec<f32> {
        match self {
            FeatureSet::None => Vec::new(),
            FeatureSet::Tone => tone_features(text),
            FeatureSet::Stance => stance_features(text),
        }
    }
}

fn b(x: bool) -> f32 {
    if x {
        1.0
    } else {
        0.0
    }
}

/// The tone features of one text; see [`TONE_FEATURES`] for their names.
pub fn tone_features(text: &str) -> Vec<f32> {
    let t = text.trim();
    let lower = t.to_lowercase();
    let first = t.chars().next();
    // A continuation picks up the cut sentence: lowercase, closing punctuation, or the
    // apostrophe of a cut possessive or contraction (`'s upcoming ...`).
    let mid_sentence = first.is_some_and(|c| c.is_lowercase() || ",;:)]}'\u{2019}".contains(c));
    let instruction_marker = lower.contains("### instruction")
        || lower.contains("### input")
        || lower
            .lines()
            .any(|l| l.trim_start().starts_with("instruction:"));
    let response_marker = lower.contains("### response");
    let first_sentence_question = t
        .chars()
        .find(|c| matches!(c, '.' | '!' | '?' | '\n'))
        .is_some_and(|c| c == '?');
    let lines: Vec<&str> = t.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    let question_lines = lines.iter().filter(|l| l.ends_with('?')).count();
    let question_line_ratio = if lines.is_empty() {
        0.0
    } else {
        question_lines as f32 / lines.len() as f32
    };
    let repeated_line_ratio = repeated_ratio(lines.iter().copied());
    let words: Vec<String> = lower.split_whitespace().map(str::to_string).collect();
    let trigrams = words.windows(3).map(|w| w.join(" "));
    let repeated_trigram_ratio = repeated_ratio(trigrams);
    vec![
        b(t.is_empty()),
        b(mid_sentence),
        b(instruction_marker),
        b(response_marker),
        b(first_sentence_question),
        b(t.ends_with('?')),
        question_line_ratio,
        repeated_line_ratio,
        repeated_trigram_ratio,
        (1.0 + t.chars().count() as f32).ln() / 8.0,
    ]
}

/// Names of the stance features, in the order of [`stance_features`].
pub const STANCE_FEATURES: &[&str] = &[
    "depends",
    "no_single_answer",
    "both_or_neither",
    "people_differ",
    "your_needs",
    "matter_of_taste",
    "asks_back",
    "first_person_opinion",
    "verdict",
    "pivot_to_a_pick",
    "last_sentence_verdict",
    "last_sentence_opinion",
    "curt",
    "log_words",
];

const DEPENDS: &[&str] = &["depends", "depending on", "it varies", "varies"];
const NO_SINGLE: &[&str] = &[
    "no single",
    "no one ",
    "there is no",
    "there's no",
    "no universal",
    "no right answer",
    "no definitive",
    "no objective",
    "not one ",
    "can't say",
    "cannot say",
    "no clear",
];
const BOTH: &[&str] = &[
    "both",
    "neither",
    "each has",
    "each of",
    "either",
    "all of them",
    "all have",
];
const PEOPLE: &[&str] = &[
    "some people",
    "others",
    "many people",
    "some prefer",
    "people's",
    "people have",
    "some ",
    "many ",
    "fans",
];
const YOUR: &[&str] = &[
    "your goals",
    "your needs",
    "your taste",
    "your preference",
    "you prefer",
    "you enjoy",
    "suits you",
    "works for you",
    "what matters",
    "your situation",
    "your budget",
    "you value",
    "you want",
    "you need",
    "consider",
    "try ",
];
const TASTE: &[&str] = &[
    "personal preference",
    "matter of taste",
    "subjective",
    "eye of the beholder",
    "up to you",
    "personal choice",
    "comes down to",
];
const OPINION: &[&str] = &[
    "i think",
    "i'd ",
    "i would",
    "i prefer",
    "my favorite",
    "my favourite",
    "my pick",
    "my vote",
    "in my opinion",
    "in my view",
    "if you ask me",
    "i lean",
    "i love",
    "i like",
    "personally",
    "honestly",
    "i'm ",
    "i am ",
    "for me",
    "i believe",
    "i'd say",
    "i go with",
];
const VERDICT: &[&str] = &[
    "the best",
    "is better",
    "are better",
    "the winner",
    " wins",
    "by far",
    "hands down",
    "clearly",
    "obviously",
    "definitely",
    "without a doubt",
    "the answer is",
    "go with",
    "the greatest",
    "superior",
    "beats",
    "always",
    "nothing beats",
    "no contest",
    "the clear",
];
const PIVOT: &[&str] = &[
    "if i had to",
    "still,",
    "but overall",
    "overall,",
    "that said",
    "ultimately",
    "in the end",
    "but if",
    "but for me",
    "though,",
];

fn any(text: &str, cues: &[&str]) -> f32 {
    b(cues.iter().any(|c| text.contains(c)))
}

/// The stance features of one answer; see [`STANCE_FEATURES`] for their names.
pub fn stance_features(text: &str) -> Vec<f32> {
    let lower = text.trim().to_lowercase();
    let sentences: Vec<&str> = lower
        .split(['.', '!', '?', '\n'])
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    let last = sentences.last().copied().unwrap_or("");
    let words = lower.split_whitespace().count();
    vec![
        any(&lower, DEPENDS),
        any(&lower, NO_SINGLE),
        any(&lower, BOTH),
        any(&lower, PEOPLE),
        any(&lower, YOUR),
        any(&lower, TASTE),
        b(lower.ends_with('?')
            || lower.contains("could you tell")
            || lower.contains("what do you")),
        any(&lower, OPINION),
        any(&lower, VERDICT),
        any(&lower, PIVOT),
        any(last, VERDICT),
        any(last, OPINION),
        b(words <= 4),
        (1.0 + words as f32).ln() / 5.0,
    ]
}

/// 1 - distinct/total over the items (0 for fewer than two items).
fn repeated_ratio<S: AsRef<str> + Ord>(items: impl Iterator<Item = S>) -> f32 {
    let mut all: Vec<S> = items.collect();
    if all.len() < 2 {
        return 0.0;
    }
    let total = all.len();
    all.sort();
    all.dedup_by(|a, b| a.as_ref() == b.as_ref());
    1.0 - all.len() as f32 / total as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(text: &str, name: &str) -> f32 {
        let i = TONE_FEATURES.iter().position(|n| *n == name).unwrap();
        tone_features(text)[i]
    }

    #[test]
    fn names_match_values() {
        assert_eq!(tone_features("Hello.").len(), TONE_FEATURES.len());
        assert_eq!(FeatureSet::Tone.len(), TONE_FEATURES.len());
        assert!(FeatureSet::None.compute("x").is_empty());
    }

    #[test]
    fn each_feature_fires_on_its_shape() {
        assert_eq!(f("  \n", "empty"), 1.0);
        assert_eq!(f("Paris.", "empty"), 0.0);
        assert_eq!(f("of France? It is Paris.", "starts_mid_sentence"), 1.0);
        assert_eq!(f(", and why?", "starts_mid_sentence"), 1.0);
        assert_eq!(f("'s new album, and why?", "starts_mid_sentence"), 1.0);
        assert_eq!(f("The capital is Paris.", "starts_mid_sentence"), 0.0);
        assert_eq!(
            f("Sure.\n\n### Instruction:\nWrite", "instruction_marker"),
            1.0
        );
        assert_eq!(f("Sure, here it is.", "instruction_marker"), 0.0);
        assert_eq!(f("### Response: Paris", "response_marker"), 1.0);
        assert_eq!(f("of France? Paris.", "first_sentence_question"), 1.0);
        assert_eq!(f("Paris. Why ask?", "first_sentence_question"), 0.0);
        assert_eq!(f("Paris. Why ask?", "ends_with_question"), 1.0);
        assert_eq!(
            f("1. Why?\n2. How?\nDone.", "question_line_ratio"),
            2.0 / 3.0
        );
        assert_eq!(f("a\na\na\nb", "repeated_line_ratio"), 0.5);
        assert_eq!(f("one line only", "repeated_line_ratio"), 0.0);
        assert!(f("go on go on go on go on go on", "repeated_trigram_ratio") > 0.5);
        assert_eq!(f("all words differ here", "repeated_trigram_ratio"), 0.0);
        assert!(f(&"x".repeat(2000), "log_chars") > f("short", "log_chars"));
    }
}
