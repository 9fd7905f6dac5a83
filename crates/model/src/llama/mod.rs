//! The LLaMA decoder (Touvron et al. 2023), with the tensor names of the Hugging Face hub.
//!
//! ```text
//! h = embed_tokens[input_ids]
//! for each layer:  h = h + o_proj(attention(rope(q_proj(rms(h))), rope(k_proj(..)), v_proj(..)))
//!                  h = h + down_proj(silu(gate_proj(rms(h))) * up_proj(rms(h)))
//! logits = lm_head(rms(h))            (lm_head = embed_tokens when the embeddings are tied)
//! ```
//!
//! Three entry points share the same layers:
//! - [`Llama::forward_hidden`] / [`Llama::forward_logits`]: a padded batch with an attention mask
//!   (1 = token, 0 = pad), causal; position ids are derived from the mask, so left and right
//!   padding give the same results for the real tokens.
//! - [`Llama::loss`]: mean cross-entropy with Hugging Face's convention (labels aligned with
//!   `input_ids`, shifted inside, -100 ignored), computing logits only where a label is.
//! - [`Llama::forward_cached`]: incremental decoding with a [`KvCache`].
//!
//! The weights are plain tensors taken from a name → tensor map, so a trainer can pass candle
//! `Var`s for the ones it trains ([`Llama::from_weights`], [`Llama::named_weights`]), and the
//! LoRA code can reach each projection by its hub name ([`Llama::linears_mut`]).
use std::collections::HashMap;

use candle_core::{DType, Device, Module, Result, Tensor};

use crate::config::LlamaConfig;
use crate::linear::Linear;
use crate::ops::{self, AttnMask, KeyRanges};

mod mask;
mod weights;

use mask::{attn_mask, mask_rows, positions_from_mask};
use weights::take;
pub use weights::{random_weights, weight_shapes};

/// Labels equal to this are ignored by the loss (PyTorch's `ignore_index`).
pub const IGNORE_INDEX: i64 = -100;

/// Rows of logits computed at once by the loss (bounds its memory when no gradient is kept).
pub const LOSS_CHUNK_ELEMENTS: usize = 1 << 22;
/// The same on a GPU, where a few large products beat many small ones (the chunk's logits
/// are kept for the backward: 128M elements are 256 MiB in bf16).
pub const LOSS_CHUNK_ELEMENTS_GPU: usize = 1 << 27;

#[derive(Clone)]
struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
}

#[derive(Clone)]
struct Mlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
}

#[derive(Clone)]
struct DecoderLayer {
    input_layernorm: Tensor,
    self_attn: Attention,
    post_attention_layernorm: Tensor,
    mlp: Mlp,
    eps: f32,
}

/// A LLaMA causal language model.
pub struct Llama {
    cfg: LlamaConfig,
    embed_tokens: Tensor,
    layers: Vec<DecoderLayer>,
    norm: Tensor,
    lm_head: Linear,
    /// The tensors the model was built from, by hub name (the tied lm_head is not listed).
    weights: Vec<(String, Tensor)>,
    /// The base linears kept quantized (QLoRA), by hub name.
    quantized: Vec<(String, crate::quant::SharedQuant)>,
    inv_freq: Vec<f32>,
    dtype: DType,
    device: Device,
    activations: Activations,
    /// Recompute each decoder layer in the backward instead of keeping its activations.
    checkpointing: bool,
    /// Parameter gradients that checkpointed layers' backward passes computed.
    ckpt_grads: CheckpointGrads,
}

/// The dtype of the activations (what flows between layers) for a model's weights.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activations {
    /// The device's plan: `f32` for bf16 weights on the CPU, `weights` on CUDA.
    #[default]
    Auto,
    /// Activations in the weights' dtype, CUDA's plan (what `torch.autocast` gives): bf16
    /// matmuls accumulated in f32; norms, softmax, SiLU, attention and the loss computed in f32
    /// inside the kernels and rounded once; LoRA A/B and the optimizer's state in f32. On the
    /// CPU it runs too (slowly): the tests check CUDA's dtype plan there.
    Weights,
    /// f32 activations with bf16 weights multiplied in bf16 and summed in f32 (the CPU's plan:
    /// candle's CPU kernels for bf16 element-wise ops are slow). CPU only for half weights.
    F32,
}

impl Activations {
    /// `SFT_ACTIVATIONS` (`auto`, `weights` or `f32`), or `Auto` when it is not set.
    pub fn from_env() -> Result<Self> {
        match std::env::var("SFT_ACTIVATIONS") {
            Err(_) => Ok(Self::Auto),
            Ok(v) => match v.trim() {
                "" | "auto" => Ok(Self::Auto),
                "weights" => Ok(Self::Weights),
                "f32" => Ok(Self::F32),
                other => {
                    candle_core::bail!("SFT_ACTIVATIONS={other}: expected auto, weights or f32")
                }
            },
        }
    }

