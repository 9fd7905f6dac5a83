//! The trainer end to end through `sft-train` on a tiny random LLaMA: interrupted and resumed
//! runs (by signal, by a test hook, by a crash inside a checkpoint write, with a corrupted
//! latest checkpoint) reproduce the uninterrupted run bit for bit; config errors and the dry
//! run speak clearly.
mod common;
use common::*;
use serde_json::Value;
use std::path::Path;
use std::process::Command;

fn weights(run: &Path, kind: &str) -> Vec<u8> {
    let f = if kind == "full" {
        "model.safetensors"
    } else {
        "adapter_model.safetensors"
    };
    std::fs::read(run.join("step-000008").join(f)).unwrap()
}

/// The uninterrupted run's losses and final weights (`set`: `--set` overrides).
fn reference(kind: &str, set: &[&str]) -> (tempfile::TempDir, Vec<String>, Vec<u8>) {
    let (t, cfg) = tiny_run("train_resume.yaml", &[("kind", kind)]);
    let out = train(&cfg, set, &[]);
    assert_ok(&out);
    let run = t.path().join("ck/r");
    (t, losses(&run), weights(&run, kind))
}

/// `--set KEY=VALUE` arguments for each override.
fn sets(overrides: &[&str]) -> Vec<String> {
    overrides
        .iter()
        .flat_map(|o| ["--set".to_string(), o.to_string()])
        .collect()
}

