//! The training run, top to bottom: load, resume, then for each optimizer step: micro-batches
//! → forward → loss → backward → accumulate → clip → AdamW → schedule → evaluators →
//! checkpoints → logs. Everything the run writes lives in `checkpoint.dir/run.name/`.
use crate::checkpoint::Checkpoints;
use crate::config::Config;
use crate::metrics::MetricsLog;
use crate::model::{Evaluators, ModelAnswer, TrainModel};
use crate::schedule::lr_at;
use crate::state::{differences, hash_value, identity, Due, EvalRecord, TrainerState};
use crate::summary::Summary;
use crate::{plot, TrainError};
use serde_json::{Map, Value};
use sft_data::{Batcher, Cursor};
use sft_ifs::plateau::{Decision, EvalPoint};
use sft_optim::{clip_grad_norm, AdamW, AdamWConfig, GradAccumulator};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// Which checkpoint to resume from.
#[derive(Clone, Debug)]
pub enum Resume {
    Latest,
    Path(PathBuf),
}

#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    pub resume: Option<Resume>,
    /// Set by the SIGINT/SIGTERM handler: finish the step, checkpoint, exit.
    pub stop: Arc<AtomicBool>,
}

/// How the run ended.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    Finished,
    Plateau,
    Interrupted,
    AlreadyStopped,
}

fn stop_requested_by_test(step: u64) -> bool {
    std::env::var("SFT_TEST_STOP_AT_STEP")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        == Some(step)
}

/// Slows every step (`SFT_TEST_STEP_DELAY_MS`) so that a test's signal lands mid-run.
fn test_step_delay() -> Option<u64> {
    std::env::var("SFT_TEST_STEP_DELAY_MS").ok()?.parse().ok()
}

