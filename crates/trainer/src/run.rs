//! The training run, top to bottom in [`train_with`]: open the run (resume, model, data,
//! state), evaluate the base model, then for each optimizer step: micro-batches → forward →
//! loss → backward → accumulate → clip → AdamW ([`Run::train_step`]) → log → the evaluations
//! that are due, each seen by the stop rules → checkpoint; at the end the final evaluations,
//! the last checkpoint and the summary. Everything the run writes lives in
//! `checkpoint.dir/run.name/`.
//!
//! Data-parallel ([`train_on`] with several ranks): every rank walks the same data stream and
//! takes its slice of each global batch (micro-batch x accumulation x world); the gradient
//! sums are added up over the ranks before they are normalised, clipped and stepped, the same
//! on every rank. Rank 0 alone writes (logs, metrics, plots, checkpoints) and runs the
//! evaluators, the others answering their share of the prompts; the stop decisions (a signal
//! on any rank, a stop rule) are agreed by every rank.
use crate::answer::{ModelAnswer, SplitAnswer};
use crate::checkpoint::{step_dir_name, Checkpoints};
use crate::config::Config;
use crate::error::TrainError;
use crate::evals::Scheduled;
use crate::metrics::MetricsLog;
use crate::model::TrainModel;
use crate::plot;
use crate::progress::Progress;
use crate::schedule::lr_at;
use crate::state::{differences, identity, EvalRecord, TrainerState};
use crate::stop::{Decision, StopRule};
use crate::summary::Summary;
use candle_core::DType;
use serde_json::{Map, Value};
use sft_data::{Batcher, Dataset};
use sft_dist::{Comm, ReduceStats, Reducer, Single};
use sft_optim::{
    clip_grad_norm, shard_file_name, AdamW, AdamWConfig, GradAccumulator, Grads, ParamSpec,
    ShardedAdamW,
};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Which checkpoint to resume from.
#[derive(Clone, Debug)]
pub enum Resume {
    Latest,
    Path(PathBuf),
}

/// How a run is driven from outside: where it resumes, the stop signal, and test hooks.
#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    pub resume: Option<Resume>,
    /// Set by the SIGINT/SIGTERM handler: finish the step, checkpoint, exit.
    pub stop: Arc<AtomicBool>,
    /// Test hook: raise `stop` after this optimizer step, as a signal would.
    pub stop_after_step: Option<u64>,
    /// Test hook: sleep this long in every step, so that a test's signal lands mid-run.
    pub step_delay: Option<Duration>,
    /// Test hook: after this step, wait (up to two minutes) for `stop`, so that a test's
    /// signal lands mid-run without racing the steps.
    pub pause_after_step: Option<u64>,
    /// Check hook: sum the gradients through NCCL even with one process (scripts/gpu-check's
    /// NCCL stage on one GPU). Refused by a build without NCCL or on a CPU device.
    pub nccl_alone: bool,
}

impl RunOptions {
    /// The test hooks as the binaries take them: `SFT_TEST_STOP_AT_STEP=N`,
    /// `SFT_TEST_STEP_DELAY_MS=N`, `SFT_TEST_PAUSE_AFTER_STEP=N` and `SFT_TEST_NCCL_ALONE=1`.
    pub fn with_test_hooks_from_env(mut self) -> Self {
        let var = |k: &str| std::env::var(k).ok().and_then(|v| v.parse::<u64>().ok());
        self.stop_after_step = var("SFT_TEST_STOP_AT_STEP");
        self.step_delay = var("SFT_TEST_STEP_DELAY_MS").map(Duration::from_millis);
        self.pause_after_step = var("SFT_TEST_PAUSE_AFTER_STEP");
        self.nccl_alone = var("SFT_TEST_NCCL_ALONE").is_some_and(|v| v > 0);
        self
    }
}

/// How the run ended.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    Finished,
    /// A stop rule ended it (the IFS plateau, the held-out loss's patience...).
    Stopped,
    Interrupted,
    AlreadyStopped,
}

/// Run a config to its end (or its interruption) with the evaluators and stop rules it
/// configures, and return the summary.
pub fn train(cfg: &Config, opts: &RunOptions) -> Result<(Outcome, Summary), TrainError> {
    let evaluators = crate::evals::from_config(cfg)?;
    train_with(cfg, opts, evaluators, crate::stop::from_config(cfg))
}

/// Run a config with these evaluators and stop rules (the config's, from
/// [`crate::evals::from_config`] and [`crate::stop::from_config`], and any others).
pub fn train_with(
    cfg: &Config,
    opts: &RunOptions,
    evaluators: Vec<Scheduled>,
    rules: Vec<Box<dyn StopRule>>,
) -> Result<(Outcome, Summary), TrainError> {
    train_in(&Single, cfg, opts, evaluators, rules)
}

/// [`train`] as one rank of a data-parallel run (`comm`: [`sft_dist::connect`]).
pub fn train_on(
    comm: &dyn Comm,
    cfg: &Config,
    opts: &RunOptions,
) -> Result<(Outcome, Summary), TrainError> {
    let evaluators = crate::evals::from_config(cfg)?;
    train_in(comm, cfg, opts, evaluators, crate::stop::from_config(cfg))
}

