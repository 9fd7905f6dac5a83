//! sft-optim: the optimizer of the training step, written for this project.
//!
//! AdamW with decoupled weight decay (a per-parameter flag, so norms and biases can be left
//! undecayed), float32 master copies for bf16/f16 weights, float32 moments, bias correction,
//! global-norm gradient clipping, a gradient accumulator over micro-batches, and a state that
//! saves to and loads from safetensors so a resumed run steps bit-identically.
//!
//! Edges: the learning rate is given to every [`AdamW::step`] by the caller (the scheduler lives
//! in the trainer); this crate knows parameters only by name and `Var`, nothing of models.
//! candle-nn's `AdamW` is not used: it has no parameter groups, keeps moments in the weight's
//! dtype (a bf16 weight of 1.0 with lr 1e-4 never moves), and cannot save its state.
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use serde::{Deserialize, Serialize};
use sft_common::RawView;

mod sharded;
pub use sharded::{
    parse_shard_file_name, shard_file_name, shard_range, Pending, Segment, ShardHeader,
    ShardedAdamW,
};

/// What can go wrong; every variant names the parameter or file involved.
#[derive(Debug, thiserror::Error)]
pub enum OptimError {
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error("parameter `{name}` received no gradient (is it reachable from the loss?)")]
    MissingGrad { name: String },
    #[error("gradient of `{name}` has shape {got:?}, expected {expected:?}")]
    GradShape {
        name: String,
        got: Vec<usize>,
        expected: Vec<usize>,
    },
    #[error("duplicate parameter name `{name}`")]
    DuplicateParam { name: String },
    #[error("{path}: {cause}")]
    Io {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("{path}: {msg}")]
    Format { path: PathBuf, msg: String },
}

pub type Result<T> = std::result::Result<T, OptimError>;

/// One trainable parameter: its name (stable across runs; it keys the saved state), the `Var`
/// the model reads, and whether weight decay applies to it.
#[derive(Clone, Debug)]
pub struct ParamSpec {
    pub name: String,
    pub var: Var,
    pub weight_decay: bool,
}

impl ParamSpec {
    /// A parameter whose decay follows [`decays_by_name`].
    pub fn new(name: impl Into<String>, var: Var) -> Self {
        let name = name.into();
        let weight_decay = decays_by_name(&name);
        Self {
            name,
            var,
            weight_decay,
        }
    }

    /// A spec for each named variable (an adapter's or a model's trainable list).
    pub fn all(named: &[(String, Var)]) -> Vec<Self> {
        named
            .iter()
            .map(|(n, v)| Self::new(n.clone(), v.clone()))
            .collect()
    }
}

/// The gradient of `p` in a backward pass's store; a parameter without one is an error (it is
/// how a detached graph shows up).
fn grad_of<'a>(p: &ParamSpec, store: &'a GradStore) -> Result<&'a Tensor> {
    store
        .get(p.var.as_tensor())
        .ok_or_else(|| OptimError::MissingGrad {
            name: p.name.clone(),
        })
}

/// The usual grouping (Hugging Face's Trainer): no decay on biases and normalisation weights.
pub fn decays_by_name(name: &str) -> bool {
    !(name.ends_with(".bias") || name.ends_with("norm.weight") || name.contains("layernorm"))
}

/// AdamW's hyper-parameters, PyTorch's defaults except the decay.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Decoupled decay, applied as `p *= 1 - lr * weight_decay` to parameters flagged for it.
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

/// Gradients of the trainable parameters, keyed by parameter name.
#[derive(Clone, Debug, Default)]
pub struct Grads {
    map: HashMap<String, Tensor>,
}

impl Grads {
    pub fn new(map: HashMap<String, Tensor>) -> Self {
        Self { map }
    }

