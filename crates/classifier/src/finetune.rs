//! Fine-tuning the top layers of the encoder together with a head.
//!
//! candle's BERT uses the fused LayerNorm, which passes no gradient, so training goes through a
//! forward of our own ([`BertWeights`]): embeddings, self-attention, a LayerNorm written from
//! primitive ops, the GELU (erf) feed-forward, mean pooling and L2 normalisation, all with
//! backward. It equals candle's BERT on the same weights (a test checks it).
//!
//! To stay cheap on a CPU, the bottom `6 - layers` layers are frozen and run once per text; their
//! output is kept, batched by length. Only the top `layers` layers are adapted: LoRA of rank
//! `rank` on their six linear maps (query, key, value, attention output, intermediate, output)
//! plus additive deltas of their two LayerNorms, trained with a freshly initialised head
//! (standardised embedding ⊕ surface features, as [`crate::head`]) by minibatch Adam. The trained
//! factors travel in the head's safetensors file (names `finetune.*`) and are merged into the
//! encoder's weights at load ([`crate::Encoder::with_deltas`]), so inference is one forward of
//! candle's BERT, as for a frozen head.
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var, D};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::encoder::l2_normalize;
use crate::error::{Error, Result};
use crate::features::FeatureSet;
use crate::head::{bce_with_logits, Adam, Head, HeadKind};
use crate::metrics::{Metrics, THRESHOLD_SWEEP};

/// The six linear maps of a BERT layer, as named under `encoder.layer.N.`.
pub const LINEARS: [&str; 6] = [
    "attention.self.query",
    "attention.self.key",
    "attention.self.value",
    "attention.output.dense",
    "intermediate.dense",
    "output.dense",
];
/// The two LayerNorms of a BERT layer.
pub const NORMS: [&str; 2] = ["attention.output.LayerNorm", "output.LayerNorm"];

/// Prefix of the fine-tuned tensors inside a head file.
pub const PREFIX: &str = "finetune.";

/// How the top of the encoder is fine-tuned with the head (`finetune:` in a training config).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FinetuneConfig {
    /// Top encoder layers adapted (1: the last one).
    pub layers: usize,
    /// LoRA rank of each linear map.
    pub rank: usize,
    /// LoRA scale numerator: the update is `alpha / rank · B A`.
    pub alpha: f64,
    /// Passes over the training examples, at most: with validation data, the epoch with the
    /// most validation lines right at the threshold is kept (the first of equals).
    pub epochs: usize,
    /// Examples per step (batched by length).
    pub batch_size: usize,
    /// Adam learning rate of the encoder's LoRA factors and LayerNorm deltas.
    pub lr: f64,
    /// Adam learning rate of the head.
    pub head_lr: f64,
    pub seed: u64,
}

impl Default for FinetuneConfig {
    fn default() -> Self {
        Self {
            layers: 1,
            rank: 8,
            alpha: 16.0,
            epochs: 2,
            batch_size: 32,
            lr: 1e-3,
            head_lr: 1e-3,
            seed: 0,
        }
    }
}

impl FinetuneConfig {
    /// Checks the settings; `num_layers`: the encoder's, when known.
    pub fn validate(&self, num_layers: Option<usize>) -> Result<()> {
        let bad = |m: String| Err(Error::Invalid(format!("finetune: {m}")));
        if self.layers == 0 || num_layers.is_some_and(|n| self.layers > n) {
            return bad(format!(
                "layers must be in 1..={}, got {}",
                num_layers.unwrap_or(usize::MAX),
                self.layers
            ));
        }
        if self.rank == 0 {
            return bad("rank must be > 0".into());
        }
        if self.epochs == 0 || self.batch_size == 0 {
            return bad(format!(
                "epochs and batch_size must be > 0, got {} and {}",
                self.epochs, self.batch_size
            ));
        }
        if !(self.lr > 0.0 && self.head_lr > 0.0 && self.alpha > 0.0) {
            return bad(format!(
                "lr, head_lr and alpha must be > 0, got {}, {} and {}",
                self.lr, self.head_lr, self.alpha
            ));
        }
        Ok(())
    }

