//! Which keys each query may see: an additive mask, or causal key ranges (padding, packed
//! sequences).
use std::sync::Arc;

use candle_core::{bail, DType, Device, Result, Tensor};

/// Which keys each query may see.
#[derive(Clone, Debug)]
pub enum AttnMask {
    /// Additive, (b or 1, 1, t, s): 0 where a query may attend a key, `-inf` where not. Any
    /// pattern; the CPU kernel and the composed reference take it.
    Additive(Tensor),
    /// Causal key ranges (padding, packed sequences): see [`KeyRanges`]. Every kernel takes it.
    Ranges(KeyRanges),
}

/// Causal attention within contiguous runs of keys: query `i` of batch row `b`, at absolute
/// position `past + i`, sees keys `start(b, i) ..= past + i` (and `s = past + t` keys exist).
///
/// - Padding: a real token's run starts at the first real token of its row; a padding query
///   sees only itself (its output is never used, and no row is empty).
/// - Packed sequences (several examples in one row, flash-attention's varlen `cu_seqlens`):
///   a token's run starts at the first position of its example, so no token sees another
///   example.
#[derive(Clone, Debug)]
pub struct KeyRanges {
    /// `start(b, i)` at `b * t + i`.
    starts: Arc<Vec<u32>>,
    b: usize,
    t: usize,
    past: usize,
    /// The starts as a (b, t) u32 tensor on the device the kernels run on.
    on_device: Tensor,
}

impl KeyRanges {
    /// Ranges from each query's first key (`starts`: b * t values, row-major); every start must
    /// be at most the query's own position `past + i`.
    pub fn new(
        starts: Vec<u32>,
        (b, t): (usize, usize),
        past: usize,
        dev: &Device,
    ) -> Result<Self> {
        if starts.len() != b * t {
            bail!("key ranges: {} starts for a ({b}, {t}) batch", starts.len());
        }
        for (n, &st) in starts.iter().enumerate() {
            if st as usize > past + n % t {
                bail!(
                    "key ranges: query {} of row {} starts at key {st}, after itself ({})",
                    n % t,
                    n / t,
                    past + n % t
                );
            }
        }
        let on_device = Tensor::from_slice(&starts, (b, t), dev)?;
        Ok(Self {
            starts: Arc::new(starts),
            b,
            t,
            past,
            on_device,
        })
    }

    /// Causal ranges over rows of `past + t` positions (`valid`: true for tokens, false for
    /// padding): a token sees the tokens up to itself, a padding query only itself. `None` when a
    /// row's tokens before some query are not one contiguous run (a hole in the middle): that
    /// pattern needs an additive mask.
    pub fn causal(
        valid: &[Vec<bool>],
        past: usize,
        t: usize,
        dev: &Device,
    ) -> Result<Option<Self>> {
        let mut starts = Vec::with_capacity(valid.len() * t);
        for row in valid {
            if row.len() != past + t {
                bail!(
                    "key ranges: a validity row of {} for {} positions",
                    row.len(),
                    past + t
                );
            }
            let first = row.iter().position(|&v| v).unwrap_or(row.len());
            for q in past..past + t {
                if !row[q] {
                    starts.push(q as u32);
                } else if row[first..=q].iter().all(|&v| v) {
                    starts.push(first as u32);
                } else {
                    return Ok(None);
                }
            }
        }
        Self::new(starts, (valid.len(), t), past, dev).map(Some)
    }

    /// Ranges of packed rows: `segments[b][i]` numbers the example position `i` belongs to
    /// (examples are contiguous runs of one number; 0 marks padding, which sees only itself),
    /// so each token sees only its own example's earlier tokens.
    pub fn packed(segments: &[Vec<u32>], dev: &Device) -> Result<Self> {
        let t = segments.first().map_or(0, |r| r.len());
        let mut starts = Vec::with_capacity(segments.len() * t);
        for row in segments {
            if row.len() != t {
                bail!("key ranges: packed rows of {} and {t} positions", row.len());
            }
            let mut start = 0;
            for (i, &seg) in row.iter().enumerate() {
                if i > 0 && seg != row[i - 1] {
                    start = i;
                }
                starts.push(if seg == 0 { i } else { start } as u32);
            }
        }
        Self::new(starts, (segments.len(), t), 0, dev)
    }

    /// `start(b, i)` at `b * t + i`.
    pub fn starts(&self) -> &[u32] {
        &self.starts
    }

    /// (batch, queries, cached positions before them).
    pub fn dims(&self) -> (usize, usize, usize) {
        (self.b, self.t, self.past)
    }

    /// The starts as a (b, t) u32 tensor on the kernels' device.
    pub fn on_device(&self) -> &Tensor {
        &self.on_device
    }

    /// The same pattern as an additive (b, 1, t, past + t) mask.
    pub fn to_additive(&self, dtype: DType, dev: &Device) -> Result<Tensor> {
        let (b, t, s) = (self.b, self.t, self.past + self.t);
        let mut m = vec![f32::NEG_INFINITY; b * t * s];
        for (n, &st) in self.starts.iter().enumerate() {
            let q = self.past + n % t;
            m[n * s + st as usize..n * s + q + 1].fill(0.0);
        }
        Tensor::from_vec(m, (b, 1, t, s), dev)?.to_dtype(dtype)
    }
}
