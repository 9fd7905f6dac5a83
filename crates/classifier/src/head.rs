//! The trained part: a logistic regression or a one-hidden-layer MLP on a standardised input
//! (sentence embedding ⊕ surface features). Trained full-batch with our own Adam on candle's
//! composed ops, which all have backward; the encoder's output is a constant. Seeded and
//! deterministic: the same inputs and config give the same bytes.
use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, Var, D};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum HeadKind {
    Logistic,
    Mlp { hidden: usize },
}

/// How a head is trained.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HeadTrainConfig {
    pub head: HeadKind,
    /// Full-batch Adam steps.
    pub steps: usize,
    pub lr: f64,
    /// L2 penalty on the weights (not the biases): `weight_decay / 2 · Σ w²` added to the loss.
    pub weight_decay: f64,
    pub seed: u64,
    /// Weight each class by n / (2 · n_class) so that an unbalanced set does not bias the head.
    pub balance_classes: bool,
}

impl Default for HeadTrainConfig {
    fn default() -> Self {
        Self {
            head: HeadKind::Mlp { hidden: 64 },
            steps: 400,
            lr: 0.01,
            weight_decay: 1e-3,
            seed: 0,
            balance_classes: true,
        }
    }
}

/// A binary head: `logit = f((x - mean) / std)`.
#[derive(Clone, Debug)]
pub struct Head {
    kind: HeadKind,
    mean: Tensor,
    std: Tensor,
    w1: Tensor,
    b1: Tensor,
    w2: Option<Tensor>,
    b2: Option<Tensor>,
}

const MEAN: &str = "standardize.mean";
const STD: &str = "standardize.std";
const W1: &str = "layer1.weight";
const B1: &str = "layer1.bias";
const W2: &str = "layer2.weight";
const B2: &str = "layer2.bias";

/// Row-major f32 tensor data in the shape safetensors (0.6) serialises.
struct F32View {
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

impl safetensors::View for &F32View {
    fn dtype(&self) -> safetensors::Dtype {
        safetensors::Dtype::F32
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.bytes)
    }
    fn data_len(&self) -> usize {
        self.bytes.len()
    }
}

fn view(t: &Tensor) -> Result<F32View> {
    let values = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    Ok(F32View {
        shape: t.dims().to_vec(),
        bytes: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
    })
}

impl Head {
    pub fn kind(&self) -> HeadKind {
        self.kind
    }

    pub fn input_dim(&self) -> usize {
        self.mean.dims1().unwrap_or(0)
    }

    pub fn device(&self) -> &Device {
        self.w1.device()
    }

    pub(crate) fn forward(
        kind: HeadKind,
        xs: &Tensor,
        w1: &Tensor,
        b1: &Tensor,
        w2: Option<&Tensor>,
        b2: Option<&Tensor>,
    ) -> Result<Tensor> {
        let h = xs.matmul(&w1.t()?)?.broadcast_add(b1)?;
        let z = match (kind, w2, b2) {
            (HeadKind::Logistic, _, _) => h,
            (HeadKind::Mlp { .. }, Some(w2), Some(b2)) => {
                h.relu()?.matmul(&w2.t()?)?.broadcast_add(b2)?
            }
            (HeadKind::Mlp { .. }, _, _) => {
                return Err(Error::Invalid("an MLP head needs layer2".into()))
            }
        };
        Ok(z.squeeze(D::Minus1)?)
    }

    /// A head from its parts (the fine-tuning in [`crate::finetune`] trains them itself).
    pub(crate) fn from_parts(
        kind: HeadKind,
        mean: Tensor,
        std: Tensor,
        layers: (Tensor, Tensor, Option<Tensor>, Option<Tensor>),
    ) -> Self {
        let (w1, b1, w2, b2) = layers;
        Head {
            kind,
            mean,
            std,
            w1,
            b1,
            w2,
            b2,
        }
    }

    pub(crate) fn standardize(&self, x: &Tensor) -> Result<Tensor> {
        let x = x.to_dtype(DType::F32)?.to_device(self.w1.device())?;
        Ok(x.broadcast_sub(&self.mean)?.broadcast_div(&self.std)?)
    }

