//! The model as the loop sees it: loading with the adapter applied, the trainable parameters,
//! loss on a batch, save and restore, the optimizer, and the evaluators' view of the model.
use crate::config::{AdapterKind, Config, GenEvalConfig};
use crate::TrainError;
use candle_core::{DType, Device, Tensor, Var};
use sft_data::Encoder;
use sft_data::{Batch, BuildOptions, Dataset, Template, TokenizerFiles};
use sft_eval::{Answer, BoxError};
use sft_model::generate::{generate_ids, GenerateConfig, Sampling};
use sft_model::llama::{Llama, LossOutput};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A trainable parameter: its name in the saved files and its variable.
pub struct Param {
    pub name: String,
    pub var: Var,
    /// Weight decay applies (not to norms and biases).
    pub decay: bool,
}

pub struct TrainModel {
    pub llama: Llama,
    pub tokenizer: tokenizers::Tokenizer,
    pub dir: PathBuf,
    pub eos_token_ids: Vec<u32>,
    pub params: Vec<Param>,
    /// The adapter when training LoRA.
    pub lora: Option<sft_model::lora::LoraAdapter>,
    /// `base_model_name_or_path` written into adapter configs.
    pub base_name: String,
    pub kind: AdapterKind,
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
        let loaded = sft_model::load::load_model(&spec, dtype, &device)
            .map_err(|e| TrainError::Model(format!("model.source {spec}: {e}")))?;
        let mut llama = loaded.model;
        // `auto` leaves the plan the loader chose (SFT_ACTIVATIONS or the device's default).
        if cfg.model.activations != sft_model::llama::Activations::Auto {
            llama
                .set_activations(cfg.model.activations)
                .map_err(|e| TrainError::Config(format!("model.activations: {e}")))?;
        }
        llama.set_gradient_checkpointing(cfg.train.gradient_checkpointing);
        let (params, lora) = match cfg.adapter.kind {
            AdapterKind::Lora => {
                let (p, a) = crate::adapter::apply_lora(&mut llama, cfg)?;
                (p, Some(a))
            }
            AdapterKind::Full => (crate::adapter::make_all_trainable(&mut llama)?, None),
        };
        Ok(Self {
            llama,
            tokenizer: loaded.tokenizer,
            dir: loaded.dir,
            eos_token_ids: loaded.eos_token_ids,
            params,
            lora,
            base_name: cfg.model.source.clone(),
            kind: cfg.adapter.kind,
            device,
            template: None,
        })
    }

    pub fn total_params(&self) -> usize {
        self.llama
            .named_weights()
            .iter()
            .map(|(_, t)| t.elem_count())
            .sum()
    }

    /// The optimizer's view of the trainable parameters.
    pub fn param_specs(&self) -> Vec<sft_optim::ParamSpec> {
        self.params
            .iter()
            .map(|p| sft_optim::ParamSpec {
                name: p.name.clone(),
                var: p.var.clone(),
                weight_decay: p.decay,
            })
            .collect()
    }

    pub fn trainable_params(&self) -> usize {
        self.params.iter().map(|p| p.var.elem_count()).sum()
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

    /// The template training renders prompts with (after [`TrainModel::dataset`]).
    pub fn template(&self) -> Option<&Template> {
        self.template.as_ref().map(|t| &t.1)
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
        if ds.eval.is_empty() {
            return Ok(f64::NAN);
        }
        let mut set = ds.eval.clone();
        if cfg.eval.loss.max_examples > 0 && set.len() > cfg.eval.loss.max_examples {
            let idx: Vec<usize> = (0..cfg.eval.loss.max_examples).collect();
            set = set.select(&idx);
        }
        let opts = cfg.data.batch_options(cfg.train.micro_batch_size);
        let batches = sft_data::eval_batches(&set, ds.pad_id, &opts);
        crate::adapter::set_training(&mut self.llama, None);
        let (mut sum, mut n) = (0.0, 0usize);
        for b in &batches {
            let out = self.loss(b)?;
            sum += out.sum.detach().to_dtype(DType::F64)?.to_scalar::<f64>()?;
            n += out.n_tokens;
        }
        Ok(if n == 0 { f64::NAN } else { sum / n as f64 })
    }

    /// Write the trained weights: a PEFT adapter, or full weights in Hugging Face shards, plus
    /// the config and tokenizer files needed to use them.
    pub fn save(&self, dir: &Path) -> Result<(), TrainError> {
        crate::adapter::save(self, dir)
    }

    /// Set the trainable parameters from a checkpoint folder.
    pub fn restore(&mut self, dir: &Path) -> Result<(), TrainError> {
        crate::adapter::restore(self, dir)
    }
}