    pub fn scale(&self) -> f64 {
        self.alpha / self.rank as f64
    }
}

/// One BERT layer's weights: (weight, bias) of [`LINEARS`] and of [`NORMS`].
struct Layer {
    lin: Vec<(Tensor, Tensor)>,
    norm: Vec<(Tensor, Tensor)>,
}

/// all-MiniLM-L6-v2's weights for our own differentiable forward.
pub struct BertWeights {
    word: Tensor,
    pos: Tensor,
    typ: Tensor,
    norm: (Tensor, Tensor),
    layers: Vec<Layer>,
    heads: usize,
    eps: f64,
    device: Device,
}

/// The trainable deltas of one layer: LoRA (A, B) per linear map, (Δweight, Δbias) per norm.
pub struct Adapter {
    a: Vec<Var>,
    b: Vec<Var>,
    norm: Vec<(Var, Var)>,
    scale: f64,
}

impl Adapter {
    fn new(
        hidden: usize,
        inter: usize,
        rank: usize,
        scale: f64,
        rng: &mut ChaCha8Rng,
        device: &Device,
    ) -> Result<Self> {
        let dims = [
            (hidden, hidden),
            (hidden, hidden),
            (hidden, hidden),
            (hidden, hidden),
            (hidden, inter),
            (inter, hidden),
        ];
        let (mut a, mut b) = (Vec::new(), Vec::new());
        for (input, output) in dims {
            // PEFT's default: A uniform in ±1/sqrt(in), B zero (the start is the frozen model).
            let lim = 1.0 / (input as f32).sqrt();
            let v: Vec<f32> = (0..rank * input)
                .map(|_| rng.random_range(-lim..lim))
                .collect();
            a.push(Var::from_tensor(&Tensor::from_vec(
                v,
                (rank, input),
                device,
            )?)?);
            b.push(Var::zeros((output, rank), DType::F32, device)?);
        }
        let norm = (0..NORMS.len())
            .map(|_| {
                Ok((
                    Var::zeros(hidden, DType::F32, device)?,
                    Var::zeros(hidden, DType::F32, device)?,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { a, b, norm, scale })
    }

    /// The adapters of the top layers from a head file's `finetune.*` tensors (as [`train`]
    /// stores them), for `num_layers` encoder layers: the same deltas as [`merged_deltas`],
    /// applied in our own forward.
    pub fn from_stored(
        stored: &[(String, Tensor)],
        num_layers: usize,
        scale: f64,
    ) -> Result<Vec<Adapter>> {
        let get = |name: String| -> Result<Var> {
            let t = stored
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, t)| t)
                .ok_or_else(|| Error::format("head safetensors", format!("no `{name}`")))?;
            Ok(Var::from_tensor(t)?)
        };
        let mut first = num_layers;
        while first > 0
            && stored
                .iter()
                .any(|(n, _)| n.starts_with(&format!("{PREFIX}encoder.layer.{}.", first - 1)))
        {
            first -= 1;
        }
        let mut out = Vec::new();
        for l in first..num_layers {
            let p = format!("{PREFIX}encoder.layer.{l}.");
            let mut a = Vec::new();
            let mut b = Vec::new();
            for m in LINEARS {
                a.push(get(format!("{p}{m}.lora_a"))?);
                b.push(get(format!("{p}{m}.lora_b"))?);
            }
            let norm = NORMS
                .iter()
                .map(|m| Ok((get(format!("{p}{m}.weight"))?, get(format!("{p}{m}.bias"))?)))
                .collect::<Result<_>>()?;
            out.push(Adapter { a, b, norm, scale });
        }
        Ok(out)
    }

    fn vars(&self) -> Vec<&Var> {
        let mut v: Vec<&Var> = self.a.iter().chain(&self.b).collect();
        for (w, b) in &self.norm {
            v.push(w);
            v.push(b);
        }
        v
    }
}

fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    let mu = x.mean_keepdim(D::Minus1)?;
    let xc = x.broadcast_sub(&mu)?;
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
    let xn = xc.broadcast_div(&(var + eps)?.sqrt()?)?;
    Ok(xn.broadcast_mul(w)?.broadcast_add(b)?)
}

