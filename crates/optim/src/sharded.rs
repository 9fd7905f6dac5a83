//! AdamW with its state sharded over the ranks of a data-parallel run (ZeRO stage 1).
//!
//! The trainable parameters, flattened one after another in their fixed order, form one
//! vector of `total` elements; rank `r` of `world` owns the contiguous share
//! [`shard_range`]`(total, r, world)` of it. Each rank keeps the moments (and the float32 master
//! copies of half-precision weights) of its share only, updates its share with the summed
//! gradients ([`ShardedAdamW::step_shard`], the same element-wise arithmetic as [`AdamW`]), and
//! the updated shares, gathered from every rank in rank order, set every weight
//! ([`ShardedAdamW::apply`]): every rank ends with the weights a replicated AdamW gives, bit for
//! bit.
//!
//! Each rank saves its share to its own file (`optimizer-shard-R-of-W.safetensors`), and
//! [`ShardedAdamW::load`] reads the shares of any world size, taking from each file the part
//! that overlaps this rank's share, so a run resumes at another world size.
use std::collections::HashMap;
use std::ops::Range;
use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

use crate::{
    raw_to_tensor, state_view, AdamWConfig, Grads, OptimError, ParamHeader, ParamSpec, Result,
};

/// The share of `total` elements that rank `rank` of `world` owns: contiguous, the first
/// `total % world` ranks one element more, so the shares in rank order tile `0..total`.
pub fn shard_range(total: usize, rank: usize, world: usize) -> Range<usize> {
    let world = world.max(1);
    let (base, extra) = (total / world, total % world);
    let start = rank * base + rank.min(extra);
    start..start + base + usize::from(rank < extra)
}

/// The file of rank `rank`'s share in a checkpoint folder.
pub fn shard_file_name(rank: usize, world: usize) -> String {
    format!("optimizer-shard-{rank}-of-{world}.safetensors")
}

/// `(rank, world)` of a shard file's name.
pub fn parse_shard_file_name(name: &str) -> Option<(usize, usize)> {
    let rest = name
        .strip_prefix("optimizer-shard-")?
        .strip_suffix(".safetensors")?;
    let (r, w) = rest.split_once("-of-")?;
    let (r, w) = (r.parse().ok()?, w.parse().ok()?);
    (r < w).then_some((r, w))
}

/// The part of one parameter in this rank's share.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Segment {
    pub name: String,
    /// Offset in the parameter's flattened elements.
    pub start: usize,
    pub len: usize,
}

/// A shard file's description, JSON in its safetensors header (`__metadata__["sft_optim"]`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ShardHeader {
    pub format: String,
    pub step: u64,
    pub config: AdamWConfig,
    pub rank: usize,
    pub world: usize,
    /// Elements of all trainable parameters together, and this shard's range of them.
    pub total: usize,
    pub start: usize,
    pub end: usize,
    /// Every trainable parameter, in the flattening order.
    pub params: Vec<ParamHeader>,
    pub segments: Vec<Segment>,
}

const SHARD_FORMAT: &str = "sft-adamw-shard-v1";

struct SegState {
    param: usize,
    start: usize,
    len: usize,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    master: Option<Tensor>,
}

/// AdamW whose state covers this rank's share of the flattened trainable parameters.
pub struct ShardedAdamW {
    cfg: AdamWConfig,
    params: Vec<ParamSpec>,
    /// Each parameter's offset in the flattened vector.
    offsets: Vec<usize>,
    /// Whether each parameter has a float32 master copy (half-precision weight, master
    /// weights on).
    masters: Vec<bool>,
    total: usize,
    rank: usize,
    world: usize,
    segs: Vec<SegState>,
    step: u64,
}

