//! The progress bar: examples/s, tokens/s, loss, lr, each evaluator's latest score and the ETA. Drawn only
//! on a terminal (indicatif hides itself otherwise; the logs carry the same numbers).
use crate::config::Config;
use indicatif::{ProgressBar, ProgressStyle};
use std::cell::{Cell, RefCell};
use std::time::Instant;

pub struct Progress {
    bar: Option<ProgressBar>,
    start: Instant,
    start_examples: u64,
    tokens: Cell<u64>,
    /// Each evaluator's latest primary score, in the order they first ran.
    scores: RefCell<Vec<(String, f64)>>,
}

impl Progress {
    /// `show`: this process draws the bar (rank 0 of a data-parallel run).
    pub fn new(cfg: &Config, show: bool, total_steps: u64, step: u64, examples: u64) -> Self {
        let bar = (show && cfg.logging.progress).then(|| {
            let bar = ProgressBar::new(total_steps);
            bar.set_style(
                ProgressStyle::with_template("{bar:30} {pos}/{len} steps  {msg}  ETA {eta}")
                    .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            bar.set_position(step);
            bar
        });
        Self {
            bar,
            start: Instant::now(),
            start_examples: examples,
            tokens: Cell::new(0),
            scores: RefCell::new(Vec::new()),
        }
    }

    pub fn step(&self, step: u64, examples: u64, tokens: usize, loss: f64, lr: f64, _dt: f64) {
        self.tokens.set(self.tokens.get() + tokens as u64);
        if let Some(bar) = &self.bar {
            let secs = self.start.elapsed().as_secs_f64().max(1e-9);
            let scores: String = self
                .scores
                .borrow()
                .iter()
                .map(|(name, v)| format!("  {name} {v:.3}"))
                .collect();
            bar.set_message(format!(
                "{:.1} ex/s  {:.0} tok/s  loss {loss:.4}  lr {lr:.2e}{scores}",
                (examples - self.start_examples) as f64 / secs,
                self.tokens.get() as f64 / secs,
            ));
            bar.set_position(step);
        }
    }

    /// An evaluator's latest primary score.
    pub fn set_score(&self, name: &str, score: f64) {
        let mut scores = self.scores.borrow_mut();
        match scores.iter_mut().find(|(n, _)| n == name) {
            Some(s) => s.1 = score,
            None => scores.push((name.to_string(), score)),
        }
    }

    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}