/// A padded batch of texts: hidden states `(b, t, d)` after some layers, the additive attention
/// mask `(b, 1, 1, t)`, the pooling mask `(b, t, 1)`, and which texts they are.
pub struct Batch {
    h: Tensor,
    mask_add: Tensor,
    mask: Tensor,
    idx: Vec<usize>,
}

impl BertWeights {
    /// Reads `config.json` and `model.safetensors` of an encoder folder.
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let config_path = dir.join("config.json");
        let text = std::fs::read_to_string(&config_path).map_err(|e| Error::io(&config_path, e))?;
        let cfg: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| Error::format(config_path.display().to_string(), e))?;
        let int = |k: &str| -> Result<usize> {
            cfg.get(k)
                .and_then(|v| v.as_u64())
                .map(|v| v as usize)
                .ok_or_else(|| {
                    Error::format(
                        config_path.display().to_string(),
                        format!("expected an integer `{k}`"),
                    )
                })
        };
        let heads = int("num_attention_heads")?;
        let n_layers = int("num_hidden_layers")?;
        let eps = cfg
            .get("layer_norm_eps")
            .and_then(|v| v.as_f64())
            .unwrap_or(1e-12);
        let path = dir.join("model.safetensors");
        let tensors = candle_core::safetensors::load(&path, device)?;
        let get = |name: &str| -> Result<Tensor> {
            tensors
                .get(name)
                .or_else(|| tensors.get(&format!("bert.{name}")))
                .map(|t| t.to_dtype(DType::F32))
                .transpose()?
                .ok_or_else(|| {
                    Error::format(path.display().to_string(), format!("no tensor `{name}`"))
                })
        };
        let pair = |name: &str| -> Result<(Tensor, Tensor)> {
            Ok((
                get(&format!("{name}.weight"))?,
                get(&format!("{name}.bias"))?,
            ))
        };
        let mut layers = Vec::with_capacity(n_layers);
        for l in 0..n_layers {
            layers.push(Layer {
                lin: LINEARS
                    .iter()
                    .map(|m| pair(&format!("encoder.layer.{l}.{m}")))
                    .collect::<Result<_>>()?,
                norm: NORMS
                    .iter()
                    .map(|m| pair(&format!("encoder.layer.{l}.{m}")))
                    .collect::<Result<_>>()?,
            });
        }
        Ok(Self {
            word: get("embeddings.word_embeddings.weight")?,
            pos: get("embeddings.position_embeddings.weight")?,
            typ: get("embeddings.token_type_embeddings.weight")?,
            norm: pair("embeddings.LayerNorm")?,
            layers,
            heads,
            eps,
            device: device.clone(),
        })
    }

    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }
    pub fn hidden_size(&self) -> usize {
        self.word.dims()[1]
    }
    fn intermediate_size(&self) -> usize {
        self.layers[0].lin[4].0.dims()[0]
    }

    /// Pads `seqs` into one batch and runs the embeddings.
    fn embed_batch(&self, seqs: &[&[u32]], idx: Vec<usize>) -> Result<Batch> {
        let t = seqs.iter().map(|s| s.len()).max().unwrap_or(0).max(1);
        let b = seqs.len();
        let mut ids = Vec::with_capacity(b * t);
        let mut mask = Vec::with_capacity(b * t);
        for s in seqs {
            ids.extend_from_slice(s);
            ids.extend(std::iter::repeat_n(0u32, t - s.len()));
            mask.extend(std::iter::repeat_n(1f32, s.len()));
            mask.extend(std::iter::repeat_n(0f32, t - s.len()));
        }
        let d = self.hidden_size();
        let ids = Tensor::from_vec(ids, b * t, &self.device)?;
        let mask = Tensor::from_vec(mask, (b, t), &self.device)?;
        let e = self
            .word
            .index_select(&ids, 0)?
            .reshape((b, t, d))?
            .broadcast_add(&self.pos.narrow(0, 0, t)?)?
            .broadcast_add(&self.typ.narrow(0, 0, 1)?)?;
        let h = layer_norm(&e, &self.norm.0, &self.norm.1, self.eps)?;
        let mask_add = ((mask.ones_like()? - &mask)? * -1e9)?.reshape((b, 1, 1, t))?;
        Ok(Batch {
            h,
            mask_add,
            mask: mask.unsqueeze(2)?,
            idx,
        })
    }

    /// Layer `l` on hidden states `h` `(b, t, d)`, with an adapter's deltas if given.
    fn layer(
        &self,
        l: usize,
        h: &Tensor,
        mask_add: &Tensor,
        ad: Option<&Adapter>,
    ) -> Result<Tensor> {
        let w = &self.layers[l];
        let lin = |x: &Tensor, j: usize| -> Result<Tensor> {
            let (b, t, i) = x.dims3()?;
            let x2 = x.reshape((b * t, i))?;
            let (wt, bias) = &w.lin[j];
            let mut y = x2.matmul(&wt.t()?)?.broadcast_add(bias)?;
            if let Some(ad) = ad {
                let low = x2.matmul(&ad.a[j].as_tensor().t()?)?;
                y = (y + (low.matmul(&ad.b[j].as_tensor().t()?)? * ad.scale)?)?;
            }
            Ok(y.reshape((b, t, wt.dims()[0]))?)
        };
        let norm = |x: &Tensor, j: usize| -> Result<Tensor> {
            let (nw, nb) = &w.norm[j];
            match ad {
                Some(ad) => {
                    let (dw, db) = &ad.norm[j];
                    layer_norm(
                        x,
                        &(nw + dw.as_tensor())?,
                        &(nb + db.as_tensor())?,
                        self.eps,
                    )
                }
                None => layer_norm(x, nw, nb, self.eps),
            }
        };
        let (b, t, d) = h.dims3()?;
        let dh = d / self.heads;
        let split = |x: Tensor| -> Result<Tensor> {
            Ok(x.reshape((b, t, self.heads, dh))?
                .transpose(1, 2)?
                .contiguous()?)
        };
        let q = split(lin(h, 0)?)?;
        let k = split(lin(h, 1)?)?;
        let v = split(lin(h, 2)?)?;
        let scores = (q.matmul(&k.t()?)? / (dh as f64).sqrt())?.broadcast_add(mask_add)?;
        let probs = candle_nn::ops::softmax(&scores, D::Minus1)?;
        let ctx = probs
            .matmul(&v)?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((b, t, d))?;
        let a = norm(&(lin(&ctx, 3)? + h)?, 0)?;
        let m = lin(&a, 4)?.gelu_erf()?;
        norm(&(lin(&m, 5)? + a)?, 1)
    }

    /// Runs layers `from..to` (frozen, or with `adapters[l - first_adapted]`) on a batch.
    fn run(&self, batch: &Batch, from: usize, to: usize, adapters: &[Adapter]) -> Result<Tensor> {
        let first = self.num_layers() - adapters.len();
        let mut h = batch.h.clone();
        for l in from..to {
            let ad = if l >= first {
                Some(&adapters[l - first])
            } else {
                None
            };
            h = self.layer(l, &h, &batch.mask_add, ad)?;
        }
        Ok(h)
    }

    fn pool(h: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let summed = h.broadcast_mul(mask)?.sum(1)?;
        let mean = summed.broadcast_div(&mask.sum(1)?)?;
        l2_normalize(&mean)
    }

    /// Texts (as token ids) after the embeddings and the first `upto` layers, frozen, in
    /// batches of `batch_size` texts of similar length.
    pub fn batches(&self, ids: &[Vec<u32>], upto: usize, batch_size: usize) -> Result<Vec<Batch>> {
        let mut order: Vec<usize> = (0..ids.len()).collect();
        order.sort_by_key(|&i| (ids[i].len(), i));
        self.batches_in(ids, &order, upto, batch_size)
    }

    /// As [`BertWeights::batches`], the texts taken in `order` (a shuffled order gives batches
    /// that mix lengths, and so labels: length-sorted batches of the recipe hold one kind each).
    pub fn batches_in(
        &self,
        ids: &[Vec<u32>],
        order: &[usize],
        upto: usize,
        batch_size: usize,
    ) -> Result<Vec<Batch>> {
        let mut out = Vec::new();
        for chunk in order.chunks(batch_size.max(1)) {
            let seqs: Vec<&[u32]> = chunk.iter().map(|&i| ids[i].as_slice()).collect();
            let mut b = self.embed_batch(&seqs, chunk.to_vec())?;
            b.h = self.run(&b, 0, upto, &[])?.detach();
            out.push(b);
        }
        Ok(out)
    }

    /// Sentence embeddings `(n, d)` of token-id sequences through the whole encoder (with the
    /// top layers' adapters, if any), in the texts' order.
    pub fn embed(&self, ids: &[Vec<u32>], adapters: &[Adapter]) -> Result<Tensor> {
        let batches = self.batches(ids, 0, 32)?;
        self.pooled(&batches, 0, adapters)
    }

    /// Pooled embeddings of batches that hold the output of layer `from`, in the texts' order.
    fn pooled(&self, batches: &[Batch], from: usize, adapters: &[Adapter]) -> Result<Tensor> {
        let n: usize = batches.iter().map(|b| b.idx.len()).sum();
        let mut rows = Vec::with_capacity(batches.len());
        let mut inverse = vec![0u32; n];
        let mut r = 0;
        for b in batches {
            let h = self.run(b, from, self.num_layers(), adapters)?;
            rows.push(Self::pool(&h, &b.mask)?.detach());
            for &i in &b.idx {
                inverse[i] = r;
                r += 1;
            }
        }
        let sorted = Tensor::cat(&rows, 0)?;
        Ok(sorted.index_select(&Tensor::new(inverse.as_slice(), &self.device)?, 0)?)
    }
}