    /// The activations' dtype for weights of `dtype` on `device`.
    pub fn dtype(self, dtype: DType, device: &Device) -> DType {
        match self {
            // The CPU's plan; the emulated GPU (SFT_KERNELS=emu) takes CUDA's.
            Self::Auto if dtype == DType::BF16 && crate::ops::cpu_kernels(device) => DType::F32,
            Self::Auto | Self::Weights => dtype,
            Self::F32 if dtype == DType::F64 => DType::F64,
            Self::F32 => DType::F32,
        }
    }
}

/// Where checkpointed layers leave their parameters' gradients until [`Llama::backward`]
/// merges them into the gradient store.
#[derive(Clone, Default)]
struct CheckpointGrads(std::sync::Arc<std::sync::Mutex<Vec<(Tensor, Tensor)>>>);

impl CheckpointGrads {
    fn push(&self, param: &Tensor, grad: Tensor) {
        let mut g = self.0.lock().unwrap_or_else(|e| e.into_inner());
        g.push((param.clone(), grad));
    }

    fn take(&self) -> Vec<(Tensor, Tensor)> {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

/// A batch as the model reads it, on the host: row-major (rows, seq_len) arrays.
#[derive(Clone, Copy, Debug)]
pub struct Inputs<'a> {
    pub ids: &'a [u32],
    pub rows: usize,
    pub seq_len: usize,
    /// 1 for tokens, 0 for padding; `None`: no padding.
    pub attention_mask: Option<&'a [u8]>,
    /// Packed rows: the example each position belongs to (1, 2, ... in contiguous runs, 0 in
    /// padding). Tokens attend only within their example, and positions restart at each.
    pub segment_ids: Option<&'a [u32]>,
}

/// The result of [`Llama::loss`]: the summed token cross-entropy and how many tokens it covers,
/// so a trainer can normalise over several accumulated micro-batches.
#[derive(Debug, Clone)]
pub struct LossOutput {
    /// Sum of `-log p(label)` over the counted positions: a scalar in the graph, f32 (f64 for
    /// an f64 model).
    pub sum: Tensor,
    pub n_tokens: usize,
}

impl LossOutput {
    /// `sum / n_tokens` (0 when there are no tokens).
    pub fn mean(&self) -> Result<Tensor> {
        if self.n_tokens == 0 {
            return Ok(self.sum.clone());
        }
        self.sum.affine(1.0 / self.n_tokens as f64, 0.0)
    }
}

/// Rotary tables for one forward call: one row per (example, position).
#[derive(Clone)]
struct Rope {
    /// (b * t, head_dim / 2)
    cos: Tensor,
    sin: Tensor,
    /// All examples share the same positions: the tables are then (t, head_dim / 2).
    shared: bool,
}

/// Per-layer keys and values of the tokens seen so far, preallocated along the time axis.
pub struct KvCache {
    /// (k, v) per layer, each (b, num_kv_heads, capacity, head_dim).
    layers: Vec<(Tensor, Tensor)>,
    len: usize,
    capacity: usize,
    /// Which cached positions are real tokens (false = padding), per example.
    valid: Vec<Vec<bool>>,
}

impl KvCache {
    /// Number of positions cached (padding included).
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn batch_size(&self) -> usize {
        self.valid.len()
    }
    /// Keeps only the given examples (in this order): drops finished sequences from a batch.
    pub fn select_rows(&mut self, rows: &[usize]) -> Result<()> {
        if rows.is_empty() {
            candle_core::bail!("KvCache::select_rows: no rows to keep");
        }
        let dev = self.layers.first().map(|(k, _)| k.device().clone());
        let Some(dev) = dev else {
            self.valid = rows.iter().map(|&r| self.valid[r].clone()).collect();
            return Ok(());
        };
        let idx = Tensor::new(rows.iter().map(|&r| r as u32).collect::<Vec<_>>(), &dev)?;
        for (k, v) in self.layers.iter_mut() {
            *k = k.index_select(&idx, 0)?;
            *v = v.index_select(&idx, 0)?;
        }
        self.valid = rows.iter().map(|&r| self.valid[r].clone()).collect();
        Ok(())
    }
}

impl Llama {
    /// Builds the model from tensors named as on the hub (see [`weight_shapes`]). All must share
    /// one dtype and device, which become the model's. With tied embeddings an `lm_head.weight`
    /// entry is ignored; rotary `inv_freq` buffers of old checkpoints are ignored; any other
    /// unexpected tensor is an error.
    pub fn from_weights(cfg: &LlamaConfig, weights: HashMap<String, Tensor>) -> Result<Self> {
        Self::from_parts(cfg, weights, HashMap::new())
    }