impl ShardedAdamW {
    /// Rank `rank` of `world`'s optimizer for `params` (the same list, in the same order, on
    /// every rank). `master_weights`: float32 master copies of bf16/f16 weights, as
    /// [`crate::AdamW`] keeps by default. The state is float32: f64 parameters are refused.
    pub fn new(
        params: Vec<ParamSpec>,
        cfg: AdamWConfig,
        rank: usize,
        world: usize,
        master_weights: bool,
    ) -> Result<Self> {
        let mut seen = std::collections::HashSet::new();
        let mut offsets = Vec::with_capacity(params.len());
        let mut masters = Vec::with_capacity(params.len());
        let mut total = 0;
        for p in &params {
            if !seen.insert(p.name.clone()) {
                return Err(OptimError::DuplicateParam {
                    name: p.name.clone(),
                });
            }
            let dt = p.var.dtype();
            if dt == DType::F64 {
                return Err(candle_core::Error::Msg(format!(
                    "parameter `{}` is f64: the sharded optimizer keeps float32 state (use \
                     the replicated optimizer)",
                    p.name
                ))
                .into());
            }
            offsets.push(total);
            masters.push(master_weights && dt != DType::F32);
            total += p.var.elem_count();
        }
        let range = shard_range(total, rank, world);
        let mut segs = Vec::new();
        for (i, p) in params.iter().enumerate() {
            let (lo, hi) = (offsets[i], offsets[i] + p.var.elem_count());
            let (s, e) = (lo.max(range.start), hi.min(range.end));
            if s >= e {
                continue;
            }
            let (start, len) = (s - lo, e - s);
            let dev = p.var.device();
            let master = if masters[i] {
                Some(flat_part(p.var.as_tensor(), start, len)?.to_dtype(DType::F32)?)
            } else {
                None
            };
            segs.push(SegState {
                param: i,
                start,
                len,
                exp_avg: Tensor::zeros(len, DType::F32, dev)?,
                exp_avg_sq: Tensor::zeros(len, DType::F32, dev)?,
                master,
            });
        }
        Ok(Self {
            cfg,
            params,
            offsets,
            masters,
            total,
            rank,
            world: world.max(1),
            segs,
            step: 0,
        })
    }

    /// Elements of all trainable parameters together.
    pub fn total(&self) -> usize {
        self.total
    }

    /// This rank's range of the flattened parameters.
    pub fn range(&self) -> Range<usize> {
        shard_range(self.total, self.rank, self.world)
    }

    /// How many elements each rank owns, in rank order (what the all-gather receives).
    pub fn counts(&self) -> Vec<usize> {
        (0..self.world)
            .map(|r| shard_range(self.total, r, self.world).len())
            .collect()
    }

    pub fn step_count(&self) -> u64 {
        self.step
    }

    /// Bytes of state this rank holds (moments, master copies).
    pub fn state_bytes(&self) -> usize {
        self.segs
            .iter()
            .map(|s| 4 * s.len * (2 + usize::from(s.master.is_some())))
            .sum()
    }

    /// One update of this rank's share with learning rate `lr` and the summed, normalised
    /// and clipped gradients of every parameter (the same on every rank). Returns the updated
    /// float32 values of the share, in order, for the all-gather; the weights themselves
    /// change only in [`ShardedAdamW::apply`].
    pub fn step_shard(&mut self, grads: &Grads, lr: f64) -> Result<Vec<f32>> {
        for p in &self.params {
            let g = grads.get(&p.name).ok_or_else(|| OptimError::MissingGrad {
                name: p.name.clone(),
            })?;
            if g.dims() != p.var.dims() {
                return Err(OptimError::GradShape {
                    name: p.name.clone(),
                    got: g.dims().to_vec(),
                    expected: p.var.dims().to_vec(),
                });
            }
        }
        self.step += 1;
        // The same numbers and operations as AdamW::step, element for element.
        let corrections = crate::bias_corrections(&self.cfg, lr, self.step);
        let mut out = Vec::with_capacity(self.range().len());
        for s in &mut self.segs {
            let spec = &self.params[s.param];
            let g = flat_part(
                grads.get(&spec.name).expect("checked above"),
                s.start,
                s.len,
            )?
            .detach()
            .to_dtype(DType::F32)?;
            let param = match &s.master {
                Some(m) => m.clone(),
                None => flat_part(spec.var.as_tensor(), s.start, s.len)?
                    .detach()
                    .to_dtype(DType::F32)?,
            };
            let param = crate::update(
                param,
                &g,
                (&mut s.exp_avg, &mut s.exp_avg_sq),
                &self.cfg,
                spec.weight_decay,
                lr,
                corrections,
            )?;
            out.extend(param.to_vec1::<f32>()?);
            if let Some(m) = &mut s.master {
                *m = param;
            }
        }
        Ok(out)
    }

