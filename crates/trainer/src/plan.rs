//! `--dry-run`: the resolved config, the plan (examples, steps) and a memory estimate, without
//! training. The estimate counts what the loop keeps alive at its peak: weights, trainable
//! parameters and their gradients, AdamW's float32 moments (and master copies for bf16/f16
//! full fine-tuning), and the activations autograd holds for one micro-batch.
use crate::config::{AdapterKind, Config};
use crate::error::TrainError;
use sft_model::config::LlamaConfig;
use std::fmt;

#[derive(Clone, Debug, PartialEq)]
pub struct MemoryEstimate {
    pub weights: u64,
    pub trainable_params: u64,
    pub trainable: u64,
    pub gradients: u64,
    pub optimizer: u64,
    pub activations: u64,
}

impl MemoryEstimate {
    pub fn total(&self) -> u64 {
        self.weights + self.trainable + self.gradients + self.optimizer + self.activations
    }
}

fn dtype_bytes(dtype: &str) -> u64 {
    if dtype == "f32" {
        4
    } else {
        2
    }
}

/// (in, out) features of each projection of a decoder layer.
fn projections(m: &LlamaConfig) -> [(&'static str, u64, u64); 7] {
    let h = m.hidden_size as u64;
    let q = (m.num_attention_heads * m.head_dim) as u64;
    let kv = (m.num_key_value_heads * m.head_dim) as u64;
    let i = m.intermediate_size as u64;
    [
        ("q_proj", h, q),
        ("k_proj", h, kv),
        ("v_proj", h, kv),
        ("o_proj", q, h),
        ("gate_proj", h, i),
        ("up_proj", h, i),
        ("down_proj", i, h),
    ]
}

pub fn parameter_count(m: &LlamaConfig) -> u64 {
    let h = m.hidden_size as u64;
    let per_layer: u64 = projections(m).iter().map(|(_, a, b)| a * b).sum::<u64>() + 2 * h;
    let embed = m.vocab_size as u64 * h;
    let head = if m.tie_word_embeddings { 0 } else { embed };
    embed + head + h + per_layer * m.num_hidden_layers as u64
}

/// LoRA parameters: r * (in + out) per targeted projection per layer.
pub fn lora_parameter_count(m: &LlamaConfig, r: usize, targets: &[String]) -> u64 {
    let all = targets.iter().any(|t| t == "all-linear");
    let per_layer: u64 = projections(m)
        .iter()
        .filter(|(n, _, _)| all || targets.iter().any(|t| t == n))
        .map(|(_, a, b)| r as u64 * (a + b))
        .sum();
    per_layer * m.num_hidden_layers as u64
}

/// The memory a micro-batch of `batch` sequences of `seq` tokens needs.
pub fn estimate(cfg: &Config, m: &LlamaConfig, batch: u64, seq: u64) -> MemoryEstimate {
    let wb = dtype_bytes(&cfg.model.dtype);
    let params = parameter_count(m);
    let weights = params * wb;
    let (trainable_params, trainable, master) = match cfg.adapter.kind {
        // Full: the weights are the trainable tensors (counted once, in `weights`); bf16/f16
        // adds float32 master copies.
        AdapterKind::Full => (params, 0, if wb == 4 { 0 } else { params * 4 }),
        AdapterKind::Lora => {
            let n = lora_parameter_count(m, cfg.adapter.r, &cfg.adapter.targets);
            (n, n * 4, 0)
        }
    };
    let gradients = trainable_params * 4;
    let optimizer = trainable_params * 8 + master;
    // Activations autograd keeps per layer and token: the norms' inputs and outputs, q, k, v
    // after rope, the attention output and o_proj's input (about 10 hidden-sized vectors), the
    // MLP's gate, up, activation and product (4 intermediate-sized), plus the attention
    // probabilities (heads x seq per token).
    let h = m.hidden_size as u64;
    let i = m.intermediate_size as u64;
    let heads = m.num_attention_heads as u64;
    let layers = m.num_hidden_layers as u64;
    let per_token_layer = (10 * h + 4 * i + 2 * heads * seq) * wb;
    let tokens = batch * seq;
    let layer_acts = tokens * per_token_layer;
    let activations = layer_acts * layers
        + tokens * h * wb * 2 // embeddings and final norm
        + 4 * (16 << 20); // one chunk of logits in the loss (LOSS_CHUNK_ELEMENTS f32)
    MemoryEstimate {
        weights,
        trainable_params,
        trainable,
        gradients,
        optimizer,
        activations,
    }
}

pub struct DryRun {
    pub config_yaml: String,
    pub model: LlamaConfig,
    pub train_examples: u64,
    pub eval_examples: u64,
    pub steps: u64,
    pub examples: u64,
    pub batch: u64,
    pub seq: u64,
    pub memory: MemoryEstimate,
}

fn gib(b: u64) -> String {
    format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64)
}