/// [`train_with`] as one rank of a data-parallel run.
pub fn train_in(
    comm: &dyn Comm,
    cfg: &Config,
    opts: &RunOptions,
    evaluators: Vec<Scheduled>,
    rules: Vec<Box<dyn StopRule>>,
) -> Result<(Outcome, Summary), TrainError> {
    let started = Instant::now();
    let mut run = match Run::open(comm, cfg, opts, evaluators, rules)? {
        Opened::Ready(run) => *run,
        Opened::AlreadyStopped(summary) => return Ok((Outcome::AlreadyStopped, *summary)),
    };

    // Evaluations before the first step: the base model's scores (once: a checkpoint at step 0,
    // of a run stopped before its first step, already holds them).
    let mut stop = None;
    if !run.resuming {
        stop = run.evaluate(When::Start)?;
        if stop.is_none() && std::mem::take(&mut run.pending_save) {
            // The base model itself is a candidate for the chosen checkpoint.
            run.save()?;
        }
        if opts.stop_after_step == Some(0) {
            opts.stop.store(true, Ordering::SeqCst);
        }
    }

    let mut interrupted = false;
    while stop.is_none() && !run.reached_limit() {
        // A signal on any rank stops every rank, before the same step.
        if run
            .comm
            .any(opts.stop.load(Ordering::SeqCst))
            .map_err(TrainError::dist)?
        {
            interrupted = true;
            break;
        }
        let t0 = Instant::now();
        if let Some(delay) = opts.step_delay {
            std::thread::sleep(delay);
        }
        let lr = lr_at(&cfg.train, run.st.step, run.total_steps);
        let Some(step) = run.train_step(lr)? else {
            continue; // skipped: a non-finite loss or gradient, or no trained tokens
        };
        run.log_step(&step, lr, t0.elapsed().as_secs_f64())?;
        stop = run.evaluate(When::Due)?;
        let every = cfg.checkpoint.every_steps;
        let periodic = every > 0 && run.st.step.is_multiple_of(every);
        if (periodic || std::mem::take(&mut run.pending_save)) && stop.is_none() {
            run.save()?;
        }
        if opts.stop_after_step == Some(run.st.step) {
            opts.stop.store(true, Ordering::SeqCst);
        }
        if opts.pause_after_step == Some(run.st.step) {
            let until = Instant::now() + Duration::from_secs(120);
            while !opts.stop.load(Ordering::SeqCst) && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
    run.progress.finish();

    // The finished model's evaluations, unless they just ran.
    if stop.is_none() && !interrupted {
        stop = run.evaluate(When::End)?;
    }
    let outcome = match (&stop, interrupted) {
        (Some(_), _) => Outcome::Stopped,
        (None, true) => Outcome::Interrupted,
        (None, false) => Outcome::Finished,
    };
    run.finish(outcome, stop, started)
}

/// One optimizer step's numbers, as logged.
struct StepReport {
    /// Mean loss per trained token over the step's micro-batches.
    loss: f64,
    grad_norm: f64,
    tokens: usize,
    padding: f64,
    /// Several ranks: the gradients' all-reduce (bytes, time), and the seconds of the step's
    /// first sum (the loss's), which include waiting for the slowest rank.
    reduced: Option<(ReduceStats, f64)>,
}

/// When evaluations run: before the first step (those asked `at_start`), when due, at the end.
#[derive(Clone, Copy, Debug, PartialEq)]
enum When {
    Start,
    Due,
    End,
}

enum Opened<'a> {
    Ready(Box<Run<'a>>),
    AlreadyStopped(Box<Summary>),
}

/// Everything a run holds between its steps.
struct Run<'a> {
    cfg: &'a Config,
    /// The ranks of a data-parallel run ([`Single`] for one process), and how they sum
    /// gradients (MPI; NCCL for CUDA tensors).
    comm: &'a dyn Comm,
    reducer: Reducer<'a>,
    /// This segment continues a checkpoint (whose state already holds the evaluations it ran).
    resuming: bool,
    run_dir: PathBuf,
    ckpts: Checkpoints,
    model: TrainModel,
    specs: Vec<ParamSpec>,
    optim: Optim,
    data: Dataset,
    batcher: Batcher,
    total_steps: u64,
    evaluators: Vec<Scheduled>,
    /// The evaluator whose primary score ranks checkpoints (`best`); else the held-out loss.
    ranking: Option<String>,
    rules: Vec<Box<dyn StopRule>>,
    /// metrics.jsonl and TensorBoard: rank 0's.
    log: Option<MetricsLog>,
    progress: Progress,
    st: TrainerState,
    /// Seconds of training before this segment of the run, and in it.
    train_seconds_before: f64,
    train_seconds: f64,
    /// A stop rule asked for this step's checkpoint (a candidate for the chosen one).
    pending_save: bool,
}

impl<'a> Run<'a> {
    /// Check the resume, load the model, the optimizer and the data, restore or start the state.
    fn open(
        comm: &'a dyn Comm,
        cfg: &'a Config,
        opts: &RunOptions,
        evaluators: Vec<Scheduled>,
        mut rules: Vec<Box<dyn StopRule>>,
    ) -> Result<Opened<'a>, TrainError> {
        check_names(&evaluators, &rules)?;
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
            Some(r) => Some(find_resume(&ckpts, r, cfg)?),
        };
        let resuming = resumed.is_some();
        if let Some((path, st)) = &resumed {
            check_resume_compatible(cfg, comm.world(), st, path)?;
        } else if !ckpts.list().is_empty() {
            return Err(TrainError::Config(format!(
                "{} already holds checkpoints: pass --resume to continue that run, or choose \
                 another run.name (or delete the folder)",
                run_dir.display()
            )));
        }

        // The model, its trainable parameters and the optimizer.
        let mut model = TrainModel::load(cfg)?;
        let specs = model.param_specs();
        let reducer =
            Reducer::new(comm, &model.device, opts.nccl_alone).map_err(TrainError::dist)?;
        let adamw = AdamWConfig {
            beta1: cfg.train.beta1,
            beta2: cfg.train.beta2,
            eps: cfg.train.eps,
            weight_decay: cfg.train.weight_decay,
        };
        let mut optim = if cfg.train.shard_optimizer {
            let o = ShardedAdamW::new(
                specs.clone(),
                adamw,
                comm.rank(),
                comm.world(),
                cfg.train.master_weights,
            )
            .map_err(TrainError::optim)?;
            let r = o.range();
            tracing::info!(
                "optimizer: AdamW sharded over {} rank(s); this rank holds elements {}..{} of {} \
                 ({:.1} MiB of moments and master copies)",
                comm.world(),
                r.start,
                r.end,
                o.total(),
                o.state_bytes() as f64 / (1u64 << 20) as f64
            );
            Optim::Sharded(o)
        } else {
            let mut o = AdamW::new(specs.clone(), adamw).map_err(TrainError::optim)?;
            if !cfg.train.master_weights {
                o = o.without_master_weights();
            }
            Optim::Replicated(o)
        };
        tracing::info!(
            "model: {} ({} layers, {} parameters, {} trainable in {} tensors, {:?})",
            model.dir.display(),
            model.llama.config().num_hidden_layers,
            model.total_params(),
            model.trainable_params(),
            model.trainable.params.len(),
            cfg.adapter.kind,
        );
        if let Some((n, formats, bytes)) = model.quantized_summary() {
            tracing::info!(
                "QLoRA: {n} base linears kept quantized ({formats}), {:.1} MiB as stored",
                bytes as f64 / (1u64 << 20) as f64
            );
        }

        // The data.
        let t_data = Instant::now();
        let data = model.dataset(cfg)?;
        let data_build_seconds = t_data.elapsed().as_secs_f64();
        let mut batcher = Batcher::new(
            Arc::new(data.train.clone()),
            data.pad_id,
            cfg.data.batch_options(cfg.train.micro_batch_size),
        )?;
        let batches_per_epoch = batcher.batches_in_epoch(0) as u64;
        let world = comm.world();
        let total_steps = total_steps(cfg, world, batches_per_epoch, data.train.len() as u64);
        tracing::info!(
            "plan: {} train examples, {} batches per epoch, {} optimizer steps",
            data.train.len(),
            batches_per_epoch,
            total_steps
        );
        if world > 1 {
            let per_rank = cfg.train.micro_batch_size * cfg.train.grad_accum;
            tracing::info!(
                "data-parallel: {world} ranks x {per_rank} sequences (micro-batch {} x \
                 accumulation {}) = global batch {}",
                cfg.train.micro_batch_size,
                cfg.train.grad_accum,
                per_rank * world
            );
        }

        // The state: fresh, or restored with the weights, the optimizer and the data cursor.
        let mut st = match resumed {
            Some((path, mut st)) => {
                st.upgrade();
                model.restore(&path)?;
                optim.load(&path)?;
                batcher = batcher.with_cursor(st.cursor);
                tracing::info!(
                    "resumed from {} (step {}, {} examples)",
                    path.display(),
                    st.step,
                    st.examples
                );
                st
            }
            None => {
                let mut due = BTreeMap::from([("loss".to_string(), cfg.eval.loss.every_examples)]);
                for e in &evaluators {
                    due.insert(e.name().to_string(), e.schedule.every_examples);
                }
                TrainerState::fresh(cfg, world, due)
            }
        };
        *st.seconds.entry("data_build".into()).or_default() += data_build_seconds;
        let train_seconds_before = st.seconds.get("train").copied().unwrap_or(0.0);

        // A stopped run: would the rules, replayed over its evaluations with the new settings,
        // stop it again? Then each rule takes back the state it saved (a rule added since
        // starts fresh).
        let stops_again = st.stopped.is_some() && replay(&mut rules, &st.evals);
        for rule in &mut rules {
            if let Some(saved) = st.stop_rules.get(rule.name()) {
                rule.restore(saved.clone()).map_err(|e| {
                    TrainError::Checkpoint(format!("stop rule `{}`: {e}", rule.name()))
                })?;
            }
        }

        // A run that already stopped does not train on unless the new config no longer
        // stops it (higher limits; the rules replayed over the history with the new settings).
        if let Some(why) = st.stopped.clone() {
            if reached_limit(cfg, &st, total_steps) || stops_again {
                tracing::warn!(
                    "this run already stopped ({why}); it does not train on. Raise \
                     train.max_examples / train.max_steps, or change early_stopping, to continue it."
                );
                let summary =
                    Summary::build(cfg, &st, &data.report, "stopped", &why, &run_dir, 0.0);
                return Ok(Opened::AlreadyStopped(Box::new(summary)));
            }
            tracing::info!("the run had stopped ({why}); the new limits let it continue");
            st.stopped = None;
        }

        // Every rank has read what it needs from the run folder: from here rank 0 writes it.
        comm.barrier().map_err(TrainError::dist)?;
        let log = if comm.is_root() {
            let log = MetricsLog::open(
                &run_dir.join("metrics.jsonl"),
                resuming.then_some(st.step),
                cfg.logging.tensorboard,
            )
            .map_err(|e| TrainError::io(&run_dir, e))?;
            Some(log)
        } else {
            None
        };
        let progress = Progress::new(cfg, comm.is_root(), total_steps, st.step, st.examples);
        let ranking = evaluators
            .iter()
            .find(|e| e.ranks_best)
            .map(|e| e.name().to_string());
        Ok(Opened::Ready(Box::new(Run {
            cfg,
            comm,
            reducer,
            resuming,
            run_dir,
            ckpts,
            model,
            specs,
            optim,
            data,
            batcher,
            total_steps,
            evaluators,
            ranking,
            rules,
            log,
            progress,
            st,
            train_seconds_before,
            train_seconds: 0.0,
            pending_save: false,
        })))
    }

    fn reached_limit(&self) -> bool {
        reached_limit(self.cfg, &self.st, self.total_steps)
    }

    /// One optimizer step: the micro-batches' forward, loss and backward, the gradients
    /// accumulated, summed over the ranks, clipped and applied by AdamW. `None` when the step
    /// is skipped (a non-finite loss or gradient, or no trained token); too many skips in a
    /// row fail the run.
    fn train_step(&mut self, lr: f64) -> Result<Option<StepReport>, TrainError> {
        let cfg = self.cfg;
        let (rank, world) = (self.comm.rank(), self.comm.world());
        let st = &mut self.st;
        // The loss is summed over every trained token of the optimizer step and normalised
        // once, so accumulation (and data parallelism) equals one big batch.
        let mut acc = GradAccumulator::new();
        let (mut loss_sum, mut tokens, mut examples, mut padding) = (0.0f64, 0usize, 0u64, 0.0);
        // The global batch: `grad_accum` micro-batches for each rank, in the data's order.
        // Every rank draws all of them (the data position stays global); rank r trains
        // micro-batches r x grad_accum .. (r + 1) x grad_accum.
        let micro_batches = cfg.train.grad_accum * world;
        for micro in 0..micro_batches {
            let tb = Instant::now();
            let batch = self.batcher.next_batch();
            *st.seconds.entry("data_batches".into()).or_default() += tb.elapsed().as_secs_f64();
            examples += batch.num_examples() as u64;
            padding += batch.padding_ratio();
            if micro / cfg.train.grad_accum != rank {
                continue; // another rank's slice
            }
            self.model.set_dropout_seed(st.seed, st.step, micro as u64);
            let out = self.model.loss(&batch)?;
            let value = out
                .sum
                .to_dtype(candle_core::DType::F64)?
                .to_scalar::<f64>()?;
            loss_sum += value;
            tokens += out.n_tokens;
            if out.n_tokens > 0 {
                let store = self.model.backward(&out.sum)?;
                acc.add(&self.specs, &store, out.n_tokens)
                    .map_err(TrainError::optim)?;
            }
        }
        st.examples += examples;
        st.cursor = self.batcher.cursor();
        let mut grads = acc.into_sums();
        let mut reduced = None;
        if world > 1 || self.reducer.on_gpus() {
            // The first collective of the step: it also waits for the slowest rank.
            let t = Instant::now();
            let mut sums = [loss_sum, tokens as f64];
            self.comm
                .allreduce_sum_f64(&mut sums)
                .map_err(TrainError::dist)?;
            (loss_sum, tokens) = (sums[0], sums[1] as usize);
            let wait = t.elapsed().as_secs_f64();
            let stats = allreduce_grads(&self.reducer, &self.specs, &mut grads)?;
            *st.seconds.entry("allreduce".into()).or_default() += t.elapsed().as_secs_f64();
            reduced = Some((stats, wait));
        }
        st.tokens += tokens as u64;
        grads
            .scale(1.0 / tokens.max(1) as f64)
            .map_err(TrainError::optim)?;
        let mean_loss = if tokens > 0 {
            loss_sum / tokens as f64
        } else {
            0.0
        };

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
                    self.run_dir.display()
                )));
            }
            return Ok(None);
        }
        st.bad_in_a_row = 0;
        let grad_norm = if cfg.train.max_grad_norm > 0.0 {
            clip_grad_norm(&mut grads, cfg.train.max_grad_norm)
        } else {
            grads.global_norm()
        }
        .map_err(TrainError::optim)?;
        match &mut self.optim {
            Optim::Replicated(o) => o.step(&grads, lr).map_err(TrainError::optim)?,
            Optim::Sharded(o) => {
                // This rank's share updated, then every rank's share on every rank.
                let t = Instant::now();
                let mine = o.step_shard(&grads, lr).map_err(TrainError::optim)?;
                gather_weights(self.comm, o, &mine)?;
                *st.seconds.entry("sharded_update".into()).or_default() +=
                    t.elapsed().as_secs_f64();
            }
        }
        st.step += 1;
        Ok(Some(StepReport {
            loss: mean_loss,
            grad_norm,
            tokens,
            padding: padding / micro_batches as f64,
            reduced,
        }))
    }

    /// The step's line in metrics.jsonl, the progress bar and (every `logging.every_steps`)
    /// the log; `seconds` is the step's wall time.
    fn log_step(&mut self, s: &StepReport, lr: f64, seconds: f64) -> Result<(), TrainError> {
        self.train_seconds += seconds;
        let st = &mut self.st;
        let mut rec = Map::new();
        rec.insert("step".into(), st.step.into());
        rec.insert("examples".into(), st.examples.into());
        rec.insert("loss".into(), s.loss.into());
        rec.insert("lr".into(), lr.into());
        rec.insert("grad_norm".into(), s.grad_norm.into());
        rec.insert("tokens".into(), s.tokens.into());
        rec.insert("padding".into(), s.padding.into());
        rec.insert("seconds".into(), seconds.into());
        if let Some((r, wait)) = &s.reduced {
            rec.insert("allreduce_bytes".into(), r.bytes.into());
            rec.insert("allreduce_seconds".into(), r.total.as_secs_f64().into());
            rec.insert("allreduce_wait_seconds".into(), (*wait).into());
        }
        let tl = Instant::now();
        if let Some(log) = &mut self.log {
            log.write(&rec).map_err(|e| TrainError::io(log.path(), e))?;
        }
        *st.seconds.entry("logging".into()).or_default() += tl.elapsed().as_secs_f64();
        self.progress
            .step(st.step, st.examples, s.tokens, s.loss, lr, seconds);
        let every = self.cfg.logging.every_steps;
        if every > 0 && st.step.is_multiple_of(every) {
            tracing::info!(
                "step {}/{}  examples {}  loss {:.4}  lr {:.2e}  grad-norm {:.3}  {:.0} tok/s",
                st.step,
                self.total_steps,
                st.examples,
                s.loss,
                lr,
                s.grad_norm,
                s.tokens as f64 / seconds
            );
        }
        Ok(())
    }

    /// Run the evaluations whose time has come: the held-out loss, then each evaluator in
    /// order. Each goes to metrics.jsonl and the state's history and is shown to the stop
    /// rules; returns the first stop reason. With several ranks, rank 0 decides what is due
    /// and scores; every rank computes its share; the stop reason is rank 0's, on every rank.
    fn evaluate(&mut self, when: When) -> Result<Option<String>, TrainError> {
        let due = self.due_evaluations(when)?;
        let mut stop = None;
        if due.iter().any(|n| n == "loss") {
            let t = Instant::now();
            let loss = self.model.eval_loss_on(self.cfg, &self.data, self.comm)?;
            self.add_seconds("eval_loss", t);
            if let Some(loss) = loss {
                let rec = self.record("loss", BTreeMap::from([("eval_loss".into(), loss)]))?;
                let rank = self.ranking.is_none().then_some(-loss);
                stop = stop.or(self.after_evaluation(&rec, rank)?);
            }
        }
        for i in 0..self.evaluators.len() {
            let name = self.evaluators[i].name().to_string();
            if !due.contains(&name) {
                continue;
            }
            let t = Instant::now();
            let out = self.run_dir.join("evals").join(step_dir_name(self.st.step));
            let comm = self.comm;
            let e = &mut self.evaluators[i];
            let mut answer = ModelAnswer::new(&mut self.model, &e.schedule)?;
            let report = if comm.world() == 1 {
                e.evaluator.evaluate(&mut answer, &out)
            } else if comm.is_root() {
                // Rank 0 runs the evaluator; every rank generates its share of the answers.
                let mut split = SplitAnswer {
                    model: answer,
                    comm,
                };
                let report = e.evaluator.evaluate(&mut split, &out);
                split.done()?;
                report
            } else {
                crate::answer::serve(&answer, comm)?;
                self.add_seconds(&format!("eval_{name}"), t);
                continue;
            }
            .map_err(TrainError::eval)?;
            self.add_seconds(&format!("eval_{name}"), t);
            let rec = self.record(&name, report.scores.clone())?;
            let others: Vec<String> = report
                .scores
                .iter()
                .filter(|(k, _)| **k != name)
                .map(|(k, v)| format!("{k} {v:.3}"))
                .collect();
            tracing::info!(
                "{name} at {} examples: {:.3} ({})",
                self.st.examples,
                report.primary,
                others.join(", ")
            );
            self.progress.set_score(&name, report.primary);
            let rank = (self.ranking.as_deref() == Some(name.as_str())).then_some(report.primary);
            stop = stop.or(self.after_evaluation(&rec, rank)?);
        }
        if self.cfg.logging.plots && self.st.evals.last().is_some_and(|r| r.step == self.st.step) {
            self.redraw_plots();
        }
        // Rank 0's decisions (its stop rules saw the scores), on every rank: whether to stop,
        // and whether a rule asked for this step's checkpoint (every rank writes its optimizer
        // shard when the moments are sharded).
        let mut bytes = serde_json::to_vec(&(&stop, self.pending_save))
            .map_err(|e| TrainError::Dist(e.to_string()))?;
        self.comm
            .broadcast_bytes(&mut bytes, 0)
            .map_err(TrainError::dist)?;
        let (stop, pending): (Option<String>, bool) =
            serde_json::from_slice(&bytes).map_err(|e| TrainError::Dist(e.to_string()))?;
        self.pending_save = pending;
        Ok(stop)
    }

    /// The evaluations that run now (`loss`, then the evaluators in order), as rank 0 sees
    /// them (its state holds the history), on every rank.
    fn due_evaluations(&mut self, when: When) -> Result<Vec<String>, TrainError> {
        let mut due = Vec::new();
        if self.comm.is_root() {
            if when == When::End {
                // Evaluate the final model, unless an evaluation just ran at this step.
                let names: Vec<String> = std::iter::once("loss")
                    .chain(self.evaluators.iter().map(|e| e.name()))
                    .map(String::from)
                    .collect();
                let st = &mut self.st;
                for name in names {
                    if !st.evals.iter().any(|r| r.step == st.step && r.name == name) {
                        st.due.insert(name, st.examples);
                    }
                }
            }
            let every = self.cfg.eval.loss.every_examples;
            if every > 0 && self.is_due("loss", every, true, when) {
                due.push("loss".to_string());
            }
            for i in 0..self.evaluators.len() {
                let e = &self.evaluators[i];
                let name = e.name().to_string();
                let (every, at_start) = (e.schedule.every_examples, e.schedule.at_start);
                if every > 0 && self.is_due(&name, every, at_start, when) {
                    due.push(name);
                }
            }
        }
        let mut bytes = serde_json::to_vec(&due).map_err(|e| TrainError::Dist(e.to_string()))?;
        self.comm
            .broadcast_bytes(&mut bytes, 0)
            .map_err(TrainError::dist)?;
        serde_json::from_slice(&bytes).map_err(|e| TrainError::Dist(e.to_string()))
    }

    /// Whether evaluation `name` (every `every` examples) runs now; when due, its next time
    /// moves past the examples seen by whole periods.
    fn is_due(&mut self, name: &str, every: u64, at_start: bool, when: When) -> bool {
        if when == When::Start {
            return at_start;
        }
        let now = self.st.examples;
        let due = self.st.due.entry(name.to_string()).or_insert(0);
        if now < *due {
            return false;
        }
        while *due <= now {
            *due += every;
        }
        true
    }

    /// Write an evaluation to metrics.jsonl and the state's history.
    fn record(
        &mut self,
        name: &str,
        scores: BTreeMap<String, f64>,
    ) -> Result<EvalRecord, TrainError> {
        let mut line = Map::new();
        line.insert("step".into(), self.st.step.into());
        line.insert("examples".into(), self.st.examples.into());
        line.insert("eval".into(), name.into());
        for (k, v) in &scores {
            line.insert(k.clone(), (*v).into());
        }
        let rec = EvalRecord {
            name: name.to_string(),
            step: self.st.step,
            examples: self.st.examples,
            scores,
        };
        self.st.evals.push(rec.clone());
        if let Some(log) = &mut self.log {
            log.write(&line)
                .map_err(|e| TrainError::io(log.path(), e))?;
        }
        Ok(rec)
    }

    /// After an evaluation: the best checkpoint (by `rank`, higher is better, when this
    /// evaluation ranks them), then each stop rule's decision. Returns the first stop reason.
    fn after_evaluation(
        &mut self,
        rec: &EvalRecord,
        rank: Option<f64>,
    ) -> Result<Option<String>, TrainError> {
        let st = &mut self.st;
        if let Some(score) = rank {
            if st.best.is_none_or(|b| score > b.1) {
                st.best = Some((rec.step, score));
            }
        }
        let mut stop = None;
        for rule in &mut self.rules {
            match rule.observe(rec) {
                Decision::Continue => {}
                Decision::Keep { release } => {
                    let released = release.and_then(|r| st.pinned.iter().position(|&s| s == r));
                    if let Some(i) = released {
                        st.pinned.remove(i);
                    }
                    st.pinned.push(rec.step);
                    self.pending_save = true;
                }
                Decision::Stop { reason, chosen } => {
                    if stop.is_some() {
                        continue;
                    }
                    if let Some(c) = &chosen {
                        check_link(rule.name(), &c.link)?;
                    }
                    st.chosen = chosen;
                    stop = Some(reason);
                }
            }
        }
        Ok(stop)
    }

    fn add_seconds(&mut self, part: &str, since: Instant) {
        *self.st.seconds.entry(part.to_string()).or_default() += since.elapsed().as_secs_f64();
    }

    /// Checkpoint the current step (with every stop rule's state), then prune. Rank 0 writes;
    /// the other ranks hold the same weights and optimizer state.
    fn save(&mut self) -> Result<(), TrainError> {
        let (rank, world) = (self.comm.rank(), self.comm.world());
        if let Optim::Sharded(o) = &self.optim {
            // Every rank writes its share beside the checkpoint; rank 0 moves them in.
            let staged = staged_shard(&self.run_dir, self.st.step, rank, world);
            o.save(&staged)
                .map_err(|e| TrainError::Checkpoint(format!("{}: {e}", staged.display())))?;
            self.comm.barrier().map_err(TrainError::dist)?;
        }
        if !self.comm.is_root() {
            return Ok(());
        }
        let st = &mut self.st;
        st.seconds.insert(
            "train".into(),
            self.train_seconds_before + self.train_seconds,
        );
        st.config = serde_json::to_value(self.cfg).unwrap_or(Value::Null);
        st.stop_rules = self
            .rules
            .iter()
            .map(|r| (r.name().to_string(), r.state()))
            .collect();
        let t = Instant::now();
        let (model, optim, run_dir, step) = (&self.model, &self.optim, &self.run_dir, st.step);
        self.ckpts
            .save(st.step, &*st, |dir| {
                model.save(dir).map_err(|e| e.to_string())?;
                match optim {
                    Optim::Replicated(o) => o
                        .save(dir.join(crate::checkpoint::OPTIMIZER_FILE))
                        .map_err(|e| e.to_string()),
                    Optim::Sharded(_) => (0..world).try_for_each(|r| {
                        let staged = staged_shard(run_dir, step, r, world);
                        std::fs::rename(&staged, dir.join(shard_file_name(r, world)))
                            .map_err(|e| format!("{}: {e}", staged.display()))
                    }),
                }
            })
            .map_err(TrainError::checkpoint)?;
        let mut pinned = st.pinned.clone();
        if self.cfg.checkpoint.keep_best {
            pinned.extend(st.best.map(|b| b.0));
        }
        pinned.extend(st.chosen.as_ref().map(|c| c.step));
        let removed = self
            .ckpts
            .prune(self.cfg.checkpoint.keep_last, &pinned)
            .map_err(TrainError::checkpoint)?;
        if let Some((step, _)) = st.best {
            if self.ckpts.list().iter().any(|(s, _)| *s == step) {
                self.ckpts
                    .point("best", &step_dir_name(step))
                    .map_err(TrainError::checkpoint)?;
            }
        }
        *st.seconds.entry("checkpoint".into()).or_default() += t.elapsed().as_secs_f64();
        tracing::debug!("checkpoint step {} saved; pruned {:?}", st.step, removed);
        Ok(())
    }

    /// The last checkpoint, the chosen checkpoint's link, the plots and the summary.
    fn finish(
        mut self,
        outcome: Outcome,
        stop: Option<String>,
        started: Instant,
    ) -> Result<(Outcome, Summary), TrainError> {
        let reason = match (&outcome, stop) {
            (_, Some(reason)) => reason,
            (Outcome::Interrupted, None) => {
                "interrupted: checkpointed after the current step".into()
            }
            _ => "finished: reached the configured length".into(),
        };
        if outcome != Outcome::Interrupted {
            self.st.stopped = Some(reason.clone());
        }
        self.save()?;
        if !self.comm.is_root() {
            let status = format!("{outcome:?}").to_lowercase();
            let summary = Summary::build(
                self.cfg,
                &self.st,
                &self.data.report,
                &status,
                &reason,
                &self.run_dir,
                started.elapsed().as_secs_f64(),
            );
            return Ok((outcome, summary));
        }
        if let Some(c) = &self.st.chosen {
            self.ckpts
                .point(&c.link, &step_dir_name(c.step))
                .map_err(TrainError::checkpoint)?;
        }
        self.redraw_plots();
        let status = match outcome {
            Outcome::Finished => "finished",
            Outcome::Stopped | Outcome::AlreadyStopped => "stopped",
            Outcome::Interrupted => "interrupted",
        };
        let summary = Summary::build(
            self.cfg,
            &self.st,
            &self.data.report,
            status,
            &reason,
            &self.run_dir,
            started.elapsed().as_secs_f64(),
        );
        summary.write(&self.run_dir)?;
        match (&outcome, &self.st.chosen) {
            (Outcome::Stopped, Some(c)) => tracing::info!(
                "{reason}. The {} checkpoint: {}",
                c.link,
                step_dir_name(c.step)
            ),
            (Outcome::Interrupted, _) => tracing::info!(
                "interrupted at step {}: checkpoint saved; resume with --resume",
                self.st.step
            ),
            _ => tracing::info!("{reason} after {} steps", self.st.step),
        }
        Ok((outcome, summary))
    }

    fn redraw_plots(&self) {
        let Some(log) = self.log.as_ref().filter(|_| self.cfg.logging.plots) else {
            return;
        };
        match MetricsLog::read_all(log.path()) {
            Ok(records) => {
                if let Err(e) = plot::redraw(&self.run_dir, &records) {
                    tracing::warn!("plots: {e}");
                }
            }
            Err(e) => tracing::warn!("plots: cannot read {}: {e}", log.path().display()),
        }
    }
}

