//! Development tool: chooses the tone head's training settings on the VALIDATION split of the
//! real outputs (never the test split): the weight (repeat) of the hand-labelled train lines
//! against the recipe's examples, the optimizer steps, the hidden width and the threshold, and
//! (SEEDS) the spread over the head's initialisation. Prints validation and bundled held-out
//! accuracy per setting. Embeddings are cached under /tmp.
//!
//! `cargo run --release -p sft-classifier --example tune_tone -- configs/classifier/tone.yaml`
//! (run from the repository root; the config's `labelled` repeat is what the grid replaces).
use std::path::PathBuf;

use candle_core::{Device, Tensor};
use sft_classifier::eval::Labelled;
use sft_classifier::metrics::THRESHOLD_SWEEP;
use sft_classifier::train::{tone_dataset, TrainConfig};
use sft_classifier::{Encoder, FeatureSet, Head, HeadKind, HeadTrainConfig, Metrics};

fn embed_cached(enc: &Encoder, texts: &[String], tag: &str) -> Tensor {
    let h = sft_classifier::recipe::fnv1a(texts.join("\u{1}").as_bytes());
    let path = PathBuf::from(format!("/tmp/sft-emb-{tag}-{h:016x}.safetensors"));
    if let Ok(m) = candle_core::safetensors::load(&path, &Device::Cpu) {
        return m["e"].clone();
    }
    let t = std::time::Instant::now();
    let e = enc.embed(texts).expect("embedding");
    eprintln!(
        "embedded {} texts in {:.1}s",
        texts.len(),
        t.elapsed().as_secs_f64()
    );
    candle_core::safetensors::save(&std::collections::HashMap::from([("e", e.clone())]), &path)
        .expect("caching embeddings");
    e
}

fn inputs(enc: &Encoder, items: &[Labelled], f: FeatureSet, tag: &str) -> Tensor {
    let texts: Vec<String> = items.iter().map(|l| l.text.clone()).collect();
    let e = embed_cached(enc, &texts, tag);
    let feats: Vec<f32> = items.iter().flat_map(|l| f.compute(&l.text)).collect();
    let feats = Tensor::from_vec(feats, (items.len(), f.len()), &Device::Cpu).expect("features");
    Tensor::cat(&[e, feats], 1).expect("inputs")
}

fn main() {
    let path = std::env::args()
        .nth(1)
        .expect("usage: tune_tone CONFIG.yaml");
    let cfg = TrainConfig::from_yaml_file(&path).expect("config");
    let mut tone = cfg.tone.clone().expect("a tone config");
    assert!(
        tone.validation
            .iter()
            .all(|v| !v.path.to_string_lossy().contains("real_outputs/test")),
        "the test split is never a validation source"
    );
    let labelled = std::mem::take(&mut tone.labelled);
    let base = tone_dataset(&tone).expect("recipe data");
    let mut real = Vec::new();
    for src in &labelled {
        let items = sft_classifier::eval::select_split(
            sft_classifier::eval::read_labelled(&src.path, sft_classifier::eval::TONE_KEYS)
                .expect("labelled file"),
            src.split.as_deref(),
        );
        real.extend(items);
    }
    let mut enc = Encoder::load_default(&Device::Cpu).expect("encoder");
    enc.set_max_len(cfg.max_len).expect("max_len");
    let f = cfg.features;
    let x_rec = inputs(&enc, &base.train, f, "tone-tr");
    let x_ho = inputs(&enc, &base.heldout, f, "tone-ho");
    let x_real = inputs(&enc, &real, f, "real-tr");
    let x_val = inputs(&enc, &base.validation, f, "real-val");
    let y = |v: &[Labelled]| -> Vec<u8> { v.iter().map(|l| l.label).collect() };
    let (y_rec, y_ho, y_real, y_val) = (
        y(&base.train),
        y(&base.heldout),
        y(&real),
        y(&base.validation),
    );
    println!(
        "recipe train {} heldout {} real train {} validation {}",
        y_rec.len(),
        y_ho.len(),
        y_real.len(),
        y_val.len()
    );
    let repeats: Vec<usize> = std::env::var("REPEATS")
        .unwrap_or_else(|_| "0,1,2,4,8,16".into())
        .split(',')
        .map(|s| s.parse().expect("REPEATS"))
        .collect();
    let steps: Vec<usize> = std::env::var("STEPS")
        .unwrap_or_else(|_| "400,800".into())
        .split(',')
        .map(|s| s.parse().expect("STEPS"))
        .collect();
    let hidden: Vec<usize> = std::env::var("HIDDEN")
        .unwrap_or_else(|_| "64".into())
        .split(',')
        .map(|s| s.parse().expect("HIDDEN"))
        .collect();
    // Other seeds of the head's initialisation show how much of a difference is noise.
    let seeds: Vec<u64> = std::env::var("SEEDS")
        .unwrap_or_else(|_| cfg.head_config().seed.to_string())
        .split(',')
        .map(|s| s.parse().expect("SEEDS"))
        .collect();
    for &r in &repeats {
        let mut xs = vec![x_rec.clone()];
        let mut ys = y_rec.clone();
        for _ in 0..r {
            xs.push(x_real.clone());
            ys.extend(&y_real);
        }
        let x = Tensor::cat(&xs, 0).expect("cat");
        for &s in &steps {
            for (&h, &seed) in hidden
                .iter()
                .flat_map(|h| seeds.iter().map(move |s| (h, s)))
            {
                let hc = HeadTrainConfig {
                    head: HeadKind::Mlp { hidden: h },
                    steps: s,
                    seed,
                    ..cfg.head_config()
                };
                let (head, _) = Head::train(&x, &ys, &hc).expect("train");
                let pv = head.probs(&x_val).expect("probs");
                let ph = head.probs(&x_ho).expect("probs");
                let mut line = format!("repeat {r:>2} steps {s:>4} hidden {h:>3} seed {seed}:");
                for t in THRESHOLD_SWEEP {
                    let mv = Metrics::at_threshold(&pv, &y_val, t);
                    let mh = Metrics::at_threshold(&ph, &y_ho, t);
                    line.push_str(&format!(
                        "  t{t:.1} val {}/{} heldout {:.4}",
                        mv.tp + mv.tn,
                        mv.n,
                        mh.accuracy
                    ));
                }
                println!("{line}");
            }
        }
    }
}
