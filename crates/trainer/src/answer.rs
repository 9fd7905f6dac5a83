//! The evaluators' view of a model: render each instruction through a template (the training
//! one by default), generate greedily in batches, return the texts.
use crate::config::GenEvalConfig;
use crate::error::TrainError;
use crate::model::TrainModel;
use sft_data::{Encoder, Template, TemplateSpec, TokenizerFiles};
use sft_eval::{Answer, BoxError};
use sft_model::generate::{generate_ids, GenerateConfig, Sampling};
use sft_model::llama::Llama;
use std::path::Path;
use std::sync::Arc;

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
    let spec = TemplateSpec::try_from(name.to_string())
        .map_err(|err| TrainError::Config(format!("template '{name}': {err}")))?;
    let files = TokenizerFiles::from_dir(dir)?;
    let (enc, t) = sft_data::load_template(&spec, None, &files)?;
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
                .training_template()
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