    /// Picks the gradient of every parameter out of a backward pass ([`grad_of`]).
    pub fn from_store(params: &[ParamSpec], store: &GradStore) -> Result<Self> {
        let mut map = HashMap::with_capacity(params.len());
        for p in params {
            let g = grad_of(p, store)?;
            map.insert(p.name.clone(), g.clone());
        }
        Ok(Self { map })
    }

    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.map.get(name)
    }

    pub fn insert(&mut self, name: impl Into<String>, grad: Tensor) {
        self.map.insert(name.into(), grad);
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&String, &Tensor)> {
        self.map.iter()
    }

    /// The L2 norm of all gradients together (non-finite if any element is). Summed in the
    /// order of the names, so that every process (every rank of a data-parallel run, every
    /// resumed run) gets the same bits.
    pub fn global_norm(&self) -> Result<f64> {
        let mut names: Vec<&String> = self.map.keys().collect();
        names.sort();
        let mut sq = 0f64;
        for g in names.into_iter().map(|n| &self.map[n]) {
            sq += g
                .to_dtype(DType::F32)?
                .sqr()?
                .sum_all()?
                .to_dtype(DType::F64)?
                .to_scalar::<f64>()?;
        }
        Ok(sq.sqrt())
    }

    /// Names of the parameters whose gradient holds a NaN or an infinity, sorted.
    pub fn non_finite(&self) -> Result<Vec<String>> {
        let mut bad = vec![];
        for (name, g) in &self.map {
            // 0 * g is 0 for every finite element and NaN otherwise; no overflow either way.
            let s = g
                .to_dtype(DType::F32)?
                .affine(0.0, 0.0)?
                .sum_all()?
                .to_scalar::<f32>()?;
            if s != 0.0 {
                bad.push(name.clone());
            }
        }
        bad.sort();
        Ok(bad)
    }

    /// Scales every gradient by `factor`.
    pub fn scale(&mut self, factor: f64) -> Result<()> {
        for g in self.map.values_mut() {
            *g = g.affine(factor, 0.0)?;
        }
        Ok(())
    }
}

/// Global-norm clipping as PyTorch's `clip_grad_norm_`: when the norm exceeds `max_norm`,
/// every gradient is scaled by `max_norm / (norm + 1e-6)`. Returns the norm before clipping;
/// a non-finite norm leaves the gradients untouched (the caller should skip the step).
pub fn clip_grad_norm(grads: &mut Grads, max_norm: f64) -> Result<f64> {
    let norm = grads.global_norm()?;
    if norm.is_finite() && norm > max_norm {
        grads.scale(max_norm / (norm + 1e-6))?;
    }
    Ok(norm)
}

/// Sums gradients over micro-batches in float32 and normalises by the tokens they covered.
///
/// Each micro-batch's loss should be the *sum* of its token losses; after the last one,
/// [`GradAccumulator::finish`] divides by the total token count, which gives the gradient of
/// the mean loss over every accumulated token, however the tokens were split.
#[derive(Debug, Default)]
pub struct GradAccumulator {
    sums: HashMap<String, Tensor>,
    tokens: usize,
    micro_batches: usize,
}

impl GradAccumulator {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one micro-batch's gradients (of a summed loss over `tokens` tokens).
    pub fn add(&mut self, params: &[ParamSpec], store: &GradStore, tokens: usize) -> Result<()> {
        for p in params {
            let g = grad_of(p, store)?;
            if g.dims() != p.var.dims() {
                return Err(OptimError::GradShape {
                    name: p.name.clone(),
                    got: g.dims().to_vec(),
                    expected: p.var.dims().to_vec(),
                });
            }
            let g = g.to_dtype(state_dtype(p.var.dtype()))?;
            let sum = match self.sums.remove(&p.name) {
                Some(s) => (s + g)?,
                None => g,
            };
            self.sums.insert(p.name.clone(), sum);
        }
        self.tokens += tokens;
        self.micro_batches += 1;
        Ok(())
    }

    pub fn tokens(&self) -> usize {
        self.tokens
    }

    pub fn micro_batches(&self) -> usize {
        self.micro_batches
    }

    /// The accumulated gradients, not yet divided by the tokens: what data-parallel ranks sum
    /// before dividing by the tokens of every rank.
    pub fn into_sums(self) -> Grads {
        Grads::new(self.sums)
    }

    /// The accumulated gradients divided by the total token count (by 1 if it is zero).
    pub fn finish(self) -> Result<Grads> {
        let mut g = Grads::new(self.sums);
        g.scale(1.0 / self.tokens.max(1) as f64)?;
        Ok(g)
    }
}