    /// Sets every weight from the updated shares of all ranks, concatenated in rank order
    /// (`total` float32 values): each weight takes its elements rounded to its dtype.
    pub fn apply(&self, all: &[f32]) -> Result<()> {
        if all.len() != self.total {
            return Err(candle_core::Error::Msg(format!(
                "sharded AdamW: {} gathered values, expected {}",
                all.len(),
                self.total
            ))
            .into());
        }
        let mut pending = Pending::default();
        self.apply_piece(&mut pending, 0, all)?;
        self.check_applied(&pending)
    }

    /// Takes the gathered values of elements `start..start + vals.len()` of the flattened
    /// parameters (pieces may come in any order): a weight is set once all its elements have
    /// come, so that the weights can be gathered in chunks, holding at most the chunk and the
    /// weights not yet complete.
    pub fn apply_piece(&self, pending: &mut Pending, start: usize, vals: &[f32]) -> Result<()> {
        let end = start + vals.len();
        if end > self.total {
            return Err(candle_core::Error::Msg(format!(
                "sharded AdamW: gathered elements {start}..{end} of {}",
                self.total
            ))
            .into());
        }
        // The first parameter that ends after `start`.
        let first = self
            .offsets
            .partition_point(|&o| o <= start)
            .saturating_sub(1);
        for i in first..self.params.len() {
            let (lo, p) = (self.offsets[i], &self.params[i]);
            let n = p.var.elem_count();
            if lo >= end {
                break;
            }
            let (s, e) = (lo.max(start), (lo + n).min(end));
            if s >= e {
                continue;
            }
            let piece = &vals[s - start..e - start];
            if e - s == n {
                set_flat(p, piece)?;
                continue;
            }
            let (buf, filled) = pending.0.entry(i).or_insert_with(|| (vec![0.0; n], 0));
            buf[s - lo..e - lo].copy_from_slice(piece);
            *filled += e - s;
            if *filled == n {
                let (buf, _) = pending.0.remove(&i).expect("just filled");
                set_flat(p, &buf)?;
            } else if *filled > n {
                return Err(candle_core::Error::Msg(format!(
                    "sharded AdamW: elements of `{}` gathered twice",
                    p.name
                ))
                .into());
            }
        }
        Ok(())
    }

    /// After the last piece: every weight was set.
    pub fn check_applied(&self, pending: &Pending) -> Result<()> {
        match pending.0.keys().next() {
            None => Ok(()),
            Some(&i) => Err(candle_core::Error::Msg(format!(
                "sharded AdamW: `{}` was not gathered whole",
                self.params[i].name
            ))
            .into()),
        }
    }

    fn param_headers(&self) -> Vec<ParamHeader> {
        self.params
            .iter()
            .zip(&self.masters)
            .map(|(p, &master)| ParamHeader {
                name: p.name.clone(),
                shape: p.var.dims().to_vec(),
                dtype: format!("{:?}", p.var.dtype()).to_lowercase(),
                weight_decay: p.weight_decay,
                master,
            })
            .collect()
    }

    /// The description [`ShardedAdamW::save`] writes into the file's header.
    pub fn header(&self) -> ShardHeader {
        let range = self.range();
        ShardHeader {
            format: SHARD_FORMAT.to_string(),
            step: self.step,
            config: self.cfg,
            rank: self.rank,
            world: self.world,
            total: self.total,
            start: range.start,
            end: range.end,
            params: self.param_headers(),
            segments: self
                .segs
                .iter()
                .map(|s| Segment {
                    name: self.params[s.param].name.clone(),
                    start: s.start,
                    len: s.len,
                })
                .collect(),
        }
    }

