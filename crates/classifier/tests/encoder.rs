//! The encoder against an independent numpy implementation of all-MiniLM-L6-v2
//! (scripts/minilm_reference.py wrote tests/data/minilm_reference.json).
mod common;

use candle_core::Device;
use sft_classifier::Encoder;

#[derive(serde::Deserialize)]
struct Reference {
    texts: Vec<String>,
    ids: Vec<Vec<u32>>,
    embeddings: Vec<Vec<f32>>,
}

fn reference() -> Reference {
    let text = std::fs::read_to_string(common::data("minilm_reference.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

#[test]
fn matches_the_numpy_reference_in_one_padded_batch() {
    let enc = common::encoder();
    let r = reference();
    assert_eq!(enc.token_ids(&r.texts).unwrap(), r.ids);
    let got = enc.embed(&r.texts).unwrap().to_vec2::<f32>().unwrap();
    for (i, (g, want)) in got.iter().zip(&r.embeddings).enumerate() {
        let worst = g
            .iter()
            .zip(want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(
            worst < 1e-4,
            "text {i} ({:?}): max |diff| {worst}",
            r.texts[i]
        );
        let norm: f32 = g.iter().map(|v| v * v).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-5);
    }
}

#[test]
fn order_and_values_do_not_depend_on_batching() {
    let r = reference();
    let mut small = Encoder::load(common::encoder().dir(), &Device::Cpu).unwrap();
    small.set_batch_size(2);
    let mut texts = r.texts.clone();
    texts.reverse();
    let got = small.embed(&texts).unwrap().to_vec2::<f32>().unwrap();
    for (g, want) in got.iter().zip(r.embeddings.iter().rev()) {
        let worst = g
            .iter()
            .zip(want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(worst < 1e-4);
    }
    assert_eq!(small.embed(&[]).unwrap().dims(), &[0, 384]);
}

#[test]
fn truncates_long_texts() {
    let mut enc = Encoder::load(common::encoder().dir(), &Device::Cpu).unwrap();
    let long = vec!["word ".repeat(1000)];
    assert_eq!(
        enc.token_ids(&long).unwrap()[0].len(),
        Encoder::DEFAULT_MAX_LEN
    );
    enc.set_max_len(16).unwrap();
    assert_eq!(enc.token_ids(&long).unwrap()[0].len(), 16);
    assert!(enc.set_max_len(1000).is_err());
    assert_eq!(enc.embed(&long).unwrap().dims(), &[1, 384]);
}

#[test]
fn a_missing_folder_is_named_in_the_error() {
    let err = Encoder::load("/nonexistent/minilm", &Device::Cpu).unwrap_err();
    assert!(err.to_string().contains("/nonexistent/minilm"), "{err}");
}