    /// Logits of class 1, shape `(n,)`, for inputs of shape `(n, input_dim)`.
    pub fn logits(&self, x: &Tensor) -> Result<Tensor> {
        let (_, d) = x.dims2()?;
        if d != self.input_dim() {
            return Err(Error::Invalid(format!(
                "head expects inputs of width {}, got {d}",
                self.input_dim()
            )));
        }
        let xs = self.standardize(x)?;
        Self::forward(
            self.kind,
            &xs,
            &self.w1,
            &self.b1,
            self.w2.as_ref(),
            self.b2.as_ref(),
        )
    }

    /// Probabilities of class 1.
    pub fn probs(&self, x: &Tensor) -> Result<Vec<f32>> {
        if x.dims()[0] == 0 {
            return Ok(Vec::new());
        }
        let p = candle_nn::ops::sigmoid(&self.logits(x)?)?;
        Ok(p.to_vec1::<f32>()?)
    }

    /// Trains a head on inputs `x` `(n, d)` and 0/1 `labels`; returns it and the loss per step.
    pub fn train(x: &Tensor, labels: &[u8], cfg: &HeadTrainConfig) -> Result<(Head, Vec<f32>)> {
        let (n, d) = x.dims2()?;
        if n == 0 || n != labels.len() {
            return Err(Error::Invalid(format!(
                "training a head needs as many labels as inputs (> 0): {n} inputs, {} labels",
                labels.len()
            )));
        }
        if let Some(bad) = labels.iter().find(|&&y| y > 1) {
            return Err(Error::Invalid(format!("labels must be 0 or 1, got {bad}")));
        }
        let device = x.device().clone();
        let x = x.to_dtype(DType::F32)?;
        let mean = x.mean(0)?;
        let std = x
            .broadcast_sub(&mean)?
            .sqr()?
            .mean(0)?
            .sqrt()?
            .clamp(1e-6, f64::MAX)?;
        let xs = x.broadcast_sub(&mean)?.broadcast_div(&std)?;

        let n1 = labels.iter().filter(|&&y| y == 1).count();
        let n0 = n - n1;
        let class_weight = |y: u8| -> f32 {
            let nc = if y == 1 { n1 } else { n0 };
            if cfg.balance_classes && nc > 0 {
                n as f32 / (2.0 * nc as f32)
            } else {
                1.0
            }
        };
        let y: Vec<f32> = labels.iter().map(|&y| y as f32).collect();
        let wts: Vec<f32> = labels.iter().map(|&y| class_weight(y)).collect();
        let y = Tensor::from_vec(y, n, &device)?;
        let wts = Tensor::from_vec(wts, n, &device)?;

        let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
        let (w1, b1, w2, b2) = init_params(cfg.head, d, &mut rng, &device)?;
        let mut params: Vec<(&Var, bool)> = vec![(&w1, true), (&b1, false)];
        if let (Some(w2), Some(b2)) = (&w2, &b2) {
            params.push((w2, true));
            params.push((b2, false));
        }
        let mut adam = Adam::new(&params.iter().map(|(v, _)| *v).collect::<Vec<_>>(), cfg.lr)?;
        let mut losses = Vec::with_capacity(cfg.steps);
        for _ in 0..cfg.steps {
            let z = Self::forward(
                cfg.head,
                &xs,
                w1.as_tensor(),
                b1.as_tensor(),
                w2.as_ref().map(|v| v.as_tensor()),
                b2.as_ref().map(|v| v.as_tensor()),
            )?;
            let bce = bce_with_logits(&z, &y)?;
            let mut loss = (bce * &wts)?.mean_all()?;
            if cfg.weight_decay > 0.0 {
                for (v, decays) in &params {
                    if *decays {
                        let l2 = (v.as_tensor().sqr()?.sum_all()? * (cfg.weight_decay / 2.0))?;
                        loss = (loss + l2)?;
                    }
                }
            }
            losses.push(loss.to_scalar::<f32>()?);
            let grads = loss.backward()?;
            adam.step(&grads)?;
        }
        let head = Head {
            kind: cfg.head,
            mean,
            std,
            w1: w1.as_tensor().detach(),
            b1: b1.as_tensor().detach(),
            w2: w2.map(|v| v.as_tensor().detach()),
            b2: b2.map(|v| v.as_tensor().detach()),
        };
        Ok((head, losses))
    }

    /// The head as safetensors bytes, with `metadata` in the file's `__metadata__`.
    pub fn to_safetensors(&self, metadata: HashMap<String, String>) -> Result<Vec<u8>> {
        self.to_safetensors_with(metadata, &[])
    }

