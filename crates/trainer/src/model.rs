//! The model as the loop sees it: loading with the adapter applied, the trainable parameters,
//! loss on a batch, save and restore.
use crate::adapter::Trainable;
use crate::config::Config;
use crate::error::TrainError;
use candle_core::{DType, Device, Tensor};
use sft_data::Encoder;
use sft_data::{Batch, BuildOptions, Dataset, Template, TokenizerFiles};
use sft_model::llama::{Llama, LossOutput};
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub struct TrainModel {
    pub llama: Llama,
    pub tokenizer: tokenizers::Tokenizer,
    pub dir: PathBuf,
    pub eos_token_ids: Vec<u32>,
    /// The parameters training changes (and the LoRA adapter).
    pub trainable: Trainable,
    pub device: Device,
    template: Option<(Arc<Encoder>, Template)>,
}

pub fn parse_device(spec: &str) -> Result<Device, TrainError> {
    sft_model::device::open(spec).map_err(|e| TrainError::Config(format!("model.device: {e}")))
}

/// A dtype by name (see [`sft_model::config::dtype_from_name`]), for `model.dtype`.
pub fn parse_dtype(s: &str) -> Result<DType, TrainError> {
    sft_model::config::dtype_from_name(s)
        .ok_or_else(|| TrainError::Config(format!("model.dtype: unknown dtype '{s}'")))
}

/// `cache:NAME` is `$SFT_CACHE/models/NAME` (the folders scripts/fetch-test-models.sh fills).
pub fn resolve_model_spec(spec: &str) -> String {
    match spec.strip_prefix("cache:") {
        Some(name) => sft_model::load::sft_cache_dir()
            .join("models")
            .join(name)
            .display()
            .to_string(),
        None => spec.to_string(),
    }
}

impl TrainModel {
    pub fn load(cfg: &Config) -> Result<Self, TrainError> {
        let device = parse_device(&cfg.model.device)?;
        let dtype = parse_dtype(&cfg.model.dtype)?;
        let spec = resolve_model_spec(&cfg.model.source);
        let quant = sft_model::load::QuantOptions {
            how: cfg.model.quantize,
            double_quant: cfg.model.double_quant,
        };
        let loaded = sft_model::load::load_model_with(&spec, dtype, &device, &quant)
            .map_err(|e| TrainError::Model(format!("model.source {spec}: {e}")))?;
        let mut llama = loaded.model;
        // `auto` leaves the plan the loader chose (SFT_ACTIVATIONS or the device's default).
        if cfg.model.activations != sft_model::llama::Activations::Auto {
            llama
                .set_activations(cfg.model.activations)
                .map_err(|e| TrainError::Config(format!("model.activations: {e}")))?;
        }
        llama.set_gradient_checkpointing(cfg.train.gradient_checkpointing);
        let trainable = Trainable::attach(&mut llama, cfg)?;
        Ok(Self {
            llama,
            tokenizer: loaded.tokenizer,
            dir: loaded.dir,
            eos_token_ids: loaded.eos_token_ids,
            trainable,
            device,
            template: None,
        })
    }

    pub fn total_params(&self) -> usize {
        let dense: usize = self
            .llama
            .named_weights()
            .iter()
            .map(|(_, t)| t.elem_count())
            .sum();
        let quantized: usize = self
            .llama
            .quantized_weights()
            .iter()
            .map(|(_, q)| q.rows() * q.cols())
            .sum();
        dense + quantized
    }

    /// The quantized base linears: how many, their formats, and the bytes they hold (QLoRA).
    pub fn quantized_summary(&self) -> Option<(usize, String, usize)> {
        let q = self.llama.quantized_weights();
        if q.is_empty() {
            return None;
        }
        let mut formats: Vec<String> = q.iter().map(|(_, w)| w.format()).collect();
        formats.sort();
        formats.dedup();
        let bytes = q.iter().map(|(_, w)| w.stored_bytes()).sum();
        Some((q.len(), formats.join(", "), bytes))
    }

    /// The optimizer's view of the trainable parameters.
    pub fn param_specs(&self) -> Vec<sft_optim::ParamSpec> {
        self.trainable
            .params
            .iter()
            .map(|p| sft_optim::ParamSpec {
                name: p.name.clone(),
                var: p.var.clone(),
                weight_decay: p.decay,
            })
            .collect()
    }

    pub fn trainable_params(&self) -> usize {
        self.trainable
            .params
            .iter()
            .map(|p| p.var.elem_count())
            .sum()
    }

