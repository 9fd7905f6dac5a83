//! `--dry-run`: the resolved config, the plan (examples, steps) and a memory estimate, without
//! training. The estimate counts what the loop keeps alive at its peak: weights, trainable
//! parameters and their gradients, AdamW's float32 moments (and master copies for bf16/f16
//! full fine-tuning), and the activations autograd holds for one micro-batch.
use crate::config::{AdapterKind, Config};
use crate::error::TrainError;
use sft_model::config::LlamaConfig;
use sft_model::llama::Activations;
use sft_model::memory::{self, MemoryEstimate};
use sft_model::quant::Quantize;
use std::fmt;

/// The memory a micro-batch of `batch` sequences of `seq` tokens needs (see
/// [`sft_model::memory`] for what is counted).
pub fn estimate(cfg: &Config, m: &LlamaConfig, batch: u64, seq: u64) -> MemoryEstimate {
    let weight_bytes = if cfg.model.dtype == "f32" { 4 } else { 2 };
    let device_is_cpu = cfg.model.device == "cpu";
    let activation_bytes = match cfg.model.activations {
        Activations::F32 => 4,
        Activations::Weights => weight_bytes,
        Activations::Auto if device_is_cpu => 4,
        Activations::Auto => weight_bytes,
    };
    let lora_params = match cfg.adapter.kind {
        AdapterKind::Full => None,
        AdapterKind::Lora => Some(memory::lora_parameter_count(
            m,
            cfg.adapter.r,
            &cfg.adapter.targets,
        )),
    };
    memory::estimate(
        m,
        &memory::Setup {
            weight_bytes,
            linear_bits: match cfg.model.quantize {
                Quantize::None => None,
                Quantize::Nf4 if cfg.model.double_quant => {
                    Some(4.0 + 8.0 / 64.0 + 32.0 / (64.0 * 256.0))
                }
                Quantize::Nf4 => Some(4.5),
                Quantize::Q8_0 => Some(8.5),
                // The file's own types vary; Q4_1 and Q4_K take 5 and 4.5 bits.
                Quantize::Gguf => Some(4.5),
            },
            activation_bytes,
            lora_params,
            master_weights: cfg.train.master_weights,
            gradient_checkpointing: cfg.train.gradient_checkpointing,
            batch,
            seq,
            loss_chunk: if device_is_cpu {
                sft_model::llama::LOSS_CHUNK_ELEMENTS
            } else {
                sft_model::llama::LOSS_CHUNK_ELEMENTS_GPU
            } as u64,
        },
    )
}

pub struct DryRun {
    pub config_yaml: String,
    /// The folder the config's relative input paths are read from.
    pub base_dir: Option<std::path::PathBuf>,
    pub model: LlamaConfig,
    pub train_examples: u64,
    pub eval_examples: u64,
    pub steps: u64,
    pub examples: u64,
    pub batch: u64,
    pub seq: u64,
    /// Processes training together (data-parallel ranks), each with the memory below.
    pub world: u64,
    pub grad_accum: u64,
    /// Per rank; with `train.shard_optimizer` its optimizer state is this rank's share.
    pub memory: MemoryEstimate,
    /// The optimizer state of one rank when replicated, and when sharded over `world` ranks
    /// (the largest share), whichever `train.shard_optimizer` picks.
    pub optimizer_replicated: u64,
    pub optimizer_sharded: u64,
    pub shard_optimizer: bool,
}

impl DryRun {
    /// The plan and the estimate (in bytes) as one JSON object, what `--dry-run` prints on
    /// stdout.
    pub fn numbers(&self) -> serde_json::Value {
        let m = &self.memory;
        serde_json::json!({
            "train_examples": self.train_examples,
            "eval_examples": self.eval_examples,
            "steps": self.steps,
            "examples": self.examples,
            "micro_batch": self.batch,
            "seq": self.seq,
            "world": self.world,
            "grad_accum": self.grad_accum,
            "per_rank_batch": self.batch * self.grad_accum,
            "global_batch": self.batch * self.grad_accum * self.world,
            "memory_bytes": {
                "weights": m.weights,
                "trainable": m.trainable,
                "gradients": m.gradients,
                "optimizer": m.optimizer,
                "optimizer_replicated": self.optimizer_replicated,
                "optimizer_sharded": self.optimizer_sharded,
                "activations": m.activations,
                "total": m.total(),
            },
            "trainable_params": m.trainable_params,
            "shard_optimizer": self.shard_optimizer,
        })
    }
}

