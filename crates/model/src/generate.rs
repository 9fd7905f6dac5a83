//! Batched generation with a KV cache: greedy or temperature / top-p sampling.
//!
//! Prompts are sorted by length and cut into batches (little padding), each batch left-padded
//! and prefilled at once, then decoded one token per step; a sequence that stops (EOS, a stop
//! string, `max_new_tokens`) leaves the batch, so the rest run on a smaller one. Padding is
//! masked and position ids count real tokens only, so a prompt gets the same greedy tokens in
//! a batch as alone. Sampling draws from one ChaCha stream per prompt (seed, prompt index), so
//! its results do not depend on the batch size or on the other prompts either.
use candle_core::Tensor;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tokenizers::Tokenizer;

use crate::llama::Llama;

#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("{0}")]
    Input(String),
}

pub type Result<T> = std::result::Result<T, GenerateError>;

/// How the next token is chosen.
#[derive(Debug, Clone, PartialEq)]
pub enum Sampling {
    /// The most likely token (the first one on ties).
    Greedy,
    /// Softmax of `logits / temperature`, restricted to the smallest set of most likely tokens
    /// whose probability reaches `top_p`.
    Sample {
        temperature: f64,
        top_p: f64,
        seed: u64,
    },
}

#[derive(Debug, Clone)]
pub struct GenerateConfig {
    pub max_new_tokens: usize,
    pub sampling: Sampling,
    /// Token ids that end a sequence (kept in `output_ids`). Usually the model's
    /// [`crate::load::LoadedModel::eos_token_ids`].
    pub eos_token_ids: Vec<u32>,
    /// Texts that end a sequence once they appear in its decoded output.
    pub stop_strings: Vec<String>,
    /// Sequences run together (more is faster per token, up to memory).
    pub batch_size: usize,
    /// Whether the tokenizer adds its special tokens (BOS...) to the prompts in [`generate`].
    pub add_special_tokens: bool,
    /// Id written in the padding positions (never attended to).
    pub pad_token_id: u32,
}

