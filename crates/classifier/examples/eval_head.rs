//! Scores a tone head file (frozen or fine-tuned) on labelled JSONL files, as
//! `sft classifier eval` does, printing accuracy with its Wilson interval per template and kind:
//! `cargo run --release -p sft-classifier --example eval_head -- HEAD.safetensors FILE.jsonl ...`
use std::sync::Arc;

use candle_core::Device;
use sft_classifier::eval::{breakdown, evaluate, read_labelled, TONE_KEYS};
use sft_classifier::{Encoder, ToneClassifier};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let head = args
        .next()
        .ok_or("usage: eval_head HEAD.safetensors FILE.jsonl ...")?;
    let encoder = Arc::new(Encoder::load_default(&Device::Cpu)?);
    let tone = ToneClassifier::load(encoder, &head)?;
    for path in args {
        let items = read_labelled(&path, TONE_KEYS)?;
        let (_, preds) = evaluate(tone.classifier(), &items)?;
        let b = breakdown(&items, &preds);
        println!("{path}: {}", serde_json::to_string(&b)?);
    }
    Ok(())
}