    /// As [`Head::to_safetensors`], with more named tensors in the same file (a fine-tuned
    /// encoder's deltas).
    pub fn to_safetensors_with(
        &self,
        metadata: HashMap<String, String>,
        extra: &[(String, Tensor)],
    ) -> Result<Vec<u8>> {
        let mut views = vec![
            (MEAN, view(&self.mean)?),
            (STD, view(&self.std)?),
            (W1, view(&self.w1)?),
            (B1, view(&self.b1)?),
        ];
        if let (Some(w2), Some(b2)) = (&self.w2, &self.b2) {
            views.push((W2, view(w2)?));
            views.push((B2, view(b2)?));
        }
        for (name, t) in extra {
            if [MEAN, STD, W1, B1, W2, B2].contains(&name.as_str()) {
                return Err(Error::Invalid(format!(
                    "tensor name `{name}` is the head's own"
                )));
            }
            views.push((name.as_str(), view(t)?));
        }
        let refs: Vec<(&str, &F32View)> = views.iter().map(|(n, v)| (*n, v)).collect();
        safetensors::serialize(refs, Some(metadata))
            .map_err(|e| Error::format("head safetensors", e))
    }

    /// Reads a head written by [`Head::to_safetensors`]; returns it and the file's metadata.
    pub fn from_safetensors(
        bytes: &[u8],
        device: &Device,
    ) -> Result<(Head, HashMap<String, String>)> {
        let what = "head safetensors";
        let (_, meta) =
            safetensors::SafeTensors::read_metadata(bytes).map_err(|e| Error::format(what, e))?;
        let metadata = meta.metadata().clone().unwrap_or_default();
        let st =
            safetensors::SafeTensors::deserialize(bytes).map_err(|e| Error::format(what, e))?;
        let get = |name: &str| -> Result<Option<Tensor>> {
            let t = match st.tensor(name) {
                Ok(t) => t,
                Err(safetensors::SafeTensorError::TensorNotFound(_)) => return Ok(None),
                Err(e) => return Err(Error::format(what, format!("{name}: {e}"))),
            };
            if t.dtype() != safetensors::Dtype::F32 {
                return Err(Error::format(what, format!("{name}: expected F32")));
            }
            let values: Vec<f32> = t
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            Ok(Some(Tensor::from_vec(values, t.shape(), device)?))
        };
        let need = |name: &str| -> Result<Tensor> {
            get(name)?.ok_or_else(|| Error::format(what, format!("missing tensor `{name}`")))
        };
        let (mean, std, w1, b1) = (need(MEAN)?, need(STD)?, need(W1)?, need(B1)?);
        let (w2, b2) = (get(W2)?, get(B2)?);
        let d = mean.dims1()?;
        let (h, d1) = w1.dims2()?;
        let kind = match (&w2, &b2) {
            (None, None) => HeadKind::Logistic,
            (Some(_), Some(_)) => HeadKind::Mlp { hidden: h },
            _ => return Err(Error::format(what, "layer2 needs both weight and bias")),
        };
        let ok = std.dims1()? == d
            && d1 == d
            && b1.dims1()? == h
            && match (&kind, &w2, &b2) {
                (HeadKind::Logistic, _, _) => h == 1,
                (_, Some(w2), Some(b2)) => w2.dims2()? == (1, h) && b2.dims1()? == 1,
                _ => false,
            };
        if !ok {
            return Err(Error::format(what, "tensor shapes do not form a head"));
        }
        Ok((
            Head::from_parts(kind, mean, std, (w1, b1, w2, b2)),
            metadata,
        ))
    }
}

/// The f32 tensors of a safetensors file whose names start with `prefix`, in name order.
pub(crate) fn read_prefixed(
    bytes: &[u8],
    prefix: &str,
    device: &Device,
) -> Result<Vec<(String, Tensor)>> {
    let what = "head safetensors";
    let st = safetensors::SafeTensors::deserialize(bytes).map_err(|e| Error::format(what, e))?;
    let mut names: Vec<String> = st
        .names()
        .into_iter()
        .filter(|n| n.starts_with(prefix))
        .map(|n| n.to_string())
        .collect();
    names.sort();
    let mut out = Vec::with_capacity(names.len());
    for name in names {
        let t = st
            .tensor(&name)
            .map_err(|e| Error::format(what, format!("{name}: {e}")))?;
        if t.dtype() != safetensors::Dtype::F32 {
            return Err(Error::format(what, format!("{name}: expected F32")));
        }
        let values: Vec<f32> = t
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        out.push((name.clone(), Tensor::from_vec(values, t.shape(), device)?));
    }
    Ok(out)
}