    /// Writes this rank's share to one safetensors file: per parameter in the share,
    /// `<param>.exp_avg`, `<param>.exp_avg_sq` (and `<param>.master`), 1-D over its segment.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let header = serde_json::to_string(&self.header()).map_err(|e| OptimError::Format {
            path: path.to_path_buf(),
            msg: format!("cannot encode the header: {e}"),
        })?;
        let mut views = Vec::new();
        for s in &self.segs {
            let n = &self.params[s.param].name;
            views.push((format!("{n}.exp_avg"), state_view(&s.exp_avg)?));
            views.push((format!("{n}.exp_avg_sq"), state_view(&s.exp_avg_sq)?));
            if let Some(m) = &s.master {
                views.push((format!("{n}.master"), state_view(m)?));
            }
        }
        let meta = HashMap::from([(crate::META_KEY.to_string(), header)]);
        let bytes = safetensors::serialize(views, Some(meta)).map_err(|e| OptimError::Format {
            path: path.to_path_buf(),
            msg: format!("cannot serialize: {e}"),
        })?;
        std::fs::write(path, bytes).map_err(|cause| OptimError::Io {
            path: path.to_path_buf(),
            cause,
        })
    }

    /// The shard files in `dir` (every `optimizer-shard-R-of-W.safetensors`), checked to be
    /// one complete set: one world size, every rank once.
    pub fn files_in(dir: &Path) -> Result<Vec<PathBuf>> {
        let fmt = |msg: String| OptimError::Format {
            path: dir.to_path_buf(),
            msg,
        };
        let mut found: Vec<(usize, usize, PathBuf)> = std::fs::read_dir(dir)
            .map_err(|cause| OptimError::Io {
                path: dir.to_path_buf(),
                cause,
            })?
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                parse_shard_file_name(&name).map(|(r, w)| (w, r, e.path()))
            })
            .collect();
        found.sort();
        let Some(&(world, _, _)) = found.first() else {
            return Err(fmt(
                "no optimizer shard files (optimizer-shard-R-of-W.safetensors)".into(),
            ));
        };
        let ranks: Vec<usize> = found.iter().map(|f| f.1).collect();
        if found.iter().any(|f| f.0 != world) || ranks != (0..world).collect::<Vec<_>>() {
            let names: Vec<String> = found.iter().map(|f| shard_file_name(f.1, f.0)).collect();
            return Err(fmt(format!(
                "the optimizer shards are not one complete set: found {}, expected \
                 {} of {world}",
                names.join(", "),
                shard_file_name(0, world).replace("-0-of-", "-R-of-")
            )));
        }
        Ok(found.into_iter().map(|f| f.2).collect())
    }

    /// The shard files of `dir` that this rank reads: those whose share overlaps its own.
    pub fn files_to_read(&self, dir: &Path) -> Result<Vec<PathBuf>> {
        let files = Self::files_in(dir)?;
        let world = files.len();
        let mine = self.range();
        Ok(files
            .into_iter()
            .enumerate()
            .filter(|(r, _)| {
                let theirs = shard_range(self.total, *r, world);
                theirs.start < mine.end && mine.start < theirs.end || mine.is_empty() && *r == 0
            })
            .map(|(_, f)| f)
            .collect())
    }

    /// Restores this rank's share from the shard files of a checkpoint folder, written by any
    /// number of ranks for the same parameters (names, shapes, master copies; the files'
    /// config replaces this optimizer's). Load the weights first.
    pub fn load(&mut self, dir: &Path) -> Result<()> {
        let files = self.files_to_read(dir)?;
        let ours = self.param_headers();
        let index: HashMap<&str, usize> = self
            .params
            .iter()
            .enumerate()
            .map(|(i, p)| (p.name.as_str(), i))
            .collect();
        // (param, start in the parameter, values) of every piece the files hold, per tensor kind.
        let mut pieces: Vec<(usize, usize, [Vec<f32>; 3])> = Vec::new();
        let mut header_seen: Option<ShardHeader> = None;
        for path in &files {
            let fmt = |msg: String| OptimError::Format {
                path: path.to_path_buf(),
                msg,
            };
            let bytes = std::fs::read(path).map_err(|cause| OptimError::Io {
                path: path.to_path_buf(),
                cause,
            })?;
            let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes)
                .map_err(|e| fmt(format!("not a safetensors file: {e}")))?;
            let h = meta
                .metadata()
                .as_ref()
                .and_then(|m| m.get(crate::META_KEY))
                .ok_or_else(|| fmt(format!("no `{}` entry in the header", crate::META_KEY)))?;
            let h: ShardHeader = serde_json::from_str(h)
                .map_err(|e| fmt(format!("bad `{}`: {e}", crate::META_KEY)))?;
            if h.format != SHARD_FORMAT {
                return Err(fmt(format!(
                    "format `{}`, expected `{SHARD_FORMAT}`",
                    h.format
                )));
            }
            if h.params != ours {
                return Err(fmt(
                    "the shard was saved for other trainable parameters (names, shapes, dtypes \
                     or master copies differ)"
                        .into(),
                ));
            }
            let want = shard_range(h.total, h.rank, h.world);
            if h.total != self.total || (h.start, h.end) != (want.start, want.end) {
                return Err(fmt(format!(
                    "shard of elements {}..{} of {}, expected {}..{} of {}",
                    h.start, h.end, h.total, want.start, want.end, self.total
                )));
            }
            if let Some(prev) = &header_seen {
                if prev.step != h.step || prev.config != h.config {
                    return Err(fmt("the shards were saved at different steps".into()));
                }
            }
            let st = safetensors::SafeTensors::deserialize(&bytes)
                .map_err(|e| fmt(format!("not a safetensors file: {e}")))?;
            let cpu = candle_core::Device::Cpu;
            let read = |key: &str, len: usize| -> Result<Vec<f32>> {
                let v = st
                    .tensor(key)
                    .map_err(|e| fmt(format!("tensor `{key}`: {e}")))?;
                let t = raw_to_tensor(&v, &cpu).map_err(|e| fmt(format!("tensor `{key}`: {e}")))?;
                if t.dims() != [len] || t.dtype() != DType::F32 {
                    return Err(fmt(format!(
                        "tensor `{key}` is {:?} {:?}, expected F32 [{len}]",
                        t.dtype(),
                        t.dims()
                    )));
                }
                Ok(t.to_vec1::<f32>()?)
            };
            for seg in &h.segments {
                let &i = index
                    .get(seg.name.as_str())
                    .ok_or_else(|| fmt(format!("segment of unknown parameter `{}`", seg.name)))?;
                let n = &seg.name;
                let m = read(&format!("{n}.exp_avg"), seg.len)?;
                let v = read(&format!("{n}.exp_avg_sq"), seg.len)?;
                let w = if self.masters[i] {
                    read(&format!("{n}.master"), seg.len)?
                } else {
                    Vec::new()
                };
                pieces.push((i, seg.start, [m, v, w]));
            }
            header_seen = Some(h);
        }
        let Some(h) = header_seen else {
            return Err(OptimError::Format {
                path: dir.to_path_buf(),
                msg: "no optimizer shard to read".into(),
            });
        };
        // Each of this rank's segments, assembled from the pieces that overlap it.
        let mut restored = Vec::with_capacity(self.segs.len());
        for s in &self.segs {
            let mut parts: [Vec<f32>; 3] = [vec![0.0; s.len], vec![0.0; s.len], vec![]];
            if s.master.is_some() {
                parts[2] = vec![0.0; s.len];
            }
            let mut covered = 0;
            for (i, start, vals) in &pieces {
                if *i != s.param {
                    continue;
                }
                let (lo, hi) = (
                    (*start).max(s.start),
                    (start + vals[0].len()).min(s.start + s.len),
                );
                if lo >= hi {
                    continue;
                }
                for k in 0..3 {
                    if !parts[k].is_empty() {
                        parts[k][lo - s.start..hi - s.start]
                            .copy_from_slice(&vals[k][lo - start..hi - start]);
                    }
                }
                covered += hi - lo;
            }
            if covered != s.len {
                return Err(OptimError::Format {
                    path: dir.to_path_buf(),
                    msg: format!(
                        "the shards cover {covered} of the {} elements of `{}` this rank owns",
                        s.len, self.params[s.param].name
                    ),
                });
            }
            let dev = self.params[s.param].var.device();
            let [m, v, w] = parts;
            let master = if s.master.is_some() {
                Some(Tensor::from_vec(w, s.len, dev)?)
            } else {
                None
            };
            restored.push((
                Tensor::from_vec(m, s.len, dev)?,
                Tensor::from_vec(v, s.len, dev)?,
                master,
            ));
        }
        for (s, (m, v, w)) in self.segs.iter_mut().zip(restored) {
            s.exp_avg = m;
            s.exp_avg_sq = v;
            s.master = w;
        }
        self.step = h.step;
        self.cfg = h.config;
        Ok(())
    }
}

