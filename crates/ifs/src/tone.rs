//! The response-tone classifier behind IFS: sft-classifier's MiniLM encoder with the head
//! shipped in `assets/tone_head.safetensors` (compiled into sft-classifier), or a head the
//! user trained.
use crate::evaluator::ToneLabeler;
use sft_classifier::{Encoder, ToneClassifier};
use sft_eval::BoxError;
use std::path::Path;
use std::sync::Arc;

pub struct Tone(pub ToneClassifier);

impl Tone {
    /// The encoder from the cache (`$SFT_CACHE/models/all-minilm-l6-v2`) and the shipped head,
    /// or the head at `head` (a file or a folder holding `head.safetensors`).
    pub fn load(head: Option<&Path>, device: &candle_core::Device) -> Result<Self, BoxError> {
        let encoder = Arc::new(Encoder::load_default(device)?);
        let c = match head {
            Some(p) => ToneClassifier::load(encoder, p)?,
            None => ToneClassifier::default_embedded(encoder)?,
        };
        Ok(Self(c))
    }
}

impl ToneLabeler for Tone {
    fn label(&mut self, responses: &[String]) -> Result<Vec<(bool, f64)>, BoxError> {
        Ok(self
            .0
            .predict(responses)?
            .into_iter()
            .map(|(l, p)| (l == 1, p as f64))
            .collect())
    }
}