/// The deltas to add to the encoder's weights from a head file's `finetune.*` tensors:
/// `scale · B A` for each LoRA pair, and the LayerNorm deltas as stored.
pub fn merged_deltas(stored: &[(String, Tensor)], scale: f64) -> Result<Vec<(String, Tensor)>> {
    let mut out = Vec::new();
    for (name, t) in stored {
        let Some(rest) = name.strip_prefix(PREFIX) else {
            continue;
        };
        if let Some(base) = rest.strip_suffix(".lora_a") {
            let b_name = format!("{PREFIX}{base}.lora_b");
            let b = stored
                .iter()
                .find(|(n, _)| *n == b_name)
                .map(|(_, t)| t)
                .ok_or_else(|| {
                    Error::format("head safetensors", format!("`{name}` without `{b_name}`"))
                })?;
            out.push((format!("{base}.weight"), (b.matmul(t)? * scale)?));
        } else if rest.ends_with(".lora_b") {
            continue;
        } else {
            out.push((rest.to_string(), t.clone()));
        }
    }
    Ok(out)
}

/// What [`train`] returns: the head, the tensors to store beside it, the loss per step and
/// the validation metrics after each epoch (at the config's threshold).
pub struct Trained {
    pub head: Head,
    pub stored: Vec<(String, Tensor)>,
    pub losses: Vec<f32>,
    pub validation_by_epoch: Vec<Metrics>,
    pub heldout_probs: Vec<f32>,
    pub validation_probs: Vec<f32>,
    pub train_probs: Vec<f32>,
}

