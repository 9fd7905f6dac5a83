//! Trains heads from configs, as `sft classifier train` does, without the CLI:
//! `cargo run --release -p sft-classifier --example train_heads -- configs/classifier/tone.yaml ...`
use candle_core::Device;
use sft_classifier::{train, TrainConfig};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // The training's progress (a fine-tuning's validation scores per epoch) on stderr.
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    for path in std::env::args().skip(1) {
        let cfg = TrainConfig::from_yaml_file(&path)?;
        let report = train::run(&cfg, &Device::Cpu)?;
        println!("{}", serde_json::to_string(&report)?);
    }
    Ok(())
}