impl Default for GenerateConfig {
    fn default() -> Self {
        Self {
            max_new_tokens: 256,
            sampling: Sampling::Greedy,
            eos_token_ids: Vec::new(),
            stop_strings: Vec::new(),
            batch_size: 32,
            add_special_tokens: false,
            pad_token_id: 0,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    Eos,
    StopString,
    MaxNewTokens,
}

#[derive(Debug, Clone)]
pub struct Generation {
    pub prompt_ids: Vec<u32>,
    /// The new tokens, including the EOS token when generation stopped on it.
    pub output_ids: Vec<u32>,
    /// The new tokens decoded without special tokens (so without the EOS), cut before the
    /// first stop string. Empty when no tokenizer was given.
    pub text: String,
    pub stop_reason: StopReason,
}

/// Tokenizes `prompts` and generates a continuation for each, in order.
pub fn generate(
    model: &Llama,
    tokenizer: &Tokenizer,
    prompts: &[String],
    cfg: &GenerateConfig,
) -> Result<Vec<Generation>> {
    let ids = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| {
            tokenizer
                .encode(p.as_str(), cfg.add_special_tokens)
                .map(|e| e.get_ids().to_vec())
                .map_err(|e| GenerateError::Tokenizer(format!("prompt {i}: {e}")))
        })
        .collect::<Result<Vec<_>>>()?;
    generate_ids(model, Some(tokenizer), &ids, cfg)
}

/// Generates from tokenized prompts, in order. The tokenizer is needed for stop strings and
/// for `text`.
pub fn generate_ids(
    model: &Llama,
    tokenizer: Option<&Tokenizer>,
    prompts: &[Vec<u32>],
    cfg: &GenerateConfig,
) -> Result<Vec<Generation>> {
    if let Some(i) = prompts.iter().position(|p| p.is_empty()) {
        return Err(GenerateError::Input(format!("prompt {i} has no tokens")));
    }
    let vocab = model.config().vocab_size;
    for (i, p) in prompts.iter().enumerate() {
        if let Some(bad) = p.iter().find(|&&t| t as usize >= vocab) {
            return Err(GenerateError::Input(format!(
                "prompt {i}: token id {bad} is outside the vocabulary (size {vocab})"
            )));
        }
    }
    if !cfg.stop_strings.is_empty() && tokenizer.is_none() {
        return Err(GenerateError::Input("stop strings need a tokenizer".into()));
    }
    if let Sampling::Sample {
        temperature, top_p, ..
    } = cfg.sampling
    {
        if !(temperature >= 0.0 && temperature.is_finite() && top_p > 0.0 && top_p <= 1.0) {
            return Err(GenerateError::Input(format!(
                "sampling needs temperature >= 0 and 0 < top_p <= 1 (got {temperature}, {top_p})"
            )));
        }
    }
    let batch_size = cfg.batch_size.max(1);
    // Longest first: similar lengths share a batch, and a batch too large for memory fails
    // at once rather than at the end.
    let mut order: Vec<usize> = (0..prompts.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(prompts[i].len()));
    let mut out: Vec<Option<Generation>> = vec![None; prompts.len()];
    for chunk in order.chunks(batch_size) {
        // On a worker of rayon's pool: the kernels' parallel loops then start by work
        // stealing, not by waking a worker and putting this thread to sleep (two futex
        // handoffs per parallel op, a few hundred ops per decoding step).
        let gens = rayon::scope(|_| run_batch(model, tokenizer, prompts, chunk, cfg))?;
        for (&i, g) in chunk.iter().zip(gens) {
            out[i] = Some(g);
        }
    }
    Ok(out
        .into_iter()
        .map(|g| g.expect("every prompt was generated"))
        .collect())
}

/// One row of a running batch.
struct Seq {
    /// Index of the prompt in the caller's list (the sampling stream).
    prompt: usize,
    output: Vec<u32>,
    stop: Option<StopReason>,
    rng: Option<ChaCha8Rng>,
}

fn run_batch(
    model: &Llama,
    tokenizer: Option<&Tokenizer>,
    prompts: &[Vec<u32>],
    rows: &[usize],
    cfg: &GenerateConfig,
) -> Result<Vec<Generation>> {
    let dev = model.device();
    let width = rows.iter().map(|&i| prompts[i].len()).max().unwrap_or(0);
    let mut seqs: Vec<Seq> = rows
        .iter()
        .map(|&i| Seq {
            prompt: i,
            output: Vec::new(),
            stop: None,
            rng: match cfg.sampling {
                Sampling::Sample { seed, .. } => {
                    let mut r = ChaCha8Rng::seed_from_u64(seed);
                    r.set_stream(i as u64);
                    Some(r)
                }
                Sampling::Greedy => None,
            },
        })
        .collect();
    if cfg.max_new_tokens > 0 {
        let mut ids = Vec::with_capacity(rows.len() * width);
        let mut mask = Vec::with_capacity(rows.len() * width);
        for &i in rows {
            let pad = width - prompts[i].len();
            ids.extend(std::iter::repeat_n(cfg.pad_token_id, pad));
            ids.extend_from_slice(&prompts[i]);
            mask.extend(std::iter::repeat_n(0u8, pad));
            mask.extend(std::iter::repeat_n(1u8, prompts[i].len()));
        }
        let ids = Tensor::from_vec(ids, (rows.len(), width), dev)?;
        let mask = Tensor::from_vec(mask, (rows.len(), width), dev)?;
        let mut cache = model.new_cache(rows.len(), width + cfg.max_new_tokens)?;
        let mut logits = model.forward_cached(&ids, Some(&mask), &mut cache)?;
        // Rows of `logits` / the cache, as indices into `seqs`.
        let mut active: Vec<usize> = (0..seqs.len()).collect();
        loop {
            let rows_logits: Vec<Vec<f32>> = logits.to_vec2()?;
            for (&s, l) in active.iter().zip(&rows_logits) {
                let seq = &mut seqs[s];
                if seq.stop.is_some() {
                    continue;
                }
                let tok = pick(l, &cfg.sampling, seq.rng.as_mut());
                seq.output.push(tok);
                if cfg.eos_token_ids.contains(&tok) {
                    seq.stop = Some(StopReason::Eos);
                } else if !cfg.stop_strings.is_empty() && hits_stop(tokenizer, &seq.output, cfg)? {
                    seq.stop = Some(StopReason::StopString);
                } else if seq.output.len() >= cfg.max_new_tokens {
                    seq.stop = Some(StopReason::MaxNewTokens);
                }
            }
            let keep: Vec<usize> = (0..active.len())
                .filter(|&r| seqs[active[r]].stop.is_none())
                .collect();
            if keep.is_empty() {
                break;
            }
            // Dropping rows copies the whole cache, so wait until a quarter of the batch has
            // finished; until then finished rows run along on padding and are ignored.
            let done = active.len() - keep.len();
            if done > 0 && done * 4 >= active.len() {
                cache.select_rows(&keep)?;
                active = keep.iter().map(|&r| active[r]).collect();
            }
            let next: Vec<u32> = active
                .iter()
                .map(|&s| match seqs[s].stop {
                    Some(_) => cfg.pad_token_id,
                    None => *seqs[s].output.last().expect("one token"),
                })
                .collect();
            let next = Tensor::from_vec(next, (active.len(), 1), dev)?;
            logits = model.forward_cached(&next, None, &mut cache)?;
        }
    }
    seqs.into_iter()
        .map(|s| {
            let text = match tokenizer {
                Some(tok) => final_text(tok, &s.output, s.stop, cfg)?,
                None => String::new(),
            };
            Ok(Generation {
                prompt_ids: prompts[s.prompt].clone(),
                output_ids: s.output,
                text,
                stop_reason: s.stop.unwrap_or(StopReason::MaxNewTokens),
            })
        })
        .collect()
}

fn decode(tok: &Tokenizer, ids: &[u32], skip_special: bool) -> Result<String> {
    tok.decode(ids, skip_special)
        .map_err(|e| GenerateError::Tokenizer(format!("decoding: {e}")))
}

/// Whether a stop string appears in the output so far (special tokens included, so a stop
/// string may name one).
fn hits_stop(tok: Option<&Tokenizer>, output: &[u32], cfg: &GenerateConfig) -> Result<bool> {
    let Some(tok) = tok else { return Ok(false) };
    let text = decode(tok, output, false)?;
    Ok(cfg
        .stop_strings
        .iter()
        .any(|s| !s.is_empty() && text.contains(s.as_str())))
}

fn final_text(
    tok: &Tokenizer,
    output: &[u32],
    stop: Option<StopReason>,
    cfg: &GenerateConfig,
) -> Result<String> {
    let ids = match (stop, output.split_last()) {
        (Some(StopReason::Eos), Some((_, rest))) => rest,
        _ => output,
    };
    let mut text = decode(tok, ids, true)?;
    if let Some(cut) = cfg
        .stop_strings
        .iter()
        .filter(|s| !s.is_empty())
        .filter_map(|s| text.find(s.as_str()))
        .min()
    {
        text.truncate(cut);
    }
    Ok(text)
}

/// Chooses the next token from one row of logits.
fn pick(logits: &[f32], sampling: &Sampling, rng: Option<&mut ChaCha8Rng>) -> u32 {
    let argmax = || {
        let mut best = 0usize;
        for (i, &v) in logits.iter().enumerate() {
            if v > logits[best] {
                best = i;
            }
        }
        best as u32
    };
    match (sampling, rng) {
        (
            Sampling::Sample {
                temperature, top_p, ..
            },
            Some(rng),
        ) if *temperature > 0.0 => sample_top_p(logits, *temperature, *top_p, rng),
        _ => argmax(),
    }
}

fn sample_top_p(logits: &[f32], temperature: f64, top_p: f64, rng: &mut ChaCha8Rng) -> u32 {
    let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
    let mut probs: Vec<(u32, f64)> = logits
        .iter()
        .enumerate()
        .map(|(i, &l)| (i as u32, ((l as f64 - max) / temperature).exp()))
        .collect();
    let z: f64 = probs.iter().map(|p| p.1).sum();
    // Most likely first; ties by id, so the result does not depend on the sort's stability.
    probs.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    let mut kept = 0.0;
    let mut n = 0;
    for &(_, p) in &probs {
        kept += p / z;
        n += 1;
        if kept >= top_p {
            break;
        }
    }
    let mass: f64 = probs[..n].iter().map(|p| p.1).sum();
    let mut u = rng.random::<f64>() * mass;
    for &(id, p) in &probs[..n] {
        if u < p {
            return id;
        }
        u -= p;
    }
    probs[n - 1].0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::LlamaConfig;
    use crate::llama::random_weights;
    use candle_core::{DType, Device};

    fn tiny() -> Llama {
        let cfg = LlamaConfig::from_json_str(
            r#"{"model_type": "llama", "vocab_size": 50, "hidden_size": 32,
                "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4,
                "num_key_value_heads": 2, "rope_theta": 10000.0, "rms_norm_eps": 1e-5,
                "tie_word_embeddings": true}"#,
        )
        .unwrap();
        // Larger weights than the default init so the next-token distribution is peaked and
        // the greedy path is not decided by near-ties.
        let w = random_weights(&cfg, DType::F32, &Device::Cpu, 11)
            .unwrap()
            .into_iter()
            .map(|(n, t)| {
                let t = if n.ends_with("norm.weight") {
                    t
                } else {
                    (t * 8.0).unwrap()
                };
                (n, t)
            })
            .collect();
        Llama::from_weights(&cfg, w).unwrap()
    }