    /// [`Llama::from_weights`] with some base linears kept quantized (QLoRA): `quant` holds
    /// their blocks by hub name (`model.layers.N.self_attn.q_proj.weight`, ...), `weights` the
    /// rest. A quantized weight is not in [`Llama::named_weights`].
    pub fn from_parts(
        cfg: &LlamaConfig,
        mut weights: HashMap<String, Tensor>,
        mut quant: HashMap<String, crate::quant::SharedQuant>,
    ) -> Result<Self> {
        let shapes = weight_shapes(cfg);
        let mut ordered = Vec::with_capacity(shapes.len());
        let mut quantized = Vec::new();
        for (name, shape) in &shapes {
            if let Some(q) = quant.remove(name) {
                let (r, c) = q.dims();
                if [r, c] != shape[..] {
                    candle_core::bail!(
                        "quantized tensor `{name}` has shape ({r}, {c}), expected {shape:?} for this config"
                    );
                }
                quantized.push((name.clone(), q));
                continue;
            }
            ordered.push((name.clone(), take(&mut weights, name, shape)?));
        }
        if let Some(extra) = quant.keys().min() {
            candle_core::bail!("quantized tensor `{extra}` is not a base linear of this config");
        }
        if cfg.tie_word_embeddings {
            weights.remove("lm_head.weight");
        }
        weights.retain(|k, _| !k.ends_with("rotary_emb.inv_freq"));
        if let Some(extra) = weights.keys().min() {
            candle_core::bail!(
                "unexpected tensor `{extra}` ({} in all) for a LLaMA with this config",
                weights.len()
            );
        }
        let dtype = ordered[0].1.dtype();
        let device = ordered[0].1.device().clone();
        for (name, t) in &ordered {
            if t.dtype() != dtype {
                candle_core::bail!(
                    "tensor `{name}` is {:?}, the embeddings {dtype:?}",
                    t.dtype()
                );
            }
            if !t.device().same_device(&device) {
                candle_core::bail!("tensor `{name}` is on another device than the embeddings");
            }
        }
        for (name, q) in &quantized {
            if q.dtype() != dtype {
                candle_core::bail!(
                    "quantized tensor `{name}` dequantizes to {:?}, the embeddings are {dtype:?}",
                    q.dtype()
                );
            }
        }
        let mut map: HashMap<String, Tensor> = ordered.iter().cloned().collect();
        // Every name below is in `weight_shapes`, so it was checked and inserted above.
        let mut get = |name: String| -> Result<Tensor> {
            map.remove(&name)
                .ok_or_else(|| candle_core::Error::Msg(format!("missing tensor `{name}`")))
        };
        let embed_tokens = get("model.embed_tokens.weight".into())?;
        let eps = cfg.rms_norm_eps as f32;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for l in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{l}");
            let mut linear = |name: &str, bias: bool| -> Result<Linear> {
                let b = if bias {
                    Some(get(format!("{p}.{name}.bias"))?)
                } else {
                    None
                };
                let wname = format!("{p}.{name}.weight");
                if let Some((_, q)) = quantized.iter().find(|(n, _)| *n == wname) {
                    return Linear::quantized(q.clone(), b, &device);
                }
                Ok(Linear::new(get(wname)?, b))
            };
            let (ab, mb) = (cfg.attention_bias, cfg.mlp_bias);
            let self_attn = Attention {
                q_proj: linear("self_attn.q_proj", ab)?,
                k_proj: linear("self_attn.k_proj", ab)?,
                v_proj: linear("self_attn.v_proj", ab)?,
                o_proj: linear("self_attn.o_proj", ab)?,
                num_heads: cfg.num_attention_heads,
                num_kv_heads: cfg.num_key_value_heads,
                head_dim: cfg.head_dim,
            };
            let mlp = Mlp {
                gate_proj: linear("mlp.gate_proj", mb)?,
                up_proj: linear("mlp.up_proj", mb)?,
                down_proj: linear("mlp.down_proj", mb)?,
            };
            layers.push(DecoderLayer {
                input_layernorm: get(format!("{p}.input_layernorm.weight"))?,
                self_attn,
                post_attention_layernorm: get(format!("{p}.post_attention_layernorm.weight"))?,
                mlp,
                eps,
            });
        }
        let norm = get("model.norm.weight".into())?;
        let lm_head = if cfg.tie_word_embeddings {
            Linear::new(embed_tokens.clone(), None)
        } else {
            Linear::new(get("lm_head.weight".into())?, None)
        };
        Self {
            inv_freq: cfg.rope_inv_freq(),
            cfg: cfg.clone(),
            embed_tokens,
            layers,
            norm,
            lm_head,
            weights: ordered,
            quantized,
            dtype,
            device,
            activations: Activations::Auto,
            checkpointing: false,
            ckpt_grads: CheckpointGrads::default(),
        }
        .with_activations(Activations::from_env()?)
    }

