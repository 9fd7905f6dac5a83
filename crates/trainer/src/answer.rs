//! The evaluators' view of a model: render each instruction through a template (the training
//! one by default), generate greedily in batches, return the texts.
use crate::config::GenEvalConfig;
use crate::error::TrainError;
use crate::model::TrainModel;
use serde::{Deserialize, Serialize};
use sft_data::{Encoder, Template, TemplateSpec, TokenizerFiles};
use sft_dist::{share, Comm};
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

impl ModelAnswer<'_> {
    /// The prompts' token ids, rendered through the template.
    fn encode(&self, instructions: &[String]) -> Result<Vec<Vec<u32>>, BoxError> {
        Ok(instructions
            .iter()
            .map(|i| self.encoder.encode_prompt(&self.template.render_prompt(i)?))
            .collect::<Result<Vec<_>, _>>()?)
    }

    fn generate(
        &self,
        prompts: &[Vec<u32>],
        max_new_tokens: usize,
    ) -> Result<Vec<String>, BoxError> {
        let cfg = GenerateConfig {
            max_new_tokens,
            sampling: Sampling::Greedy,
            eos_token_ids: self.eos_token_ids.clone(),
            stop_strings: Vec::new(),
            batch_size: self.batch_size,
            add_special_tokens: false,
            pad_token_id: self.eos_token_ids.first().copied().unwrap_or(0),
        };
        let out = generate_ids(self.llama, Some(self.tokenizer), prompts, &cfg)?;
        Ok(out.into_iter().map(|g| g.text).collect())
    }

    /// This rank's share of `instructions`: the prompts (their indices) of the generation
    /// batches it answers. The batches are those one process would form (longest prompt
    /// first, `batch_size` at a time, as `generate_ids` does), dealt out whole and in order,
    /// so every answer is generated in the same batch as in a single process.
    fn my_share(
        &self,
        instructions: &[String],
        comm: &dyn Comm,
    ) -> Result<(Vec<usize>, Vec<Vec<u32>>), BoxError> {
        let prompts = self.encode(instructions)?;
        let mut order: Vec<usize> = (0..prompts.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(prompts[i].len()));
        let batches: Vec<&[usize]> = order.chunks(self.batch_size.max(1)).collect();
        let mine: Vec<usize> = batches[share(batches.len(), comm.rank(), comm.world())]
            .iter()
            .flat_map(|b| b.iter().copied())
            .collect();
        let mine_prompts = mine.iter().map(|&i| prompts[i].clone()).collect();
        Ok((mine, mine_prompts))
    }

    /// This rank's answers to its share, as (index, text) pairs in JSON.
    fn answer_share(&self, request: &Request, comm: &dyn Comm) -> Result<Vec<u8>, BoxError> {
        let (indices, prompts) = self.my_share(&request.instructions, comm)?;
        let texts = self.generate(&prompts, request.max_new_tokens)?;
        let pairs: Vec<(usize, String)> = indices.into_iter().zip(texts).collect();
        Ok(serde_json::to_vec(&pairs)?)
    }
}

impl Answer for ModelAnswer<'_> {
    fn answer(
        &mut self,
        instructions: &[String],
        max_new_tokens: usize,
    ) -> Result<Vec<String>, BoxError> {
        let prompts = self.encode(instructions)?;
        self.generate(&prompts, max_new_tokens)
    }
}

/// What rank 0 asks the other ranks to answer; `done`: the evaluation is over.
#[derive(Serialize, Deserialize)]
struct Request {
    instructions: Vec<String>,
    max_new_tokens: usize,
    done: bool,
}

/// An evaluation's generation split across the ranks of a data-parallel run. Rank 0 runs the
/// evaluator with this as its model: each call sends the prompts to every rank ([`serve`] on
/// the others), each rank answers its share, and the answers are gathered back in prompt
/// order. Rank 0 ends the evaluation with [`SplitAnswer::done`].
pub struct SplitAnswer<'a, 'c> {
    pub model: ModelAnswer<'a>,
    pub comm: &'c dyn Comm,
}

impl SplitAnswer<'_, '_> {
    /// Tell the serving ranks that this evaluation is over.
    pub fn done(&self) -> Result<(), TrainError> {
        send(
            self.comm,
            &Request {
                instructions: Vec::new(),
                max_new_tokens: 0,
                done: true,
            },
        )
    }
}

fn send(comm: &dyn Comm, req: &Request) -> Result<(), TrainError> {
    let mut bytes = serde_json::to_vec(req).map_err(|e| TrainError::eval(Box::new(e)))?;
    comm.broadcast_bytes(&mut bytes, 0)
        .map_err(TrainError::dist)
}

impl Answer for SplitAnswer<'_, '_> {
    fn answer(
        &mut self,
        instructions: &[String],
        max_new_tokens: usize,
    ) -> Result<Vec<String>, BoxError> {
        let req = Request {
            instructions: instructions.to_vec(),
            max_new_tokens,
            done: false,
        };
        send(self.comm, &req)?;
        let mine = self.model.answer_share(&req, self.comm)?;
        let all = self
            .comm
            .gather_bytes(&mine, 0)?
            .ok_or("the answers were gathered on another rank")?;
        let mut texts: Vec<Option<String>> = vec![None; instructions.len()];
        for part in all {
            for (i, t) in serde_json::from_slice::<Vec<(usize, String)>>(&part)? {
                if let Some(slot) = texts.get_mut(i) {
                    *slot = Some(t);
                }
            }
        }
        texts
            .into_iter()
            .enumerate()
            .map(|(i, t)| t.ok_or_else(|| format!("no rank answered prompt {i}").into()))
            .collect()
    }
}

/// A rank other than 0 during an evaluation: answer its share of each request from rank 0
/// until rank 0 says the evaluation is over.
pub fn serve(model: &ModelAnswer<'_>, comm: &dyn Comm) -> Result<(), TrainError> {
    loop {
        let mut bytes = Vec::new();
        comm.broadcast_bytes(&mut bytes, 0)
            .map_err(TrainError::dist)?;
        let req: Request =
            serde_json::from_slice(&bytes).map_err(|e| TrainError::eval(Box::new(e)))?;
        if req.done {
            return Ok(());
        }
        let mine = model.answer_share(&req, comm).map_err(TrainError::eval)?;
        comm.gather_bytes(&mine, 0).map_err(TrainError::dist)?;
    }
}