/// AdamW, replicated on every rank or sharded over them (`train.shard_optimizer`).
enum Optim {
    Replicated(AdamW),
    Sharded(ShardedAdamW),
}

impl Optim {
    /// Restores the state a checkpoint holds: `optimizer.safetensors`, or the shard files of
    /// a sharded run (written by any number of ranks). A checkpoint of the other kind is
    /// refused, saying which setting resumes it.
    fn load(&mut self, dir: &Path) -> Result<(), TrainError> {
        let err =
            |e: sft_optim::OptimError| TrainError::Checkpoint(format!("{}: {e}", dir.display()));
        let replicated = dir.join(crate::checkpoint::OPTIMIZER_FILE).exists();
        match self {
            Optim::Replicated(o) if replicated => o
                .load(dir.join(crate::checkpoint::OPTIMIZER_FILE))
                .map_err(err),
            Optim::Sharded(o) if !replicated => o.load(dir).map_err(err),
            Optim::Replicated(_) => Err(TrainError::Config(format!(
                "cannot resume {}: its optimizer state is sharded over ranks (it was saved \
                 with train.shard_optimizer: true); resume with train.shard_optimizer: true",
                dir.display()
            ))),
            Optim::Sharded(_) => Err(TrainError::Config(format!(
                "cannot resume {}: its optimizer state is one replicated file (it was saved \
                 with train.shard_optimizer: false); resume with train.shard_optimizer: false",
                dir.display()
            ))),
        }
    }
}

