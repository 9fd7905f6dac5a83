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

/// The IFS and ObjecQA generation and the held-out loss split across 2 ranks: the same
/// answers, scores and losses as one process, and the plateau rule stops at the same step.
#[test]
fn split_evaluations_score_what_one_process_scores() {
    let (one, cfg1) = tiny_run("data_parallel_evals.yaml", &[("accum", "2")]);
    assert_ok(&single(&cfg1, &[], &[]));
    let (two, cfg2) = tiny_run("data_parallel_evals.yaml", &[("accum", "1")]);
    assert_ok(&mpirun(2, &cfg2, &[], &[]));
    let run = |t: &tempfile::TempDir| t.path().join("ck/dpe");
    // Every evaluation line (scores, held-out loss) and every step's loss, as written.
    let lines = |t: &tempfile::TempDir| -> Vec<serde_json::Value> {
        std::fs::read_to_string(run(t).join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| {
                let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
                let o = v.as_object_mut().unwrap();
                o.retain(|k, _| !k.contains("seconds") && !k.starts_with("allreduce"));
                v
            })
            .collect()
    };
    let (a, b) = (lines(&one), lines(&two));
    assert_eq!(a, b);
    let evals = |name: &str| a.iter().filter(|v| v["eval"] == name).count();
    assert!(
        evals("ifs") >= 3 && evals("objecqa") >= 1 && evals("loss") >= 3,
        "{a:?}"
    );
    // The answers themselves, file for file.
    for step in std::fs::read_dir(run(&one).join("evals")).unwrap() {
        let step = step.unwrap();
        for f in std::fs::read_dir(step.path()).unwrap() {
            let f = f.unwrap().path();
            let other = run(&two)
                .join("evals")
                .join(step.file_name())
                .join(f.file_name().unwrap());
            assert_eq!(
                std::fs::read(&f).unwrap(),
                std::fs::read(&other).unwrap(),
                "{}",
                f.display()
            );
        }
    }
    let summary = |t: &tempfile::TempDir| -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(run(t).join("summary.json")).unwrap()).unwrap()
    };
    let (s1, s2) = (summary(&one), summary(&two));
    assert_eq!(s1["status"], "stopped", "{s1}");
    assert!(s1["stop_reason"].as_str().unwrap().contains("plateau"));
    for k in ["status", "stop_reason", "steps", "examples"] {
        assert_eq!(s1[k], s2[k], "{k}");
    }
}

/// The processes mpirun started for a run: its children, by rank.
fn ranks(mpirun: u32) -> Vec<(usize, u32)> {
    let mut out = vec![];
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
        // pid (comm) state ppid ...
        let ppid = stat
            .rsplit(')')
            .next()
            .and_then(|s| s.split_whitespace().nth(1))
            .and_then(|s| s.parse::<u32>().ok());
        if ppid != Some(mpirun) {
            continue;
        }
        let env = std::fs::read(e.path().join("environ")).unwrap_or_default();
        let rank = env
            .split(|&b| b == 0)
            .filter_map(|kv| std::str::from_utf8(kv).ok())
            .find_map(|kv| kv.strip_prefix("OMPI_COMM_WORLD_RANK="))
            .and_then(|r| r.parse().ok());
        if let Some(r) = rank {
            out.push((r, pid));
        }
    }
    out.sort();
    out
}

/// Starts `mpirun -np 2` on `cfg` with steps slowed down, waits for rank 0 to log step 1, and
/// sends `signal` to rank 1; returns mpirun's output and how long it ran after the signal.
fn signal_rank_one(cfg: &Path, run: &Path, signal: &str, extra: &[&str]) -> (Output, Duration) {
    signal_one(cfg, run, signal, extra, false)
}