    fn prompts() -> Vec<Vec<u32>> {
        vec![
            vec![3, 9, 27, 4, 10],
            vec![7],
            vec![12, 1, 40],
            vec![5, 5, 5, 5, 5, 5, 5, 2],
            vec![33, 21],
        ]
    }

    /// Greedy tokens, one step at a time with the full forward (no cache, no batch).
    fn greedy_reference(model: &Llama, prompt: &[u32], n: usize, eos: &[u32]) -> Vec<u32> {
        let mut seq = prompt.to_vec();
        let mut out = Vec::new();
        for _ in 0..n {
            let ids = Tensor::new(vec![seq.clone()], &Device::Cpu).unwrap();
            let l = model.forward_logits(&ids, None).unwrap();
            let last: Vec<f32> = l
                .squeeze(0)
                .unwrap()
                .to_vec2::<f32>()
                .unwrap()
                .pop()
                .unwrap();
            let tok = pick(&last, &Sampling::Greedy, None);
            out.push(tok);
            seq.push(tok);
            if eos.contains(&tok) {
                break;
            }
        }
        out
    }

    #[test]
    fn batched_greedy_equals_one_by_one_without_cache() {
        let model = tiny();
        let ps = prompts();
        // As EOS, the token that ends the most prompts early (but not all), so that rows stop
        // at different steps: finished rows first run along, then leave the batch.
        let free: Vec<Vec<u32>> = ps
            .iter()
            .map(|p| greedy_reference(&model, p, 12, &[]))
            .collect();
        let stops = |tok: u32| free.iter().filter(|f| f[..11].contains(&tok)).count();
        let best = (0..50u32)
            .filter(|&t| stops(t) < ps.len() && free[0][..11].contains(&t))
            .max_by_key(|&t| stops(t))
            .unwrap();
        assert!(stops(best) >= 2, "no token stops two prompts: {free:?}");
        let eos = vec![best];
        let free = free[0].clone();
        for bs in [1, 2, 5] {
            let cfg = GenerateConfig {
                max_new_tokens: 12,
                eos_token_ids: eos.clone(),
                batch_size: bs,
                ..Default::default()
            };
            let gens = generate_ids(&model, None, &ps, &cfg).unwrap();
            for (p, g) in ps.iter().zip(&gens) {
                let want = greedy_reference(&model, p, 12, &eos);
                assert_eq!(g.output_ids, want, "batch size {bs}, prompt {p:?}");
                assert_eq!(&g.prompt_ids, p);
                let stopped = want.last() == Some(&eos[0]);
                assert_eq!(
                    g.stop_reason,
                    if stopped {
                        StopReason::Eos
                    } else {
                        StopReason::MaxNewTokens
                    }
                );
            }
            let first = free.iter().position(|&t| t == eos[0]).unwrap() + 1;
            assert_eq!(gens[0].output_ids.len(), first);
            assert_eq!(gens[0].stop_reason, StopReason::Eos);
        }
    }