/// Float32 for every weight dtype except f64 (kept for finite-difference tests).
fn state_dtype(dt: DType) -> DType {
    if dt == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

struct ParamState {
    spec: ParamSpec,
    /// A float32 copy when the weight is bf16/f16: updates accumulate here.
    master: Option<Tensor>,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
}

/// AdamW (Loshchilov & Hutter), with PyTorch's update order:
/// `p *= 1 - lr wd` (flagged parameters), `m = b1 m + (1 - b1) g`, `v = b2 v + (1 - b2) g^2`,
/// `p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)`.
pub struct AdamW {
    cfg: AdamWConfig,
    params: Vec<ParamState>,
    step: u64,
}

/// The saved state's description, stored as JSON in the safetensors header
/// (`__metadata__["sft_optim"]`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StateHeader {
    pub format: String,
    pub step: u64,
    pub config: AdamWConfig,
    pub params: Vec<ParamHeader>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ParamHeader {
    pub name: String,
    pub shape: Vec<usize>,
    pub dtype: String,
    pub weight_decay: bool,
    pub master: bool,
}

const FORMAT: &str = "sft-adamw-v1";
const META_KEY: &str = "sft_optim";

impl AdamW {
    pub fn new(params: Vec<ParamSpec>, cfg: AdamWConfig) -> Result<Self> {
        let mut seen = std::collections::HashSet::new();
        let mut states = Vec::with_capacity(params.len());
        for spec in params {
            if !seen.insert(spec.name.clone()) {
                return Err(OptimError::DuplicateParam { name: spec.name });
            }
            let t = spec.var.as_tensor();
            let sd = state_dtype(t.dtype());
            let master = if t.dtype() != sd {
                Some(t.detach().to_dtype(sd)?)
            } else {
                None
            };
            let exp_avg = Tensor::zeros(t.shape(), sd, t.device())?;
            let exp_avg_sq = Tensor::zeros(t.shape(), sd, t.device())?;
            states.push(ParamState {
                spec,
                master,
                exp_avg,
                exp_avg_sq,
            });
        }
        Ok(Self {
            cfg,
            params: states,
            step: 0,
        })
    }

    pub fn config(&self) -> &AdamWConfig {
        &self.cfg
    }

    /// No float32 master copies of bf16/f16 weights: each update is computed in f32 and
    /// rounded into the weight (the moments stay f32). Saves 4 bytes per parameter (28 GB for
    /// a 7B model, what full fine-tuning on one GPU needs), at the cost of updates below the
    /// weight's rounding step being lost, as in PyTorch training in pure bf16.
    pub fn without_master_weights(mut self) -> Self {
        for p in &mut self.params {
            p.master = None;
        }
        self
    }

    /// Steps taken so far (the `t` of the bias correction).
    pub fn step_count(&self) -> u64 {
        self.step
    }

    pub fn params(&self) -> impl Iterator<Item = &ParamSpec> {
        self.params.iter().map(|p| &p.spec)
    }

    /// Elements of all parameters together.
    pub fn num_elements(&self) -> usize {
        self.params.iter().map(|p| p.spec.var.elem_count()).sum()
    }

    /// One update with learning rate `lr`. Every parameter must have a gradient in `grads`.
    pub fn step(&mut self, grads: &Grads, lr: f64) -> Result<()> {
        // Check everything before touching any state, so a bad call changes nothing.
        for p in &self.params {
            let g = grads
                .get(&p.spec.name)
                .ok_or_else(|| OptimError::MissingGrad {
                    name: p.spec.name.clone(),
                })?;
            if g.dims() != p.spec.var.dims() {
                return Err(OptimError::GradShape {
                    name: p.spec.name.clone(),
                    got: g.dims().to_vec(),
                    expected: p.spec.var.dims().to_vec(),
                });
            }
        }
        self.step += 1;
        let corrections = bias_corrections(&self.cfg, lr, self.step);
        for p in &mut self.params {
            let sd = p.exp_avg.dtype();
            let g = grads
                .get(&p.spec.name)
                .expect("checked above")
                .detach()
                .to_dtype(sd)?;
            let param = match &p.master {
                Some(m) => m.clone(),
                // Without a master copy a half-precision weight is updated in f32 and rounded.
                None => p.spec.var.as_tensor().detach().to_dtype(sd)?,
            };
            let param = update(
                param,
                &g,
                (&mut p.exp_avg, &mut p.exp_avg_sq),
                &self.cfg,
                p.spec.weight_decay,
                lr,
                corrections,
            )?;
            match &mut p.master {
                Some(m) => {
                    p.spec.var.set(&param.to_dtype(p.spec.var.dtype())?)?;
                    *m = param;
                }
                None => p.spec.var.set(&param.to_dtype(p.spec.var.dtype())?)?,
            }
        }
        Ok(())
    }

    /// The description that [`AdamW::save`] writes into the file's header.
    pub fn header(&self) -> StateHeader {
        StateHeader {
            format: FORMAT.to_string(),
            step: self.step,
            config: self.cfg,
            params: self
                .params
                .iter()
                .map(|p| ParamHeader {
                    name: p.spec.name.clone(),
                    shape: p.spec.var.dims().to_vec(),
                    dtype: format!("{:?}", p.spec.var.dtype()).to_lowercase(),
                    weight_decay: p.spec.weight_decay,
                    master: p.master.is_some(),
                })
                .collect(),
        }
    }

    /// The state tensors, keyed `<param>.exp_avg`, `<param>.exp_avg_sq` and `<param>.master`.
    pub fn state_dict(&self) -> BTreeMap<String, Tensor> {
        let mut out = BTreeMap::new();
        for p in &self.params {
            let n = &p.spec.name;
            out.insert(format!("{n}.exp_avg"), p.exp_avg.clone());
            out.insert(format!("{n}.exp_avg_sq"), p.exp_avg_sq.clone());
            if let Some(m) = &p.master {
                out.insert(format!("{n}.master"), m.clone());
            }
        }
        out
    }

    /// Writes the state to one safetensors file (the header goes into its metadata).
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let header = serde_json::to_string(&self.header()).map_err(|e| OptimError::Format {
            path: path.to_path_buf(),
            msg: format!("cannot encode the header: {e}"),
        })?;
        let mut views = Vec::new();
        for (name, t) in self.state_dict() {
            views.push((name, state_view(&t)?));
        }
        let meta = HashMap::from([(META_KEY.to_string(), header)]);
        let bytes = safetensors::serialize(views, Some(meta)).map_err(|e| OptimError::Format {
            path: path.to_path_buf(),
            msg: format!("cannot serialize: {e}"),
        })?;
        std::fs::write(path, bytes).map_err(|source| OptimError::Io {
            path: path.to_path_buf(),
            cause: source,
        })
    }

    /// Restores a state written by [`AdamW::save`] for the same parameters (names and shapes
    /// must match; the file's config replaces this optimizer's). The model's weights are not
    /// part of the state: load them first.
    pub fn load(&mut self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let fmt = |msg: String| OptimError::Format {
            path: path.to_path_buf(),
            msg,
        };
        let bytes = std::fs::read(path).map_err(|source| OptimError::Io {
            path: path.to_path_buf(),
            cause: source,
        })?;
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes)
            .map_err(|e| fmt(format!("not a safetensors file: {e}")))?;
        let header = meta
            .metadata()
            .as_ref()
            .and_then(|m| m.get(META_KEY))
            .ok_or_else(|| fmt(format!("no `{META_KEY}` entry in the header metadata")))?;
        let header: StateHeader =
            serde_json::from_str(header).map_err(|e| fmt(format!("bad `{META_KEY}`: {e}")))?;
        if header.format != FORMAT {
            return Err(fmt(format!(
                "format `{}`, expected `{FORMAT}`",
                header.format
            )));
        }
        let st = safetensors::SafeTensors::deserialize(&bytes)
            .map_err(|e| fmt(format!("not a safetensors file: {e}")))?;
        let saved: HashMap<&str, &ParamHeader> =
            header.params.iter().map(|p| (p.name.as_str(), p)).collect();
        let mut restored = Vec::with_capacity(self.params.len());
        for p in &self.params {
            let name = &p.spec.name;
            let h = saved
                .get(name.as_str())
                .ok_or_else(|| fmt(format!("no state for parameter `{name}`")))?;
            if h.shape != p.spec.var.dims() {
                return Err(fmt(format!(
                    "parameter `{name}` has shape {:?} in the file, {:?} here",
                    h.shape,
                    p.spec.var.dims()
                )));
            }
            let dev = p.spec.var.device();
            let sd = p.exp_avg.dtype();
            let load = |key: String| -> Result<Tensor> {
                let v = st
                    .tensor(&key)
                    .map_err(|e| fmt(format!("tensor `{key}`: {e}")))?;
                let t = raw_to_tensor(&v, dev).map_err(|e| fmt(format!("tensor `{key}`: {e}")))?;
                if t.dims() != p.spec.var.dims() || t.dtype() != sd {
                    return Err(fmt(format!(
                        "tensor `{key}` is {:?} {:?}, expected {:?} {sd:?}",
                        t.dtype(),
                        t.dims(),
                        p.spec.var.dims()
                    )));
                }
                Ok(t)
            };
            let m = load(format!("{name}.exp_avg"))?;
            let v = load(format!("{name}.exp_avg_sq"))?;
            let master = match (&p.master, h.master) {
                (Some(_), true) => Some(load(format!("{name}.master"))?),
                (None, false) => None,
                (Some(_), false) => {
                    return Err(fmt(format!(
                        "parameter `{name}` has no master copy in the file but needs one here"
                    )))
                }
                (None, true) => {
                    return Err(fmt(format!(
                        "parameter `{name}` has a master copy in the file but none here"
                    )))
                }
            };
            restored.push((m, v, master));
        }
        for (p, (m, v, master)) in self.params.iter_mut().zip(restored) {
            p.exp_avg = m;
            p.exp_avg_sq = v;
            p.master = master;
        }
        self.step = header.step;
        self.cfg = header.config;
        Ok(())
    }
}