/// Every rank's updated share of the weights, gathered onto every rank in chunks (each
/// rank's next [`sft_dist::BUCKET_ELEMENTS`] / world elements a round), so that no rank holds
/// all the weights in f32 at once: only a chunk from each rank and the weights not yet whole.
fn gather_weights(comm: &dyn Comm, o: &ShardedAdamW, mine: &[f32]) -> Result<(), TrainError> {
    let (rank, world) = (comm.rank(), comm.world());
    let counts = o.counts();
    let starts: Vec<usize> = (0..world)
        .map(|r| sft_optim::shard_range(o.total(), r, world).start)
        .collect();
    let chunk = (sft_dist::BUCKET_ELEMENTS / world).max(1);
    let rounds = counts.iter().max().copied().unwrap_or(0).div_ceil(chunk);
    let mut pending = sft_optim::Pending::default();
    for k in 0..rounds {
        let lo = k * chunk;
        let sizes: Vec<usize> = counts
            .iter()
            .map(|&c| c.saturating_sub(lo).min(chunk))
            .collect();
        let from = lo.min(mine.len());
        let got = comm
            .allgather_f32(&mine[from..from + sizes[rank]], &sizes)
            .map_err(TrainError::dist)?;
        let mut at = 0;
        for r in 0..world {
            o.apply_piece(&mut pending, starts[r] + lo, &got[at..at + sizes[r]])
                .map_err(TrainError::optim)?;
            at += sizes[r];
        }
    }
    o.check_applied(&pending).map_err(TrainError::optim)
}

