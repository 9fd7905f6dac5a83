//! Loading from the hub's cache without the network: a cache folder in the hub's layout
//! (`models--org--name/{blobs,refs,snapshots}`) built here, with a sharded checkpoint; plus the
//! refusals (pickle checkpoints, bad model specs).
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use sft_model::config::LlamaConfig;
use sft_model::llama::random_weights;
use sft_model::load::{load_dir, resolve, weight_files, HubOptions, LoadError, ModelSource};

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

fn tiny_config() -> LlamaConfig {
    LlamaConfig::from_json_str(
        r#"{"model_type": "llama", "vocab_size": 64, "hidden_size": 16, "intermediate_size": 24,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "rope_theta": 10000.0, "rms_norm_eps": 1e-5, "tie_word_embeddings": false,
            "eos_token_id": 2}"#,
    )
    .unwrap()
}

/// A minimal word-level tokenizer.json.
fn tokenizer_json() -> String {
    let vocab: serde_json::Map<String, serde_json::Value> = (0..64)
        .map(|i| (format!("w{i}"), serde_json::Value::from(i)))
        .collect();
    serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null,
        "decoder": null, "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "w0"}
    })
    .to_string()
}

/// Writes `name` as a blob (named by a fake sha) and links it from the snapshot, as hf-hub does.
fn put(repo_dir: &Path, name: &str, bytes: &[u8]) {
    let blob = repo_dir
        .join("blobs")
        .join(format!("{:064x}", name.len() * 7919 + bytes.len()));
    std::fs::create_dir_all(blob.parent().unwrap()).unwrap();
    std::fs::write(&blob, bytes).unwrap();
    let link = repo_dir.join("snapshots").join(COMMIT).join(name);
    std::fs::create_dir_all(link.parent().unwrap()).unwrap();
    std::os::unix::fs::symlink(&blob, &link).unwrap();
}

/// A hub cache holding `org/tiny-llama` at COMMIT, `main` pointing to it, weights in two shards.
fn build_cache(root: &Path) -> HashMap<String, Tensor> {
    let cfg = tiny_config();
    let weights = random_weights(&cfg, DType::F32, &Device::Cpu, 42).unwrap();
    let repo = root.join("models--org--tiny-llama");
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), COMMIT).unwrap();
    put(
        &repo,
        "config.json",
        cfg.to_hf_json().to_string().as_bytes(),
    );
    put(&repo, "tokenizer.json", tokenizer_json().as_bytes());
    let mut names: Vec<&String> = weights.keys().collect();
    names.sort();
    let (a, b) = names.split_at(names.len() / 2);
    let mut weight_map = serde_json::Map::new();
    let tmp = tempfile::tempdir().unwrap();
    for (i, part) in [a, b].iter().enumerate() {
        let file = format!("model-0000{}-of-00002.safetensors", i + 1);
        let shard: HashMap<String, Tensor> = part
            .iter()
            .map(|n| (n.to_string(), weights[*n].clone()))
            .collect();
        let p = tmp.path().join(&file);
        candle_core::safetensors::save(&shard, &p).unwrap();
        put(&repo, &file, &std::fs::read(&p).unwrap());
        for n in part.iter() {
            weight_map.insert(n.to_string(), file.clone().into());
        }
    }
    let index = serde_json::json!({"metadata": {"total_size": 0}, "weight_map": weight_map});
    put(
        &repo,
        "model.safetensors.index.json",
        index.to_string().as_bytes(),
    );
    weights
}

fn offline(root: &Path) -> HubOptions {
    HubOptions {
        cache_dir: Some(root.to_path_buf()),
        offline: true,
        ..Default::default()
    }
}

fn same_weights(dir: &Path, want: &HashMap<String, Tensor>) {
    let m = load_dir(dir, DType::F32, &Device::Cpu).unwrap();
    assert_eq!(m.model.named_weights().len(), want.len());
    for (name, t) in m.model.named_weights() {
        let d = (t - &want[name])
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(d, 0.0, "{name}");
    }
    assert_eq!(m.eos_token_ids, vec![2]);
    assert_eq!(
        m.tokenizer.encode("w5 w7", false).unwrap().get_ids(),
        &[5, 7]
    );
}

#[test]
fn offline_hub_cache_by_branch_and_by_commit() {
    let root = tempfile::tempdir().unwrap();
    let weights = build_cache(root.path());
    let opts = offline(root.path());
    let src = ModelSource::parse("org/tiny-llama").unwrap();
    let dir = resolve(&src, &opts, DType::F32).unwrap();
    assert!(dir.ends_with(format!("snapshots/{COMMIT}")));
    assert_eq!(weight_files(&dir).unwrap().len(), 2);
    same_weights(&dir, &weights);
    // A commit hash as the revision, given in the spec.
    let src = ModelSource::parse(&format!("org/tiny-llama@{COMMIT}")).unwrap();
    assert_eq!(resolve(&src, &opts, DType::F32).unwrap(), dir);
    // An unknown branch, an unknown repository: errors naming them.
    let e = resolve(
        &ModelSource::parse("org/tiny-llama@dev").unwrap(),
        &opts,
        DType::F32,
    )
    .unwrap_err();
    assert!(e.to_string().contains("refs/dev"), "{e}");
    let e = resolve(&ModelSource::parse("org/other").unwrap(), &opts, DType::F32).unwrap_err();
    assert!(e.to_string().contains("org/other"), "{e}");
}

