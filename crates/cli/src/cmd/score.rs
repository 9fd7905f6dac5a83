//! `sft score --model M --input FILE.jsonl`: for each line `{"prompt": "..."}`, one JSON line
//! `{"input_ids": [...], "mean_next_token_loss": x, "last_logits_top10": {"ids", "values"}}`.
//! The prompt is taken as it is, no template applied, and tokenized without special tokens;
//! the loss is the mean next-token cross-entropy over the prompt (null for a one-token
//! prompt). `--adapter DIR` applies a LoRA adapter (ours or PEFT's, or a run folder's chosen
//! checkpoint) unmerged.
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use candle_core::{DType, IndexOp, Tensor};
use clap::{Args, ValueEnum};
use sft_model::load::{load_model_with, LoadedModel, QuantOptions};
use sft_model::quant::Quantize;

use super::run_folder::{adapter_dir, trained_base};

/// How to load the model, shared by `score` and `generate`.
#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// A Hugging Face folder, a hub id (`org/name`, optionally `@revision`), a `.gguf` file
    /// (imported into the sft cache on first use) or `cache:NAME` ($SFT_CACHE/models/NAME).
    /// Hub access honours HF_TOKEN, HF_HOME and HF_HUB_OFFLINE.
    // An Option that clap requires: `sft objecqa judge eval` shares the arguments and has none.
    #[arg(long, required = true)]
    pub model: Option<String>,
    /// dtype the weights are computed in.
    #[arg(long, value_enum, default_value_t = DtypeArg::F32)]
    pub dtype: DtypeArg,
    /// A LoRA adapter folder (ours or PEFT's `save_pretrained`), applied unmerged; a run
    /// folder stands for its chosen checkpoint (format-infusion, else latest).
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// cpu, cuda, cuda:N, or auto (the first GPU of a CUDA build, else the CPU).
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Keep the base linears quantized, as a QLoRA run trains them: none, nf4, q8_0 or gguf
    /// (a GGUF's own blocks). Unset: what the adapter's run trained over (its checkpoint's
    /// `model.quantize`), else none.
    #[arg(long, value_enum)]
    pub quantize: Option<QuantizeArg>,
    /// With nf4: quantize the absmax too (bitsandbytes' double quantization). Unset: as the
    /// adapter's run did.
    #[arg(long)]
    pub double_quant: bool,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum QuantizeArg {
    None,
    Nf4,
    #[value(name = "q8_0")]
    Q8_0,
    Gguf,
}

impl QuantizeArg {
    pub fn quantize(self) -> Quantize {
        match self {
            QuantizeArg::None => Quantize::None,
            QuantizeArg::Nf4 => Quantize::Nf4,
            QuantizeArg::Q8_0 => Quantize::Q8_0,
            QuantizeArg::Gguf => Quantize::Gguf,
        }
    }
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum DtypeArg {
    F32,
    Bf16,
    F16,
}

impl DtypeArg {
    pub fn dtype(self) -> DType {
        match self {
            DtypeArg::F32 => DType::F32,
            DtypeArg::Bf16 => DType::BF16,
            DtypeArg::F16 => DType::F16,
        }
    }
}

impl ModelArgs {
    /// `--model` (clap makes it required).
    pub fn spec(&self) -> anyhow::Result<&str> {
        self.model.as_deref().context("give --model M")
    }