impl fmt::Display for DryRun {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "# resolved config\n{}", self.config_yaml)?;
        writeln!(f, "# plan")?;
        writeln!(f, "train examples   {}", self.train_examples)?;
        writeln!(f, "held-out         {}", self.eval_examples)?;
        writeln!(f, "optimizer steps  {}", self.steps)?;
        writeln!(f, "examples seen    {}", self.examples)?;
        writeln!(
            f,
            "# memory estimate (micro-batch {} x {} tokens)",
            self.batch, self.seq
        )?;
        let m = &self.memory;
        writeln!(f, "weights          {}", gib(m.weights))?;
        writeln!(
            f,
            "trainable        {} ({} parameters)",
            gib(m.trainable),
            m.trainable_params
        )?;
        writeln!(f, "gradients        {}", gib(m.gradients))?;
        writeln!(f, "optimizer state  {}", gib(m.optimizer))?;
        writeln!(f, "activations      {}", gib(m.activations))?;
        write!(f, "total            {}", gib(m.total()))
    }
}

/// Resolve the model and the data, count, and estimate.
pub fn dry_run(cfg: &Config) -> Result<DryRun, TrainError> {
    let spec = crate::model::resolve_model_spec(&cfg.model.source);
    let source = sft_model::load::ModelSource::parse(&spec)
        .map_err(|e| TrainError::Model(format!("model.source {spec}: {e}")))?;
    let dtype = crate::model::parse_dtype(&cfg.model.dtype)?;
    let dir = sft_model::load::resolve(&source, &sft_model::load::HubOptions::from_env(), dtype)
        .map_err(|e| TrainError::Model(format!("model.source {spec}: {e}")))?;
    let m = LlamaConfig::from_file(dir.join("config.json"))
        .map_err(|e| TrainError::Model(e.to_string()))?;
    let files = sft_data::TokenizerFiles::from_dir(&dir)?;
    let ds = sft_data::build_dataset(&cfg.data, &files, &sft_data::BuildOptions::default())?;
    let mut batcher = sft_data::Batcher::new(
        std::sync::Arc::new(ds.train.clone()),
        ds.pad_id,
        cfg.data.batch_options(cfg.train.micro_batch_size),
    )?;
    let per_epoch = batcher.batches_in_epoch(0) as u64;
    let steps = crate::run::total_steps(cfg, per_epoch, ds.train.len() as u64);
    let mean_batch = ds.train.len() as f64 / per_epoch.max(1) as f64;
    let mut examples = (steps as f64 * mean_batch * cfg.train.grad_accum as f64).round() as u64;
    if let Some(x) = cfg.train.max_examples {
        examples = examples.min(x);
    }
    let batch = cfg.train.micro_batch_size as u64;
    let seq = cfg.data.max_length as u64;
    Ok(DryRun {
        config_yaml: serde_yaml::to_string(cfg).unwrap_or_default(),
        memory: estimate(cfg, &m, batch, seq),
        model: m,
        train_examples: ds.train.len() as u64,
        eval_examples: ds.eval.len() as u64,
        steps,
        examples,
        batch,
        seq,
    })
}
