//! Batches: deterministic epoch plans, length grouping under a token budget, optional packing,
//! and a cursor that resumes exactly.
//!
//! # The batch contract (what the model consumes)
//! All arrays are row-major `(rows, seq_len)`, right-padded:
//! - `input_ids`: token ids, `pad_id` in padding;
//! - `labels`: the token id where the token trains (response and EOS), -100 over prompts and
//!   padding. Aligned with `input_ids` as in Hugging Face: the loss at position `t` compares
//!   logits[t] with labels[t + 1] (the model shifts);
//! - `attention_mask`: 1 for real tokens, 0 for padding;
//! - `position_ids`: 0, 1, 2… from the start of each example (restarting at every packed
//!   example), 0 in padding;
//! - `segment_ids` (packed batches only): 1, 2, 3… numbering the examples of a row, 0 in
//!   padding. Token `q` may attend to token `k` iff `k <= q` and `segment_ids[q] ==
//!   segment_ids[k] != 0`: a block-diagonal causal mask, so packed examples never see each other.
//!   Shifting labels never trains across a boundary: every example starts with prompt tokens,
//!   whose labels are -100.
//!
//! # Epoch plans
//! Epoch `e` is planned from `(seed, e)` alone: shuffle the examples; with `group_by_length`,
//! sort windows of 64 batches' worth of examples by length and cut batches greedily (at most
//! `micro_batch` examples, at most `max_tokens` padded tokens), then shuffle the batch order;
//! with packing, first-fit the (window-sorted) examples into rows of `pack_length` tokens and
//! take `micro_batch` rows per batch (fewer if the token budget says so). A [`Cursor`]
//! `(epoch, position)` names the next batch of that plan, so a run resumed from a saved cursor
//! sees exactly the batches of the run left alone.
use std::sync::Arc;

use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::error::{DataError, Result};
use crate::tokenized::TokenizedSet;

/// How batches are cut. See [`crate::DataConfig::batch_options`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchOptions {
    /// At most this many examples per batch (packed: rows per batch).
    pub micro_batch: usize,
    /// At most this many tokens per batch, padding included (rows x padded length).
    pub max_tokens: Option<usize>,
    /// Pack examples into rows of this many tokens.
    pub pack_length: Option<usize>,
    pub group_by_length: bool,
    pub shuffle: bool,
    pub seed: u64,
}

/// Where the batch stream stands: the trainer saves it and resumes from it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cursor {
    /// The epoch of the next batch (from 0).
    pub epoch: u64,
    /// The index of the next batch in that epoch's plan.
    pub position: u64,
    /// Training examples delivered so far, over all epochs.
    pub examples_seen: u64,
}

/// A padded batch. See the module documentation for the contract.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    pub rows: usize,
    pub seq_len: usize,
    pub input_ids: Vec<u32>,
    pub labels: Vec<i64>,
    pub attention_mask: Vec<u8>,
    pub position_ids: Vec<u32>,
    /// Packed batches only.
    pub segment_ids: Option<Vec<u32>>,
    /// The examples (indices into the set), in row order.
    pub examples: Vec<usize>,
    /// Non-padding tokens.
    pub real_tokens: usize,
    /// Tokens whose label is not -100.
    pub trained_tokens: usize,
    /// The epoch and plan position this batch came from.
    pub epoch: u64,
    pub position: u64,
}

impl Batch {
    pub fn num_examples(&self) -> usize {
        self.examples.len()
    }

    /// Padding share of the batch.
    pub fn padding_ratio(&self) -> f64 {
        let slots = self.rows * self.seq_len;
        if slots == 0 {
            0.0
        } else {
            1.0 - self.real_tokens as f64 / slots as f64
        }
    }
}

/// Fisher–Yates shuffle driven by ChaCha8 from `seed` (stable across platforms and versions of
/// `rand`'s helpers, since only the ChaCha stream is used).
pub fn shuffle<T>(v: &mut [T], seed: u64) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    for i in (1..v.len()).rev() {
        let j = (rng.next_u64() % (i as u64 + 1)) as usize;
        v.swap(i, j);
    }
}

