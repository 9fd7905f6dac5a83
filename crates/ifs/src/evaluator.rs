//! The IFS evaluator: answer every prompt of the instruction set (full and fragment), label
//! each response answer-like (1) or continuation-like (0) with the tone classifier, and score.
//!
//! IFS = answer-like / all; an empty response is never answer-like. Reported over all prompts,
//! over full and over partial instructions, each with a 95% Wilson interval. The responses
//! and their labels are written to `<out_dir>/ifs-responses.jsonl` for inspection.
use crate::instructions::{self, Instruction, Kind, Prompt};
use serde::Serialize;
use sft_eval::{wilson_interval, Answer, BoxError, EvalReport, Evaluator};
use std::io::Write;
use std::path::Path;

/// Labels responses: `true` = answer-like, with the classifier's probability.
pub trait ToneLabeler {
    fn label(&mut self, responses: &[String]) -> Result<Vec<(bool, f64)>, BoxError>;
}

/// One labelled response, as written for inspection.
#[derive(Clone, Debug, Serialize)]
pub struct Labelled {
    pub id: String,
    pub kind: Kind,
    pub prompt: String,
    pub response: String,
    pub answer_like: bool,
    pub prob: f64,
}

/// IFS over all, full and partial prompts.
#[derive(Clone, Debug, Default, Serialize)]
pub struct IfsScores {
    pub ifs: f64,
    pub ifs_full: f64,
    pub ifs_partial: f64,
    pub n: usize,
    pub n_full: usize,
    pub n_partial: usize,
    pub ci: (f64, f64),
    pub ci_full: (f64, f64),
    pub ci_partial: (f64, f64),
}

impl IfsScores {
    pub fn from_labels(items: &[Labelled]) -> Self {
        let count = |kind: Option<Kind>| {
            let sel: Vec<&Labelled> = items
                .iter()
                .filter(|l| kind.is_none_or(|k| l.kind == k))
                .collect();
            (sel.iter().filter(|l| l.answer_like).count(), sel.len())
        };
        let ratio = |(a, n): (usize, usize)| if n == 0 { 0.0 } else { a as f64 / n as f64 };
        let (all, full, part) = (
            count(None),
            count(Some(Kind::Full)),
            count(Some(Kind::Partial)),
        );
        Self {
            ifs: ratio(all),
            ifs_full: ratio(full),
            ifs_partial: ratio(part),
            n: all.1,
            n_full: full.1,
            n_partial: part.1,
            ci: wilson_interval(all.0, all.1),
            ci_full: wilson_interval(full.0, full.1),
            ci_partial: wilson_interval(part.0, part.1),
        }
    }

    pub fn to_report(&self) -> EvalReport {
        let mut r = EvalReport {
            primary: self.ifs,
            ..Default::default()
        };
        for (k, v) in [
            ("ifs", self.ifs),
            ("ifs_full", self.ifs_full),
            ("ifs_partial", self.ifs_partial),
            ("ifs_ci_low", self.ci.0),
            ("ifs_ci_high", self.ci.1),
        ] {
            r.scores.insert(k.to_string(), v);
        }
        r.details.insert("n".into(), self.n.into());
        r
    }
}

pub struct IfsEvaluator<L: ToneLabeler> {
    prompts: Vec<Prompt>,
    labeler: L,
    max_new_tokens: usize,
    /// File name under the output folder for the responses.
    pub responses_file: String,
    last: Vec<Labelled>,
}

impl<L: ToneLabeler> IfsEvaluator<L> {
    /// Evaluate the first `limit` instructions of `set` (0 = all), full and partial.
    pub fn new(set: &[Instruction], limit: usize, labeler: L, max_new_tokens: usize) -> Self {
        Self {
            prompts: instructions::prompts(set, limit),
            labeler,
            max_new_tokens,
            responses_file: "ifs-responses.jsonl".into(),
            last: Vec::new(),
        }
    }

    pub fn prompts(&self) -> &[Prompt] {
        &self.prompts
    }

    /// The labelled responses of the last evaluation.
    pub fn last(&self) -> &[Labelled] {
        &self.last
    }

    /// Answer, label and score, without writing anything.
    pub fn score(&mut self, model: &mut dyn Answer) -> Result<IfsScores, BoxError> {
        let texts: Vec<String> = self.prompts.iter().map(|p| p.text.clone()).collect();
        let responses = model.answer(&texts, self.max_new_tokens)?;
        if responses.len() != texts.len() {
            return Err(format!(
                "the model returned {} responses for {} prompts",
                responses.len(),
                texts.len()
            )
            .into());
        }
        let labels = self.labeler.label(&responses)?;
        self.last = self
            .prompts
            .iter()
            .zip(responses)
            .zip(labels)
            .map(|((p, response), (like, prob))| Labelled {
                id: p.id.clone(),
                kind: p.kind,
                prompt: p.text.clone(),
                // An empty response never counts as an answer.
                answer_like: like && !response.trim().is_empty(),
                prob,
                response,
            })
            .collect();
        Ok(IfsScores::from_labels(&self.last))
    }
}

impl<L: ToneLabeler> Evaluator for IfsEvaluator<L> {
    fn name(&self) -> &str {
        "ifs"
    }

    fn evaluate(&mut self, model: &mut dyn Answer, out_dir: &Path) -> Result<EvalReport, BoxError> {
        let scores = self.score(model)?;
        std::fs::create_dir_all(out_dir)?;
        let path = out_dir.join(&self.responses_file);
        let mut f = std::io::BufWriter::new(std::fs::File::create(&path)?);
        for l in &self.last {
            writeln!(f, "{}", serde_json::to_string(l)?)?;
        }
        f.flush()?;
        let mut report = scores.to_report();
        report
            .details
            .insert("responses".into(), path.display().to_string().into());
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Answers the full instructions properly and continues the fragments.
    struct Scripted;
    impl Answer for Scripted {
        fn answer(&mut self, ins: &[String], _: usize) -> Result<Vec<String>, BoxError> {
            Ok(ins
                .iter()
                .enumerate()
                .map(|(i, s)| match i % 3 {
                    0 => format!("Here is the answer to: {s}"),
                    1 => String::new(),
                    _ => format!("{s} and more words ### Instruction:"),
                })
                .collect())
        }
    }

    /// Labels by a visible rule so the test checks the evaluator's arithmetic.
    struct Rule;
    impl ToneLabeler for Rule {
        fn label(&mut self, r: &[String]) -> Result<Vec<(bool, f64)>, BoxError> {
            Ok(r.iter()
                .map(|s| (s.starts_with("Here") || s.is_empty(), 0.9))
                .collect())
        }
    }

    #[test]
    fn scores_count_empty_as_not_answer_like_and_write_responses() {
        let set = instructions::bundled();
        let mut ev = IfsEvaluator::new(&set, 6, Rule, 16);
        let t = tempfile::tempdir().unwrap();
        let report = ev.evaluate(&mut Scripted, t.path()).unwrap();
        // 12 prompts; indices 0, 3, 6, 9 are answers; 1, 4, 7, 10 are empty (labelled 1 by the
        // rule, but empty never counts).
        assert!((report.primary - 4.0 / 12.0).abs() < 1e-12);
        assert!((report.scores["ifs_full"] - 2.0 / 6.0).abs() < 1e-12);
        assert!((report.scores["ifs_partial"] - 2.0 / 6.0).abs() < 1e-12);
        let lines = std::fs::read_to_string(t.path().join("ifs-responses.jsonl")).unwrap();
        assert_eq!(lines.lines().count(), 12);
        assert!(report.scores["ifs_ci_low"] < report.primary);
    }
}
