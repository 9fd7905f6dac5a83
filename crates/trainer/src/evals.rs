//! The evaluators of a config, bound to their classifiers.
use crate::config::GenEvalConfig;
use crate::TrainError;
use candle_core::Device;
use sft_eval::Evaluator;

pub fn ifs(e: &GenEvalConfig, device: &Device) -> Result<Box<dyn Evaluator>, TrainError> {
    let _ = (e, device);
    Err(TrainError::Eval(
        "the IFS evaluator is not wired yet".into(),
    ))
}

pub fn objecqa(e: &GenEvalConfig, device: &Device) -> Result<Box<dyn Evaluator>, TrainError> {
    let _ = (e, device);
    Err(TrainError::Eval(
        "the ObjecQA evaluator is not wired yet".into(),
    ))
}