/// Numerically stable binary cross-entropy on logits, per element:
/// `max(z, 0) - z·y + log(1 + exp(-|z|))`.
pub(crate) fn bce_with_logits(z: &Tensor, y: &Tensor) -> Result<Tensor> {
    let soft = (z.abs()?.neg()?.exp()? + 1.0)?.log()?;
    Ok(((z.relu()? - (z * y)?)? + soft)?)
}

/// Adam (Kingma & Ba) without decay of its own: small, f32, enough for a head.
pub(crate) struct Adam {
    vars: Vec<Var>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    lr: f64,
    t: i32,
}

impl Adam {
    const B1: f64 = 0.9;
    const B2: f64 = 0.999;
    const EPS: f64 = 1e-8;

    pub(crate) fn new(vars: &[&Var], lr: f64) -> Result<Self> {
        let zeros = |v: &Var| v.as_tensor().zeros_like();
        Ok(Self {
            vars: vars.iter().map(|v| (*v).clone()).collect(),
            m: vars
                .iter()
                .map(|v| zeros(v))
                .collect::<candle_core::Result<_>>()?,
            v: vars
                .iter()
                .map(|v| zeros(v))
                .collect::<candle_core::Result<_>>()?,
            lr,
            t: 0,
        })
    }

    pub(crate) fn step(&mut self, grads: &candle_core::backprop::GradStore) -> Result<()> {
        self.t += 1;
        let c1 = 1.0 - Self::B1.powi(self.t);
        let c2 = 1.0 - Self::B2.powi(self.t);
        for i in 0..self.vars.len() {
            let var = &self.vars[i];
            let g = grads.get(var.as_tensor()).ok_or_else(|| {
                Error::Invalid("a head parameter received no gradient".to_string())
            })?;
            self.m[i] = ((&self.m[i] * Self::B1)? + (g * (1.0 - Self::B1))?)?;
            self.v[i] = ((&self.v[i] * Self::B2)? + (g.sqr()? * (1.0 - Self::B2))?)?;
            let mhat = (&self.m[i] / c1)?;
            let vhat = (&self.v[i] / c2)?;
            let update = (mhat / (vhat.sqrt()? + Self::EPS)?)?;
            var.set(&(var.as_tensor() - (update * self.lr)?)?)?;
        }
        Ok(())
    }
}