/// Run a config to its end (or its interruption) and return the summary.
pub fn train(cfg: &Config, opts: &RunOptions) -> Result<(Outcome, Summary), TrainError> {
    let started = Instant::now();
    let run_dir = cfg.checkpoint.dir.join(&cfg.run.name);
    std::fs::create_dir_all(&run_dir).map_err(|e| TrainError::io(&run_dir, e))?;
    let ckpts = Checkpoints::new(&run_dir);

    // Resume: find and verify the checkpoint first, so a refused resume costs nothing.
    // `--resume` before any checkpoint exists (a cluster job's first start) starts fresh.
    let resumed: Option<(PathBuf, TrainerState)> = match &opts.resume {
        None => None,
        Some(Resume::Latest) if ckpts.list().is_empty() => {
            tracing::info!(
                "--resume: no checkpoint in {} yet; starting a fresh run",
                run_dir.display()
            );
            None
        }
        Some(r) => Some(find_resume(&ckpts, r)?),
    };
    let resuming = resumed.is_some();
    if let Some((path, st)) = &resumed {
        check_resume_compatible(cfg, st, path)?;
    } else if !ckpts.list().is_empty() {
        return Err(TrainError::Config(format!(
            "{} already holds checkpoints: pass --resume to continue that run, or choose another \
             run.name (or delete the folder)",
            run_dir.display()
        )));
    }

    // The model, its trainable parameters and the optimizer.
    let mut model = TrainModel::load(cfg)?;
    let specs = model.param_specs();
    let mut optim = AdamW::new(
        specs.clone(),
        AdamWConfig {
            beta1: cfg.train.beta1,
            beta2: cfg.train.beta2,
            eps: cfg.train.eps,
            weight_decay: cfg.train.weight_decay,
        },
    )
    .map_err(TrainError::optim)?;
    if !cfg.train.master_weights {
        optim = optim.without_master_weights();
    }
    tracing::info!(
        "model: {} ({} layers, {} parameters, {} trainable in {} tensors, {:?})",
        model.dir.display(),
        model.llama.config().num_hidden_layers,
        model.total_params(),
        model.trainable_params(),
        model.params.len(),
        cfg.adapter.kind,
    );

    // The data.
    let t_data = Instant::now();
    let data = model.dataset(cfg)?;
    let data_build_seconds = t_data.elapsed().as_secs_f64();
    let mut batcher = Batcher::new(
        Arc::new(data.train.clone()),
        data.pad_id,
        cfg.data.batch_options(cfg.train.micro_batch_size),
    )
    .map_err(TrainError::Data)?;
    let batches_per_epoch = batcher.batches_in_epoch(0) as u64;
    let total_steps = total_steps(cfg, batches_per_epoch, data.train.len() as u64);
    tracing::info!(
        "plan: {} train examples, {} batches per epoch, {} optimizer steps",
        data.train.len(),
        batches_per_epoch,
        total_steps
    );

    let mut evals = Evaluators::new(cfg, &model)?;

    // State: fresh or restored.
    let mut st = match resumed {
        Some((path, st)) => {
            model.restore(&path)?;
            optim
                .load(path.join("optimizer.safetensors"))
                .map_err(|e| TrainError::Checkpoint(format!("{}: {e}", path.display())))?;
            batcher = batcher.with_cursor(st.cursor);
            tracing::info!(
                "resumed from {} (step {}, {} examples)",
                path.display(),
                st.step,
                st.examples
            );
            st
        }
        None => fresh_state(cfg),
    };
    *st.seconds.entry("data_build".into()).or_default() += data_build_seconds;
    let train_seconds_before = st.seconds.get("train").copied().unwrap_or(0.0);

    // A run that already stopped does not train on unless the new config no longer stops it.
    if let Some(why) = st.stopped.clone() {
        if still_stopped(cfg, &st, total_steps) {
            tracing::warn!(
                "this run already stopped ({why}); it does not train on. Raise train.max_examples / \
                 train.max_steps, or change early_stopping, to continue it."
            );
            let summary = Summary::build(cfg, &st, &data.report, "stopped", &why, &run_dir, 0.0);
            return Ok((Outcome::AlreadyStopped, summary));
        }
        tracing::info!("the run had stopped ({why}); the new limits let it continue");
        st.stopped = None;
    }

    let mut log = MetricsLog::open(
        &run_dir.join("metrics.jsonl"),
        resuming.then_some(st.step),
        cfg.logging.tensorboard,
    )
    .map_err(|e| TrainError::io(&run_dir, e))?;
    let progress = crate::progress::Progress::new(cfg, total_steps, st.step, st.examples);

    let mut seconds_train = 0.0;
    let mut outcome = Outcome::Finished;
    let mut stop_reason = String::from("finished: reached the configured length");

    // Evaluations before the first step: the base model's scores (once: a checkpoint at step 0,
    // of a run stopped before its first step, already holds them).
    if !resuming {
        let decision = evaluate_due(
            cfg, &mut st, &mut model, &data, &mut evals, &mut log, &run_dir, true,
        )?;
        if let Some(reason) = decision {
            stop_reason = reason;
            outcome = Outcome::Plateau;
        } else if std::mem::take(&mut evals.pending_save) {
            // The base model itself is a format-infusion candidate.
            save(cfg, &ckpts, &mut st, &model, &optim, train_seconds_before)?;
        }
        if stop_requested_by_test(0) {
            opts.stop.store(true, Ordering::SeqCst);
        }
    }

    while outcome == Outcome::Finished {
        if reached_limit(cfg, &st, total_steps) {
            break;
        }
        if opts.stop.load(Ordering::SeqCst) {
            outcome = Outcome::Interrupted;
            stop_reason = "interrupted: checkpointed after the current step".into();
            break;
        }
        let t0 = Instant::now();
        if let Some(ms) = test_step_delay() {
            std::thread::sleep(std::time::Duration::from_millis(ms));
        }
        let lr = lr_at(&cfg.train, st.step, total_steps);

        // Micro-batches: the loss is summed over every trained token of the optimizer step and
        // normalised once, so accumulation equals one big batch.
        let mut acc = GradAccumulator::new();
        let (mut loss_sum, mut tokens, mut examples, mut padding) = (0.0f64, 0usize, 0u64, 0.0);
        for micro in 0..cfg.train.grad_accum {
            let tb = Instant::now();
            let batch = batcher.next_batch();
            *st.seconds.entry("data_batches".into()).or_default() += tb.elapsed().as_secs_f64();
            examples += batch.num_examples() as u64;
            padding += batch.padding_ratio();
            model.set_dropout_seed(st.seed, st.step, micro as u64);
            let out = model.loss(&batch)?;
            let value = out
                .sum
                .to_dtype(candle_core::DType::F64)?
                .to_scalar::<f64>()?;
            loss_sum += value;
            tokens += out.n_tokens;
            if out.n_tokens > 0 {
                let store = model.backward(&out.sum)?;
                acc.add(&specs, &store, out.n_tokens)
                    .map_err(TrainError::optim)?;
            }
        }
        st.examples += examples;
        st.tokens += tokens as u64;
        st.cursor = batcher.cursor();
        let mean_loss = if tokens > 0 {
            loss_sum / tokens as f64
        } else {
            0.0
        };
        let mut grads = acc.finish().map_err(TrainError::optim)?;

        let finite =
            mean_loss.is_finite() && grads.non_finite().map_err(TrainError::optim)?.is_empty();
        if !finite || tokens == 0 {
            st.bad_steps += 1;
            st.bad_in_a_row += 1;
            tracing::warn!(
                "step {}: {} — skipped ({} in a row)",
                st.step + 1,
                if tokens == 0 {
                    "no trained tokens"
                } else {
                    "non-finite loss or gradient"
                },
                st.bad_in_a_row
            );
            if st.bad_in_a_row >= cfg.train.max_bad_steps {
                return Err(TrainError::Diverged(format!(
                    "{} steps in a row had a non-finite loss or gradient; stopping. The last good \
                     checkpoint is kept in {} (lower train.lr or check the data)",
                    st.bad_in_a_row,
                    run_dir.display()
                )));
            }
            continue;
        }
        st.bad_in_a_row = 0;
        let grad_norm = if cfg.train.max_grad_norm > 0.0 {
            clip_grad_norm(&mut grads, cfg.train.max_grad_norm)
        } else {
            grads.global_norm()
        }
        .map_err(TrainError::optim)?;
        optim.step(&grads, lr).map_err(TrainError::optim)?;
        st.step += 1;
        let dt = t0.elapsed().as_secs_f64();
        seconds_train += dt;

        let mut rec = Map::new();
        rec.insert("step".into(), st.step.into());
        rec.insert("examples".into(), st.examples.into());
        rec.insert("loss".into(), mean_loss.into());
        rec.insert("lr".into(), lr.into());
        rec.insert("grad_norm".into(), grad_norm.into());
        rec.insert("tokens".into(), tokens.into());
        rec.insert(
            "padding".into(),
            (padding / cfg.train.grad_accum as f64).into(),
        );
        rec.insert("seconds".into(), dt.into());
        let tl = Instant::now();
        log.write(&rec).map_err(|e| TrainError::io(log.path(), e))?;
        *st.seconds.entry("logging".into()).or_default() += tl.elapsed().as_secs_f64();
        progress.step(st.step, st.examples, tokens, mean_loss, lr, dt);
        if cfg.logging.every_steps > 0 && st.step % cfg.logging.every_steps == 0 {
            tracing::info!(
                "step {}/{}  examples {}  loss {:.4}  lr {:.2e}  grad-norm {:.3}  {:.0} tok/s",
                st.step,
                total_steps,
                st.examples,
                mean_loss,
                lr,
                grad_norm,
                tokens as f64 / dt
            );
        }

        if let Some(reason) = evaluate_due(
            cfg, &mut st, &mut model, &data, &mut evals, &mut log, &run_dir, false,
        )? {
            stop_reason = reason;
            outcome = Outcome::Plateau;
        }
        progress.set_ifs(st.plateau.history.last().map(|p| p.score));

        let periodic = cfg.checkpoint.every_steps > 0 && st.step % cfg.checkpoint.every_steps == 0;
        if (periodic || std::mem::take(&mut evals.pending_save)) && outcome == Outcome::Finished {
            save(
                cfg,
                &ckpts,
                &mut st,
                &model,
                &optim,
                train_seconds_before + seconds_train,
            )?;
        }
        if stop_requested_by_test(st.step) {
            opts.stop.store(true, Ordering::SeqCst);
        }
    }
    progress.finish();

    if outcome == Outcome::Finished {
        // Final evaluations of the finished model, unless they just ran.
        if let Some(reason) = evaluate_final(
            cfg, &mut st, &mut model, &data, &mut evals, &mut log, &run_dir,
        )? {
            stop_reason = reason;
            outcome = Outcome::Plateau;
        }
    }
    if outcome != Outcome::Interrupted {
        st.stopped = Some(stop_reason.clone());
    }
    save(
        cfg,
        &ckpts,
        &mut st,
        &model,
        &optim,
        train_seconds_before + seconds_train,
    )?;
    if let Some(step) = st.format_infusion_step {
        ckpts
            .point("format-infusion", &crate::checkpoint::step_dir_name(step))
            .map_err(TrainError::checkpoint)?;
    }
    redraw_plots(cfg, &run_dir, &log);
    let status = match outcome {
        Outcome::Finished => "finished",
        Outcome::Plateau => "stopped",
        Outcome::Interrupted => "interrupted",
        Outcome::AlreadyStopped => "stopped",
    };
    let summary = Summary::build(
        cfg,
        &st,
        &data.report,
        status,
        &stop_reason,
        &run_dir,
        started.elapsed().as_secs_f64(),
    );
    summary.write(&run_dir)?;
    match outcome {
        Outcome::Plateau => tracing::info!(
            "{stop_reason}. The format-infusion checkpoint: {}",
            summary.format_infusion_checkpoint.as_deref().unwrap_or("-")
        ),
        Outcome::Interrupted => tracing::info!(
            "interrupted at step {}: checkpoint saved; resume with --resume",
            st.step
        ),
        _ => tracing::info!("{stop_reason} after {} steps", st.step),
    }
    Ok((outcome, summary))
}