/// Batches of rows of examples.
pub type Plan = Vec<Vec<Vec<usize>>>;

const GROUP_WINDOW_BATCHES: usize = 64;

/// The plan of one epoch: batches, each a list of rows, each a list of example indices.
pub fn plan_epoch(set: &TokenizedSet, opts: &BatchOptions, epoch: u64) -> Plan {
    let n = set.len();
    let mut order: Vec<usize> = (0..n).collect();
    if opts.shuffle {
        shuffle(&mut order, sft_common::mix(opts.seed, epoch, 0));
    }
    let mb = opts.micro_batch.max(1);
    let window = if opts.group_by_length {
        mb * GROUP_WINDOW_BATCHES
    } else {
        usize::MAX
    };
    let mut plan: Plan = Vec::new();
    for chunk in order.chunks(window.min(n.max(1))) {
        let mut chunk = chunk.to_vec();
        if opts.group_by_length {
            // Longest first; ties keep the shuffled order (stable sort).
            chunk.sort_by_key(|&i| std::cmp::Reverse(set.len_of(i)));
        }
        match opts.pack_length {
            Some(cap) => {
                let rows = pack_rows(set, &chunk, cap);
                let per_batch = opts.max_tokens.map_or(mb, |t| (t / cap).clamp(1, mb));
                plan.extend(rows.chunks(per_batch).map(|c| c.to_vec()));
            }
            None => {
                let mut batch: Vec<Vec<usize>> = Vec::new();
                let mut longest = 0usize;
                for &i in &chunk {
                    let len = set.len_of(i);
                    let wider = longest.max(len);
                    let over_budget = opts
                        .max_tokens
                        .is_some_and(|t| wider * (batch.len() + 1) > t);
                    if !batch.is_empty() && (batch.len() >= mb || over_budget) {
                        plan.push(std::mem::take(&mut batch));
                        longest = 0;
                    }
                    longest = longest.max(len);
                    batch.push(vec![i]);
                }
                if !batch.is_empty() {
                    plan.push(batch);
                }
            }
        }
    }
    if opts.shuffle && opts.group_by_length {
        shuffle(&mut plan, sft_common::mix(opts.seed, epoch, 1));
    }
    plan
}

/// First-fit packing of examples (in the given order) into rows of at most `cap` tokens.
fn pack_rows(set: &TokenizedSet, order: &[usize], cap: usize) -> Vec<Vec<usize>> {
    let mut rows: Vec<Vec<usize>> = Vec::new();
    let mut room: Vec<usize> = Vec::new();
    for &i in order {
        let len = set.len_of(i);
        match room.iter().position(|&r| r >= len) {
            Some(r) => {
                rows[r].push(i);
                room[r] -= len;
            }
            None => {
                rows.push(vec![i]);
                room.push(cap.saturating_sub(len));
            }
        }
    }
    rows
}

/// Builds the padded arrays of one batch.
pub fn make_batch(set: &TokenizedSet, rows: &[Vec<usize>], pad_id: u32, packed: bool) -> Batch {
    let seq_len = rows
        .iter()
        .map(|r| r.iter().map(|&i| set.len_of(i)).sum::<usize>())
        .max()
        .unwrap_or(0);
    let slots = rows.len() * seq_len;
    let mut b = Batch {
        rows: rows.len(),
        seq_len,
        input_ids: vec![pad_id; slots],
        labels: vec![-100; slots],
        attention_mask: vec![0; slots],
        position_ids: vec![0; slots],
        segment_ids: packed.then(|| vec![0; slots]),
        examples: Vec::new(),
        real_tokens: 0,
        trained_tokens: 0,
        epoch: 0,
        position: 0,
    };
    for (r, row) in rows.iter().enumerate() {
        let mut t = r * seq_len;
        for (s, &i) in row.iter().enumerate() {
            let e = set.get(i);
            b.examples.push(i);
            for (p, &id) in e.ids.iter().enumerate() {
                b.input_ids[t] = id;
                b.attention_mask[t] = 1;
                b.position_ids[t] = p as u32;
                if p >= e.prompt_len {
                    b.labels[t] = id as i64;
                    b.trained_tokens += 1;
                }
                if let Some(seg) = b.segment_ids.as_mut() {
                    seg[t] = s as u32 + 1;
                }
                t += 1;
            }
            b.real_tokens += e.ids.len();
        }
    }
    b
}