/// A state tensor's bytes for the safetensors writer: f32 or f64 (what [`raw_to_tensor`] reads
/// back).
fn state_view(t: &Tensor) -> Result<RawView> {
    match t.dtype() {
        DType::F32 | DType::F64 => Ok(RawView::from_tensor(t)?),
        dt => Err(candle_core::Error::Msg(format!(
            "optimizer state of dtype {dt:?} cannot be saved"
        ))
        .into()),
    }
}

fn raw_to_tensor(
    v: &safetensors::tensor::TensorView<'_>,
    dev: &Device,
) -> std::result::Result<Tensor, String> {
    let shape = v.shape().to_vec();
    let bytes = v.data();
    let t = match v.dtype() {
        safetensors::Dtype::F32 => {
            let vals: Vec<f32> = bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            Tensor::from_vec(vals, shape, dev)
        }
        safetensors::Dtype::F64 => {
            let vals: Vec<f64> = bytes
                .chunks_exact(8)
                .map(|c| {
                    let mut a = [0u8; 8];
                    a.copy_from_slice(c);
                    f64::from_le_bytes(a)
                })
                .collect();
            Tensor::from_vec(vals, shape, dev)
        }
        dt => return Err(format!("unexpected dtype {dt:?} (expected F32 or F64)")),
    };
    t.map_err(|e| e.to_string())
}