    pub fn load(&self) -> anyhow::Result<LoadedModel> {
        let spec = self.spec()?;
        let device = sft_model::device::open(&self.device)
            .with_context(|| format!("--device {}", self.device))?;
        let start = std::time::Instant::now();
        // A run folder given as the adapter: found before the model is loaded.
        let adapter = self.adapter.as_deref().map(adapter_dir).transpose()?;
        let quant = self.quant_options(adapter.as_deref())?;
        let mut m = load_model_with(spec, self.dtype.dtype(), &device, &quant)
            .with_context(|| format!("loading the model `{spec}`"))?;
        if let Some((n, bytes)) = quantized_bytes(&m) {
            tracing::info!(
                "base linears kept quantized ({}): {n} of them, {:.1} MiB as stored",
                quant.how.name(),
                bytes as f64 / (1 << 20) as f64
            );
        }
        if let Some(dir) = &adapter {
            sft_model::lora::load_adapter(&mut m.model, dir)
                .with_context(|| format!("applying the adapter {}", dir.display()))?;
            tracing::info!("applied the LoRA adapter {}", dir.display());
        }
        tracing::info!(
            "loaded {} ({:?}) from {} in {:.1}s",
            spec,
            self.dtype.dtype(),
            m.dir.display(),
            start.elapsed().as_secs_f64()
        );
        Ok(m)
    }
}

impl ModelArgs {
    /// `--quantize`/`--double-quant`, or, unset, what the adapter's run trained over: the
    /// evaluators then see the base that training saw.
    fn quant_options(&self, adapter: Option<&Path>) -> anyhow::Result<QuantOptions> {
        let q = match self.quantize {
            Some(q) => QuantOptions {
                how: q.quantize(),
                double_quant: self.double_quant,
            },
            None => match adapter.and_then(trained_base).map(|t| t.quant) {
                Some(trained) if !trained.how.is_none() => {
                    tracing::info!(
                        "the adapter was trained over a {}{} base: loading the base so \
                         (--quantize none for the dense base)",
                        trained.how.name(),
                        if trained.double_quant {
                            " (double-quantized)"
                        } else {
                            ""
                        }
                    );
                    QuantOptions {
                        double_quant: trained.double_quant || self.double_quant,
                        ..trained
                    }
                }
                _ => QuantOptions {
                    how: Quantize::None,
                    double_quant: self.double_quant,
                },
            },
        };
        if q.double_quant && q.how != Quantize::Nf4 {
            bail!(
                "--double-quant applies to --quantize nf4 only (here: {})",
                q.how.name()
            );
        }
        Ok(q)
    }
}

/// How many base linears a model keeps quantized and their stored bytes (None when dense).
fn quantized_bytes(m: &LoadedModel) -> Option<(usize, usize)> {
    let q = m.model.quantized_weights();
    (!q.is_empty()).then(|| (q.len(), q.iter().map(|(_, w)| w.stored_bytes()).sum()))
}

/// Where an evaluation keeps its responses: `--out`, or `<prefix>-<model folder name>`.
pub fn out_dir(out: Option<PathBuf>, m: &LoadedModel, prefix: &str) -> PathBuf {
    out.unwrap_or_else(|| {
        let name = m
            .dir
            .file_name()
            .map_or("model".into(), |n| n.to_string_lossy());
        PathBuf::from(format!("{prefix}-{name}"))
    })
}

#[derive(Args, Debug)]
pub struct ScoreArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// JSONL file, one `{"prompt": "..."}` object per line (blank lines are skipped); the
    /// prompt is used as it is, with no template.
    #[arg(long)]
    pub input: PathBuf,
}

/// The prompts of a JSONL file of `{"prompt": "..."}` objects (other keys are ignored).
/// Errors name the file and the 1-based line; a file without a prompt is an error too, before
/// any model is loaded.
pub fn read_prompts(path: &Path) -> anyhow::Result<Vec<String>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut prompts = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = || format!("{}:{}", path.display(), i + 1);
        let v: serde_json::Value =
            serde_json::from_str(line).with_context(|| format!("{}: not valid JSON", at()))?;
        match v.get("prompt") {
            Some(serde_json::Value::String(s)) => prompts.push(s.clone()),
            Some(_) => bail!("{}: `prompt` must be a string", at()),
            None => bail!("{}: expected an object with a string `prompt`", at()),
        }
    }
    if prompts.is_empty() {
        bail!(
            "{}: no prompts (expected one {{\"prompt\": \"...\"}} object per line)",
            path.display()
        );
    }
    Ok(prompts)
}

pub fn run(args: ScoreArgs) -> anyhow::Result<()> {
    let prompts = read_prompts(&args.input)?;
    let m = args.model.load()?;
    let device = m.model.device().clone();
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    for (i, prompt) in prompts.iter().enumerate() {
        let ids = m
            .tokenizer
            .encode(prompt.as_str(), false)
            .map_err(|e| {
                anyhow::anyhow!(
                    "{}: prompt {}: tokenizing: {e}",
                    args.input.display(),
                    i + 1
                )
            })?
            .get_ids()
            .to_vec();
        if ids.is_empty() {
            bail!("{}: prompt {} has no tokens", args.input.display(), i + 1);
        }
        let input = Tensor::new(vec![ids.clone()], &device)?;
        let hidden = m.model.forward_hidden(&input, None)?;
        let t = ids.len();
        // Last-position logits only; the loss computes its own (shifted) logits.
        let last = m
            .model
            .lm_head(&hidden.i((0, t - 1))?)?
            .to_dtype(DType::F32)?;
        let last: Vec<f32> = last.to_vec1()?;
        let mut order: Vec<usize> = (0..last.len()).collect();
        order.sort_by(|&a, &b| last[b].total_cmp(&last[a]).then(a.cmp(&b)));
        let top: Vec<usize> = order.into_iter().take(10).collect();
        let labels = Tensor::new(
            vec![ids.iter().map(|&x| x as i64).collect::<Vec<_>>()],
            &device,
        )?;
        let loss = m.model.loss(&input, None, &labels)?;
        let mean = if loss.n_tokens == 0 {
            serde_json::Value::Null
        } else {
            (loss.mean()?.to_dtype(DType::F64)?.to_scalar::<f64>()?).into()
        };
        let line = serde_json::json!({
            "input_ids": ids,
            "mean_next_token_loss": mean,
            "last_logits_top10": {
                "ids": top,
                "values": top.iter().map(|&j| last[j]).collect::<Vec<_>>(),
            },
        });
        writeln!(out, "{line}")?;
    }
    Ok(())
}