fn gib(b: u64) -> String {
    format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64)
}

impl fmt::Display for DryRun {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "# resolved config\n{}", self.config_yaml)?;
        if let Some(dir) = &self.base_dir {
            writeln!(
                f,
                "# its relative input paths are read from {}",
                dir.display()
            )?;
        }
        writeln!(f, "# plan")?;
        writeln!(f, "train examples   {}", self.train_examples)?;
        writeln!(f, "held-out         {}", self.eval_examples)?;
        writeln!(f, "optimizer steps  {}", self.steps)?;
        writeln!(f, "examples seen    {}", self.examples)?;
        writeln!(f, "world size       {} process(es)", self.world)?;
        writeln!(
            f,
            "batch            {} per rank (micro-batch {} x accumulation {}), {} global (x {} \
             ranks)",
            self.batch * self.grad_accum,
            self.batch,
            self.grad_accum,
            self.batch * self.grad_accum * self.world,
            self.world
        )?;
        let holds = if self.shard_optimizer {
            "each holds a replica of the weights and its share of the optimizer state"
        } else {
            "each holds a replica"
        };
        writeln!(
            f,
            "# memory estimate per rank ({holds}; micro-batch {} x {} tokens)",
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
        if self.shard_optimizer {
            writeln!(
                f,
                "optimizer state  {} (sharded over {} ranks; replicated it would be {})",
                gib(m.optimizer),
                self.world,
                gib(self.optimizer_replicated)
            )?;
        } else {
            writeln!(
                f,
                "optimizer state  {} (replicated; sharded over {} ranks, train.shard_optimizer, \
                 it would be {})",
                gib(m.optimizer),
                self.world,
                gib(self.optimizer_sharded)
            )?;
        }
        writeln!(f, "activations      {}", gib(m.activations))?;
        write!(f, "total            {}", gib(m.total()))
    }
}

/// Resolve the model and the data, count, and estimate, for a run of `world` processes.
pub fn dry_run(cfg: &Config, world: usize) -> Result<DryRun, TrainError> {
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
    let steps = crate::run::total_steps(cfg, world, per_epoch, ds.train.len() as u64);
    let mean_batch = ds.train.len() as f64 / per_epoch.max(1) as f64;
    let global_accum = (cfg.train.grad_accum * world) as f64;
    let mut examples = (steps as f64 * mean_batch * global_accum).round() as u64;
    if let Some(x) = cfg.train.max_examples {
        examples = examples.min(x);
    }
    let batch = cfg.train.micro_batch_size as u64;
    let seq = cfg.data.max_length as u64;
    let mut memory = estimate(cfg, &m, batch, seq);
    // Sharded: the largest rank's share of the flattened parameters (ceil(n / world)).
    let replicated = memory.optimizer;
    let n = memory.trainable_params.max(1);
    let sharded = replicated / n * n.div_ceil(world.max(1) as u64);
    if cfg.train.shard_optimizer {
        memory.optimizer = sharded;
    }
    Ok(DryRun {
        config_yaml: serde_yaml::to_string(cfg).unwrap_or_default(),
        base_dir: cfg.base_dir.clone(),
        memory,
        optimizer_replicated: replicated,
        optimizer_sharded: sharded,
        shard_optimizer: cfg.train.shard_optimizer,
        model: m,
        train_examples: ds.train.len() as u64,
        eval_examples: ds.eval.len() as u64,
        world: world as u64,
        grad_accum: cfg.train.grad_accum as u64,
        steps,
        examples,
        batch,
        seq,
    })
}