fn resumed_matches(kind: &str, overrides: &[&str]) {
    let set = sets(overrides);
    let set: Vec<&str> = set.iter().map(String::as_str).collect();
    let with = |extra: &[&'static str]| -> Vec<&str> {
        set.iter().copied().chain(extra.iter().copied()).collect()
    };
    let (_keep, ref_losses, ref_weights) = reference(kind, &set);
    let first_loss = ref_losses[0].clone();

    // Interrupted by the test hook (as SIGINT would) after step 3, resumed.
    let (t, cfg) = tiny_run("train_resume.yaml", &[("kind", kind)]);
    let out = train(&cfg, &set, &[("SFT_TEST_STOP_AT_STEP", "3")]);
    assert_eq!(
        out.status.code(),
        Some(130),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = train(&cfg, &with(&["--resume"]), &[]);
    assert_ok(&out);
    let run = t.path().join("ck/r");
    assert_eq!(
        losses(&run),
        ref_losses,
        "{kind}: losses after stop at 3 + resume"
    );
    assert_eq!(weights(&run, kind), ref_weights, "{kind}: final weights");
    // The held-out loss before training, then step 1.
    assert!(
        first_loss.starts_with("0:") && ref_losses[1].starts_with("1:"),
        "{ref_losses:?}"
    );

    // A crash inside the checkpoint write at step 6 (after step 4's checkpoint): the torn
    // folder is never used; resuming from step 4 reproduces the run.
    let (t, cfg) = tiny_run("train_resume.yaml", &[("kind", kind)]);
    let out = train(&cfg, &set, &[("SFT_TEST_FAIL_CHECKPOINT_AT_STEP", "6")]);
    assert!(!out.status.success());
    let run = t.path().join("ck/r");
    assert!(
        run.join(".tmp-step-000006").exists(),
        "the half-written checkpoint stays aside"
    );
    assert_eq!(
        std::fs::read_link(run.join("latest")).unwrap(),
        Path::new("step-000004")
    );
    let out = train(&cfg, &with(&["--resume"]), &[]);
    assert_ok(&out);
    assert_eq!(
        losses(&run),
        ref_losses,
        "{kind}: losses after a crash mid-save"
    );
    assert_eq!(weights(&run, kind), ref_weights);
}

#[test]
fn full_fine_tuning_resumes_bit_for_bit() {
    resumed_matches("full", &[]);
}

#[test]
fn corrupted_latest_checkpoint_falls_back_to_the_previous_one() {
    let (_keep, ref_losses, ref_weights) = reference("full", &[]);
    let (t, cfg) = tiny_run("train_resume.yaml", &[("kind", "full")]);
    let out = train(&cfg, &[], &[("SFT_TEST_STOP_AT_STEP", "5")]);
    assert_eq!(out.status.code(), Some(130));
    let run = t.path().join("ck/r");
    // Step 5's checkpoint (the interruption's) is the latest: flip a byte in its weights.
    let f = run.join("step-000005/model.safetensors");
    let mut bytes = std::fs::read(&f).unwrap();
    let n = bytes.len();
    bytes[n - 3] ^= 0x55;
    std::fs::write(&f, bytes).unwrap();
    let out = train(&cfg, &["--resume"], &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("checksum mismatch"), "{stderr}");
    assert_eq!(losses(&run), ref_losses);
    assert_eq!(weights(&run, "full"), ref_weights);
}

#[test]
fn sigterm_checkpoints_and_resume_continues() {
    let (_keep, ref_losses, ref_weights) = reference("full", &[]);
    let (t, cfg) = tiny_run("train_resume.yaml", &[("kind", "full")]);
    // The run pauses after step 2 until it is signalled (a test hook); the test waits for the
    // event "step 2 logged" on stderr, not for a time, then sends SIGTERM.
    let mut child = Command::new(env!("CARGO_BIN_EXE_sft-train"))
        .arg("--config")
        .arg(&cfg)
        .env("RUST_LOG", "info")
        .env("SFT_TEST_PAUSE_AFTER_STEP", "2")
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let run = t.path().join("ck/r");
    let (tx, rx) = std::sync::mpsc::channel();
    let stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        use std::io::BufRead;
        let mut all = String::new();
        for line in std::io::BufReader::new(stderr).lines() {
            let line = line.unwrap_or_default();
            if line.contains("step 2/8") {
                let _ = tx.send(());
            }
            all.push_str(&line);
            all.push('\n');
        }
        all
    });
    if rx
        .recv_timeout(std::time::Duration::from_secs(300))
        .is_err()
    {
        let _ = child.kill();
        let _ = child.wait();
        panic!(
            "step 2 was never logged within the deadline:\n{}",
            reader.join().unwrap()
        );
    }
    let st = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    let status = child.wait().unwrap();
    let log = reader.join().unwrap();
    assert_eq!(status.code(), Some(130), "{log}");
    // Interrupted right after step 2, as signalled: steps 1 and 2 logged, nothing more.
    let steps: Vec<u64> = std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v.get("loss").is_some())
        .filter_map(|v| v["step"].as_u64())
        .collect();
    assert_eq!(steps, [1, 2], "{log}");
    let summary: Value =
        serde_json::from_slice(&std::fs::read(run.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["status"], "interrupted");
    let out = train(&cfg, &["--resume"], &[]);
    assert_ok(&out);
    assert_eq!(losses(&run), ref_losses);
    assert_eq!(weights(&run, "full"), ref_weights);
}

#[test]
fn resume_refuses_a_changed_model_or_data_and_allows_more_steps() {
    let (t, cfg) = tiny_run("train_resume.yaml", &[("kind", "full")]);
    assert!(train(&cfg, &[], &[]).status.success());
    let out = train(&cfg, &["--resume", "--set", "data.max_length=64"], &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("changes what was trained") && stderr.contains("data.max_length: 96 -> 64"),
        "{stderr}"
    );
    // The finished run does not train on unless the limits grow.
    let out = train(&cfg, &["--resume"], &[("RUST_LOG", "info")]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("already stopped"));
    let out = train(&cfg, &["--resume", "--set", "train.max_steps=10"], &[]);
    assert_ok(&out);
    let run = t.path().join("ck/r");
    assert!(run.join("step-000010").is_dir());
}