/// A head's fresh parameters `(w1, b1, w2, b2)` for `d` features: the logistic head from zero
/// (convex), the MLP's weights Glorot-uniform from `rng` (w1, then w2) and its biases zero.
pub(crate) fn init_params(
    kind: HeadKind,
    d: usize,
    rng: &mut ChaCha8Rng,
    device: &Device,
) -> Result<(Var, Var, Option<Var>, Option<Var>)> {
    let mut glorot = |rows: usize, cols: usize| -> Result<Var> {
        let a = (6.0 / (rows + cols) as f64).sqrt() as f32;
        let v: Vec<f32> = (0..rows * cols).map(|_| rng.random_range(-a..a)).collect();
        Ok(Var::from_tensor(&Tensor::from_vec(
            v,
            (rows, cols),
            device,
        )?)?)
    };
    let zeros = |len: usize| -> Result<Var> { Ok(Var::zeros(len, DType::F32, device)?) };
    Ok(match kind {
        HeadKind::Logistic => (
            Var::zeros((1, d), DType::F32, device)?,
            zeros(1)?,
            None,
            None,
        ),
        HeadKind::Mlp { hidden } => {
            if hidden == 0 {
                return Err(Error::Invalid("mlp hidden size must be > 0".into()));
            }
            let w1 = glorot(hidden, d)?;
            let w2 = glorot(1, hidden)?;
            (w1, zeros(hidden)?, Some(w2), Some(zeros(1)?))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two Gaussian blobs, separable along the first axis.
    fn blobs(n: usize, d: usize, seed: u64) -> (Tensor, Vec<u8>) {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut x = Vec::new();
        let mut y = Vec::new();
        for i in 0..n {
            let label = (i % 2) as u8;
            for j in 0..d {
                let noise: f32 = rng.random_range(-1.0..1.0);
                let centre = if j == 0 {
                    3.0 * (label as f32 * 2.0 - 1.0)
                } else {
                    0.0
                };
                x.push(centre + noise);
            }
            y.push(label);
        }
        (Tensor::from_vec(x, (n, d), &Device::Cpu).unwrap(), y)
    }

    fn accuracy(head: &Head, x: &Tensor, y: &[u8]) -> f64 {
        let p = head.probs(x).unwrap();
        let ok = p
            .iter()
            .zip(y)
            .filter(|(p, y)| (**p >= 0.5) == (**y == 1))
            .count();
        ok as f64 / y.len() as f64
    }

    #[test]
    fn every_parameter_gets_a_gradient_and_the_loss_falls() {
        let (x, y) = blobs(64, 8, 1);
        for head in [HeadKind::Logistic, HeadKind::Mlp { hidden: 8 }] {
            let cfg = HeadTrainConfig {
                head,
                steps: 200,
                lr: 0.05,
                ..Default::default()
            };
            // `Adam::step` errors if any parameter lacks a gradient.
            let (h, losses) = Head::train(&x, &y, &cfg).unwrap();
            assert!(losses[199] < 0.5 * losses[0], "{head:?}: {losses:?}");
            assert_eq!(accuracy(&h, &x, &y), 1.0, "{head:?}");
        }
    }

    #[test]
    fn separates_held_out_points() {
        let (x, y) = blobs(200, 16, 2);
        let (xt, yt) = blobs(200, 16, 3);
        let (h, _) = Head::train(&x, &y, &HeadTrainConfig::default()).unwrap();
        assert!(accuracy(&h, &xt, &yt) >= 0.97);
    }

    #[test]
    fn deterministic_and_round_trips() {
        let (x, y) = blobs(50, 4, 4);
        let cfg = HeadTrainConfig {
            steps: 30,
            ..Default::default()
        };
        let meta = HashMap::from([("k".to_string(), "v".to_string())]);
        let a = Head::train(&x, &y, &cfg).unwrap().0;
        let b = Head::train(&x, &y, &cfg).unwrap().0;
        let bytes = a.to_safetensors(meta.clone()).unwrap();
        assert_eq!(bytes, b.to_safetensors(meta.clone()).unwrap());
        let (back, m) = Head::from_safetensors(&bytes, &Device::Cpu).unwrap();
        assert_eq!(m, meta);
        assert_eq!(back.kind(), HeadKind::Mlp { hidden: 64 });
        assert_eq!(back.probs(&x).unwrap(), a.probs(&x).unwrap());
        let other = Head::train(&x, &y, &HeadTrainConfig { seed: 9, ..cfg })
            .unwrap()
            .0;
        assert_ne!(other.probs(&x).unwrap(), a.probs(&x).unwrap());
    }

    #[test]
    fn bce_matches_the_naive_formula() {
        let z = Tensor::new(&[-3.0f32, -0.5, 0.0, 2.0], &Device::Cpu).unwrap();
        let y = Tensor::new(&[0.0f32, 1.0, 1.0, 0.0], &Device::Cpu).unwrap();
        let got = bce_with_logits(&z, &y).unwrap().to_vec1::<f32>().unwrap();
        for (i, (zi, yi)) in [(-3.0f32, 0.0f32), (-0.5, 1.0), (0.0, 1.0), (2.0, 0.0)]
            .iter()
            .enumerate()
        {
            let p = 1.0 / (1.0 + (-zi).exp());
            let want = -(yi * p.ln() + (1.0 - yi) * (1.0 - p).ln());
            assert!((got[i] - want).abs() < 1e-5, "{i}: {} vs {want}", got[i]);
        }
    }

    #[test]
    fn rejects_bad_input() {
        let (x, _) = blobs(4, 2, 5);
        assert!(Head::train(&x, &[0, 1], &HeadTrainConfig::default()).is_err());
        assert!(Head::train(&x, &[0, 1, 2, 0], &HeadTrainConfig::default()).is_err());
        assert!(Head::from_safetensors(b"not a file", &Device::Cpu).is_err());
    }
}