/// Where rank `rank` writes its optimizer shard of checkpoint `step` before rank 0 moves it
/// into the checkpoint folder (a hidden name in the run folder, which must be shared by every
/// rank, as the resume already needs).
fn staged_shard(run_dir: &Path, step: u64, rank: usize, world: usize) -> PathBuf {
    run_dir.join(format!(
        ".{}-{}",
        step_dir_name(step),
        shard_file_name(rank, world)
    ))
}

/// Sums the step's gradient sums over the ranks: every trainable parameter's, in the
/// parameters' (fixed) order, flattened into buckets (a rank without a gradient for one, no
/// trained token in its slice, adds zeros).
fn allreduce_grads(
    reducer: &Reducer,
    specs: &[ParamSpec],
    grads: &mut Grads,
) -> Result<ReduceStats, TrainError> {
    let mut tensors = Vec::with_capacity(specs.len());
    for p in specs {
        let t = match grads.get(&p.name) {
            Some(g) => g.clone(),
            None => {
                let dt = match p.var.dtype() {
                    DType::F64 => DType::F64,
                    _ => DType::F32,
                };
                p.var.zeros_like()?.to_dtype(dt)?
            }
        };
        tensors.push(t);
    }
    let stats = reducer
        .allreduce(&mut tensors, sft_dist::BUCKET_ELEMENTS)
        .map_err(TrainError::dist)?;
    for (p, t) in specs.iter().zip(tensors) {
        grads.insert(p.name.clone(), t);
    }
    Ok(stats)
}

