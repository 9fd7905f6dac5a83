//! The trainer's extension points through their public traits alone: a third evaluator (a
//! tiny one written here) beside IFS and ObjecQA, and a second stop rule beside the plateau
//! rule. The trainer runs them on their own schedule, logs the evaluator's scores, stops where
//! the rule says, keeps the rule's state in its checkpoints and restores it on resume. Also
//! the config's second rule, patience on the held-out loss, through `sft-train`.
mod common;
use common::*;
use serde_json::Value;
use sft_eval::{Answer, BoxError, EvalReport, Evaluator};
use sft_trainer::config::{Config, GenEvalConfig};
use sft_trainer::evals::Scheduled;
use sft_trainer::state::{Chosen, EvalRecord};
use sft_trainer::stop::{Decision, StopRule};
use sft_trainer::summary::Summary;
use sft_trainer::{Outcome, Resume, RunOptions};
use std::path::Path;

/// The mean length in words of the model's answers to two instructions.
struct Words;

impl Evaluator for Words {
    fn name(&self) -> &str {
        "words"
    }

    fn evaluate(&mut self, model: &mut dyn Answer, out_dir: &Path) -> Result<EvalReport, BoxError> {
        let asked = ["Name a colour.".to_string(), "Count to three.".to_string()];
        let answers = model.answer(&asked, 6)?;
        let words: usize = answers.iter().map(|a| a.split_whitespace().count()).sum();
        let mean = words as f64 / answers.len() as f64;
        std::fs::create_dir_all(out_dir)?;
        std::fs::write(out_dir.join("words.json"), serde_json::to_vec(&answers)?)?;
        let mut r = EvalReport {
            primary: mean,
            ..Default::default()
        };
        r.scores.insert("words".into(), mean);
        r.scores
            .insert("words_answers".into(), answers.len() as f64);
        Ok(r)
    }
}

/// Stops once evaluator `eval` has run `after` times, choosing the last one's checkpoint.
struct StopAfter {
    eval: String,
    after: u64,
    seen: u64,
}

impl StopRule for StopAfter {
    fn name(&self) -> &str {
        "stop_after"
    }

    fn observe(&mut self, e: &EvalRecord) -> Decision {
        if e.name != self.eval {
            return Decision::Continue;
        }
        self.seen += 1;
        if self.seen < self.after {
            return Decision::Continue;
        }
        Decision::Stop {
            reason: format!("{} has run {} times", self.eval, self.seen),
            chosen: Some(Chosen {
                step: e.step,
                link: "words-stop".into(),
            }),
        }
    }

    fn state(&self) -> Value {
        self.seen.into()
    }

    fn restore(&mut self, state: Value) -> Result<(), String> {
        self.seen = state.as_u64().ok_or("expected a count")?;
        Ok(())
    }
}

fn config(dir: &Path, model: &Path) -> Config {
    let yaml = config_text("custom_evaluation.yaml", dir, model, &[]);
    Config::from_yaml(&yaml, "ext.yaml", &[]).unwrap()
}

/// The config's evaluators and rules plus the test's, through the library.
fn train(cfg: &Config, opts: RunOptions) -> (Outcome, Summary) {
    let cfg = cfg.clone();
    std::thread::Builder::new()
        .stack_size(256 << 20)
        .spawn(move || {
            let mut evaluators = sft_trainer::evals::from_config(&cfg).unwrap();
            evaluators.push(Scheduled::new(
                Box::new(Words),
                GenEvalConfig {
                    every_examples: 8,
                    batch_size: 2,
                    ..Default::default()
                },
            ));
            let mut rules = sft_trainer::stop::from_config(&cfg);
            rules.push(Box::new(StopAfter {
                eval: "words".into(),
                after: 4,
                seen: 0,
            }));
            sft_trainer::train_with(&cfg, &opts, evaluators, rules).unwrap()
        })
        .unwrap()
        .join()
        .unwrap()
}

fn evals(run: &Path, name: &str) -> Vec<Value> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|r| r["eval"] == name)
        .collect()
}

fn steps(recs: &[Value]) -> Vec<u64> {
    recs.iter().map(|r| r["step"].as_u64().unwrap()).collect()
}

