//! The weights a config calls for: names and shapes in hub naming, random ones for tests, and
//! taking one out of a name → tensor map with its shape checked.
use std::collections::HashMap;

use candle_core::{DType, Device, Result, Tensor};
use rand::{Rng, SeedableRng};

use crate::config::LlamaConfig;

/// Expected tensor names and shapes of a model with this config, in hub naming.
pub fn weight_shapes(cfg: &LlamaConfig) -> Vec<(String, Vec<usize>)> {
    let (h, i, v) = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size);
    let q = cfg.num_attention_heads * cfg.head_dim;
    let kv = cfg.num_key_value_heads * cfg.head_dim;
    let mut out = vec![("model.embed_tokens.weight".to_string(), vec![v, h])];
    for l in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{l}");
        out.push((format!("{p}.input_layernorm.weight"), vec![h]));
        for (name, o, inp) in [
            ("q_proj", q, h),
            ("k_proj", kv, h),
            ("v_proj", kv, h),
            ("o_proj", h, q),
        ] {
            out.push((format!("{p}.self_attn.{name}.weight"), vec![o, inp]));
            if cfg.attention_bias {
                out.push((format!("{p}.self_attn.{name}.bias"), vec![o]));
            }
        }
        out.push((format!("{p}.post_attention_layernorm.weight"), vec![h]));
        for (name, o, inp) in [("gate_proj", i, h), ("up_proj", i, h), ("down_proj", h, i)] {
            out.push((format!("{p}.mlp.{name}.weight"), vec![o, inp]));
            if cfg.mlp_bias {
                out.push((format!("{p}.mlp.{name}.bias"), vec![o]));
            }
        }
    }
    out.push(("model.norm.weight".to_string(), vec![h]));
    if !cfg.tie_word_embeddings {
        out.push(("lm_head.weight".to_string(), vec![v, h]));
    }
    out
}

/// Random weights for a config (uniform, std 0.02 for matrices; norms near 1), from a seed:
/// for tests and `init-random`.
pub fn random_weights(
    cfg: &LlamaConfig,
    dtype: DType,
    device: &Device,
    seed: u64,
) -> Result<HashMap<String, Tensor>> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let a = 0.02f32 * 3f32.sqrt();
    let mut out = HashMap::new();
    for (name, shape) in weight_shapes(cfg) {
        let n: usize = shape.iter().product();
        let data: Vec<f32> = if name.ends_with("norm.weight") {
            (0..n)
                .map(|_| 1.0 + rng.random_range(-0.1f32..0.1))
                .collect()
        } else {
            (0..n).map(|_| rng.random_range(-a..a)).collect()
        };
        let t = Tensor::from_vec(data, shape, device)?.to_dtype(dtype)?;
        out.insert(name, t);
    }
    Ok(out)
}

pub(super) fn take(
    weights: &mut HashMap<String, Tensor>,
    name: &str,
    shape: &[usize],
) -> Result<Tensor> {
    let t = weights
        .remove(name)
        .ok_or_else(|| candle_core::Error::Msg(format!("missing tensor `{name}`")))?;
    if t.dims() != shape {
        candle_core::bail!(
            "tensor `{name}` has shape {:?}, expected {shape:?} for this config",
            t.dims()
        );
    }
    Ok(t)
}