/// Evaluator names key the metrics and the schedule, rule names the saved states: each must
/// be unique (and no evaluator may take the held-out loss's name, `loss`).
fn check_names(evaluators: &[Scheduled], rules: &[Box<dyn StopRule>]) -> Result<(), TrainError> {
    /// The first of `names` that `taken` or an earlier name already has.
    fn repeated<'a>(
        taken: &[&'a str],
        mut names: impl Iterator<Item = &'a str>,
    ) -> Option<&'a str> {
        let mut seen = taken.to_vec();
        names.find(|&n| {
            let again = seen.contains(&n);
            seen.push(n);
            again
        })
    }
    if let Some(n) = repeated(&["loss"], evaluators.iter().map(|e| e.name())) {
        return Err(TrainError::Config(format!(
            "two evaluations are named `{n}`: each evaluator needs its own name"
        )));
    }
    if let Some(n) = repeated(&[], rules.iter().map(|r| r.name())) {
        return Err(TrainError::Config(format!(
            "two stop rules are named `{n}`: each needs its own name (it keys its saved state)"
        )));
    }
    Ok(())
}

/// A chosen checkpoint's link lives beside `latest` and `best` in the run folder.
fn check_link(rule: &str, link: &str) -> Result<(), TrainError> {
    let plain = !link.is_empty()
        && link
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if plain && !["latest", "best"].contains(&link) && !link.starts_with("step-") {
        return Ok(());
    }
    Err(TrainError::Config(format!(
        "stop rule `{rule}` names its checkpoint `{link}`: expected letters, digits, - and _, \
         other than latest, best and step-N"
    )))
}