fn fresh_state(cfg: &Config) -> TrainerState {
    let id = identity(cfg);
    TrainerState {
        step: 0,
        examples: 0,
        tokens: 0,
        cursor: Cursor::default(),
        seed: cfg.train.seed,
        bad_steps: 0,
        bad_in_a_row: 0,
        due: Due {
            loss: cfg.eval.loss.every_examples,
            ifs: cfg.eval.ifs.every_examples,
            objecqa: cfg.eval.objecqa.every_examples,
        },
        plateau: Default::default(),
        evals: Vec::new(),
        stopped: None,
        format_infusion_step: None,
        pinned: Vec::new(),
        best: None,
        seconds: Default::default(),
        config_hash: hash_value(&id),
        identity: id,
        config: serde_json::to_value(cfg).unwrap_or(Value::Null),
    }
}

/// Optimizer steps the run will take at most: the first limit reached of epochs, max_steps
/// and max_examples.
pub fn total_steps(cfg: &Config, batches_per_epoch: u64, train_examples: u64) -> u64 {
    let per_step = (cfg.train.micro_batch_size * cfg.train.grad_accum) as u64;
    let mut limit = u64::MAX;
    if let Some(e) = cfg.train.epochs {
        limit =
            limit.min(((batches_per_epoch as f64 * e) / cfg.train.grad_accum as f64).ceil() as u64);
    }
    if let Some(s) = cfg.train.max_steps {
        limit = limit.min(s);
    }
    if let Some(x) = cfg.train.max_examples {
        // Batches may hold fewer than micro_batch_size examples (token budget): estimate with
        // the mean batch size of an epoch.
        let mean = if batches_per_epoch > 0 {
            (train_examples as f64 / batches_per_epoch as f64).max(1.0)
        } else {
            per_step as f64
        };
        limit = limit.min((x as f64 / (mean * cfg.train.grad_accum as f64)).ceil() as u64);
    }
    limit.max(1)
}

