//! The ObjecQA judge: sft-classifier's MiniLM encoder with the head shipped in
//! `assets/judge_head.safetensors` (compiled in), or a head the user trained.
use crate::Judge;
use sft_classifier::Encoder;
use sft_eval::BoxError;
use std::path::Path;
use std::sync::Arc;

pub struct EncoderJudge(pub sft_classifier::Judge);

impl EncoderJudge {
    pub fn load(head: Option<&Path>, device: &candle_core::Device) -> Result<Self, BoxError> {
        let encoder = Arc::new(Encoder::load_default(device)?);
        let j = match head {
            Some(p) => sft_classifier::Judge::load(encoder, p)?,
            None => sft_classifier::Judge::default_embedded(encoder)?,
        };
        Ok(Self(j))
    }
}

impl Judge for EncoderJudge {
    fn judge(
        &mut self,
        questions: &[String],
        answers: &[String],
    ) -> Result<Vec<(bool, f64)>, BoxError> {
        let qa: Vec<(String, String)> = questions
            .iter()
            .cloned()
            .zip(answers.iter().cloned())
            .collect();
        Ok(self
            .0
            .predict(&qa)?
            .into_iter()
            .map(|(l, p)| (l == 1, p as f64))
            .collect())
    }
}
