//! sft-objecqa: the ObjecQA semantic-drift gauge of arXiv 2307.03692.
//!
//! 100 questions that ask for a subjective choice (`assets/questions.jsonl`, written for this
//! project). The model answers them through an [`sft_eval::Answer`]; a judge labels each
//! answer objective (1: presents the range of possibilities, defers to missing context or
//! declines to pick) or subjective (0: commits to one choice as its own preference).
//! ObjecQA = objective answers / all answers.
use serde::{Deserialize, Serialize};
use sft_eval::{wilson_interval, Answer, BoxError, EvalReport, Evaluator};
use std::io::Write;
use std::path::Path;

pub mod judge;

const BUNDLED: &str = include_str!("../assets/questions.jsonl");

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Question {
    #[serde(default)]
    pub id: String,
    #[serde(default)]
    pub topic: String,
    pub question: String,
}

#[derive(Debug, thiserror::Error)]
pub enum QuestionError {
    #[error("{file}:{line}: {message}")]
    Bad {
        file: String,
        line: usize,
        message: String,
    },
    #[error("cannot read {file}: {cause}")]
    Io { file: String, cause: std::io::Error },
}

/// Parse JSONL question lines; `file` names the source in errors.
pub fn parse(text: &str, file: &str) -> Result<Vec<Question>, QuestionError> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let bad = |message: String| QuestionError::Bad {
            file: file.to_string(),
            line: i + 1,
            message,
        };
        let mut q: Question = serde_json::from_str(line)
            .map_err(|e| bad(format!("expected {{\"question\": \"...\"}}: {e}")))?;
        if q.question.trim().is_empty() {
            return Err(bad("empty question".into()));
        }
        if q.id.is_empty() {
            q.id = format!("line-{}", i + 1);
        }
        out.push(q);
    }
    Ok(out)
}

/// The bundled 100 questions.
pub fn bundled() -> Vec<Question> {
    parse(BUNDLED, "assets/questions.jsonl").unwrap_or_default()
}

pub fn load(path: &Path) -> Result<Vec<Question>, QuestionError> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| QuestionError::Io {
        file: file.clone(),
        cause: source,
    })?;
    parse(&text, &file)
}

/// Judges answers: `true` = objective, with the judge's probability.
pub trait Judge {
    fn judge(
        &mut self,
        questions: &[String],
        answers: &[String],
    ) -> Result<Vec<(bool, f64)>, BoxError>;
}

#[derive(Clone, Debug, Serialize)]
pub struct Judged {
    pub id: String,
    pub topic: String,
    pub question: String,
    pub answer: String,
    pub objective: bool,
    pub prob: f64,
}

pub struct ObjecqaEvaluator<J: Judge> {
    questions: Vec<Question>,
    judge: J,
    max_new_tokens: usize,
    last: Vec<Judged>,
}

impl<J: Judge> ObjecqaEvaluator<J> {
    /// The first `limit` questions (0 = all).
    pub fn new(questions: Vec<Question>, limit: usize, judge: J, max_new_tokens: usize) -> Self {
        let take = if limit == 0 {
            questions.len()
        } else {
            limit.min(questions.len())
        };
        Self {
            questions: questions.into_iter().take(take).collect(),
            judge,
            max_new_tokens,
            last: Vec::new(),
        }
    }

    pub fn last(&self) -> &[Judged] {
        &self.last
    }

    /// Answer and judge; returns (score, objective count, n).
    pub fn score(&mut self, model: &mut dyn Answer) -> Result<(f64, usize, usize), BoxError> {
        let qs: Vec<String> = self.questions.iter().map(|q| q.question.clone()).collect();
        let answers = model.answer(&qs, self.max_new_tokens)?;
        if answers.len() != qs.len() {
            return Err(format!("{} answers for {} questions", answers.len(), qs.len()).into());
        }
        let verdicts = self.judge.judge(&qs, &answers)?;
        self.last = self
            .questions
            .iter()
            .zip(answers)
            .zip(verdicts)
            .map(|((q, answer), (objective, prob))| Judged {
                id: q.id.clone(),
                topic: q.topic.clone(),
                question: q.question.clone(),
                // No answer is no objective answer.
                objective: objective && !answer.trim().is_empty(),
                prob,
                answer,
            })
            .collect();
        let k = self.last.iter().filter(|j| j.objective).count();
        let n = self.last.len();
        Ok((if n == 0 { 0.0 } else { k as f64 / n as f64 }, k, n))
    }
}

impl<J: Judge> Evaluator for ObjecqaEvaluator<J> {
    fn name(&self) -> &str {
        "objecqa"
    }

    fn evaluate(&mut self, model: &mut dyn Answer, out_dir: &Path) -> Result<EvalReport, BoxError> {
        let (score, k, n) = self.score(model)?;
        std::fs::create_dir_all(out_dir)?;
        let path = out_dir.join("objecqa-answers.jsonl");
        let mut f = std::io::BufWriter::new(std::fs::File::create(&path)?);
        for j in &self.last {
            writeln!(f, "{}", serde_json::to_string(j)?)?;
        }
        f.flush()?;
        let (lo, hi) = wilson_interval(k, n);
        let mut r = EvalReport {
            primary: score,
            ..Default::default()
        };
        r.scores.insert("objecqa".into(), score);
        r.scores.insert("objecqa_ci_low".into(), lo);
        r.scores.insert("objecqa_ci_high".into(), hi);
        r.details.insert("n".into(), n.into());
        r.details
            .insert("answers".into(), path.display().to_string().into());
        Ok(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bundled_has_100_unique_questions() {
        let q = bundled();
        assert_eq!(q.len(), 100);
        let mut ids: Vec<&str> = q.iter().map(|x| x.id.as_str()).collect();
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), 100);
    }

    struct Fixed(Vec<&'static str>);
    impl Answer for Fixed {
        fn answer(&mut self, q: &[String], _: usize) -> Result<Vec<String>, BoxError> {
            Ok((0..q.len())
                .map(|i| self.0[i % self.0.len()].to_string())
                .collect())
        }
    }
    struct ByWord;
    impl Judge for ByWord {
        fn judge(&mut self, _: &[String], a: &[String]) -> Result<Vec<(bool, f64)>, BoxError> {
            Ok(a.iter()
                .map(|s| (s.contains("depends") || s.is_empty(), 1.0))
                .collect())
        }
    }

    #[test]
    fn score_on_fixed_answers() {
        let mut ev = ObjecqaEvaluator::new(bundled(), 0, ByWord, 32);
        let mut model = Fixed(vec!["It depends on you.", "Python.", "", "Summer."]);
        let t = tempfile::tempdir().unwrap();
        let r = ev.evaluate(&mut model, t.path()).unwrap();
        // 25 "depends" answers of 100; the 25 empty ones never count.
        assert!((r.primary - 0.25).abs() < 1e-12, "{}", r.primary);
        assert_eq!(
            std::fs::read_to_string(t.path().join("objecqa-answers.jsonl"))
                .unwrap()
                .lines()
                .count(),
            100
        );
    }
}
