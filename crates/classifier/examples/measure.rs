//! Development tool: compares head designs (features, head kind, input) on the tone recipe's
//! held-out split and the judge's test split, with embeddings cached under /tmp.
//! `cargo run --release -p sft-classifier --example measure -- CONFIG.yaml` (VIEWS, DUMP: see below)
use std::collections::BTreeMap;
use std::path::PathBuf;

use candle_core::{Device, Tensor};
use sft_classifier::classifier::View;
use sft_classifier::eval::Labelled;
use sft_classifier::train::{judge_dataset, tone_dataset};
use sft_classifier::{Encoder, FeatureSet, Head, HeadKind, HeadTrainConfig, Metrics};

fn embed_cached(enc: &Encoder, texts: &[String], tag: &str) -> Tensor {
    let h = sft_classifier::recipe::fnv1a(texts.join("\u{1}").as_bytes());
    let path = PathBuf::from(format!("/tmp/sft-emb-{tag}-{h:016x}.safetensors"));
    if let Ok(m) = candle_core::safetensors::load(&path, &Device::Cpu) {
        return m["e"].clone();
    }
    let t = std::time::Instant::now();
    let e = enc.embed(texts).unwrap();
    eprintln!(
        "embedded {} texts in {:.1}s",
        texts.len(),
        t.elapsed().as_secs_f64()
    );
    candle_core::safetensors::save(&std::collections::HashMap::from([("e", e.clone())]), &path)
        .unwrap();
    e
}

fn inputs(enc: &Encoder, items: &[Labelled], views: &[View], f: FeatureSet, tag: &str) -> Tensor {
    let mut parts = Vec::new();
    for v in views {
        let texts: Vec<String> = items
            .iter()
            .map(|l| v.render(&l.context, &l.text))
            .collect();
        parts.push(embed_cached(enc, &texts, &format!("{tag}-{v:?}")));
    }
    if !f.is_empty() {
        let feats: Vec<f32> = items.iter().flat_map(|l| f.compute(&l.text)).collect();
        parts.push(Tensor::from_vec(feats, (items.len(), f.len()), &Device::Cpu).unwrap());
    }
    Tensor::cat(&parts, 1).unwrap()
}

fn main() {
    let which = std::env::args().nth(1).expect("usage: measure CONFIG.yaml");
    let enc = Encoder::load_default(&Device::Cpu).unwrap();
    let cfg = sft_classifier::TrainConfig::from_yaml_file(&which).unwrap();
    let which = cfg.task.name().to_string();
    let ds = match &cfg.tone {
        Some(t) => tone_dataset(t).unwrap(),
        None => judge_dataset(cfg.judge.as_ref().unwrap()).unwrap(),
    };
    let shapes: Vec<String> = if cfg.tone.is_some() {
        ds.heldout_examples.iter().map(|e| e.shape.name()).collect()
    } else {
        vec![String::new(); ds.heldout.len()]
    };
    println!(
        "train {} heldout {} counts {:?}",
        ds.train.len(),
        ds.heldout.len(),
        ds.counts
    );
    let ytr: Vec<u8> = ds.train.iter().map(|l| l.label).collect();
    let yho: Vec<u8> = ds.heldout.iter().map(|l| l.label).collect();
    let feature_sets = if which == "ifs-tone" {
        if std::env::var("DUMP").is_ok() {
            vec![FeatureSet::Tone]
        } else {
            vec![FeatureSet::None, FeatureSet::Tone]
        }
    } else {
        vec![FeatureSet::None, FeatureSet::Stance]
    };
    let heads: Vec<HeadKind> = if std::env::var("DUMP").is_ok() {
        vec![HeadKind::Mlp { hidden: 64 }]
    } else {
        vec![
            HeadKind::Logistic,
            HeadKind::Mlp { hidden: 64 },
            HeadKind::Mlp { hidden: 128 },
        ]
    };
    let view_sets: Vec<Vec<View>> = std::env::var("VIEWS")
        .unwrap_or_else(|_| "text;text,last".into())
        .split(';')
        .map(|vs| {
            vs.split(',')
                .map(|v| match v {
                    "text" => View::Text,
                    "ctx" => View::ContextAndText,
                    "first" => View::FirstSentence,
                    "last" => View::LastSentence,
                    other => panic!("view {other}"),
                })
                .collect()
        })
        .collect();
    for input in view_sets {
        for f in feature_sets.clone() {
            let xtr = inputs(&enc, &ds.train, &input, f, &format!("{which}-tr"));
            let xho = inputs(&enc, &ds.heldout, &input, f, &format!("{which}-ho"));
            for &head in &heads {
                let grid: Vec<(usize, f64, f64)> = if std::env::var("DUMP").is_ok() {
                    vec![(400, 0.01, 1e-3)]
                } else {
                    vec![(400, 0.01, 1e-3), (800, 0.01, 1e-2), (300, 0.003, 1e-3)]
                };
                for (steps, lr, wd) in grid {
                    let cfg = HeadTrainConfig {
                        head,
                        steps,
                        lr,
                        weight_decay: wd,
                        ..Default::default()
                    };
                    let t = std::time::Instant::now();
                    let (h, losses) = Head::train(&xtr, &ytr, &cfg).unwrap();
                    let secs = t.elapsed().as_secs_f64();
                    let p = h.probs(&xho).unwrap();
                    let pred: Vec<u8> = p.iter().map(|&p| (p >= 0.5) as u8).collect();
                    let m = Metrics::from_labels(&pred, &yho);
                    let mtr = Metrics::at_threshold(&h.probs(&xtr).unwrap(), &ytr, 0.5);
                    let mut wrong: BTreeMap<&str, (usize, usize)> = BTreeMap::new();
                    for i in 0..yho.len() {
                        let e = wrong.entry(shapes[i].as_str()).or_default();
                        e.1 += 1;
                        if pred[i] != yho[i] {
                            e.0 += 1;
                        }
                    }
                    if std::env::var("DUMP").is_ok() {
                        for i in 0..yho.len() {
                            if pred[i] != yho[i] {
                                println!(
                                    "  WRONG {} p={:.3} {:?} || {:?}",
                                    shapes[i],
                                    p[i],
                                    ds.heldout[i].context.chars().take(80).collect::<String>(),
                                    ds.heldout[i].text.chars().take(160).collect::<String>()
                                );
                            }
                        }
                    }
                    let wrong: Vec<String> = wrong
                        .iter()
                        .filter(|(_, v)| v.0 > 0)
                        .map(|(k, v)| format!("{k}:{}/{}", v.0, v.1))
                        .collect();
                    println!(
                        "{input:?} {f:?} {head:?} steps={steps} lr={lr} wd={wd}: heldout acc {:.4} p {:.4} r {:.4} f1 {:.4} | train acc {:.4} loss {:.4} ({secs:.1}s) wrong {}",
                        m.accuracy, m.precision, m.recall, m.f1, mtr.accuracy, losses.last().unwrap(), wrong.join(" ")
                    );
                }
            }
        }
    }
}