/// The weights of [`ShardedAdamW::apply_piece`] that have received some of their elements.
#[derive(Debug, Default)]
pub struct Pending(std::collections::BTreeMap<usize, (Vec<f32>, usize)>);

/// Sets `p` from its flattened float32 values, rounded to its dtype.
fn set_flat(p: &ParamSpec, vals: &[f32]) -> Result<()> {
    let t = Tensor::from_slice(vals, p.var.shape(), p.var.device())?;
    p.var.set(&t.to_dtype(p.var.dtype())?)?;
    Ok(())
}

/// Elements `start..start + len` of `t` flattened.
fn flat_part(t: &Tensor, start: usize, len: usize) -> Result<Tensor> {
    Ok(t.flatten_all()?.narrow(0, start, len)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::AdamW;
    use candle_core::{Device, Var};

    fn params(dt: DType) -> Vec<ParamSpec> {
        let dev = Device::Cpu;
        let mk = |name: &str, shape: &[usize], seed: f64| {
            let n: usize = shape.iter().product();
            let vals: Vec<f32> = (0..n)
                .map(|i| ((i as f64 * 0.37 + seed).sin()) as f32)
                .collect();
            let t = Tensor::from_vec(vals, shape, &dev)
                .unwrap()
                .to_dtype(dt)
                .unwrap();
            ParamSpec::new(name, Var::from_tensor(&t).unwrap())
        };
        vec![
            mk("a.weight", &[3, 5], 0.1),
            mk("b.norm.weight", &[4], 0.7),
            mk("c.weight", &[2, 3, 2], 1.3),
        ]
    }

    fn grads(ps: &[ParamSpec], step: usize) -> Grads {
        let mut g = Grads::default();
        for (k, p) in ps.iter().enumerate() {
            let n = p.var.elem_count();
            let vals: Vec<f32> = (0..n)
                .map(|i| ((i * 7 + k * 3 + step * 11) as f64 * 0.21).cos() as f32)
                .collect();
            g.insert(
                p.name.clone(),
                Tensor::from_vec(vals, p.var.shape(), p.var.device()).unwrap(),
            );
        }
        g
    }

    fn bits(ps: &[ParamSpec]) -> Vec<Vec<u32>> {
        ps.iter()
            .map(|p| {
                p.var
                    .as_tensor()
                    .flatten_all()
                    .unwrap()
                    .to_dtype(DType::F32)
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
                    .iter()
                    .map(|x| x.to_bits())
                    .collect()
            })
            .collect()
    }

    /// `world` ranks in one process: each holds its own copy of the parameters; the shares are
    /// gathered by concatenation, as MPI_Allgatherv leaves them.
    fn sharded_run(dt: DType, world: usize, steps: usize, cfg: AdamWConfig) -> Vec<Vec<u32>> {
        let ranks: Vec<Vec<ParamSpec>> = (0..world).map(|_| params(dt)).collect();
        let mut opts: Vec<ShardedAdamW> = ranks
            .iter()
            .enumerate()
            .map(|(r, ps)| ShardedAdamW::new(ps.clone(), cfg, r, world, true).unwrap())
            .collect();
        for step in 0..steps {
            let mut all = Vec::new();
            for (o, ps) in opts.iter_mut().zip(&ranks) {
                all.extend(o.step_shard(&grads(ps, step), 1e-2).unwrap());
            }
            for o in &opts {
                if world % 2 == 1 {
                    o.apply(&all).unwrap();
                } else {
                    // In pieces of 4, last first, as a chunked gather may deliver them.
                    let mut pending = Pending::default();
                    let starts: Vec<usize> = (0..all.len()).step_by(4).collect();
                    for &s in starts.iter().rev() {
                        let e = (s + 4).min(all.len());
                        o.apply_piece(&mut pending, s, &all[s..e]).unwrap();
                    }
                    o.check_applied(&pending).unwrap();
                }
            }
        }
        let first = bits(&ranks[0]);
        for ps in &ranks[1..] {
            assert_eq!(bits(ps), first, "the ranks hold different weights");
        }
        first
    }

    #[test]
    fn shards_tile_the_parameters() {
        for total in 0..20 {
            for world in 1..6 {
                let all: Vec<usize> = (0..world)
                    .flat_map(|r| shard_range(total, r, world))
                    .collect();
                assert_eq!(all, (0..total).collect::<Vec<_>>());
            }
        }
        assert_eq!(parse_shard_file_name(&shard_file_name(2, 3)), Some((2, 3)));
        assert_eq!(
            parse_shard_file_name("optimizer-shard-3-of-3.safetensors"),
            None
        );
        assert_eq!(parse_shard_file_name("optimizer.safetensors"), None);
    }

    #[test]
    fn sharded_steps_are_the_replicated_steps_bit_for_bit() {
        let cfg = AdamWConfig {
            weight_decay: 0.1,
            ..Default::default()
        };
        for dt in [DType::F32, DType::BF16] {
            let ps = params(dt);
            let mut adam = AdamW::new(ps.clone(), cfg).unwrap();
            for step in 0..4 {
                adam.step(&grads(&ps, step), 1e-2).unwrap();
            }
            let want = bits(&ps);
            for world in [1, 2, 3, 7] {
                assert_eq!(sharded_run(dt, world, 4, cfg), want, "{dt:?} world {world}");
            }
        }
    }

    #[test]
    fn shards_saved_at_one_world_size_resume_at_another() {
        let cfg = AdamWConfig::default();
        let dir = tempfile::tempdir().unwrap();
        // Two steps at world 3, saved; the rest at world 2 from the files.
        let ranks: Vec<Vec<ParamSpec>> = (0..3).map(|_| params(DType::BF16)).collect();
        let mut opts: Vec<ShardedAdamW> = ranks
            .iter()
            .enumerate()
            .map(|(r, ps)| ShardedAdamW::new(ps.clone(), cfg, r, 3, true).unwrap())
            .collect();
        for step in 0..2 {
            let mut all = Vec::new();
            for (o, ps) in opts.iter_mut().zip(&ranks) {
                all.extend(o.step_shard(&grads(ps, step), 1e-2).unwrap());
            }
            opts.iter().for_each(|o| o.apply(&all).unwrap());
        }
        for (r, o) in opts.iter().enumerate() {
            o.save(dir.path().join(shard_file_name(r, 3))).unwrap();
        }
        let weights = bits(&ranks[0]);
        let resumed: Vec<Vec<ParamSpec>> = (0..2)
            .map(|_| {
                let ps = params(DType::BF16);
                for (p, w) in ps.iter().zip(&ranks[0]) {
                    p.var.set(w.var.as_tensor()).unwrap();
                }
                ps
            })
            .collect();
        assert_eq!(bits(&resumed[0]), weights);
        let mut opts2: Vec<ShardedAdamW> = resumed
            .iter()
            .enumerate()
            .map(|(r, ps)| {
                let mut o = ShardedAdamW::new(ps.clone(), cfg, r, 2, true).unwrap();
                o.load(dir.path()).unwrap();
                o
            })
            .collect();
        assert_eq!(opts2[0].step_count(), 2);
        for step in 2..4 {
            let mut all = Vec::new();
            for (o, ps) in opts2.iter_mut().zip(&resumed) {
                all.extend(o.step_shard(&grads(ps, step), 1e-2).unwrap());
            }
            opts2.iter().for_each(|o| o.apply(&all).unwrap());
        }
        assert_eq!(bits(&resumed[0]), sharded_run(DType::BF16, 1, 4, cfg));
        // An incomplete set is refused with the files named.
        std::fs::remove_file(dir.path().join(shard_file_name(1, 3))).unwrap();
        let err = ShardedAdamW::files_in(dir.path()).unwrap_err().to_string();
        assert!(err.contains("not one complete set"), "{err}");
    }
}
