//! The evaluators of a config, bound to their classifiers.
use crate::config::GenEvalConfig;
use crate::TrainError;
use candle_core::Device;
use sft_eval::Evaluator;

/// The IFS evaluator: the bundled instruction set (or `items`), the shipped tone classifier
/// (or `classifier`). The classifier runs on the CPU: it is small, and keeps the GPU free.
pub fn ifs(e: &GenEvalConfig, _device: &Device) -> Result<Box<dyn Evaluator>, TrainError> {
    let set = match &e.items {
        Some(p) => sft_ifs::instructions::load(p)
            .map_err(|err| TrainError::Config(format!("eval.ifs.items: {err}")))?,
        None => sft_ifs::instructions::bundled(),
    };
    let tone = sft_ifs::tone::Tone::load(e.classifier.as_deref(), &Device::Cpu)
        .map_err(|err| TrainError::Eval(format!("the IFS tone classifier: {err}")))?;
    Ok(Box::new(sft_ifs::evaluator::IfsEvaluator::new(
        &set,
        e.limit,
        tone,
        e.max_new_tokens,
    )))
}

/// The ObjecQA evaluator: the bundled 100 questions (or `items`) and the shipped judge.
pub fn objecqa(e: &GenEvalConfig, _device: &Device) -> Result<Box<dyn Evaluator>, TrainError> {
    let qs = match &e.items {
        Some(p) => sft_objecqa::load(p)
            .map_err(|err| TrainError::Config(format!("eval.objecqa.items: {err}")))?,
        None => sft_objecqa::bundled(),
    };
    let judge = sft_objecqa::judge::EncoderJudge::load(e.classifier.as_deref(), &Device::Cpu)
        .map_err(|err| TrainError::Eval(format!("the ObjecQA judge: {err}")))?;
    Ok(Box::new(sft_objecqa::ObjecqaEvaluator::new(
        qs,
        e.limit,
        judge,
        e.max_new_tokens,
    )))
}