/// The endless, resumable stream of training batches over epochs.
#[derive(Debug)]
pub struct Batcher {
    set: Arc<TokenizedSet>,
    opts: BatchOptions,
    pad_id: u32,
    cursor: Cursor,
    plan: Option<(u64, Plan)>,
}

impl Batcher {
    pub fn new(set: Arc<TokenizedSet>, pad_id: u32, opts: BatchOptions) -> Result<Batcher> {
        if set.is_empty() {
            return Err(DataError::Config(
                "no training examples (all rows were skipped or held out)".into(),
            ));
        }
        if opts.micro_batch == 0 {
            return Err(DataError::Config(
                "the micro-batch size must be at least 1".into(),
            ));
        }
        Ok(Batcher {
            set,
            opts,
            pad_id,
            cursor: Cursor::default(),
            plan: None,
        })
    }

    /// Continue from a saved cursor.
    pub fn with_cursor(mut self, cursor: Cursor) -> Batcher {
        self.cursor = cursor;
        self
    }

    /// The position of the next batch: save this with a checkpoint.
    pub fn cursor(&self) -> Cursor {
        self.cursor
    }

    pub fn options(&self) -> &BatchOptions {
        &self.opts
    }

    pub fn set(&self) -> &TokenizedSet {
        &self.set
    }

    fn plan(&mut self, epoch: u64) -> &Plan {
        if self.plan.as_ref().map(|p| p.0) != Some(epoch) {
            self.plan = Some((epoch, plan_epoch(&self.set, &self.opts, epoch)));
        }
        &self.plan.as_ref().expect("just set").1
    }

    /// Number of batches in an epoch (can vary by epoch under a token budget).
    pub fn batches_in_epoch(&mut self, epoch: u64) -> usize {
        self.plan(epoch).len()
    }

    /// The next batch; moves to the next epoch when one ends.
    pub fn next_batch(&mut self) -> Batch {
        let Cursor {
            mut epoch,
            mut position,
            examples_seen,
        } = self.cursor;
        if position as usize >= self.plan(epoch).len() {
            epoch += 1;
            position = 0;
        }
        let packed = self.opts.pack_length.is_some();
        let pad = self.pad_id;
        let set = Arc::clone(&self.set);
        let rows = &self.plan(epoch)[position as usize];
        let mut b = make_batch(&set, rows, pad, packed);
        b.epoch = epoch;
        b.position = position;
        self.cursor = Cursor {
            epoch,
            position: position + 1,
            examples_seen: examples_seen + b.examples.len() as u64,
        };
        b
    }
}

impl Iterator for Batcher {
    type Item = Batch;
    fn next(&mut self) -> Option<Batch> {
        Some(self.next_batch())
    }
}

/// Batches of the held-out examples for the evaluation loss: unshuffled, grouped by length,
/// unpacked; the same every time.
pub fn eval_batches(set: &TokenizedSet, pad_id: u32, opts: &BatchOptions) -> Vec<Batch> {
    let o = BatchOptions {
        shuffle: false,
        group_by_length: true,
        pack_length: None,
        ..opts.clone()
    };
    plan_epoch(set, &o, 0)
        .iter()
        .enumerate()
        .map(|(i, rows)| {
            let mut b = make_batch(set, rows, pad_id, false);
            b.position = i as u64;
            b
        })
        .collect()
}

/// Padding share over a whole epoch plan.
pub fn plan_padding_ratio(set: &TokenizedSet, plan: &Plan) -> f64 {
    let (mut slots, mut real) = (0usize, 0usize);
    for rows in plan {
        let lens: Vec<usize> = rows
            .iter()
            .map(|r| r.iter().map(|&i| set.len_of(i)).sum())
            .collect();
        slots += lens.iter().max().unwrap_or(&0) * rows.len();
        real += lens.iter().sum::<usize>();
    }
    if slots == 0 {
        0.0
    } else {
        1.0 - real as f64 / slots as f64
    }
}
