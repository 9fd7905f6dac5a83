//! Shared test helpers: the cached encoder (CI fetches it first).
#![allow(dead_code)]
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use candle_core::Device;
use sft_classifier::encoder::default_encoder_dir;
use sft_classifier::Encoder;

pub fn encoder() -> Arc<Encoder> {
    static ENC: OnceLock<Arc<Encoder>> = OnceLock::new();
    ENC.get_or_init(|| {
        let dir = default_encoder_dir();
        assert!(
            dir.join("model.safetensors").is_file(),
            "all-MiniLM-L6-v2 is missing from {}: run scripts/fetch-test-models.sh (or set SFT_CACHE)",
            dir.display()
        );
        Arc::new(Encoder::load(&dir, &Device::Cpu).unwrap())
    })
    .clone()
}

/// The workspace root (two levels above this crate).
pub fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

pub fn data(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(name)
}