    /// Tokenize (or read from the cache) the config's data with this model's tokenizer.
    pub fn dataset(&mut self, cfg: &Config) -> Result<Dataset, TrainError> {
        let files = TokenizerFiles::from_dir(&self.dir).map_err(TrainError::Data)?;
        let ds = sft_data::build_dataset(&cfg.data, &files, &BuildOptions::default())
            .map_err(TrainError::Data)?;
        let (enc, template) =
            sft_data::load_encoder_and_template(&cfg.data, &files).map_err(TrainError::Data)?;
        self.template = Some((Arc::new(enc), template));
        Ok(ds)
    }

    /// The tokenizer and template training renders prompts with (after [`TrainModel::dataset`]).
    pub fn training_template(&self) -> Option<(Arc<Encoder>, Template)> {
        self.template.clone()
    }

    pub fn set_dropout_seed(&mut self, seed: u64, step: u64, micro: u64) {
        // One seed per (run seed, step, micro-batch): dropout masks are a pure function of
        // where the run is, so a resumed run draws the same ones.
        let seed = sft_common::mix(seed, step, micro);
        crate::adapter::set_training(&mut self.llama, Some(seed));
    }

    pub fn set_eval(&mut self) {
        crate::adapter::set_training(&mut self.llama, None);
    }

    /// Summed loss of a batch and its token count. Packed batches carry segment ids: each
    /// example attends only within itself and its positions restart.
    pub fn loss(&self, batch: &Batch) -> Result<LossOutput, TrainError> {
        let inputs = sft_model::llama::Inputs {
            ids: &batch.input_ids,
            rows: batch.rows,
            seq_len: batch.seq_len,
            attention_mask: Some(&batch.attention_mask),
            segment_ids: batch.segment_ids.as_deref(),
        };
        Ok(self.llama.loss_inputs(&inputs, &batch.labels)?)
    }

    /// The gradients of `loss` (checkpointed layers' parameter gradients merged in).
    pub fn backward(&self, loss: &Tensor) -> Result<candle_core::backprop::GradStore, TrainError> {
        Ok(self.llama.backward(loss)?)
    }

    /// Mean held-out loss (no dropout, no graph kept).
    pub fn eval_loss(&mut self, cfg: &Config, ds: &Dataset) -> Result<f64, TrainError> {
        Ok(self
            .eval_loss_on(cfg, ds, &sft_dist::Single)?
            .unwrap_or(f64::NAN))
    }

    /// The held-out loss with the batches shared out among the ranks: each rank computes its
    /// batches' loss sums and token counts, rank 0 gathers them and adds them up in batch
    /// order (the same additions as one process makes). `Some` on rank 0 only.
    pub fn eval_loss_on(
        &mut self,
        cfg: &Config,
        ds: &Dataset,
        comm: &dyn sft_dist::Comm,
    ) -> Result<Option<f64>, TrainError> {
        if ds.eval.is_empty() {
            return Ok(comm.is_root().then_some(f64::NAN));
        }
        let mut set = ds.eval.clone();
        if cfg.eval.loss.max_examples > 0 && set.len() > cfg.eval.loss.max_examples {
            let idx: Vec<usize> = (0..cfg.eval.loss.max_examples).collect();
            set = set.select(&idx);
        }
        let opts = cfg.data.batch_options(cfg.train.micro_batch_size);
        let batches = sft_data::eval_batches(&set, ds.pad_id, &opts);
        crate::adapter::set_training(&mut self.llama, None);
        // (the loss sum's bits, tokens): the bits, so that the sums travel exactly.
        let mut mine: Vec<(u64, usize)> = Vec::new();
        for b in &batches[sft_dist::share(batches.len(), comm.rank(), comm.world())] {
            let out = self.loss(b)?;
            let sum = out.sum.detach().to_dtype(DType::F64)?.to_scalar::<f64>()?;
            mine.push((sum.to_bits(), out.n_tokens));
        }
        let bytes = serde_json::to_vec(&mine).map_err(|e| TrainError::Dist(e.to_string()))?;
        let Some(parts) = comm.gather_bytes(&bytes, 0).map_err(TrainError::dist)? else {
            return Ok(None);
        };
        let (mut sum, mut n) = (0.0, 0usize);
        for part in parts {
            let part: Vec<(u64, usize)> =
                serde_json::from_slice(&part).map_err(|e| TrainError::Dist(e.to_string()))?;
            for (s, k) in part {
                sum += f64::from_bits(s);
                n += k;
            }
        }
        Ok(Some(if n == 0 { f64::NAN } else { sum / n as f64 }))
    }

    /// Write the trained weights: a PEFT adapter, or full weights in Hugging Face shards, plus
    /// the config and tokenizer files needed to use them.
    pub fn save(&self, dir: &Path) -> Result<(), TrainError> {
        self.trainable.save(dir, &self.dir)
    }

    /// Set the trainable parameters from a checkpoint folder.
    pub fn restore(&mut self, dir: &Path) -> Result<(), TrainError> {
        self.trainable
            .restore(dir, self.llama.dtype(), &self.device)
    }
}
