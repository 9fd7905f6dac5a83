//! The evaluators of a run: each an [`sft_eval::Evaluator`] with its own schedule. The trainer
//! runs whatever list it is given; [`from_config`] is the one place that knows the shipped
//! evaluators by name (`eval.ifs`, `eval.objecqa`), and [`ifs`] and [`objecqa`] build them for
//! the `sft ifs` and `sft objecqa` commands too.
use crate::config::{Config, GenEvalConfig};
use crate::error::TrainError;
use candle_core::Device;
use sft_eval::Evaluator;
use sft_ifs::evaluator::IfsEvaluator;
use sft_ifs::tone::Tone;
use sft_objecqa::judge::EncoderJudge;
use sft_objecqa::ObjecqaEvaluator;

/// An evaluator and when it runs.
pub struct Scheduled {
    pub evaluator: Box<dyn Evaluator>,
    /// `every_examples` and `at_start` say when it runs; `template` and `batch_size` how the
    /// model answers (the other keys are the builder's).
    pub schedule: GenEvalConfig,
    /// Its primary score ranks the checkpoints (`best`, higher is better) instead of the
    /// held-out loss. The first evaluator that says so does.
    pub ranks_best: bool,
}

impl Scheduled {
    pub fn new(evaluator: Box<dyn Evaluator>, schedule: GenEvalConfig) -> Self {
        Self {
            evaluator,
            schedule,
            ranks_best: false,
        }
    }

    /// The evaluator's name: its metrics lines' `eval`, the key of its primary score.
    pub fn name(&self) -> &str {
        self.evaluator.name()
    }
}

/// The evaluators a config turns on (`every_examples` > 0), IFS first: IFS ranks checkpoints.
pub fn from_config(cfg: &Config) -> Result<Vec<Scheduled>, TrainError> {
    let in_section = |section: &str| {
        let section = section.to_string();
        move |e: TrainError| match e {
            TrainError::Config(m) => TrainError::Config(format!("{section}: {m}")),
            e => e,
        }
    };
    let mut out = Vec::new();
    if cfg.eval.ifs.every_examples > 0 {
        let ev = ifs(&cfg.eval.ifs).map_err(in_section("eval.ifs"))?;
        out.push(Scheduled {
            ranks_best: true,
            ..Scheduled::new(Box::new(ev), cfg.eval.ifs.clone())
        });
    }
    if cfg.eval.objecqa.every_examples > 0 {
        let ev = objecqa(&cfg.eval.objecqa).map_err(in_section("eval.objecqa"))?;
        out.push(Scheduled::new(Box::new(ev), cfg.eval.objecqa.clone()));
    }
    Ok(out)
}

/// The IFS evaluator: the bundled instruction set (or `items`), the shipped tone classifier
/// (or `classifier`). The classifier runs on the CPU: it is small, and keeps the GPU free.
pub fn ifs(e: &GenEvalConfig) -> Result<IfsEvaluator<Tone>, TrainError> {
    let set = match &e.items {
        Some(p) => sft_ifs::instructions::load(p)
            .map_err(|err| TrainError::Config(format!("items: {err}")))?,
        None => sft_ifs::instructions::bundled(),
    };
    let tone = Tone::load(e.classifier.as_deref(), &Device::Cpu)
        .map_err(|err| TrainError::Eval(format!("the IFS tone classifier: {err}")))?;
    Ok(IfsEvaluator::new(&set, e.limit, tone, e.max_new_tokens))
}

/// The ObjecQA evaluator: the bundled 100 questions (or `items`) and the shipped judge (or
/// `classifier`), on the CPU.
pub fn objecqa(e: &GenEvalConfig) -> Result<ObjecqaEvaluator<EncoderJudge>, TrainError> {
    let qs = match &e.items {
        Some(p) => {
            sft_objecqa::load(p).map_err(|err| TrainError::Config(format!("items: {err}")))?
        }
        None => sft_objecqa::bundled(),
    };
    let judge = EncoderJudge::load(e.classifier.as_deref(), &Device::Cpu)
        .map_err(|err| TrainError::Eval(format!("the ObjecQA judge: {err}")))?;
    Ok(ObjecqaEvaluator::new(qs, e.limit, judge, e.max_new_tokens))
}
