//! Data-parallel training under `mpirun -np 2` (the `mpi` feature; scripts/test.sh installs
//! Open MPI): 2 ranks x micro-batch 2 train the same run, bit for bit, as 1 rank x micro-batch
//! 2 x accumulation 2; the evaluations split across the ranks score what one process scores;
//! a signal on one rank stops both at the same step and the resumed run matches; a killed
//! rank ends the other; a 2-rank checkpoint resumes on 1 rank with the same global batch.
#![cfg(feature = "mpi")]
mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Every run of these tests uses one thread, so that one process and each rank compute every
/// micro-batch with the same kernels.
const ENV: [(&str, &str); 3] = [
    ("RAYON_NUM_THREADS", "1"),
    ("CANDLE_NUM_THREADS", "1"),
    ("RUST_LOG", "warn"),
];

/// `mpirun -np N sft-train --config CFG EXTRA...`, as root where the tests run as root, quiet
/// and on shared memory only (a container's network interfaces are no use to one node).
fn mpirun_command(np: usize, cfg: &Path, extra: &[&str], env: &[(&str, &str)]) -> Command {
    let mut c = Command::new("mpirun");
    c.args(["-np", &np.to_string(), "--oversubscribe"]);
    for (k, v) in ENV.iter().chain(env) {
        c.args(["-x", &format!("{k}={v}")]);
    }
    c.arg(env!("CARGO_BIN_EXE_sft-train"))
        .arg("--config")
        .arg(cfg)
        .args(extra)
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env("OMPI_MCA_btl", "self,vader")
        .env("OMPI_MCA_btl_vader_single_copy_mechanism", "none")
        .env("OMPI_MCA_rmaps_base_oversubscribe", "1")
        .env("PMIX_MCA_gds", "hash");
    c
}

fn mpirun(np: usize, cfg: &Path, extra: &[&str], env: &[(&str, &str)]) -> Output {
    mpirun_command(np, cfg, extra, env).output().unwrap()
}

fn single(cfg: &Path, extra: &[&str], env: &[(&str, &str)]) -> Output {
    let env: Vec<(&str, &str)> = ENV.iter().chain(env).copied().collect();
    train(cfg, extra, &env)
}

fn weights(run: &Path, step: &str, kind: &str) -> Vec<u8> {
    let f = if kind == "full" {
        "model.safetensors"
    } else {
        "adapter_model.safetensors"
    };
    std::fs::read(run.join(step).join(f)).unwrap()
}

fn run_dir(t: &tempfile::TempDir) -> PathBuf {
    t.path().join("ck/dp")
}

/// One process x accumulation 2, and 2 ranks x accumulation 1: the same losses (held-out
/// ones included) and the same weights after every checkpoint.
fn same_as_one_process(kind: &str, pack: &str) {
    let vars = |accum| [("kind", kind), ("pack", pack), ("accum", accum)];
    let (one, cfg1) = tiny_run("data_parallel.yaml", &vars("2"));
    assert_ok(&single(&cfg1, &[], &[]));
    let (two, cfg2) = tiny_run("data_parallel.yaml", &vars("1"));
    let out = mpirun(2, &cfg2, &[], &[]);
    assert_ok(&out);
    let (l1, l2) = (losses(&run_dir(&one)), losses(&run_dir(&two)));
    assert_eq!(l1, l2, "{kind}, pack {pack}: losses");
    assert!(l1.len() >= 5, "{l1:?}");
    for step in ["step-000002", "step-000004"] {
        assert!(
            weights(&run_dir(&one), step, kind) == weights(&run_dir(&two), step, kind),
            "{kind}, pack {pack}: weights at {step}"
        );
    }
    // Rank 0 alone wrote the run; the summary is printed once.
    let summaries = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with('{'))
        .count();
    assert_eq!(summaries, 1, "{}", String::from_utf8_lossy(&out.stdout));
}

#[test]
fn two_ranks_train_the_lora_run_of_one_process() {
    same_as_one_process("lora", "false");
}

#[test]
fn two_ranks_train_the_packed_lora_run_of_one_process() {
    same_as_one_process("lora", "true");
}

#[test]
fn two_ranks_train_the_full_run_of_one_process() {
    same_as_one_process("full", "false");
}

#[test]
fn two_ranks_train_the_packed_full_run_of_one_process() {
    same_as_one_process("full", "true");
}

#[test]
fn dry_run_shows_the_world_and_the_batches() {
    let (_t, cfg) = tiny_run(
        "data_parallel.yaml",
        &[("kind", "lora"), ("pack", "false"), ("accum", "3")],
    );
    let out = mpirun(2, &cfg, &["--dry-run"], &[]);
    let plan = json_last(&out);
    assert_eq!(plan["world"], 2, "{plan}");
    assert_eq!(plan["per_rank_batch"], 6, "{plan}");
    assert_eq!(plan["global_batch"], 12, "{plan}");
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(text.contains("world size       2"), "{text}");
}