/// [`signal_rank_one`], or with `to_mpirun` the signal sent to mpirun itself.
fn signal_one(
    cfg: &Path,
    run: &Path,
    signal: &str,
    extra: &[&str],
    to_mpirun: bool,
) -> (Output, Duration) {
    let child = mpirun_command(2, cfg, extra, &[("SFT_TEST_STEP_DELAY_MS", "400")])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    let metrics = run.join("metrics.jsonl");
    while !std::fs::read_to_string(&metrics).is_ok_and(|m| m.contains("\"step\":1,")) {
        assert!(started.elapsed() < Duration::from_secs(120), "no step 1");
        std::thread::sleep(Duration::from_millis(20));
    }
    let ranks = ranks(child.id());
    assert_eq!(ranks.len(), 2, "{ranks:?}");
    let target = if to_mpirun { child.id() } else { ranks[1].1 };
    let st = Command::new("kill")
        .args([signal, &target.to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    let t = Instant::now();
    // Never hang the suite: a run still going two minutes after the signal has failed.
    let mut child = child;
    while child.try_wait().unwrap().is_none() {
        if t.elapsed() > Duration::from_secs(120) {
            let pids = ranks.iter().map(|r| r.1.to_string());
            let _ = Command::new("kill").arg("-9").args(pids).status();
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "mpirun still running 2 minutes after {signal} to rank 1:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    (out, t.elapsed())
}

/// SIGTERM to one rank: both stop after the same step, rank 0 checkpoints it, both exit 130;
/// the resumed 2-rank run ends with the uninterrupted run's losses and weights.
#[test]
fn sigterm_on_one_rank_stops_both_and_the_resumed_run_matches() {
    let vars = |accum| [("kind", "lora"), ("pack", "false"), ("accum", accum)];
    let (one, cfg1) = tiny_run("data_parallel.yaml", &vars("2"));
    assert_ok(&single(&cfg1, &[], &[]));
    let (two, cfg2) = tiny_run("data_parallel.yaml", &vars("1"));
    let (out, _) = signal_rank_one(&cfg2, &run_dir(&two), "-TERM", &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{err}");
    let state: serde_json::Value = serde_json::from_slice(
        &std::fs::read(run_dir(&two).join("latest/trainer_state.json")).unwrap(),
    )
    .unwrap();
    let at = state["step"].as_u64().unwrap();
    assert!((1..4).contains(&at), "interrupted at step {at}");
    assert!(
        losses(&run_dir(&two))
            .last()
            .unwrap()
            .starts_with(&format!("{at}:")),
        "rank 0 logged no step past the checkpoint"
    );
    assert_ok(&mpirun(2, &cfg2, &["--resume"], &[]));
    assert_eq!(losses(&run_dir(&one)), losses(&run_dir(&two)));
    assert!(
        weights(&run_dir(&one), "step-000004", "lora")
            == weights(&run_dir(&two), "step-000004", "lora")
    );
}

/// SIGUSR1 to mpirun (which passes it on to every rank; SIGTERM to mpirun ends the job at
/// once): every rank stops after the same step, rank 0 checkpoints it, all exit 130.
#[test]
fn sigusr1_to_mpirun_checkpoints_and_stops_every_rank() {
    let (t, cfg) = tiny_run(
        "data_parallel.yaml",
        &[("kind", "lora"), ("pack", "false"), ("accum", "1")],
    );
    let extra = ["--set", "train.max_steps=40"];
    let (out, _) = signal_one(&cfg, &run_dir(&t), "-USR1", &extra, true);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{err}");
    let state: serde_json::Value = serde_json::from_slice(
        &std::fs::read(run_dir(&t).join("latest/trainer_state.json")).unwrap(),
    )
    .unwrap();
    let at = state["step"].as_u64().unwrap();
    assert!((1..40).contains(&at), "stopped at step {at}");
    assert!(losses(&run_dir(&t))
        .last()
        .unwrap()
        .starts_with(&format!("{at}:")));
}

/// kill -9 of one rank: the other does not wait for it forever.
#[test]
fn a_killed_rank_ends_the_run_within_a_minute() {
    let (t, cfg) = tiny_run(
        "data_parallel.yaml",
        &[("kind", "lora"), ("pack", "false"), ("accum", "1")],
    );
    let (out, took) = signal_rank_one(
        &cfg,
        &run_dir(&t),
        "-KILL",
        &["--set", "train.max_steps=200"],
    );
    assert!(!out.status.success());
    assert!(took < Duration::from_secs(60), "{took:?}");
}

/// A 2-rank checkpoint resumes on 1 rank with the same global batch (accumulation 2) and
/// continues the same run; another global batch is refused, saying why.
#[test]
fn a_two_rank_checkpoint_resumes_on_one_rank_with_the_same_global_batch() {
    let vars = |accum| [("kind", "full"), ("pack", "false"), ("accum", accum)];
    let (one, cfg1) = tiny_run("data_parallel.yaml", &vars("2"));
    assert_ok(&single(&cfg1, &[], &[]));
    let (two, cfg2) = tiny_run("data_parallel.yaml", &vars("1"));
    let out = mpirun(2, &cfg2, &[], &[("SFT_TEST_STOP_AT_STEP", "2")]);
    assert_eq!(out.status.code(), Some(130));
    // On 1 rank with accumulation 1: half the global batch.
    let out = single(&cfg2, &["--resume"], &[]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("global batch is 4 sequences") && err.contains("grad_accum x world = 2"),
        "{err}"
    );
    let out = single(&cfg2, &["--resume", "--set", "train.grad_accum=2"], &[]);
    assert_ok(&out);
    assert_eq!(losses(&run_dir(&one)), losses(&run_dir(&two)));
    assert!(
        weights(&run_dir(&one), "step-000004", "full")
            == weights(&run_dir(&two), "step-000004", "full")
    );
}

/// The files a checkpoint's trainer_state.json lists with their SHA-256.
fn listed_files(step_dir: &Path) -> Vec<String> {
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(step_dir.join("trainer_state.json")).unwrap())
            .unwrap();
    state["files"]
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect()
}

const SHARDED: [&str; 2] = ["--set", "train.shard_optimizer=true"];

/// The sharded optimizer (ZeRO stage 1) against the replicated one, 2 ranks each: the same
/// losses and weights, bit for bit (the same element-wise AdamW arithmetic); each rank's
/// shard in the checkpoint, listed and hashed, and no replicated optimizer file.
#[test]
fn sharded_moments_train_the_replicated_lora_run() {
    let vars = [("kind", "lora"), ("pack", "false"), ("accum", "1")];
    let (rep, cfg1) = tiny_run("data_parallel.yaml", &vars);
    assert_ok(&mpirun(2, &cfg1, &[], &[]));
    let (sh, cfg2) = tiny_run("data_parallel.yaml", &vars);
    assert_ok(&mpirun(2, &cfg2, &SHARDED, &[]));
    assert_eq!(losses(&run_dir(&rep)), losses(&run_dir(&sh)));
    for step in ["step-000002", "step-000004"] {
        assert!(
            weights(&run_dir(&rep), step, "lora") == weights(&run_dir(&sh), step, "lora"),
            "weights at {step}"
        );
        let dir = run_dir(&sh).join(step);
        let listed = listed_files(&dir);
        for f in [
            "optimizer-shard-0-of-2.safetensors",
            "optimizer-shard-1-of-2.safetensors",
        ] {
            assert!(listed.iter().any(|l| l == f), "{f} not in {listed:?}");
        }
        assert!(!dir.join("optimizer.safetensors").exists());
    }
    // No staged shard left behind in the run folder.
    let left: Vec<String> = std::fs::read_dir(run_dir(&sh))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("optimizer-shard"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

/// Full fine-tuning, sharded over 2 ranks, stopped at step 2 and resumed on 2 ranks: the
/// losses and weights of the uninterrupted replicated run.
#[test]
fn sharded_full_run_resumed_on_two_ranks_matches_the_replicated_run() {
    let vars = [("kind", "full"), ("pack", "false"), ("accum", "1")];
    let (rep, cfg1) = tiny_run("data_parallel.yaml", &vars);
    assert_ok(&mpirun(2, &cfg1, &[], &[]));
    let (sh, cfg2) = tiny_run("data_parallel.yaml", &vars);
    let out = mpirun(2, &cfg2, &SHARDED, &[("SFT_TEST_STOP_AT_STEP", "2")]);
    assert_eq!(
        out.status.code(),
        Some(130),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let resume = [SHARDED[0], SHARDED[1], "--resume"];
    assert_ok(&mpirun(2, &cfg2, &resume, &[]));
    assert_eq!(losses(&run_dir(&rep)), losses(&run_dir(&sh)));
    for step in ["step-000002", "step-000004"] {
        assert!(
            weights(&run_dir(&rep), step, "full") == weights(&run_dir(&sh), step, "full"),
            "weights at {step}"
        );
    }
}

/// A checkpoint whose moments are sharded over 2 ranks resumes on 1 rank (the same global
/// batch): the shards are re-partitioned, and the run ends as the uninterrupted 1-process run.
/// Resuming it with the replicated optimizer is refused, saying which setting resumes it.
#[test]
fn a_sharded_two_rank_checkpoint_resumes_on_one_rank() {
    let vars = |accum| [("kind", "full"), ("pack", "false"), ("accum", accum)];
    let (one, cfg1) = tiny_run("data_parallel.yaml", &vars("2"));
    assert_ok(&single(&cfg1, &[], &[]));
    let (two, cfg2) = tiny_run("data_parallel.yaml", &vars("1"));
    let out = mpirun(2, &cfg2, &SHARDED, &[("SFT_TEST_STOP_AT_STEP", "2")]);
    assert_eq!(
        out.status.code(),
        Some(130),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = single(&cfg2, &["--resume", "--set", "train.grad_accum=2"], &[]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("sharded over ranks") && err.contains("train.shard_optimizer: true"),
        "{err}"
    );
    let resume = [
        SHARDED[0],
        SHARDED[1],
        "--resume",
        "--set",
        "train.grad_accum=2",
    ];
    assert_ok(&single(&cfg2, &resume, &[]));
    assert_eq!(losses(&run_dir(&one)), losses(&run_dir(&two)));
    assert!(
        weights(&run_dir(&one), "step-000004", "full")
            == weights(&run_dir(&two), "step-000004", "full")
    );
    // The resumed segment saved one shard (world 1).
    let listed = listed_files(&run_dir(&two).join("step-000004"));
    assert!(
        listed
            .iter()
            .any(|l| l == "optimizer-shard-0-of-1.safetensors"),
        "{listed:?}"
    );
}

/// `--dry-run` shows each rank's optimizer memory, replicated or sharded; the sharded
/// optimizer is refused on a GPU, saying why.
#[test]
fn dry_run_shows_the_optimizer_memory_per_rank() {
    let (_t, cfg) = tiny_run(
        "data_parallel.yaml",
        &[("kind", "full"), ("pack", "false"), ("accum", "1")],
    );
    let plan = json_last(&mpirun(2, &cfg, &["--dry-run"], &[]));
    let sharded = json_last(&mpirun(
        2,
        &cfg,
        &["--dry-run", SHARDED[0], SHARDED[1]],
        &[],
    ));
    let mem = |p: &serde_json::Value, k: &str| p["memory_bytes"][k].as_u64().unwrap();
    let full = mem(&plan, "optimizer");
    assert!(full > 0, "{plan}");
    assert_eq!(mem(&plan, "optimizer_replicated"), full);
    assert_eq!(mem(&sharded, "optimizer_replicated"), full);
    // Two ranks: each holds half (the larger half when the count is odd).
    let n = plan["trainable_params"].as_u64().unwrap();
    assert_eq!(
        mem(&sharded, "optimizer"),
        full / n * n.div_ceil(2),
        "{sharded}"
    );
    assert_eq!(mem(&plan, "optimizer_sharded"), mem(&sharded, "optimizer"));
    assert_eq!(sharded["shard_optimizer"], true);
    let out = single(
        &cfg,
        &[
            "--dry-run",
            SHARDED[0],
            SHARDED[1],
            "--set",
            "model.device=cuda",
        ],
        &[],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("train.shard_optimizer") && err.contains("CPU ranks only"),
        "{err}"
    );
}

/// The NCCL check hook is never ignored: on a CPU model it is refused, saying why (a build
/// without NCCL refuses it too; scripts/gpu-check's nccl stage checks that on the GPU).
#[test]
fn nccl_alone_is_refused_on_the_cpu() {
    let (_t, cfg) = tiny_run(
        "data_parallel.yaml",
        &[("kind", "lora"), ("pack", "false"), ("accum", "1")],
    );
    let out = single(&cfg, &[], &[("SFT_TEST_NCCL_ALONE", "1")]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("NCCL sums CUDA tensors"), "{err}");
}