/// With the network failing (nothing listens on the endpoint), the cache still serves.
#[test]
fn unreachable_hub_falls_back_to_the_cache() {
    let root = tempfile::tempdir().unwrap();
    let weights = build_cache(root.path());
    let opts = HubOptions {
        offline: false,
        endpoint: Some("http://127.0.0.1:9".to_string()),
        ..offline(root.path())
    };
    let dir = resolve(
        &ModelSource::parse("org/tiny-llama").unwrap(),
        &opts,
        DType::F32,
    )
    .unwrap();
    same_weights(&dir, &weights);
}

#[test]
fn pickle_checkpoints_are_refused_with_an_explanation() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("config.json"),
        tiny_config().to_hf_json().to_string(),
    )
    .unwrap();
    std::fs::write(dir.path().join("pytorch_model.bin"), b"not really").unwrap();
    let e = weight_files(dir.path()).unwrap_err();
    assert!(matches!(e, LoadError::Pickle { .. }));
    let msg = e.to_string();
    assert!(
        msg.contains("pytorch_model.bin") && msg.contains("safetensors"),
        "{msg}"
    );
    let e = load_dir(dir.path(), DType::F32, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("pickle"), "{e}");
}

#[test]
fn model_specs() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    assert_eq!(
        ModelSource::parse(d).unwrap(),
        ModelSource::Dir(PathBuf::from(d))
    );
    assert_eq!(
        ModelSource::parse("meta-llama/Llama-2-7b-hf").unwrap(),
        ModelSource::Hub {
            repo: "meta-llama/Llama-2-7b-hf".into(),
            revision: None
        }
    );
    assert_eq!(
        ModelSource::parse("org/name@v1.0").unwrap(),
        ModelSource::Hub {
            repo: "org/name".into(),
            revision: Some("v1.0".into())
        }
    );
    let g = dir.path().join("m.gguf");
    std::fs::write(&g, b"x").unwrap();
    assert_eq!(
        ModelSource::parse(g.to_str().unwrap()).unwrap(),
        ModelSource::Gguf(g.clone())
    );
    let e = ModelSource::parse("/no/such/model.gguf").unwrap_err();
    assert!(
        matches!(&e, LoadError::Io { path, .. } if path == Path::new("/no/such/model.gguf")),
        "{e:?}"
    );
    assert!(e.to_string().contains("no such GGUF file"), "{e}");
    for spec in ["not a model", "/no/such/folder"] {
        let e = ModelSource::parse(spec).unwrap_err();
        assert!(
            matches!(&e, LoadError::Spec { spec: s } if s == spec),
            "{e:?}"
        );
        assert!(
            e.to_string().contains("neither a model folder"),
            "{spec}: {e}"
        );
    }
}

#[test]
fn hub_options_debug_redacts_the_token() {
    let opts = HubOptions {
        token: Some("hf_secretTokenValue123".to_string()),
        endpoint: Some("http://127.0.0.1:9".to_string()),
        ..Default::default()
    };
    let shown = format!("{opts:?} {opts:#?}");
    assert!(!shown.contains("secretTokenValue"), "{shown}");
    assert!(
        shown.contains("<redacted>") && shown.contains("127.0.0.1:9"),
        "{shown}"
    );
}

/// A model folder whose files lead out of it (a symlink to a file elsewhere, to a device) is
/// refused; a shard index naming `../x` too. Hub snapshots' links into their `blobs` are fine
/// (the tests above).
#[cfg(unix)]
#[test]
fn model_folder_symlinks_out_are_refused() {
    let root = tempfile::tempdir().unwrap();
    build_cache(root.path());
    let snap = root
        .path()
        .join("models--org--tiny-llama/snapshots")
        .join(COMMIT);
    // A plain folder made of the snapshot's links: they lead out of it (into the cache).
    let dir = root.path().join("plain");
    std::fs::create_dir(&dir).unwrap();
    for e in std::fs::read_dir(&snap).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dir.join(e.file_name())).unwrap();
    }
    assert_eq!(weight_files(&dir).unwrap().len(), 2);
    let shard = dir.join("model-00001-of-00002.safetensors");
    let outside = root.path().join("outside.safetensors");
    std::fs::rename(&shard, &outside).unwrap();
    std::os::unix::fs::symlink(&outside, &shard).unwrap();
    let e = weight_files(&dir).unwrap_err().to_string();
    assert!(
        e.contains("model-00001-of-00002.safetensors") && e.contains("outside"),
        "{e}"
    );
    let e = load_dir(&dir, DType::F32, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("outside"), "{e}");
    std::fs::remove_file(&shard).unwrap();
    std::os::unix::fs::symlink("/dev/zero", &shard).unwrap();
    let e = weight_files(&dir).unwrap_err().to_string();
    assert!(e.contains("model-00001-of-00002.safetensors"), "{e}");
    std::fs::remove_file(&shard).unwrap();
    std::fs::rename(&outside, &shard).unwrap();
    assert_eq!(weight_files(&dir).unwrap().len(), 2);
    // The tokenizer too.
    let tok = dir.join("tokenizer.json");
    std::fs::rename(&tok, root.path().join("tokenizer.json")).unwrap();
    std::os::unix::fs::symlink(root.path().join("tokenizer.json"), &tok).unwrap();
    let e = load_dir(&dir, DType::F32, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("tokenizer.json") && e.contains("outside"), "{e}");
    // A shard index naming a file above the folder.
    let index = dir.join("model.safetensors.index.json");
    let text = std::fs::read_to_string(&index)
        .unwrap()
        .replace("model-00001-of-00002", "../outside");
    std::fs::write(&index, text).unwrap();
    let e = weight_files(&dir).unwrap_err().to_string();
    assert!(e.contains("contains `..`"), "{e}");
}