/// Show the run's evaluations to fresh rules; whether one of them would stop the run.
fn replay(rules: &mut [Box<dyn StopRule>], evals: &[EvalRecord]) -> bool {
    let mut stops = false;
    for rec in evals {
        for rule in rules.iter_mut() {
            stops |= matches!(rule.observe(rec), Decision::Stop { .. });
        }
    }
    stops
}

/// Optimizer steps the run will take at most: the first limit reached of epochs, max_steps
/// and max_examples, with `world` ranks each accumulating `grad_accum` micro-batches a step.
pub fn total_steps(cfg: &Config, world: usize, batches_per_epoch: u64, train_examples: u64) -> u64 {
    let accum = (cfg.train.grad_accum * world.max(1)) as f64;
    let per_step = (cfg.train.micro_batch_size * cfg.train.grad_accum * world.max(1)) as u64;
    let mut limit = u64::MAX;
    if let Some(e) = cfg.train.epochs {
        limit = limit.min(((batches_per_epoch as f64 * e) / accum).ceil() as u64);
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
        limit = limit.min((x as f64 / (mean * accum)).ceil() as u64);
    }
    limit.max(1)
}

fn reached_limit(cfg: &Config, st: &TrainerState, total_steps: u64) -> bool {
    st.step >= total_steps
        || cfg.train.max_steps.is_some_and(|m| st.step >= m)
        || cfg.train.max_examples.is_some_and(|m| st.examples >= m)
}