    pub fn config(&self) -> &LlamaConfig {
        &self.cfg
    }
    /// The weights' dtype.
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    /// The dtype of activations: the weights' dtype, except bf16 weights on the CPU, which run
    /// with f32 activations (bf16 matmuls summed in f32, everything else in f32, as
    /// `torch.autocast` does on the CPU): candle's CPU element-wise kernels for bf16 convert
    /// every element through a function call, which made bf16 training slower than f32.
    pub fn activation_dtype(&self) -> DType {
        self.activations.dtype(self.dtype, &self.device)
    }

    /// The model with this activation plan (see [`Activations`]). Half-precision weights with
    /// f32 activations run on the CPU only.
    pub fn with_activations(mut self, plan: Activations) -> Result<Self> {
        self.set_activations(plan)?;
        Ok(self)
    }

    /// Sets the activation plan (see [`Activations`]).
    pub fn set_activations(&mut self, plan: Activations) -> Result<()> {
        let half = matches!(self.dtype, DType::BF16 | DType::F16);
        if half && !self.device.is_cpu() && plan.dtype(self.dtype, &self.device) == DType::F32 {
            candle_core::bail!(
                "f32 activations with {:?} weights run on the CPU only (use activations: \
                 weights, or f32 weights)",
                self.dtype
            );
        }
        self.activations = plan;
        Ok(())
    }

    pub fn activations(&self) -> Activations {
        self.activations
    }

    /// Gradient checkpointing: each decoder layer keeps only its input through the forward
    /// and is recomputed in the backward (one layer's activations alive at a time). Train with
    /// [`Llama::backward`], which collects the recomputed layers' parameter gradients.
    pub fn set_gradient_checkpointing(&mut self, on: bool) {
        self.checkpointing = on;
    }

    pub fn gradient_checkpointing(&self) -> bool {
        self.checkpointing
    }