/// `(lr / (1 - beta1^t), 1 / sqrt(1 - beta2^t))`: the bias-corrected step size and the
/// second moment's correction of AdamW's step `t`.
pub(crate) fn bias_corrections(cfg: &AdamWConfig, lr: f64, t: u64) -> (f64, f64) {
    let t = t as i32;
    let bc1 = 1.0 - cfg.beta1.powi(t);
    let bc2 = 1.0 - cfg.beta2.powi(t);
    (lr / bc1, 1.0 / bc2.sqrt())
}

/// One AdamW update of `param` with gradient `g` (both in the moments' dtype): decoupled
/// weight decay when `decay`, the moments updated in place, the new parameter returned. The one
/// definition the replicated and the sharded optimizer share, so that a sharded run updates
/// every element with the same operations as a replicated one.
pub(crate) fn update(
    param: Tensor,
    g: &Tensor,
    (exp_avg, exp_avg_sq): (&mut Tensor, &mut Tensor),
    cfg: &AdamWConfig,
    decay: bool,
    lr: f64,
    (step_size, inv_sqrt_bc2): (f64, f64),
) -> Result<Tensor> {
    let param = if decay && cfg.weight_decay != 0.0 {
        param.affine(1.0 - lr * cfg.weight_decay, 0.0)?
    } else {
        param
    };
    *exp_avg = (exp_avg.affine(cfg.beta1, 0.0)? + g.affine(1.0 - cfg.beta1, 0.0)?)?;
    *exp_avg_sq = (exp_avg_sq.affine(cfg.beta2, 0.0)? + g.sqr()?.affine(1.0 - cfg.beta2, 0.0)?)?;
    let denom = exp_avg_sq.sqrt()?.affine(inv_sqrt_bc2, cfg.eps)?;
    let step = (&*exp_avg / denom)?.affine(step_size, 0.0)?;
    Ok((param - step)?)
}
