//! scripts/slurm/groovy.sbatch run as Slurm runs it, on CPU with a tiny model and a config of
//! the same shape as groovy.yaml: started with `--resume` before any checkpoint exists, stopped
//! by SIGTERM in the middle (the time-limit warning sent to the batch shell only, as
//! `--signal=B:TERM@120` does; then a preemption, where every process of the job gets it),
//! started again each time as a requeued job does, it ends with the losses and weights of an
//! uninterrupted run.
mod common;
use common::*;
use serde_json::Value;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The job script, as `sbatch` would start it, with sft-train and the config given by the
/// variables the script reads. `slurm`: a job id and a folder whose `scontrol` stands in for
/// Slurm's (it answers `show job` with the state in its file `state` and appends every
/// `requeue` to its file `requeued`).
fn job(cfg: &Path, slurm: Option<&Path>, env: &[(&str, &str)]) -> Child {
    let mut c = Command::new("bash");
    c.arg(repo().join("scripts/slurm/groovy.sbatch"))
        .current_dir(repo())
        .env("SFT_TRAIN", env!("CARGO_BIN_EXE_sft-train"))
        .env("SFT_CONFIG", cfg)
        .env("RUST_LOG", "info")
        .env_remove("SLURM_JOB_ID")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        c.env(k, v);
    }
    if let Some(bin) = slurm {
        let path = std::env::var("PATH").unwrap_or_default();
        c.env("SLURM_JOB_ID", "4242")
            .env("PATH", format!("{}:{path}", bin.display()));
    }
    c.spawn().unwrap()
}

fn steps_logged(run: &Path) -> usize {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .map(|s| {
            s.lines()
                .filter_map(|l| serde_json::from_str::<Value>(l).ok())
                .filter(|v| v.get("loss").is_some())
                .count()
        })
        .unwrap_or(0)
}