    #[test]
    fn sampling_is_seeded_per_prompt_and_respects_top_p() {
        let model = tiny();
        let ps = prompts();
        let run = |bs: usize, seed: u64, top_p: f64| {
            let cfg = GenerateConfig {
                max_new_tokens: 8,
                sampling: Sampling::Sample {
                    temperature: 1.5,
                    top_p,
                    seed,
                },
                batch_size: bs,
                ..Default::default()
            };
            generate_ids(&model, None, &ps, &cfg)
                .unwrap()
                .into_iter()
                .map(|g| g.output_ids)
                .collect::<Vec<_>>()
        };
        let a = run(5, 1, 0.9);
        assert_eq!(a, run(2, 1, 0.9), "batching changes sampled tokens");
        assert_eq!(a, run(5, 1, 0.9));
        assert_ne!(a, run(5, 2, 0.9), "the seed has no effect");
        // top_p this small keeps only the most likely token: greedy.
        let greedy = generate_ids(
            &model,
            None,
            &ps,
            &GenerateConfig {
                max_new_tokens: 8,
                ..Default::default()
            },
        )
        .unwrap();
        let tiny_p = run(3, 9, 1e-9);
        for (g, s) in greedy.iter().zip(tiny_p) {
            assert_eq!(g.output_ids, s);
        }
    }

    #[test]
    fn top_p_keeps_the_smallest_sufficient_set() {
        // probs ~ [0.5, 0.3, 0.2]: top_p 0.6 keeps ids 0 and 1 only.
        let logits = [0.5f32.ln(), 0.3f32.ln(), 0.2f32.ln()];
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let mut counts = [0usize; 3];
        for _ in 0..4000 {
            counts[sample_top_p(&logits, 1.0, 0.6, &mut rng) as usize] += 1;
        }
        assert_eq!(counts[2], 0);
        let frac0 = counts[0] as f64 / 4000.0;
        assert!((frac0 - 0.625).abs() < 0.03, "{counts:?}");
    }

    #[test]
    fn bad_inputs_are_errors() {
        let model = tiny();
        let cfg = GenerateConfig::default();
        assert!(generate_ids(&model, None, &[vec![]], &cfg).is_err());
        assert!(generate_ids(&model, None, &[vec![1000]], &cfg).is_err());
        let zero = GenerateConfig {
            max_new_tokens: 0,
            ..Default::default()
        };
        assert!(generate_ids(&model, None, &[vec![1]], &zero).unwrap()[0]
            .output_ids
            .is_empty());
    }
}
