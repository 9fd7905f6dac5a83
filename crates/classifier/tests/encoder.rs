//! The encoder against an independent numpy implementation of all-MiniLM-L6-v2
//! (scripts/minilm_reference.py wrote tests/data/minilm_reference.json).
mod common;

use candle_core::{Device, Tensor};
use sft_classifier::finetune::{self, Adapter, BertWeights};
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

/// The fine-tuning's own forward (LayerNorm from primitive ops, with backward) gives candle's
/// BERT's embeddings on the frozen weights.
#[test]
fn the_differentiable_forward_equals_candles_bert() {
    let enc = common::encoder();
    let r = reference();
    let weights = BertWeights::load(enc.dir(), &Device::Cpu).unwrap();
    let ids = enc.token_ids(&r.texts).unwrap();
    let ours = weights.embed(&ids, &[]).unwrap().to_vec2::<f32>().unwrap();
    let theirs = enc.embed(&r.texts).unwrap().to_vec2::<f32>().unwrap();
    let worst = max_diff(&ours, &theirs);
    assert!(worst < 1e-5, "max |diff| {worst}");
}

fn max_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .flat_map(|(x, y)| x.iter().zip(y).map(|(p, q)| (p - q).abs()))
        .fold(0f32, f32::max)
}

/// Deltas merged into the weights at load (the inference path of a fine-tuned head) give the
/// same embeddings as the adapters in the training forward, and different ones from the frozen
/// encoder.
#[test]
fn merged_deltas_equal_the_adapted_forward() {
    use rand::{Rng, SeedableRng};
    let enc = common::encoder();
    let r = reference();
    let weights = BertWeights::load(enc.dir(), &Device::Cpu).unwrap();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    let mut t = |shape: &[usize], a: f32| {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| rng.random_range(-a..a)).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    };
    let (rank, d, inter) = (4, 384, 1536);
    let mut stored = Vec::new();
    for l in [4, 5] {
        for (m, i, o) in [
            ("attention.self.query", d, d),
            ("attention.self.key", d, d),
            ("attention.self.value", d, d),
            ("attention.output.dense", d, d),
            ("intermediate.dense", d, inter),
            ("output.dense", inter, d),
        ] {
            let p = format!("{}encoder.layer.{l}.{m}", finetune::PREFIX);
            stored.push((format!("{p}.lora_a"), t(&[rank, i], 0.05)));
            stored.push((format!("{p}.lora_b"), t(&[o, rank], 0.05)));
        }
        for m in finetune::NORMS {
            let p = format!("{}encoder.layer.{l}.{m}", finetune::PREFIX);
            stored.push((format!("{p}.weight"), t(&[d], 0.1)));
            stored.push((format!("{p}.bias"), t(&[d], 0.1)));
        }
    }
    let scale = 2.0;
    let adapters = Adapter::from_stored(&stored, 6, scale).unwrap();
    assert_eq!(adapters.len(), 2);
    let ids = enc.token_ids(&r.texts).unwrap();
    let ours = weights
        .embed(&ids, &adapters)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    let merged = enc
        .with_deltas(&finetune::merged_deltas(&stored, scale).unwrap())
        .unwrap();
    let theirs = merged.embed(&r.texts).unwrap().to_vec2::<f32>().unwrap();
    let worst = max_diff(&ours, &theirs);
    assert!(worst < 1e-5, "max |diff| {worst}");
    let frozen = enc.embed(&r.texts).unwrap().to_vec2::<f32>().unwrap();
    assert!(
        max_diff(&ours, &frozen) > 1e-2,
        "the deltas changed nothing"
    );
}
