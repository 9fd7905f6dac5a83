//! `sft train` / `sft-train`: run a YAML config. SIGINT, SIGTERM (a scheduler's preemption or
//! time limit), SIGHUP and SIGUSR1 (what Open MPI's mpirun passes on to every rank: it ends the
//! job on SIGTERM) finish the current step, checkpoint and exit with status 130. A second
//! Ctrl-C exits at once; a repeated SIGTERM or SIGHUP does not (a scheduler may deliver SIGTERM
//! more than once: Slurm signals every process of a preempted job, the batch script forwards it).
use super::output;
use anyhow::{Context, Result};
use clap::Parser;
use sft_trainer::config::Config;
use sft_trainer::{Outcome, Resume, RunOptions};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM, SIGUSR1};

/// The quickstart config and the data it names, compiled in: `sft-train` with no `--config`
/// runs it from any folder.
const QUICKSTART: &str = include_str!("../../../../configs/quickstart.yaml");
const QUICKSTART_DATA: &[u8] = include_bytes!("../../../../configs/data/bundled.jsonl");
/// Where the quickstart names its data, relative to its folder (`configs/`).
const QUICKSTART_DATA_PATH: &str = "data/bundled.jsonl";

#[derive(Parser, Debug)]
#[command(
    name = "sft-train",
    version,
    about = "Fine-tune a LLaMA-family model from a YAML config"
)]
pub struct TrainArgs {
    /// The YAML config (default: the embedded quickstart, configs/quickstart.yaml). Relative
    /// paths in it are read from its folder.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Override a config value: `--set train.lr=1e-4` (the value is YAML; repeatable; a
    /// relative path is read from the working folder).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
    /// Resume the run: from its latest checkpoint, or from the checkpoint folder given.
    #[arg(long, num_args = 0..=1, default_missing_value = "latest", value_name = "PATH")]
    pub resume: Option<String>,
    /// Print the resolved config, the plan and a memory estimate (on stderr; the numbers as
    /// JSON on stdout), then exit.
    #[arg(long)]
    pub dry_run: bool,
}

/// The embedded quickstart, its data written once into `$SFT_CACHE/embedded/` (a folder named
/// by the data's hash) so that its relative `data/bundled.jsonl` is found from any folder.
fn quickstart(overrides: &[String]) -> Result<Config> {
    let hash = sft_common::sha256_hex(QUICKSTART_DATA);
    let base = sft_model::load::sft_cache_dir()
        .join("embedded")
        .join(format!("quickstart-{}", &hash[..16]));
    let data = base.join(QUICKSTART_DATA_PATH);
    let present = std::fs::read(&data).is_ok_and(|b| b == QUICKSTART_DATA);
    if !present {
        let folder = data.parent().unwrap_or(&base);
        std::fs::create_dir_all(folder)
            .with_context(|| format!("cannot create {}", folder.display()))?;
        // Written beside and renamed, so a run started alongside never reads half a file.
        let tmp = folder.join(format!(".bundled.jsonl.tmp{}", std::process::id()));
        std::fs::write(&tmp, QUICKSTART_DATA)
            .and_then(|()| std::fs::rename(&tmp, &data))
            .with_context(|| format!("cannot write the quickstart's data to {}", data.display()))?;
    }
    Ok(Config::from_yaml_in(
        QUICKSTART,
        "configs/quickstart.yaml (embedded)",
        overrides,
        Some(&base),
    )?)
}

pub fn run(args: TrainArgs) -> Result<()> {
    let mut cfg = match &args.config {
        Some(path) => Config::load(path, &args.overrides)?,
        None => quickstart(&args.overrides)?,
    };
    if args.dry_run {
        // Under mpirun every rank would print the same plan: rank 0 does.
        let world = sft_dist::launcher_world().map_or(1, |(n, _)| n.max(1));
        if sft_dist::launcher_rank() != 0 {
            return Ok(());
        }
        let plan = sft_trainer::plan::dry_run(&cfg, world).context("dry run")?;
        say!("{plan}");
        return output::json(&plan.numbers());
    }
    // Which CPU GEMM kernels run (SFT_CPU_KERNELS on this CPU); a refused setting stops here.
    let kernels = sft_model::cpu_features::describe().context("choosing the CPU GEMM kernels")?;
    tracing::info!("{kernels}");
    let stop = Arc::new(AtomicBool::new(false));
    stop_on_signals(stop.clone())?;
    let opts = RunOptions {
        resume: args.resume.map(|r| {
            if r == "latest" {
                Resume::Latest
            } else {
                Resume::Path(PathBuf::from(r))
            }
        }),
        stop,
        ..Default::default()
    }
    .with_test_hooks_from_env();
    // candle's backward recurses over the graph: give the run a deep stack. MPI (a run started
    // by mpirun or srun) is started, used and finished on this thread.
    let handle = std::thread::Builder::new()
        .name("train".into())
        .stack_size(1 << 30)
        .spawn(move || -> Result<_> {
            let comm = sft_dist::connect()?;
            if comm.world() == 1 {
                return Ok((sft_trainer::train(&cfg, &opts)?, true));
            }
            let _rank = tracing::error_span!("rank", n = comm.rank()).entered();
            // `cuda`: this rank's GPU, by its rank on the node.
            if cfg.model.device.trim() == "cuda" {
                cfg.model.device = format!("cuda:{}", gpu_of(comm.local_rank()));
            }
            match sft_trainer::train_on(&*comm, &cfg, &opts) {
                Ok(done) => Ok((done, comm.is_root())),
                Err(e) => {
                    // The other ranks may be waiting for this one: end them all.
                    tracing::error!("{e}; aborting all {} ranks", comm.world());
                    comm.abort(1)
                }
            }
        })
        .context("cannot start the training thread")?;
    let ((outcome, summary), root) = handle
        .join()
        .map_err(|_| anyhow::anyhow!("the training thread panicked"))??;
    if root {
        output::json(&summary)?;
    }
    if outcome == Outcome::Interrupted {
        std::process::exit(130);
    }
    Ok(())
}

/// The GPU ordinal of the process with this rank on its node: the rank itself, or, where the
/// launcher gave each process its own GPUs (srun --gpus-per-task sets CUDA_VISIBLE_DEVICES per
/// task), the rank modulo the GPUs this process sees.
fn gpu_of(local_rank: usize) -> usize {
    let visible = std::env::var("CUDA_VISIBLE_DEVICES")
        .map(|v| v.split(',').filter(|d| !d.trim().is_empty()).count())
        .unwrap_or(0);
    if visible > 0 {
        local_rank % visible
    } else {
        local_rank
    }
}

/// Set `stop` on SIGINT, SIGTERM, SIGHUP or SIGUSR1; exit at once on a second SIGINT only.
fn stop_on_signals(stop: Arc<AtomicBool>) -> Result<()> {
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP, SIGUSR1])
        .context("cannot install the signal handlers")?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            for sig in signals.forever() {
                let name = match sig {
                    SIGINT => "interrupt",
                    SIGTERM => "SIGTERM",
                    SIGHUP => "SIGHUP",
                    _ => "SIGUSR1",
                };
                if !stop.swap(true, Ordering::SeqCst) {
                    say!(
                        "{name}: finishing the current step, then checkpointing (Ctrl-C again to \
                         exit now)"
                    );
                } else if sig == SIGINT {
                    say!("second interrupt: exiting without a checkpoint");
                    std::process::exit(130);
                } else {
                    say!("{name} again: still finishing the step and checkpointing");
                }
            }
        })
        .context("cannot start the signal thread")?;
    Ok(())
}
