//! Batches: determinism, coverage, token budgets, packing, and an exact resume from a cursor.
use std::sync::Arc;

use sft_data::batch::plan_padding_ratio;
use sft_data::{eval_batches, plan_epoch, BatchOptions, Batcher, Cursor, TokenizedSet};

const PAD: u32 = 9999;

/// `n` examples of lengths 3..=60; example `i`'s tokens are `i*1000 + position`, its prompt
/// about a third of it.
fn set(n: usize) -> TokenizedSet {
    let mut s = TokenizedSet::new();
    let mut x = 12345u64;
    for i in 0..n {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let len = 3 + (x >> 40) as usize % 58;
        let ids: Vec<u32> = (0..len).map(|p| (i * 1000 + p) as u32).collect();
        s.push(&ids, (len / 3).max(1), (0, i as u64));
    }
    s
}

fn opts(micro_batch: usize) -> BatchOptions {
    BatchOptions {
        micro_batch,
        max_tokens: None,
        pack_length: None,
        group_by_length: true,
        shuffle: true,
        seed: 7,
    }
}

fn take(b: &mut Batcher, n: usize) -> Vec<sft_data::Batch> {
    (0..n).map(|_| b.next_batch()).collect()
}

#[test]
fn same_seed_same_batches_other_seed_other_batches() {
    let s = Arc::new(set(300));
    let mut a = Batcher::new(s.clone(), PAD, opts(8)).unwrap();
    let mut b = Batcher::new(s.clone(), PAD, opts(8)).unwrap();
    assert_eq!(take(&mut a, 120), take(&mut b, 120));
    let mut c = Batcher::new(s, PAD, BatchOptions { seed: 8, ..opts(8) }).unwrap();
    let mut a = Batcher::new(Arc::new(set(300)), PAD, opts(8)).unwrap();
    assert_ne!(take(&mut a, 10), take(&mut c, 10));
}

#[test]
fn every_epoch_sees_every_example_once_in_a_new_order() {
    let s = set(301);
    for o in [
        opts(8),
        BatchOptions {
            group_by_length: false,
            ..opts(8)
        },
        BatchOptions {
            pack_length: Some(128),
            ..opts(4)
        },
        BatchOptions {
            max_tokens: Some(256),
            ..opts(16)
        },
    ] {
        let mut orders = Vec::new();
        for epoch in 0..3 {
            let plan = plan_epoch(&s, &o, epoch);
            let mut seen: Vec<usize> = plan.iter().flatten().flatten().copied().collect();
            orders.push(seen.clone());
            seen.sort_unstable();
            assert_eq!(seen, (0..301).collect::<Vec<_>>(), "{o:?}");
        }
        assert_ne!(orders[0], orders[1], "{o:?}");
    }
    // Without shuffling the order is the file order.
    let o = BatchOptions {
        shuffle: false,
        group_by_length: false,
        ..opts(8)
    };
    let flat: Vec<usize> = plan_epoch(&s, &o, 3)
        .iter()
        .flatten()
        .flatten()
        .copied()
        .collect();
    assert_eq!(flat, (0..301).collect::<Vec<_>>());
}

#[test]
fn resume_from_a_saved_cursor_sees_the_same_batches() {
    let s = Arc::new(set(100));
    for o in [
        opts(8),
        BatchOptions {
            pack_length: Some(96),
            max_tokens: Some(300),
            ..opts(8)
        },
    ] {
        let mut whole = Batcher::new(s.clone(), PAD, o.clone()).unwrap();
        let per_epoch = whole.batches_in_epoch(0);
        let total = 3 * per_epoch + 5;
        let mut reference = Vec::new();
        let mut saved = Vec::new();
        for _ in 0..total {
            saved.push(whole.cursor());
            reference.push(whole.next_batch());
        }
        // Epochs follow each other, positions count within an epoch.
        assert_eq!(reference[per_epoch].epoch, 1);
        assert_eq!(reference[per_epoch].position, 0);
        for k in [0, 1, per_epoch - 1, per_epoch, per_epoch + 3, total - 1] {
            // The cursor goes through JSON as the trainer would save it.
            let json = serde_json::to_string(&saved[k]).unwrap();
            let cursor: Cursor = serde_json::from_str(&json).unwrap();
            let mut resumed = Batcher::new(s.clone(), PAD, o.clone())
                .unwrap()
                .with_cursor(cursor);
            for (j, want) in reference.iter().enumerate().skip(k) {
                assert_eq!(&resumed.next_batch(), want, "resumed at {k}, batch {j}");
            }
            assert_eq!(resumed.cursor(), whole.cursor());
        }
        let seen: u64 = reference.iter().map(|b| b.num_examples() as u64).sum();
        assert_eq!(whole.cursor().examples_seen, seen);
    }
}

