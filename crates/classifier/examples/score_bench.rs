//! Benchmark: the cost of scoring one IFS evaluation's responses with the shipped tone
//! classifier (load once, then `ToneClassifier::predict` on all of them), and where the time
//! goes (tokenizing, the encoder, features + head). Run by `scripts/bench/classifier`.
//!
//! `cargo run --release -p sft-classifier --example score_bench -- RESPONSES.jsonl [N] [REPEATS]`
//! reads the `response` field of each line, cycles the lines to N texts (default 548: 274
//! instructions, full and fragment) and prints one JSON line of seconds (best of REPEATS, default
//! 3). BATCH and MAX_LEN set the encoder's batch size and token limit; DUMP=FILE writes the
//! token ids and our embeddings as JSON (`{"ids": [[...]], "embeddings": [[...]]}`) for the peer.
use std::sync::Arc;
use std::time::Instant;

use candle_core::Device;
use sft_classifier::eval::{read_labelled, TONE_KEYS};
use sft_classifier::{Encoder, ToneClassifier};

fn env_usize(key: &str) -> Option<usize> {
    std::env::var(key).ok().and_then(|v| v.parse().ok())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let path = args
        .next()
        .ok_or("usage: score_bench RESPONSES.jsonl [N] [REPEATS]")?;
    let n: usize = args.next().map(|s| s.parse()).transpose()?.unwrap_or(548);
    let repeats: usize = args.next().map(|s| s.parse()).transpose()?.unwrap_or(3);
    let items = read_labelled(&path, TONE_KEYS)?;
    if items.is_empty() {
        return Err(format!("{path}: no responses").into());
    }
    let texts: Vec<String> = items
        .iter()
        .cycle()
        .take(n)
        .map(|l| l.text.clone())
        .collect();

    let t = Instant::now();
    let mut enc = Encoder::load_default(&Device::Cpu)?;
    if let Some(b) = env_usize("BATCH") {
        enc.set_batch_size(b);
    }
    if let Some(m) = env_usize("MAX_LEN") {
        enc.set_max_len(m)?;
    }
    let enc = Arc::new(enc);
    let tone = ToneClassifier::default_embedded(enc.clone())?;
    let load_s = t.elapsed().as_secs_f64();

    let ids = enc.token_ids(&texts)?;
    let tokens: usize = ids.iter().map(|v| v.len()).sum();
    let (mut best_total, mut best_tok, mut best_embed) = (f64::MAX, f64::MAX, f64::MAX);
    let mut answer_like = 0;
    for _ in 0..repeats {
        let t = Instant::now();
        let preds = tone.predict(&texts)?;
        best_total = best_total.min(t.elapsed().as_secs_f64());
        answer_like = preds.iter().filter(|p| p.0 == 1).count();
        let t = Instant::now();
        enc.token_ids(&texts)?;
        best_tok = best_tok.min(t.elapsed().as_secs_f64());
        let t = Instant::now();
        enc.embed(&texts)?;
        best_embed = best_embed.min(t.elapsed().as_secs_f64());
    }
    if let Ok(dump) = std::env::var("DUMP") {
        let emb: Vec<Vec<f32>> = enc.embed(&texts)?.to_vec2()?;
        let json = serde_json::json!({"ids": ids, "embeddings": emb});
        std::fs::write(&dump, json.to_string())?;
    }
    println!(
        "{{\"n\": {n}, \"tokens\": {tokens}, \"max_len\": {}, \"load_s\": {load_s:.3}, \"score_s\": {best_total:.3}, \"tokenize_s\": {best_tok:.3}, \"embed_s\": {best_embed:.3}, \"answer_like\": {answer_like}, \"threads\": {}}}",
        enc.max_len(),
        candle_core::utils::get_num_threads()
    );
    Ok(())
}