#[test]
fn a_third_evaluator_and_a_second_stop_rule_through_the_public_traits() {
    let t = tempfile::tempdir().unwrap();
    let model = tiny_model(t.path());
    let cfg = config(t.path(), &model);
    let run = t.path().join("ck/ext");
    let (outcome, summary) = train(&cfg, RunOptions::default());
    assert_eq!(outcome, Outcome::Stopped);
    // `words` every 8 examples (2 steps) from the start: its 4th run, at step 6, stops the run.
    let words = evals(&run, "words");
    assert_eq!(steps(&words), [0, 2, 4, 6], "{words:?}");
    assert!(words.iter().all(|r| r["words"].is_number()
        && r["words_answers"] == 2.0
        && r["examples"] == r["step"].as_u64().unwrap() * 4));
    // IFS and ObjecQA ran on their own schedule beside it.
    assert_eq!(steps(&evals(&run, "ifs")), [0, 4]);
    assert_eq!(steps(&evals(&run, "objecqa")), [0, 4]);
    assert!(run.join("evals/step-000006/words.json").is_file());
    let s = serde_json::to_value(&summary).unwrap();
    assert_eq!(s["status"], "stopped");
    assert_eq!(s["stop_reason"], "words has run 4 times");
    assert_eq!(s["steps"], 6);
    assert_eq!(s["words_curve"].as_array().unwrap().len(), 4);
    assert_eq!(s["ifs_curve"].as_array().unwrap().len(), 2);
    assert_eq!(s["words_stop_checkpoint"], "step-000006");
    assert_eq!(s["chosen_checkpoint"], "step-000006");
    assert_eq!(
        std::fs::read_link(run.join("words-stop")).unwrap(),
        Path::new("step-000006")
    );
    // Both rules' states are in the checkpoint.
    let state: Value =
        serde_json::from_slice(&std::fs::read(run.join("step-000006/trainer_state.json")).unwrap())
            .unwrap();
    assert_eq!(state["state"]["stop_rules"]["stop_after"], 4);
    assert!(state["state"]["stop_rules"]["plateau"]["history"].is_array());

    // Interrupted after step 3 (two `words` runs seen), resumed with a fresh rule: the restored
    // count stops the run at step 6 again, with the same scores.
    let t2 = tempfile::tempdir().unwrap();
    let cfg2 = config(t2.path(), &model);
    let run2 = t2.path().join("ck/ext");
    let opts = RunOptions {
        stop_after_step: Some(3),
        ..Default::default()
    };
    assert_eq!(train(&cfg2, opts).0, Outcome::Interrupted);
    assert_eq!(steps(&evals(&run2, "words")), [0, 2]);
    let resume = RunOptions {
        resume: Some(Resume::Latest),
        ..Default::default()
    };
    let (outcome, summary) = train(&cfg2, resume);
    assert_eq!(outcome, Outcome::Stopped);
    assert_eq!(summary.steps, 6);
    assert_eq!(evals(&run2, "words"), words);
}

#[test]
fn patience_on_the_held_out_loss_stops_a_run_from_its_config() {
    let t = tempfile::tempdir().unwrap();
    let model = tiny_model(t.path());
    // An unreachable min_delta: the loss before training is the best, the next evaluation
    // exhausts a patience of 1.
    let out = quickstart(
        t.path(),
        Some(&model),
        &[
            "run.name=loss",
            "data.max_length=96",
            "train.max_examples=64",
            "train.micro_batch_size=4",
            "eval.ifs.every_examples=0",
            "eval.loss={every_examples: 8, max_examples: 8}",
            "early_stopping.eval_loss={patience: 1, min_delta: 100.0}",
            "checkpoint.every_steps=1",
            "checkpoint.keep_last=1",
            "checkpoint.keep_best=false",
            "logging.progress=false",
        ],
        &[],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let run = t.path().join("loss");
    let s: Value =
        serde_json::from_slice(&std::fs::read(run.join("summary.json")).unwrap()).unwrap();
    assert_eq!(s["status"], "stopped", "{s}");
    assert!(
        s["stop_reason"].as_str().unwrap().contains("held-out loss"),
        "{s}"
    );
    assert_eq!(s["examples"], 8);
    assert_eq!(s["best_eval_loss_checkpoint"], "step-000000");
    assert_eq!(
        std::fs::read_link(run.join("best-eval-loss")).unwrap(),
        Path::new("step-000000")
    );
    // Kept although keep_last is 1 (and keep_best off): the rule pinned it.
    assert!(run.join("step-000000/adapter_model.safetensors").is_file());
    assert!(stderr.contains("best-eval-loss checkpoint"), "{stderr}");
}