/// The checkpoint to resume from, its state read and every file that resume loads listed in
/// it and verified (see [`crate::adapter::resume_files`]).
fn find_resume(
    ckpts: &Checkpoints,
    r: &Resume,
    cfg: &Config,
) -> Result<(PathBuf, TrainerState), TrainError> {
    let reads = |dir: &Path| crate::adapter::resume_files(cfg.adapter.kind, dir);
    match r {
        Resume::Latest => {
            let (path, _, st) = ckpts
                .load_latest::<TrainerState>(&reads)
                .map_err(TrainError::checkpoint)?;
            Ok((path, st))
        }
        Resume::Path(p) => {
            let (_, st) =
                Checkpoints::load::<TrainerState>(p, &reads).map_err(TrainError::checkpoint)?;
            Ok((p.clone(), st))
        }
    }
}

fn check_resume_compatible(
    cfg: &Config,
    world: usize,
    st: &TrainerState,
    path: &Path,
) -> Result<(), TrainError> {
    let now = identity(cfg, world);
    // The global batch (micro-batch x accumulation x world): another one is another run.
    let accum = |v: &Value| v.pointer("/train/grad_accum").and_then(Value::as_u64);
    let (was, is) = (accum(&st.identity), accum(&now));
    if was != is {
        let micro = cfg.train.micro_batch_size as u64;
        let (was, is) = (was.unwrap_or(0), is.unwrap_or(0));
        return Err(TrainError::Config(format!(
            "cannot resume {}: its global batch is {} sequences (micro-batch x accumulation x \
             world = {micro} x {was} micro-batches over all ranks), this run's {} ({micro} x {} \
             x {world} ranks). Resume with the same global batch: set train.grad_accum so that \
             grad_accum x world = {was}",
            path.display(),
            micro * was,
            micro * is,
            cfg.train.grad_accum
        )));
    }
    let diffs = differences(&st.identity, &now);
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