fn reached_limit(cfg: &Config, st: &TrainerState, total_steps: u64) -> bool {
    st.step >= total_steps
        || cfg.train.max_steps.is_some_and(|m| st.step >= m)
        || cfg.train.max_examples.is_some_and(|m| st.examples >= m)
}

/// Whether a stopped run would stop again at once under `cfg`.
fn still_stopped(cfg: &Config, st: &TrainerState, total_steps: u64) -> bool {
    if reached_limit(cfg, st, total_steps) {
        return true;
    }
    // Replay the plateau rule over the recorded IFS history with the new settings.
    let mut replay = sft_ifs::plateau::PlateauState::default();
    st.plateau.history.iter().any(|p| {
        matches!(
            replay.observe(&cfg.early_stopping, p.clone()),
            Decision::Stop { .. }
        )
    })
}

fn find_resume(ckpts: &Checkpoints, r: &Resume) -> Result<(PathBuf, TrainerState), TrainError> {
    match r {
        Resume::Latest => {
            let (path, _, st) = ckpts
                .load_latest::<TrainerState>()
                .map_err(TrainError::checkpoint)?;
            Ok((path, st))
        }
        Resume::Path(p) => {
            let (_, st) = Checkpoints::load::<TrainerState>(p).map_err(TrainError::checkpoint)?;
            Ok((p.clone(), st))
        }
    }
}

