//! Padding to attention: the mask's rows, the position ids it implies, and the causal mask of
//! the newest positions (key ranges where the kernels take them, additive otherwise).
use candle_core::{DType, Device, Result, Tensor};

use crate::ops::{AttnMask, KeyRanges};

/// The attention mask as rows of booleans (true = token).
pub(super) fn mask_rows(mask: Option<&Tensor>, b: usize, t: usize) -> Result<Vec<Vec<bool>>> {
    match mask {
        None => Ok(vec![vec![true; t]; b]),
        Some(m) => {
            if m.dims() != [b, t] {
                candle_core::bail!(
                    "attention_mask has shape {:?}, input_ids ({b}, {t})",
                    m.dims()
                );
            }
            let rows: Vec<Vec<f32>> = m.to_dtype(DType::F32)?.to_vec2()?;
            Ok(rows
                .into_iter()
                .map(|r| r.into_iter().map(|x| x != 0.0).collect())
                .collect())
        }
    }
}

/// Position id of each of the `t` newest positions: the number of real tokens before it
/// (padding positions get the id of the token before them, or 0; they are never attended to).
pub(super) fn positions_from_mask(valid: &[Vec<bool>], past: usize, t: usize) -> Vec<Vec<u32>> {
    valid
        .iter()
        .map(|row| {
            let mut count = 0u32;
            let mut out = Vec::with_capacity(t);
            for (j, &v) in row.iter().enumerate() {
                if v {
                    count += 1;
                }
                if j >= past {
                    out.push(count.saturating_sub(1));
                }
            }
            out
        })
        .collect()
}

/// The attention mask of the `t` newest positions: causal, padding never attended (a padding
/// query attends to itself so that no row is empty; its output is never used). Key ranges when
/// each row's tokens are one run (what padding and decoding produce; every kernel takes them),
/// an additive mask otherwise; `None` when nothing is masked.
pub(super) fn attn_mask(
    valid: &[Vec<bool>],
    past: usize,
    t: usize,
    dev: &Device,
) -> Result<Option<AttnMask>> {
    let all_valid = valid.iter().all(|r| r.iter().all(|&v| v));
    if t == 1 && all_valid {
        return Ok(None);
    }
    Ok(Some(match KeyRanges::causal(valid, past, t, dev)? {
        Some(r) => AttnMask::Ranges(r),
        None => AttnMask::Additive(causal_mask(valid, past, t, dev)?),
    }))
}

/// Additive mask (b, 1, t, past + t) in f32: 0 where query i may attend key j (j not after i,
/// and j a real token), -inf elsewhere.
fn causal_mask(valid: &[Vec<bool>], past: usize, t: usize, dev: &Device) -> Result<Tensor> {
    let b = valid.len();
    let total = past + t;
    let mut m = vec![0f32; b * t * total];
    for (bi, row) in valid.iter().enumerate() {
        for i in 0..t {
            let q = past + i;
            let base = (bi * t + i) * total;
            for j in 0..total {
                let allowed = j <= q && (row[j] || j == q);
                if !allowed {
                    m[base + j] = f32::NEG_INFINITY;
                }
            }
        }
    }
    Tensor::from_vec(m, (b, 1, t, total), dev)
}
