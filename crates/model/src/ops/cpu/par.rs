//! Row-parallel loops: rayon over rows once a tensor is large enough to pay for it.
use candle_core::CpuStorage;
use num_traits::Float;
use rayon::prelude::*;

use crate::ops::dispatch::Elem;

/// Below this many elements a kernel runs on the calling thread.
pub(crate) const PAR_MIN_ELEMS: usize = 32 * 1024;

/// Runs `f(row_index, out_row)` over the `d`-wide rows of `out`, in parallel when large.
pub(crate) fn for_rows<T: Send, F>(out: &mut [T], d: usize, f: F)
where
    F: Fn(usize, &mut [T]) + Send + Sync,
{
    if d == 0 {
        return;
    }
    if out.len() < PAR_MIN_ELEMS {
        out.chunks_mut(d).enumerate().for_each(|(i, r)| f(i, r));
    } else {
        let min_rows = (PAR_MIN_ELEMS / 4 / d).max(1);
        out.par_chunks_mut(d)
            .enumerate()
            .with_min_len(min_rows)
            .for_each(|(i, r)| f(i, r));
    }
}

/// Sums `f(row_index, acc)` contributions of `rows` rows into a `d`-vector, in parallel when large.
pub(crate) fn sum_rows<A, F>(rows: usize, d: usize, f: F) -> Vec<A>
where
    A: Float + Send + Sync + std::ops::AddAssign,
    F: Fn(usize, &mut [A]) + Send + Sync,
{
    let chunk = if rows * d < PAR_MIN_ELEMS {
        rows.max(1)
    } else {
        (PAR_MIN_ELEMS / 4 / d.max(1)).max(1)
    };
    let n_chunks = rows.div_ceil(chunk);
    let partial = |c: usize| {
        let mut acc = vec![A::zero(); d];
        for i in c * chunk..((c + 1) * chunk).min(rows) {
            f(i, &mut acc);
        }
        acc
    };
    let add = |mut a: Vec<A>, b: Vec<A>| {
        a.iter_mut().zip(b).for_each(|(x, y)| *x += y);
        a
    };
    if n_chunks <= 1 {
        partial(0)
    } else {
        (0..n_chunks)
            .into_par_iter()
            .map(partial)
            .reduce(|| vec![A::zero(); d], add)
    }
}

pub(crate) fn storage<T: Elem>(v: Vec<T>) -> CpuStorage {
    T::to_cpu_storage_owned(v)
}