fn check_resume_compatible(cfg: &Config, st: &TrainerState, path: &Path) -> Result<(), TrainError> {
    let diffs = differences(&st.identity, &identity(cfg));
    if !diffs.is_empty() {
        return Err(TrainError::Config(format!(
            "cannot resume {}: the config changes what was trained:\n  {}",
            path.display(),
            diffs.join("\n  ")
        )));
    }
    let new = serde_json::to_value(cfg).unwrap_or(Value::Null);
    for d in differences(&st.config, &new) {
        tracing::info!("resume: config change allowed: {d}");
    }
    Ok(())
}

fn save(
    cfg: &Config,
    ckpts: &Checkpoints,
    st: &mut TrainerState,
    model: &TrainModel,
    optim: &AdamW,
    seconds_train: f64,
) -> Result<(), TrainError> {
    st.seconds.insert("train".into(), seconds_train);
    st.config = serde_json::to_value(cfg).unwrap_or(Value::Null);
    let t = Instant::now();
    ckpts
        .save(st.step, &*st, |dir| {
            model.save(dir).map_err(|e| e.to_string())?;
            optim
                .save(dir.join("optimizer.safetensors"))
                .map_err(|e| e.to_string())
        })
        .map_err(TrainError::checkpoint)?;
    let mut pinned = st.pinned.clone();
    if cfg.checkpoint.keep_best {
        pinned.extend(st.best.map(|b| b.0));
    }
    pinned.extend(st.format_infusion_step);
    let removed = ckpts
        .prune(cfg.checkpoint.keep_last, &pinned)
        .map_err(TrainError::checkpoint)?;
    if let Some((step, _)) = st.best {
        if ckpts.list().iter().any(|(s, _)| *s == step) {
            ckpts
                .point("best", &crate::checkpoint::step_dir_name(step))
                .map_err(TrainError::checkpoint)?;
        }
    }
    *st.seconds.entry("checkpoint".into()).or_default() += t.elapsed().as_secs_f64();
    tracing::debug!("checkpoint step {} saved; pruned {:?}", st.step, removed);
    Ok(())
}