#[test]
fn batches_respect_the_limits_and_the_contract() {
    let s = set(200);
    let o = BatchOptions {
        max_tokens: Some(300),
        ..opts(16)
    };
    for rows in plan_epoch(&s, &o, 0) {
        let b = sft_data::make_batch(&s, &rows, PAD, false);
        assert!(
            b.rows <= 16 && b.rows * b.seq_len <= 300,
            "{}x{}",
            b.rows,
            b.seq_len
        );
        for (r, &i) in b.examples.iter().enumerate() {
            let e = s.get(i);
            let row = r * b.seq_len..(r + 1) * b.seq_len;
            let (ids, labels) = (&b.input_ids[row.clone()], &b.labels[row.clone()]);
            let (mask, pos) = (&b.attention_mask[row.clone()], &b.position_ids[row]);
            let n = e.ids.len();
            assert_eq!(&ids[..n], e.ids);
            assert!(ids[n..].iter().all(|&t| t == PAD));
            assert!(mask[..n].iter().all(|&m| m == 1) && mask[n..].iter().all(|&m| m == 0));
            assert_eq!(pos[..n], (0..n as u32).collect::<Vec<_>>()[..]);
            assert!(labels[..e.prompt_len]
                .iter()
                .chain(&labels[n..])
                .all(|&l| l == -100));
            assert_eq!(
                labels[e.prompt_len..n],
                e.ids[e.prompt_len..]
                    .iter()
                    .map(|&t| t as i64)
                    .collect::<Vec<_>>()[..]
            );
        }
        assert!(b.segment_ids.is_none());
        assert_eq!(
            b.real_tokens,
            b.attention_mask.iter().filter(|&&m| m == 1).count()
        );
        assert_eq!(
            b.trained_tokens,
            b.labels.iter().filter(|&&l| l != -100).count()
        );
    }
}

#[test]
fn grouping_by_length_lowers_padding() {
    let s = set(1000);
    let grouped = plan_padding_ratio(&s, &plan_epoch(&s, &opts(8), 0));
    let plain = plan_padding_ratio(
        &s,
        &plan_epoch(
            &s,
            &BatchOptions {
                group_by_length: false,
                ..opts(8)
            },
            0,
        ),
    );
    let packed = plan_padding_ratio(
        &s,
        &plan_epoch(
            &s,
            &BatchOptions {
                pack_length: Some(256),
                ..opts(4)
            },
            0,
        ),
    );
    eprintln!("padding: grouped {grouped:.4} plain {plain:.4} packed {packed:.4}");
    assert!(
        grouped < 0.05 && grouped < plain / 5.0,
        "grouped {grouped}, plain {plain}"
    );
    assert!(packed < 0.05, "packed {packed}");
}

#[test]
fn packed_rows_keep_examples_apart() {
    let s = set(120);
    let o = BatchOptions {
        pack_length: Some(128),
        ..opts(4)
    };
    let mut packed_rows = 0;
    for rows in plan_epoch(&s, &o, 0) {
        let b = sft_data::make_batch(&s, &rows, PAD, true);
        let seg = b.segment_ids.as_ref().unwrap();
        assert!(b.seq_len <= 128);
        let mut k = 0;
        for (r, row) in rows.iter().enumerate() {
            packed_rows += (row.len() > 1) as usize;
            let mut t = r * b.seq_len;
            for (j, &i) in row.iter().enumerate() {
                let e = s.get(i);
                assert_eq!(b.examples[k], i);
                k += 1;
                for p in 0..e.ids.len() {
                    assert_eq!(b.input_ids[t], e.ids[p]);
                    assert_eq!(b.position_ids[t], p as u32, "positions restart per example");
                    assert_eq!(seg[t], j as u32 + 1);
                    assert_eq!(b.labels[t] == -100, p < e.prompt_len);
                    t += 1;
                }
                // The first token of every packed example is a prompt token: no label crosses.
                assert_eq!(b.labels[t - e.ids.len()], -100);
            }
            assert!(seg[t..(r + 1) * b.seq_len].iter().all(|&x| x == 0));
            assert!(b.attention_mask[t..(r + 1) * b.seq_len]
                .iter()
                .all(|&x| x == 0));
        }
    }
    assert!(packed_rows > 0);
}

#[test]
fn eval_batches_are_fixed_and_complete() {
    let s = set(57);
    let a = eval_batches(&s, PAD, &opts(8));
    assert_eq!(
        a,
        eval_batches(
            &s,
            PAD,
            &BatchOptions {
                seed: 99,
                ..opts(8)
            }
        )
    );
    let mut seen: Vec<usize> = a.iter().flat_map(|b| b.examples.clone()).collect();
    seen.sort_unstable();
    assert_eq!(seen, (0..57).collect::<Vec<_>>());
    assert!(a.iter().all(|b| b.segment_ids.is_none()));
}

#[test]
fn an_empty_set_or_a_zero_batch_is_refused() {
    assert!(Batcher::new(Arc::new(TokenizedSet::new()), PAD, opts(8)).is_err());
    assert!(Batcher::new(Arc::new(set(3)), PAD, opts(0)).is_err());
}
