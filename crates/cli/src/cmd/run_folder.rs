//! A training run's folder given where an adapter is expected (`--adapter`): its chosen
//! checkpoint is the adapter.
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use candle_core::DType;
use sft_model::load::QuantOptions;
use sft_model::lora::TrainedBase;
use sft_model::quant::Quantize;

/// The base a LoRA checkpoint of ours was trained over (`model.quantize`, `model.double_quant`
/// and `model.dtype` of the config its `trainer_state.json` records); `None` for a PEFT adapter
/// or a checkpoint that records no config.
pub fn trained_base(adapter: &Path) -> Option<TrainedBase> {
    let text = std::fs::read_to_string(adapter.join("trainer_state.json")).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    let model = v.get("state")?.get("config")?.get("model")?;
    let how: Quantize = match model.get("quantize") {
        Some(q) => serde_json::from_value(q.clone()).ok()?,
        None => Quantize::None,
    };
    let double_quant = model
        .get("double_quant")
        .and_then(|d| d.as_bool())
        .unwrap_or(false);
    let dtype = match model.get("dtype").and_then(|d| d.as_str()).unwrap_or("f32") {
        "bf16" => DType::BF16,
        "f16" => DType::F16,
        _ => DType::F32,
    };
    Some(TrainedBase {
        quant: QuantOptions { how, double_quant },
        dtype,
    })
}

/// Where a run folder's link `name` (`format-infusion`, `latest`) points: a checkpoint folder
/// of the run (a plain name; a link leading out of the run is ignored).
fn link_target(run: &Path, name: &str) -> Option<PathBuf> {
    let link = run.join(name);
    let target = match std::fs::read_link(&link) {
        Ok(t) => t.to_string_lossy().into_owned(),
        // Where symlinks are not made, the trainer writes the target's name into a file.
        Err(_) if link.is_file() => std::fs::read_to_string(&link).ok()?.trim().to_string(),
        Err(_) => return None,
    };
    plain_name(&target).then(|| run.join(target))
}

/// A single path component, as the trainer names its checkpoints (`step-000002`).
fn plain_name(name: &str) -> bool {
    !name.is_empty() && name != "." && name != ".." && !name.contains(['/', '\\', '\0'])
}

/// The checkpoint `summary.json` names as the run's choice (the stop rule's, else the last).
fn chosen_in_summary(run: &Path) -> Option<PathBuf> {
    let text = std::fs::read_to_string(run.join("summary.json")).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    let name = v.get("chosen_checkpoint")?.as_str()?;
    plain_name(name).then(|| run.join(name))
}

/// The adapter folder `--adapter DIR` means: DIR itself when it holds `adapter_config.json`;
/// for a run folder, the checkpoint its run chose (`summary.json`'s `chosen_checkpoint`, else
/// `format-infusion`, else `latest`), said in a log line.
pub fn adapter_dir(dir: &Path) -> anyhow::Result<PathBuf> {
    if dir.join("adapter_config.json").exists() {
        return Ok(dir.to_path_buf());
    }
    if !dir.is_dir() {
        // The loader's error names the missing folder.
        return Ok(dir.to_path_buf());
    }
    let candidates = [
        (
            chosen_in_summary(dir),
            "the run's chosen checkpoint in summary.json",
        ),
        (link_target(dir, "format-infusion"), "format-infusion"),
        (link_target(dir, "latest"), "latest"),
    ];
    let found: Vec<(PathBuf, &str)> = candidates
        .into_iter()
        .filter_map(|(p, why)| p.filter(|p| p.is_dir()).map(|p| (p, why)))
        .collect();
    if let Some((ck, why)) = found
        .iter()
        .find(|(p, _)| p.join("adapter_config.json").is_file())
    {
        let name = ck
            .file_name()
            .map_or_else(String::new, |n| n.to_string_lossy().into());
        tracing::info!(
            "--adapter {} is a run folder: using {name} ({why})",
            dir.display()
        );
        return Ok(ck.clone());
    }
    if let Some((ck, _)) = found.iter().find(|(p, _)| p.join("config.json").is_file()) {
        bail!(
            "{} is a run of full fine-tuning: its checkpoints are models, not adapters; give \
             {} as --model",
            dir.display(),
            ck.display()
        );
    }
    let listing = std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))?;
    let steps = listing
        .filter_map(|e| e.ok())
        .any(|e| e.file_name().to_string_lossy().starts_with("step-"));
    let hint = if steps {
        "; give one of its step-N folders"
    } else {
        "; give a run's checkpoint (its latest or step-N) or a PEFT adapter folder"
    };
    bail!(
        "{} is not an adapter folder (no adapter_config.json){hint}",
        dir.display()
    )
}