/// The evaluators' view of a model: render each instruction through a template (the
/// training one by default), generate greedily in batches, return the texts.
pub struct ModelAnswer<'a> {
    pub llama: &'a Llama,
    pub tokenizer: &'a tokenizers::Tokenizer,
    /// Tokenizes prompts exactly as training does (BOS prefix included).
    pub encoder: Arc<Encoder>,
    pub template: Template,
    pub eos_token_ids: Vec<u32>,
    pub batch_size: usize,
}

/// The template named `name` for the model in `dir` (as `data.template` would read it).
pub fn template_named(name: &str, dir: &Path) -> Result<(Arc<Encoder>, Template), TrainError> {
    let data: sft_data::DataConfig =
        serde_yaml::from_str(&format!("sources: []\ntemplate: {name}"))
            .map_err(|err| TrainError::Config(format!("template '{name}': {err}")))?;
    let files = TokenizerFiles::from_dir(dir).map_err(TrainError::Data)?;
    let (enc, t) = sft_data::load_encoder_and_template(&data, &files).map_err(TrainError::Data)?;
    Ok((Arc::new(enc), t))
}

impl<'a> ModelAnswer<'a> {
    /// A loaded model (no adapter training) prompted through the template named `template`.
    pub fn for_loaded(
        m: &'a sft_model::load::LoadedModel,
        template: &str,
        batch_size: usize,
    ) -> Result<Self, TrainError> {
        let (encoder, template) = template_named(template, &m.dir)?;
        Ok(Self {
            llama: &m.model,
            tokenizer: &m.tokenizer,
            encoder,
            template,
            eos_token_ids: m.eos_token_ids.clone(),
            batch_size,
        })
    }

    /// The model under training, in evaluation mode (no dropout).
    pub fn new(model: &'a mut TrainModel, e: &GenEvalConfig) -> Result<Self, TrainError> {
        let (encoder, template) = match &e.template {
            Some(name) => template_named(name, &model.dir)?,
            None => model
                .template
                .clone()
                .ok_or_else(|| TrainError::Config("no training template loaded".into()))?,
        };
        model.set_eval();
        Ok(Self {
            llama: &model.llama,
            tokenizer: &model.tokenizer,
            encoder,
            template,
            eos_token_ids: model.eos_token_ids.clone(),
            batch_size: e.batch_size,
        })
    }
}

impl Answer for ModelAnswer<'_> {
    fn answer(
        &mut self,
        instructions: &[String],
        max_new_tokens: usize,
    ) -> Result<Vec<String>, BoxError> {
        let prompts = instructions
            .iter()
            .map(|i| self.encoder.encode_prompt(&self.template.render_prompt(i)?))
            .collect::<Result<Vec<_>, _>>()?;
        let cfg = GenerateConfig {
            max_new_tokens,
            sampling: Sampling::Greedy,
            eos_token_ids: self.eos_token_ids.clone(),
            stop_strings: Vec::new(),
            batch_size: self.batch_size,
            add_special_tokens: false,
            pad_token_id: self.eos_token_ids.first().copied().unwrap_or(0),
        };
        let out = generate_ids(self.llama, Some(self.tokenizer), &prompts, &cfg)?;
        Ok(out.into_iter().map(|g| g.text).collect())
    }
}

/// The evaluators a config turns on.
pub struct Evaluators {
    pub ifs: Option<Box<dyn sft_eval::Evaluator>>,
    pub objecqa: Option<Box<dyn sft_eval::Evaluator>>,
    /// An evaluation asked for a checkpoint at this step (a format-infusion candidate).
    pub pending_save: bool,
}

impl Evaluators {
    pub fn new(cfg: &Config, model: &TrainModel) -> Result<Self, TrainError> {
        let ifs = if cfg.eval.ifs.every_examples > 0 {
            Some(crate::evals::ifs(&cfg.eval.ifs, &model.device)?)
        } else {
            None
        };
        let objecqa = if cfg.eval.objecqa.every_examples > 0 {
            Some(crate::evals::objecqa(&cfg.eval.objecqa, &model.device)?)
        } else {
            None
        };
        if ifs.is_none() && cfg.early_stopping.enabled {
            tracing::info!("eval.ifs.every_examples is 0: IFS early stopping is off for this run");
        }
        Ok(Self {
            ifs,
            objecqa,
            pending_save: false,
        })
    }
}