/// Run the evaluators whose cadence has come; returns the stop reason if the plateau rule fired.
#[allow(clippy::too_many_arguments)]
fn evaluate_due(
    cfg: &Config,
    st: &mut TrainerState,
    model: &mut TrainModel,
    data: &sft_data::Dataset,
    evals: &mut Evaluators,
    log: &mut MetricsLog,
    run_dir: &Path,
    at_start: bool,
) -> Result<Option<String>, TrainError> {
    let mut stop = None;
    // Held-out loss.
    let e = &cfg.eval.loss;
    if e.every_examples > 0 && (at_start || st.examples >= st.due.loss) {
        if !at_start {
            advance(&mut st.due.loss, e.every_examples, st.examples);
        }
        let t = Instant::now();
        let loss = model.eval_loss(cfg, data)?;
        *st.seconds.entry("eval_loss".into()).or_default() += t.elapsed().as_secs_f64();
        record(st, log, "loss", [("eval_loss", loss)].into_iter())?;
        if evals.ifs.is_none() && st.best.is_none_or(|b| -loss > b.1) {
            st.best = Some((st.step, -loss));
        }
    }
    // IFS, which drives early stopping.
    if let Some(report) = run_generation_eval(
        "ifs",
        &cfg.eval.ifs,
        evals.ifs.as_deref_mut(),
        |d| &mut d.ifs,
        st,
        model,
        log,
        run_dir,
        at_start,
    )? {
        let point = EvalPoint {
            step: st.step,
            examples: st.examples,
            score: report.primary,
        };
        let prev_anchor = st.plateau.anchor(&cfg.early_stopping).cloned();
        let decision = st.plateau.observe(&cfg.early_stopping, point);
        if st.best.is_none_or(|b| report.primary > b.1) {
            st.best = Some((st.step, report.primary));
        }
        // Every evaluation that could become the format-infusion one gets a checkpoint kept.
        let anchor = st.plateau.anchor(&cfg.early_stopping).cloned();
        if anchor.as_ref().is_some_and(|a| a.step == st.step) && prev_anchor != anchor {
            st.pinned.push(st.step);
            evals.pending_save = true;
        }
        let score = |k: &str| report.scores.get(k).copied().unwrap_or(f64::NAN);
        tracing::info!(
            "IFS at {} examples: {:.3} (full {:.3}, partial {:.3})",
            st.examples,
            report.primary,
            score("ifs_full"),
            score("ifs_partial")
        );
        if let Decision::Stop { anchor, reason } = decision {
            st.format_infusion_step = Some(anchor.step);
            stop = Some(reason);
        }
    }
    // ObjecQA, at its own cadence.
    if let Some(report) = run_generation_eval(
        "objecqa",
        &cfg.eval.objecqa,
        evals.objecqa.as_deref_mut(),
        |d| &mut d.objecqa,
        st,
        model,
        log,
        run_dir,
        at_start,
    )? {
        tracing::info!("ObjecQA at {} examples: {:.3}", st.examples, report.primary);
    }
    if (st.evals.last().is_some_and(|r| r.step == st.step)) && cfg.logging.plots {
        redraw_plots(cfg, run_dir, log);
    }
    Ok(stop)
}