    /// `loss.backward()`, with the parameter gradients of checkpointed layers added in.
    pub fn backward(&self, loss: &Tensor) -> Result<candle_core::backprop::GradStore> {
        self.ckpt_grads.take();
        let mut store = loss.backward()?;
        for (param, g) in self.ckpt_grads.take() {
            let sum = match store.remove(&param) {
                Some(prev) => (prev + g)?,
                None => g,
            };
            store.insert(&param, sum);
        }
        Ok(store)
    }
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The tensors the model was built from, by hub name, in checkpoint order (the tied
    /// `lm_head` is not listed: it is `model.embed_tokens.weight`).
    pub fn named_weights(&self) -> &[(String, Tensor)] {
        &self.weights
    }

    /// The base linears kept quantized, by hub name (empty without `quantize`).
    pub fn quantized_weights(&self) -> &[(String, crate::quant::SharedQuant)] {
        &self.quantized
    }

    /// Every projection by hub module name (`model.layers.3.self_attn.q_proj`,
    /// `model.layers.3.mlp.down_proj`, `lm_head` when untied), for LoRA to wrap.
    pub fn linears_mut(&mut self) -> Vec<(String, &mut Linear)> {
        let mut out = Vec::new();
        for (l, layer) in self.layers.iter_mut().enumerate() {
            let a = &mut layer.self_attn;
            let m = &mut layer.mlp;
            let p = format!("model.layers.{l}");
            out.push((format!("{p}.self_attn.q_proj"), &mut a.q_proj));
            out.push((format!("{p}.self_attn.k_proj"), &mut a.k_proj));
            out.push((format!("{p}.self_attn.v_proj"), &mut a.v_proj));
            out.push((format!("{p}.self_attn.o_proj"), &mut a.o_proj));
            out.push((format!("{p}.mlp.gate_proj"), &mut m.gate_proj));
            out.push((format!("{p}.mlp.up_proj"), &mut m.up_proj));
            out.push((format!("{p}.mlp.down_proj"), &mut m.down_proj));
        }
        if !self.cfg.tie_word_embeddings {
            out.push(("lm_head".to_string(), &mut self.lm_head));
        }
        out
    }

    /// Final hidden states (after the last RMSNorm), (b, t, hidden). `input_ids`: (b, t) u32;
    /// `attention_mask`: (b, t), 1 for tokens and 0 for padding (any integer or float dtype);
    /// `None` means no padding.
    pub fn forward_hidden(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        let (b, t) = input_ids.dims2()?;
        let valid = mask_rows(attention_mask, b, t)?;
        let (rope, mask) = self.padded_layout(&valid, 0, t)?;
        self.hidden(input_ids, &rope, mask.as_ref())
    }

    /// [`Llama::forward_hidden`] of a batch given on the host (padded or packed rows).
    pub fn forward_hidden_inputs(&self, inputs: &Inputs<'_>) -> Result<Tensor> {
        let (ids, rope, mask) = self.layout(inputs)?;
        self.hidden(&ids, &rope, mask.as_ref())
    }

    /// The ids on the device, the rotary tables and the attention mask of a host batch.
    fn layout(&self, inp: &Inputs<'_>) -> Result<(Tensor, Rope, Option<AttnMask>)> {
        let (b, t) = (inp.rows, inp.seq_len);
        let n = b * t;
        let check = |what: &str, len: usize| -> Result<()> {
            if len != n {
                candle_core::bail!("{what} has {len} entries for a ({b}, {t}) batch");
            }
            Ok(())
        };
        check("input_ids", inp.ids.len())?;
        let ids = Tensor::from_slice(inp.ids, (b, t), &self.device)?;
        if let Some(seg) = inp.segment_ids {
            check("segment_ids", seg.len())?;
            let rows: Vec<Vec<u32>> = seg.chunks(t.max(1)).map(|r| r.to_vec()).collect();
            let ranges = KeyRanges::packed(&rows, &self.device)?;
            // Positions restart at each example: the distance to its first token.
            let positions: Vec<Vec<u32>> = ranges
                .starts()
                .chunks(t.max(1))
                .zip(&rows)
                .map(|(st, r)| {
                    (0..t)
                        .map(|i| if r[i] == 0 { 0 } else { i as u32 - st[i] })
                        .collect()
                })
                .collect();
            let rope = self.rope(&positions, b, t)?;
            return Ok((ids, rope, Some(AttnMask::Ranges(ranges))));
        }
        let valid: Vec<Vec<bool>> = match inp.attention_mask {
            None => vec![vec![true; t]; b],
            Some(m) => {
                check("attention_mask", m.len())?;
                m.chunks(t.max(1))
                    .map(|r| r.iter().map(|&v| v != 0).collect())
                    .collect()
            }
        };
        let (rope, mask) = self.padded_layout(&valid, 0, t)?;
        Ok((ids, rope, mask))
    }

    /// Rotary tables and mask of the `t` newest positions of padded rows (`valid` over
    /// `past + t` positions).
    fn padded_layout(
        &self,
        valid: &[Vec<bool>],
        past: usize,
        t: usize,
    ) -> Result<(Rope, Option<AttnMask>)> {
        let positions = positions_from_mask(valid, past, t);
        let rope = self.rope(&positions, valid.len(), t)?;
        Ok((rope, attn_mask(valid, past, t, &self.device)?))
    }

    /// The decoder layers and the final norm.
    fn hidden(&self, input_ids: &Tensor, rope: &Rope, mask: Option<&AttnMask>) -> Result<Tensor> {
        let mut x = self.embed(input_ids)?;
        let dt = self.activation_dtype();
        for (l, layer) in self.layers.iter().enumerate() {
            x = if self.checkpointing && x.track_op() {
                checkpointed(layer, &x, rope, mask, &self.ckpt_grads)?
            } else {
                layer.forward(&x, rope, mask, None)?
            };
            // An op that hands back another dtype breaks the plan of the layers after it
            // (cuBLAS refuses mixed operands): say where, not three layers later.
            if x.dtype() != dt {
                candle_core::bail!(
                    "layer {l} returned {:?} activations; the model's plan ({:?}) runs {dt:?}",
                    x.dtype(),
                    self.activations
                );
            }
        }
        ops::rms_norm(&x, &self.cast(&self.norm)?, self.cfg.rms_norm_eps as f32)
    }

    /// A weight in the activations' dtype (a differentiable cast: norms of a bf16 model in
    /// full fine-tuning still get their gradient).
    fn cast(&self, w: &Tensor) -> Result<Tensor> {
        cast_to(w, self.activation_dtype())
    }

    /// `lm_head` applied to hidden states: (..., hidden) -> (..., vocab).
    pub fn lm_head(&self, hidden: &Tensor) -> Result<Tensor> {
        self.lm_head.forward(hidden)
    }

    /// Logits at every position, (b, t, vocab), in the model's dtype. For scoring; training
    /// should use [`Llama::loss`], which never builds all of them.
    pub fn forward_logits(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        let h = self.forward_hidden(input_ids, attention_mask)?;
        self.lm_head(&h)
    }

    /// Summed cross-entropy of next-token prediction, Hugging Face's convention: `labels` (b, t)
    /// i64 are aligned with `input_ids` and shifted here (position i predicts `labels[i + 1]`);
    /// positions whose label is -100 are ignored (so `labels = input_ids` with pads set to -100
    /// gives the standard LM loss). Logits are computed only at counted positions, in chunks.
    pub fn loss(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        labels: &Tensor,
    ) -> Result<LossOutput> {
        let (b, t) = input_ids.dims2()?;
        if labels.dims() != [b, t] {
            candle_core::bail!(
                "labels have shape {:?}, input_ids ({b}, {t})",
                labels.dims()
            );
        }
        let hidden = self.forward_hidden(input_ids, attention_mask)?;
        let labels: Vec<i64> = labels.to_dtype(DType::I64)?.flatten_all()?.to_vec1()?;
        self.loss_of_hidden(&hidden, &labels)
    }

    /// [`Llama::loss`] of a batch given on the host (padded or packed rows): nothing is read
    /// back from the device.
    pub fn loss_inputs(&self, inputs: &Inputs<'_>, labels: &[i64]) -> Result<LossOutput> {
        if labels.len() != inputs.rows * inputs.seq_len {
            candle_core::bail!(
                "labels has {} entries for a ({}, {}) batch",
                labels.len(),
                inputs.rows,
                inputs.seq_len
            );
        }
        let hidden = self.forward_hidden_inputs(inputs)?;
        self.loss_of_hidden(&hidden, labels)
    }

    /// The summed shifted cross-entropy of final hidden states (b, t, hidden) against row-major
    /// labels.
    fn loss_of_hidden(&self, hidden: &Tensor, labels: &[i64]) -> Result<LossOutput> {
        let (b, t, h) = hidden.dims3()?;
        let mut rows = Vec::new();
        let mut targets = Vec::new();
        for (bi, row) in labels.chunks(t.max(1)).enumerate() {
            for i in 0..t.saturating_sub(1) {
                let l = row[i + 1];
                if l == IGNORE_INDEX {
                    continue;
                }
                if l < 0 || l as usize >= self.cfg.vocab_size {
                    candle_core::bail!(
                        "label {l} at ({bi}, {}) is outside the vocabulary (0..{}) and not -100",
                        i + 1,
                        self.cfg.vocab_size
                    );
                }
                rows.push((bi * t + i) as u32);
                targets.push(l as u32);
            }
        }
        let n_tokens = rows.len();
        if n_tokens == 0 {
            return Ok(LossOutput {
                sum: Tensor::zeros((), DType::F32, &self.device)?,
                n_tokens,
            });
        }
        let flat = hidden.reshape((b * t, h))?;
        let per_chunk = if self.device.is_cpu() {
            LOSS_CHUNK_ELEMENTS
        } else {
            LOSS_CHUNK_ELEMENTS_GPU
        };
        let chunk = (per_chunk / self.cfg.vocab_size).max(1);
        let mut sums = Vec::new();
        for start in (0..n_tokens).step_by(chunk) {
            let end = (start + chunk).min(n_tokens);
            let idx = Tensor::new(&rows[start..end], &self.device)?;
            let tgt = Tensor::new(&targets[start..end], &self.device)?;
            let logits = self.lm_head(&flat.index_select(&idx, 0)?)?;
            sums.push(ops::cross_entropy(&logits, &tgt, IGNORE_INDEX)?.sum_all()?);
        }
        let sum = if sums.len() == 1 {
            sums.pop().expect("one chunk")
        } else {
            Tensor::stack(&sums, 0)?.sum_all()?
        };
        Ok(LossOutput { sum, n_tokens })
    }

    /// An empty cache for `batch` sequences, room for `capacity` positions (it grows if needed).
    pub fn new_cache(&self, batch: usize, capacity: usize) -> Result<KvCache> {
        let capacity = capacity.max(1);
        let shape = (
            batch,
            self.cfg.num_key_value_heads,
            capacity,
            self.cfg.head_dim,
        );
        let layers = (0..self.layers.len())
            .map(|_| {
                Ok((
                    Tensor::zeros(shape, self.activation_dtype(), &self.device)?,
                    Tensor::zeros(shape, self.activation_dtype(), &self.device)?,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(KvCache {
            layers,
            len: 0,
            capacity,
            valid: vec![Vec::new(); batch],
        })
    }

    /// Incremental forward: appends `input_ids` (b, t) after the cached positions and returns the
    /// logits of the last new position, (b, vocab) in f32. `attention_mask` (b, t) marks padding
    /// among the new tokens (left padding of a prompt batch); `None` = all tokens. Positions
    /// count the real tokens before each one, per example.
    pub fn forward_cached(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        cache: &mut KvCache,
    ) -> Result<Tensor> {
        let (b, t) = input_ids.dims2()?;
        if b != cache.batch_size() {
            candle_core::bail!(
                "forward_cached: batch of {b}, cache of {}",
                cache.batch_size()
            );
        }
        let new_valid = mask_rows(attention_mask, b, t)?;
        let past = cache.len;
        if past + t > cache.capacity {
            grow_cache(cache, (past + t).max(2 * cache.capacity))?;
        }
        for (row, new) in cache.valid.iter_mut().zip(new_valid) {
            row.extend(new);
        }
        let (rope, mask) = self.padded_layout(&cache.valid, past, t)?;
        let mut x = self.embed(input_ids)?;
        for (layer, kv) in self.layers.iter().zip(cache.layers.iter_mut()) {
            x = layer.forward(&x, &rope, mask.as_ref(), Some((kv, past)))?;
        }
        cache.len = past + t;
        let last = x.narrow(1, t - 1, 1)?.squeeze(1)?;
        let last = ops::rms_norm(&last, &self.cast(&self.norm)?, self.cfg.rms_norm_eps as f32)?;
        self.lm_head(&last)?.to_dtype(DType::F32)
    }

    /// Token embeddings, (b, t) -> (b, t, hidden).
    fn embed(&self, input_ids: &Tensor) -> Result<Tensor> {
        let (b, t) = input_ids.dims2()?;
        let h = self.embed_tokens.dim(1)?;
        let x = self
            .embed_tokens
            .index_select(&input_ids.flatten_all()?, 0)?
            .reshape((b, t, h))?;
        self.cast(&x)
    }

    /// cos/sin of each (example, position) in the activations' dtype; computed in f32 as
    /// transformers does (`inv_freq * position`, then cos and sin).
    fn rope(&self, positions: &[Vec<u32>], b: usize, t: usize) -> Result<Rope> {
        let shared = positions.iter().all(|p| p == &positions[0]);
        let rows: &[Vec<u32>] = if shared { &positions[..1] } else { positions };
        let half = self.inv_freq.len();
        let n = rows.len() * t;
        let mut cos = Vec::with_capacity(n * half);
        let mut sin = Vec::with_capacity(n * half);
        for row in rows {
            for &p in row {
                for &f in &self.inv_freq {
                    let a = p as f32 * f;
                    cos.push(a.cos());
                    sin.push(a.sin());
                }
            }
        }
        let cos =
            Tensor::from_vec(cos, (n, half), &self.device)?.to_dtype(self.activation_dtype())?;
        let sin =
            Tensor::from_vec(sin, (n, half), &self.device)?.to_dtype(self.activation_dtype())?;
        let _ = b;
        Ok(Rope { cos, sin, shared })
    }
}

/// `t` in `dt`, itself when it already is.
fn cast_to(t: &Tensor, dt: DType) -> Result<Tensor> {
    if t.dtype() == dt {
        Ok(t.clone())
    } else {
        t.to_dtype(dt)
    }
}

fn grow_cache(cache: &mut KvCache, capacity: usize) -> Result<()> {
    for (k, v) in cache.layers.iter_mut() {
        let (b, h, _, d) = k.dims4()?;
        let nk = Tensor::zeros((b, h, capacity, d), k.dtype(), k.device())?;
        let nv = Tensor::zeros((b, h, capacity, d), v.dtype(), v.device())?;
        if cache.len > 0 {
            nk.slice_set(&k.narrow(2, 0, cache.len)?.contiguous()?, 2, 0)?;
            nv.slice_set(&v.narrow(2, 0, cache.len)?.contiguous()?, 2, 0)?;
        }
        *k = nk;
        *v = nv;
    }
    cache.capacity = capacity;
    Ok(())
}

/// Applies the rotary embedding to (b, heads, t, head_dim) (any strides, unit last stride).
fn apply_rope(x: &Tensor, rope: &Rope) -> Result<Tensor> {
    if rope.shared {
        return ops::rope(x, &rope.cos, &rope.sin);
    }
    let (b, _, t, d) = x.dims4()?;
    let cos = rope.cos.reshape((b, t, d / 2))?;
    let sin = rope.sin.reshape((b, t, d / 2))?;
    ops::rope(x, &cos, &sin)
}

impl Attention {
    /// `x`: (b, t, hidden). `cache`: this layer's (k, v) buffers and the cached length.
    fn forward(
        &self,
        x: &Tensor,
        rope: &Rope,
        mask: Option<&AttnMask>,
        cache: Option<(&mut (Tensor, Tensor), usize)>,
    ) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let (nh, nkv, hd) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let q = self
            .q_proj
            .forward(x)?
            .reshape((b, t, nh, hd))?
            .transpose(1, 2)?;
        let k = self
            .k_proj
            .forward(x)?
            .reshape((b, t, nkv, hd))?
            .transpose(1, 2)?;
        let v = self
            .v_proj
            .forward(x)?
            .reshape((b, t, nkv, hd))?
            .transpose(1, 2)?;
        let q = apply_rope(&q, rope)?;
        let k = apply_rope(&k, rope)?;
        let out = match cache {
            None => {
                // Training and scoring: one fused node (ops::attention), whose backward
                // recomputes the probabilities instead of keeping (t x t) tensors per layer.
                ops::attention_with(&q, &k, &v, mask, 1.0 / (hd as f64).sqrt())?
            }
            Some(((kc, vc), past)) => {
                kc.slice_set(&k.contiguous()?, 2, past)?;
                vc.slice_set(&v.contiguous()?, 2, past)?;
                ops::attention_cached_with(&q, kc, vc, past + t, mask, 1.0 / (hd as f64).sqrt())?
            }
        };
        self.o_proj.forward(&out)
    }
}

impl Mlp {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let gate = self.gate_proj.forward(x)?;
        let up = self.up_proj.forward(x)?;
        self.down_proj.forward(&ops::silu_mul(&gate, &up)?)
    }
}

impl DecoderLayer {
    /// The layer's tensors that can carry a gradient: LoRA adapters, and under full
    /// fine-tuning its weights.
    fn trainable(&self) -> Vec<Tensor> {
        let a = &self.self_attn;
        let m = &self.mlp;
        let mut out: Vec<Tensor> = [&self.input_layernorm, &self.post_attention_layernorm]
            .into_iter()
            .filter(|t| t.is_variable())
            .cloned()
            .collect();
        for lin in [
            &a.q_proj,
            &a.k_proj,
            &a.v_proj,
            &a.o_proj,
            &m.gate_proj,
            &m.up_proj,
            &m.down_proj,
        ] {
            out.extend(lin.trainable());
        }
        out
    }

    fn forward(
        &self,
        x: &Tensor,
        rope: &Rope,
        mask: Option<&AttnMask>,
        cache: Option<(&mut (Tensor, Tensor), usize)>,
    ) -> Result<Tensor> {
        let dt = x.dtype();
        let h = ops::rms_norm(x, &cast_to(&self.input_layernorm, dt)?, self.eps)?;
        let x = (x + self.self_attn.forward(&h, rope, mask, cache)?)?;
        let h = ops::rms_norm(&x, &cast_to(&self.post_attention_layernorm, dt)?, self.eps)?;
        x + self.mlp.forward(&h)?
    }
}

/// One decoder layer under gradient checkpointing: the forward runs without a graph (its
/// activations are freed at once) and the layer becomes one node whose backward recomputes it
/// from its input, backpropagates through the recomputed graph, and leaves the parameters'
/// gradients in `sink`. The dropout masks are counter-based, so the recomputed forward draws
/// the same masks as the first one.
fn checkpointed(
    layer: &DecoderLayer,
    x: &Tensor,
    rope: &Rope,
    mask: Option<&AttnMask>,
    sink: &CheckpointGrads,
) -> Result<Tensor> {
    let y = layer.forward(&x.detach(), rope, mask, None)?.detach();
    x.apply_op1(CheckpointedLayer {
        layer: layer.clone(),
        rope: rope.clone(),
        mask: mask.cloned(),
        sink: sink.clone(),
        out: std::sync::Mutex::new(Some(y)),
    })
}

struct CheckpointedLayer {
    layer: DecoderLayer,
    rope: Rope,
    mask: Option<AttnMask>,
    sink: CheckpointGrads,
    /// The forward's output, handed over once as the node's value.
    out: std::sync::Mutex<Option<Tensor>>,
}

impl CheckpointedLayer {
    fn take_out(&self) -> Result<Tensor> {
        self.out
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .ok_or_else(|| candle_core::Error::Msg("checkpointed layer: no output".into()))
    }
}

impl candle_core::CustomOp1 for CheckpointedLayer {
    fn name(&self) -> &'static str {
        "sft-checkpointed-layer"
    }

    fn cpu_fwd(
        &self,
        _: &candle_core::CpuStorage,
        _: &candle_core::Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let y = self.take_out()?.contiguous()?;
        let (s, l) = y.storage_and_layout();
        let candle_core::Storage::Cpu(s) = &*s else {
            candle_core::bail!("checkpointed layer: the output is not on the CPU");
        };
        let (a, b) = l.contiguous_offsets().expect("contiguous");
        let v = match s {
            candle_core::CpuStorage::F32(v) => candle_core::CpuStorage::F32(v[a..b].to_vec()),
            candle_core::CpuStorage::F64(v) => candle_core::CpuStorage::F64(v[a..b].to_vec()),
            candle_core::CpuStorage::BF16(v) => candle_core::CpuStorage::BF16(v[a..b].to_vec()),
            candle_core::CpuStorage::F16(v) => candle_core::CpuStorage::F16(v[a..b].to_vec()),
            _ => candle_core::bail!("checkpointed layer: unsupported dtype {:?}", y.dtype()),
        };
        Ok((v, y.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &candle_core::Layout,
    ) -> Result<(candle_core::CudaStorage, candle_core::Shape)> {
        use candle_core::backend::BackendStorage;
        let y = self.take_out()?;
        let (s, l) = y.storage_and_layout();
        let candle_core::Storage::Cuda(s) = &*s else {
            candle_core::bail!("checkpointed layer: the output is not on the GPU");
        };
        Ok((s.try_clone(l)?, y.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let xv = candle_core::Var::from_tensor(&x.detach())?;
        let y = self
            .layer
            .forward(xv.as_tensor(), &self.rope, self.mask.as_ref(), None)?;
        // d(sum(y * grad))/dy = grad: the recomputed graph's backward from the incoming grad.
        let root = (y * grad.detach())?.sum_all()?;
        let grads = root.backward()?;
        for p in self.layer.trainable() {
            if let Some(g) = grads.get(&p) {
                self.sink.push(&p, g.clone());
            }
        }
        Ok(grads.get(xv.as_tensor()).cloned())
    }
}

#[cfg(test)]
mod tests;