/// Texts and labels of one split, for [`train`].
pub struct Split<'a> {
    pub ids: Vec<Vec<u32>>,
    pub texts: Vec<&'a str>,
    pub labels: Vec<u8>,
}

fn features_of(
    texts: &[&str],
    idx: &[usize],
    features: FeatureSet,
    device: &Device,
) -> Result<Option<Tensor>> {
    if features.is_empty() {
        return Ok(None);
    }
    let v: Vec<f32> = idx
        .iter()
        .flat_map(|&i| features.compute(texts[i]))
        .collect();
    Ok(Some(Tensor::from_vec(
        v,
        (idx.len(), features.len()),
        device,
    )?))
}

/// Fine-tunes the top `cfg.layers` layers with a new head of `kind` on `train`; scores
/// `validation` after each epoch (thresholds logged) and returns everything to save.
#[allow(clippy::too_many_arguments)]
pub fn train(
    weights: &BertWeights,
    cfg: &FinetuneConfig,
    kind: HeadKind,
    features: FeatureSet,
    threshold: f32,
    train: &Split,
    heldout: &Split,
    validation: &Split,
) -> Result<Trained> {
    cfg.validate(Some(weights.num_layers()))?;
    let device = weights.device.clone();
    let first = weights.num_layers() - cfg.layers;
    let t0 = std::time::Instant::now();
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    // Training batches mix lengths (a seeded shuffle); the others are sorted by length.
    let mut shuffled: Vec<usize> = (0..train.ids.len()).collect();
    shuffled.shuffle(&mut rng);
    let prep = |s: &Split, order: Option<&[usize]>| -> Result<(Vec<Batch>, Vec<Option<Tensor>>)> {
        let batches = match order {
            Some(o) => weights.batches_in(&s.ids, o, first, cfg.batch_size)?,
            None => weights.batches(&s.ids, first, cfg.batch_size)?,
        };
        let feats = batches
            .iter()
            .map(|b| features_of(&s.texts, &b.idx, features, &device))
            .collect::<Result<_>>()?;
        Ok((batches, feats))
    };
    let (tr, tr_f) = prep(train, Some(&shuffled))?;
    let (ho, ho_f) = prep(heldout, None)?;
    let (va, va_f) = prep(validation, None)?;
    tracing::info!(
        "finetune: {} + {} + {} texts through the frozen {first} layers in {:.1}s",
        train.ids.len(),
        heldout.ids.len(),
        validation.ids.len(),
        t0.elapsed().as_secs_f64()
    );

    let (hidden, inter) = (weights.hidden_size(), weights.intermediate_size());
    let adapters = (0..cfg.layers)
        .map(|_| Adapter::new(hidden, inter, cfg.rank, cfg.scale(), &mut rng, &device))
        .collect::<Result<Vec<_>>>()?;

    let inputs = |b: &Batch, f: &Option<Tensor>, ads: &[Adapter]| -> Result<Tensor> {
        let h = weights.run(b, first, weights.num_layers(), ads)?;
        let e = BertWeights::pool(&h, &b.mask)?;
        Ok(match f {
            Some(f) => Tensor::cat(&[&e, f], 1)?,
            None => e,
        })
    };
    // Standardisation from the frozen model's inputs on the training texts (kept fixed).
    let x0 = tr
        .iter()
        .zip(&tr_f)
        .map(|(b, f)| inputs(b, f, &[]))
        .collect::<Result<Vec<_>>>()?;
    let x0 = Tensor::cat(&x0, 0)?;
    let mean = x0.mean(0)?;
    let std = x0
        .broadcast_sub(&mean)?
        .sqr()?
        .mean(0)?
        .sqrt()?
        .clamp(1e-6, f64::MAX)?;
    drop(x0);
    let d = mean.dims1()?;
    let (w1, b1, w2, b2) = crate::head::init_params(kind, d, &mut rng, &device)?;
    let mut head_vars = vec![&w1, &b1];
    if let (Some(w2), Some(b2)) = (&w2, &b2) {
        head_vars.push(w2);
        head_vars.push(b2);
    }
    let enc_vars: Vec<&Var> = adapters.iter().flat_map(|a| a.vars()).collect();
    let mut adam_enc = Adam::new(&enc_vars, cfg.lr)?;
    let mut adam_head = Adam::new(&head_vars, cfg.head_lr)?;
    let logits = |x: &Tensor| -> Result<Tensor> {
        let xs = x.broadcast_sub(&mean)?.broadcast_div(&std)?;
        Head::forward(
            kind,
            &xs,
            w1.as_tensor(),
            b1.as_tensor(),
            w2.as_ref().map(|v| v.as_tensor()),
            b2.as_ref().map(|v| v.as_tensor()),
        )
    };
    let n = train.labels.len();
    let n1 = train.labels.iter().filter(|&&y| y == 1).count();
    let class_weight = |y: u8| -> f32 {
        let nc = if y == 1 { n1 } else { n - n1 };
        if nc > 0 {
            n as f32 / (2.0 * nc as f32)
        } else {
            1.0
        }
    };
    let targets = tr
        .iter()
        .map(|b| -> Result<(Tensor, Tensor)> {
            let y: Vec<f32> = b.idx.iter().map(|&i| train.labels[i] as f32).collect();
            let w: Vec<f32> = b
                .idx
                .iter()
                .map(|&i| class_weight(train.labels[i]))
                .collect();
            Ok((
                Tensor::new(y.as_slice(), &device)?,
                Tensor::new(w.as_slice(), &device)?,
            ))
        })
        .collect::<Result<Vec<_>>>()?;
    let probs_of =
        |batches: &[Batch], feats: &[Option<Tensor>], adapters: &[Adapter]| -> Result<Vec<f32>> {
            let total: usize = batches.iter().map(|b| b.idx.len()).sum();
            let mut out = vec![0f32; total];
            for (b, f) in batches.iter().zip(feats) {
                let p = candle_nn::ops::sigmoid(&logits(&inputs(b, f, adapters)?)?)?
                    .to_vec1::<f32>()?;
                for (k, &i) in b.idx.iter().enumerate() {
                    out[i] = p[k];
                }
            }
            Ok(out)
        };
    let mut losses = Vec::new();
    let mut validation_by_epoch = Vec::new();
    let mut order: Vec<usize> = (0..tr.len()).collect();
    let all_vars: Vec<Var> = enc_vars
        .iter()
        .chain(&head_vars)
        .map(|v| (*v).clone())
        .collect();
    // The epoch kept: the best validation accuracy at the threshold (the first of equals); all
    // epochs when there is no validation data.
    let mut best: Option<(usize, usize, Vec<Tensor>)> = None;
    for epoch in 1..=cfg.epochs {
        let t = std::time::Instant::now();
        order.shuffle(&mut rng);
        let mut sum = 0.0;
        for &bi in &order {
            let x = inputs(&tr[bi], &tr_f[bi], &adapters)?;
            let (y, w) = &targets[bi];
            let loss = (bce_with_logits(&logits(&x)?, y)? * w)?.mean_all()?;
            let l = loss.to_scalar::<f32>()?;
            sum += l as f64;
            losses.push(l);
            let grads = loss.backward()?;
            adam_enc.step(&grads)?;
            adam_head.step(&grads)?;
        }
        let mut line = format!(
            "finetune: epoch {epoch}: mean loss {:.4} ({:.0}s)",
            sum / order.len() as f64,
            t.elapsed().as_secs_f64()
        );
        if !validation.labels.is_empty() {
            let p = probs_of(&va, &va_f, &adapters)?;
            for th in THRESHOLD_SWEEP {
                let m = Metrics::at_threshold(&p, &validation.labels, th);
                line.push_str(&format!("; validation at {th}: {}/{}", m.tp + m.tn, m.n));
            }
            let m = Metrics::at_threshold(&p, &validation.labels, threshold);
            if best.as_ref().is_none_or(|b| m.tp + m.tn > b.1) {
                let snapshot = all_vars
                    .iter()
                    .map(|v| v.as_tensor().copy())
                    .collect::<candle_core::Result<Vec<_>>>()?;
                best = Some((epoch, m.tp + m.tn, snapshot));
            }
            validation_by_epoch.push(m);
        }
        tracing::info!("{line}");
    }
    if let Some((epoch, correct, snapshot)) = best {
        tracing::info!(
            "finetune: keeping epoch {epoch} ({correct}/{} validation lines right at {threshold})",
            validation.labels.len()
        );
        for (v, t) in all_vars.iter().zip(snapshot) {
            v.set(&t)?;
        }
    }
    let heldout_probs = probs_of(&ho, &ho_f, &adapters)?;
    let validation_probs = probs_of(&va, &va_f, &adapters)?;
    let train_probs = probs_of(&tr, &tr_f, &adapters)?;

    let mut stored = Vec::new();
    for (k, ad) in adapters.iter().enumerate() {
        let l = first + k;
        for (j, m) in LINEARS.iter().enumerate() {
            stored.push((
                format!("{PREFIX}encoder.layer.{l}.{m}.lora_a"),
                ad.a[j].as_tensor().detach(),
            ));
            stored.push((
                format!("{PREFIX}encoder.layer.{l}.{m}.lora_b"),
                ad.b[j].as_tensor().detach(),
            ));
        }
        for (j, m) in NORMS.iter().enumerate() {
            stored.push((
                format!("{PREFIX}encoder.layer.{l}.{m}.weight"),
                ad.norm[j].0.as_tensor().detach(),
            ));
            stored.push((
                format!("{PREFIX}encoder.layer.{l}.{m}.bias"),
                ad.norm[j].1.as_tensor().detach(),
            ));
        }
    }
    stored.sort_by(|a, b| a.0.cmp(&b.0));
    let head = Head::from_parts(
        kind,
        mean,
        std,
        (
            w1.as_tensor().detach(),
            b1.as_tensor().detach(),
            w2.map(|v| v.as_tensor().detach()),
            b2.map(|v| v.as_tensor().detach()),
        ),
    );
    Ok(Trained {
        head,
        stored,
        losses,
        validation_by_epoch,
        heldout_probs,
        validation_probs,
        train_probs,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_norm_matches_candle_and_has_a_gradient() {
        let dev = Device::Cpu;
        let x = Tensor::new(&[[1.0f32, 2.0, 4.0, -1.0], [0.5, 0.5, 3.0, 0.0]], &dev).unwrap();
        let w = Var::new(&[1.0f32, 0.5, 2.0, 1.5], &dev).unwrap();
        let b = Tensor::new(&[0.1f32, 0.0, -0.2, 0.3], &dev).unwrap();
        let ours = layer_norm(&x, w.as_tensor(), &b, 1e-12).unwrap();
        let theirs = candle_nn::ops::layer_norm(&x, w.as_tensor(), &b, 1e-12).unwrap();
        let diff = (ours.clone() - theirs)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap();
        assert!(diff.to_scalar::<f32>().unwrap() < 1e-5);
        let g = ours.sum_all().unwrap().backward().unwrap();
        assert!(g.get(w.as_tensor()).is_some());
    }

    #[test]
    fn merged_deltas_are_scaled_products() {
        let dev = Device::Cpu;
        let a = Tensor::new(&[[1.0f32, 2.0]], &dev).unwrap();
        let b = Tensor::new(&[[3.0f32], [4.0]], &dev).unwrap();
        let n = Tensor::new(&[0.5f32, 0.25], &dev).unwrap();
        let stored = vec![
            (format!("{PREFIX}x.lora_a"), a),
            (format!("{PREFIX}x.lora_b"), b),
            (format!("{PREFIX}y.LayerNorm.weight"), n),
        ];
        let d = merged_deltas(&stored, 2.0).unwrap();
        assert_eq!(d[0].0, "x.weight");
        assert_eq!(
            d[0].1.to_vec2::<f32>().unwrap(),
            vec![vec![6.0, 12.0], vec![8.0, 16.0]]
        );
        assert_eq!(d[1].0, "y.LayerNorm.weight");
        assert!(merged_deltas(&stored[..1], 1.0).is_err());
    }
}