/// Run one generation-based evaluator if its cadence has come (or at the start, if asked):
/// answers go under `evals/step-NNNNNN/`, scores to metrics.jsonl and the state's history.
#[allow(clippy::too_many_arguments)]
fn run_generation_eval(
    name: &str,
    e: &crate::config::GenEvalConfig,
    ev: Option<&mut (dyn sft_eval::Evaluator + 'static)>,
    due: fn(&mut Due) -> &mut u64,
    st: &mut TrainerState,
    model: &mut TrainModel,
    log: &mut MetricsLog,
    run_dir: &Path,
    at_start: bool,
) -> Result<Option<sft_eval::EvalReport>, TrainError> {
    let Some(ev) = ev else { return Ok(None) };
    let examples = st.examples;
    let due = due(&mut st.due);
    let is_due = if at_start {
        e.at_start
    } else {
        examples >= *due
    };
    if e.every_examples == 0 || !is_due {
        return Ok(None);
    }
    if !at_start {
        advance(due, e.every_examples, examples);
    }
    let t = Instant::now();
    let out = run_dir.join("evals").join(format!("step-{:06}", st.step));
    let report = {
        let mut answer = ModelAnswer::new(model, e)?;
        ev.evaluate(&mut answer, &out).map_err(TrainError::eval)?
    };
    *st.seconds.entry(format!("eval_{name}")).or_default() += t.elapsed().as_secs_f64();
    record(
        st,
        log,
        name,
        report.scores.iter().map(|(k, v)| (k.as_str(), *v)),
    )?;
    Ok(Some(report))
}

/// At the end of a run that reached its length: evaluate the final model unless an evaluation
/// just ran at this step.
fn evaluate_final(
    cfg: &Config,
    st: &mut TrainerState,
    model: &mut TrainModel,
    data: &sft_data::Dataset,
    evals: &mut Evaluators,
    log: &mut MetricsLog,
    run_dir: &Path,
) -> Result<Option<String>, TrainError> {
    let ran = |name: &str| st.evals.iter().any(|r| r.step == st.step && r.name == name);
    if !ran("ifs") {
        st.due.ifs = st.examples;
    }
    if !ran("objecqa") {
        st.due.objecqa = st.examples;
    }
    if !ran("loss") {
        st.due.loss = st.examples;
    }
    evaluate_due(cfg, st, model, data, evals, log, run_dir, false)
}

/// Move `due` past `now` by whole periods.
fn advance(due: &mut u64, every: u64, now: u64) {
    while *due <= now {
        *due += every;
    }
}

fn record<'a>(
    st: &mut TrainerState,
    log: &mut MetricsLog,
    name: &str,
    scores: impl Iterator<Item = (&'a str, f64)>,
) -> Result<(), TrainError> {
    let mut rec = Map::new();
    rec.insert("step".into(), st.step.into());
    rec.insert("examples".into(), st.examples.into());
    rec.insert("eval".into(), name.into());
    let mut r = EvalRecord {
        name: name.to_string(),
        step: st.step,
        examples: st.examples,
        scores: Default::default(),
    };
    for (k, v) in scores {
        rec.insert(k.to_string(), v.into());
        r.scores.insert(k.to_string(), v);
    }
    st.evals.push(r);
    log.write(&rec).map_err(|e| TrainError::io(log.path(), e))
}

fn redraw_plots(cfg: &Config, run_dir: &Path, log: &MetricsLog) {
    if !cfg.logging.plots {
        return;
    }
    match MetricsLog::read_all(log.path()) {
        Ok(records) => {
            if let Err(e) = plot::redraw(run_dir, &records) {
                tracing::warn!("plots: {e}");
            }
        }
        Err(e) => tracing::warn!("plots: cannot read {}: {e}", log.path().display()),
    }
}

impl TrainError {
    fn io(path: &Path, e: std::io::Error) -> Self {
        TrainError::Io(format!("{}: {e}", path.display()))
    }
    fn checkpoint(e: crate::checkpoint::CheckpointError) -> Self {
        TrainError::Checkpoint(e.to_string())
    }
    fn eval(e: sft_eval::BoxError) -> Self {
        TrainError::Eval(e.to_string())
    }
    fn optim(e: impl std::fmt::Display) -> Self {
        TrainError::Optim(e.to_string())
    }
}