#[test]
fn config_errors_name_the_field_and_line() {
    let t = tempfile::tempdir().unwrap();
    let p = t.path().join("bad.yaml");
    std::fs::write(
        &p,
        "run:\n  name: x\nmodel:\n  source: m\ndata:\n  sources: []\ntrain:\n  lr: fast\n",
    )
    .unwrap();
    let out = train(&p, &[], &[]);
    assert_eq!(out.status.code(), Some(1));
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(
        e.contains("bad.yaml") && e.contains("train.lr") && e.contains("line 8"),
        "{e}"
    );
}

#[test]
fn dry_run_prints_the_plan_and_memory() {
    let (t, cfg) = tiny_run("train_resume.yaml", &[("kind", "full")]);
    let out = train(&cfg, &["--dry-run"], &[]);
    // The text for people on stderr, the numbers as JSON on stdout.
    let s = String::from_utf8_lossy(&out.stderr);
    let numbers = json_last(&out);
    assert_eq!(numbers["steps"], 8, "{numbers}");
    assert_eq!(numbers["trainable_params"], 3219776, "{numbers}");
    assert!(s.contains("optimizer steps  8"), "{s}");
    // 3,219,776 f32 parameters: 12.3 MiB of weights, 8 bytes each of moments.
    assert!(
        s.contains("trainable") && s.contains("(3219776 parameters)"),
        "{s}"
    );
    assert!(
        !t.path().join("ck/r").join("step-000002").exists(),
        "a dry run trains nothing"
    );
}

#[test]
fn lora_with_dropout_resumes_bit_for_bit() {
    resumed_matches("lora", &[]);
}

/// QLoRA: LoRA over NF4 (double-quantized) and Q8_0 blocks resumes as LoRA does.
#[test]
fn qlora_resumes_bit_for_bit() {
    resumed_matches("lora", &["model.quantize=nf4", "model.double_quant=true"]);
    resumed_matches("lora", &["model.quantize=q8_0"]);
    // The setting takes effect: NF4 trains other losses than the dense base.
    let (_a, dense, _) = reference("lora", &[]);
    let (_b, nf4, _) = reference("lora", &["--set", "model.quantize=nf4"]);
    assert_ne!(dense[1..], nf4[1..], "NF4 trained the dense run's losses");
}

#[test]
fn packed_lora_resumes_bit_for_bit() {
    resumed_matches("lora", &["data.pack=true"]);
}

/// Recomputing each layer in the backward changes what is stored, not what is computed.
#[test]
fn gradient_checkpointing_trains_the_same_run() {
    for kind in ["lora", "full"] {
        let (_a, plain, plain_w) = reference(kind, &[]);
        let (_b, ckpt, ckpt_w) = reference(kind, &["--set", "train.gradient_checkpointing=true"]);
        assert_eq!(ckpt, plain, "{kind}: losses with gradient checkpointing");
        assert_eq!(ckpt_w, plain_w, "{kind}: final weights");
    }
}

/// Packed rows hold several examples: fewer rows, more examples per step, and each example
/// still trains on its own response tokens.
#[test]
fn packing_puts_more_examples_in_each_step() {
    let examples = |set: &[&str]| -> (u64, f64) {
        let (t, cfg) = tiny_run("train_resume.yaml", &[("kind", "lora")]);
        let out = train(&cfg, set, &[]);
        assert_ok(&out);
        let text = std::fs::read_to_string(t.path().join("ck/r/metrics.jsonl")).unwrap();
        let last: Value = text
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .rfind(|v| v.get("loss").is_some() && v["step"] == 8)
            .expect("step 8 logged");
        (
            last["examples"].as_u64().expect("examples"),
            last["loss"].as_f64().expect("loss"),
        )
    };
    let (plain, plain_loss) = examples(&[]);
    let (packed, packed_loss) = examples(&["--set", "data.pack=true"]);
    // Unpacked: at most micro_batch_size x grad_accum examples a step (an epoch's last batch
    // may be short).
    assert!(plain <= 8 * 2 * 2, "unpacked {plain}");
    assert!(packed > plain, "packed {packed} examples, unpacked {plain}");
    assert!(packed_loss.is_finite() && plain_loss.is_finite());
}