/// Wait until metrics.jsonl holds `n` training steps (the event the signal waits for).
fn wait_for_steps(run: &Path, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(300);
    while steps_logged(run) < n {
        assert!(
            Instant::now() < deadline,
            "no step {n} in {}",
            run.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The process whose parent is `pid` (sft-train under the batch shell).
fn child_of(pid: u32) -> u32 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        for e in std::fs::read_dir("/proc").unwrap().filter_map(Result::ok) {
            let Ok(p) = e.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat")) else {
                continue;
            };
            // pid (comm) state ppid ...: comm may hold spaces, so split after the last ')'.
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                .and_then(|s| s.parse::<u32>().ok());
            if ppid == Some(pid) {
                return p;
            }
        }
        assert!(Instant::now() < deadline, "no child of {pid}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn term(pid: u32) {
    let st = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert!(st.success());
}

fn finished(child: Child) -> (Output, String) {
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    (out, stderr)
}

fn status(run: &Path) -> Value {
    let s: Value =
        serde_json::from_slice(&std::fs::read(run.join("summary.json")).unwrap()).unwrap();
    s["status"].clone()
}

/// Steps slowed so that a signal sent once a step is logged lands before the run ends.
const SLOW: &[(&str, &str)] = &[("SFT_TEST_STEP_DELAY_MS", "300")];

/// The uninterrupted run's losses and final adapter, computed once for the tests here.
fn reference() -> &'static (Vec<String>, Vec<u8>) {
    static REF: std::sync::OnceLock<(Vec<String>, Vec<u8>)> = std::sync::OnceLock::new();
    REF.get_or_init(|| {
        let (r, cfg) = tiny_run("slurm_job.yaml", &[]);
        assert_ok(&train(&cfg, &[], &[]));
        let run = r.path().join("ck/groovy");
        let w = std::fs::read(run.join("step-000010/adapter_model.safetensors")).unwrap();
        (losses(&run), w)
    })
}

fn final_adapter(run: &Path) -> Vec<u8> {
    std::fs::read(run.join("step-000010/adapter_model.safetensors")).unwrap()
}

#[test]
fn the_job_survives_a_time_limit_and_a_preemption() {
    let reference = reference();
    let (t, cfg) = tiny_run("slurm_job.yaml", &[]);
    let run = t.path().join("ck/groovy");
    let slurm = t.path().join("slurm-bin");
    std::fs::create_dir_all(&slurm).unwrap();
    std::fs::write(
        slurm.join("scontrol"),
        format!(
            "#!/bin/sh\ncase \"$1\" in\n  show) echo \"JobId=$3 JobState=$(cat {d}/state)\" ;;\n  \
             requeue) echo \"$2\" >> {d}/requeued ;;\nesac\n",
            d = slurm.display()
        ),
    )
    .unwrap();
    Command::new("chmod")
        .arg("+x")
        .arg(slurm.join("scontrol"))
        .status()
        .unwrap();

    // Start 1, under "Slurm": no checkpoint yet, `--resume` starts fresh. The time-limit
    // warning reaches the batch shell only; it forwards SIGTERM, sft-train checkpoints, and the
    // job, still RUNNING, requeues itself.
    std::fs::write(slurm.join("state"), "RUNNING").unwrap();
    let first = job(&cfg, Some(&slurm), SLOW);
    wait_for_steps(&run, 2);
    term(first.id());
    let (out, stderr) = finished(first);
    assert_eq!(out.status.code(), Some(130), "{stderr}");
    assert!(
        stderr.contains("no checkpoint in") && stderr.contains("starting a fresh run"),
        "{stderr}"
    );
    assert!(
        stderr.contains("asking sft-train to checkpoint"),
        "{stderr}"
    );
    assert_eq!(status(&run), "interrupted");
    let stopped_at = steps_logged(&run);
    assert!(
        run.join(format!("step-{stopped_at:06}")).is_dir(),
        "{stderr}"
    );
    assert_eq!(
        std::fs::read_to_string(slurm.join("requeued")).unwrap(),
        "4242\n",
        "a job stopped before its time limit requeues itself"
    );

    // Start 2 (the requeued job): a preemption. Slurm sends SIGTERM to every process of the
    // job: sft-train gets it directly and again from the batch shell, and checkpoints once.
    // Slurm requeues a preempted job itself (its state is no longer RUNNING): the script
    // does not.
    std::fs::write(slurm.join("state"), "PENDING").unwrap();
    let second = job(&cfg, Some(&slurm), SLOW);
    wait_for_steps(&run, stopped_at + 2);
    let train_pid = child_of(second.id());
    term(train_pid);
    term(second.id());
    let (out, stderr) = finished(second);
    assert_eq!(out.status.code(), Some(130), "{stderr}");
    assert!(stderr.contains("resumed from"), "{stderr}");
    assert_eq!(status(&run), "interrupted", "{stderr}");
    let stopped_again = steps_logged(&run);
    assert!(stopped_again > stopped_at && stopped_again < 10, "{stderr}");
    assert!(run.join(format!("step-{stopped_again:06}")).is_dir());
    assert_eq!(
        std::fs::read_to_string(slurm.join("requeued")).unwrap(),
        "4242\n"
    );

    // Start 3, outside Slurm: it runs to the end, as if never interrupted.
    let (out, stderr) = finished(job(&cfg, None, &[]));
    assert!(out.status.success(), "{stderr}");
    assert_eq!(status(&run), "finished");
    assert_eq!(losses(&run), reference.0);
    assert_eq!(final_adapter(&run), reference.1);
    // A job that starts again after its run finished does not train on.
    let (out, stderr) = finished(job(&cfg, None, &[]));
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("already stopped"), "{stderr}");
    assert_eq!(losses(&run), reference.0);
}

#[test]
fn resume_from_a_missing_checkpoint_folder_is_an_error() {
    let (t, cfg) = tiny_run("slurm_job.yaml", &[]);
    let missing = t.path().join("ck/groovy/step-000099");
    let out = train(&cfg, &["--resume", &missing.display().to_string()], &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&missing.display().to_string()) && stderr.contains("No such file"),
        "{stderr}"
    );
}

#[test]
fn a_job_stopped_during_its_first_evaluations_does_not_repeat_them() {
    let reference = reference();
    let (t, cfg) = tiny_run("slurm_job.yaml", &[]);
    let run = t.path().join("ck/groovy");
    // Stopped (as by SIGTERM) once the base model's evaluations are logged, before step 1.
    let (out, stderr) = finished(job(&cfg, None, &[("SFT_TEST_STOP_AT_STEP", "0")]));
    assert_eq!(out.status.code(), Some(130), "{stderr}");
    assert!(run.join("step-000000").is_dir(), "{stderr}");
    assert_eq!(steps_logged(&run), 0);
    // Started again: the checkpoint at step 0 holds those evaluations; they are not run and
    // logged a second time.
    let (out, stderr) = finished(job(&cfg, None, &[]));
    assert!(out.status.success(), "{stderr}");
    assert_eq!(losses(&run), reference.0);
    assert_eq!(final_adapter(&run), reference.1);
}
