//! `datamux`: run experiments, time models, write reports.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand, ValueEnum};
use datamux_data::Catalogue;
use datamux_pipeline::{Env, Tick};
use datamux_runner::job::Job;
use datamux_runner::sweep::{self, Message, Outcome, Plan};
use datamux_runner::{config, out, report, reproduce, serve};

// Allocation dominates small training steps; mimalloc cut one by ~35 % here (house-style §2.14),
// and keeping freed memory (`main`) saves re-zeroing it (docs/performance.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// What `datamux` exits with (also in the README).
const EXIT_CODES: &str = "Exit codes: 0 = every run of the plan finished and every [[expect]] held; \
1 = a run or a speed point failed, an expectation was missed or matched no row, a reproduced point is outside \
its tolerance, or nothing could run at all; 2 = a bad command line or experiment file (or \
another error before any run); 3 = everything that could run ran and held, but some datasets \
were unavailable.";

#[derive(Parser)]
#[command(
    name = "datamux",
    version,
    about = "Data multiplexing experiments: train, time, report",
    after_help = EXIT_CODES
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

/// Sizes of the bench's text model (`datamux_text::Size` presets).
#[derive(Clone, Copy, ValueEnum)]
enum BenchSize {
    Tiny,
    Small,
    Base,
}

impl From<BenchSize> for datamux_text::Size {
    fn from(s: BenchSize) -> Self {
        match s {
            BenchSize::Tiny => Self::Tiny,
            BenchSize::Small => Self::Small,
            BenchSize::Base => Self::Base,
        }
    }
}

#[derive(clap::Args, Clone)]
struct DataArgs {
    /// Local mirror of the datasets (else DATAMUX_DATA_DIR).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Local folder of pretrained models, laid out <owner>/<name>/ (else DATAMUX_MODELS_DIR).
    #[arg(long)]
    models_dir: Option<PathBuf>,
    /// Never download; use the mirror and the hf-hub cache only (also HF_HUB_OFFLINE=1).
    #[arg(long)]
    offline: bool,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run experiment files (or folders of them) and write results/<experiment>/.
    #[command(after_help = EXIT_CODES)]
    Run {
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        /// quick (the default, CPU minutes), standard (CPU hours), paper (GPU sizes), smoke.
        #[arg(long, default_value = "quick")]
        profile: String,
        /// The working folder of the tables (default: reproduced/<profile>/, ignored by git;
        /// `datamux publish` copies a finished one into results/).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Compare every point with the published tables under this folder (results/:
        /// results/<experiment>/ for quick, results/<profile>/<experiment>/ for the others);
        /// a point outside its tolerance exits 1.
        #[arg(long)]
        compare_with: Option<PathBuf>,
        /// Run only shard K of M (e.g. 2/3): a stable share of the grid, runs that share a
        /// warm-up kept together; expectations are checked on the merged folder (`datamux merge`).
        #[arg(long)]
        shard: Option<sweep::shard::Shard>,
        /// Training runs side by side (default: one per core).
        #[arg(long)]
        jobs: Option<usize>,
        /// Threads per training run.
        #[arg(long, default_value_t = 1)]
        threads: usize,
        /// Override a setting of every run, e.g. --set train.steps=100.
        #[arg(long = "set")]
        overrides: Vec<String>,
        /// Skip the speed points.
        #[arg(long)]
        no_speed: bool,
        /// Do not write README.md and plots afterwards.
        #[arg(long)]
        no_report: bool,
        #[command(flatten)]
        data: DataArgs,
    },
    /// Merge the folders of `datamux run --shard` into one, as one machine's run would have
    /// written it.
    Merge {
        #[arg(required = true)]
        shards: Vec<PathBuf>,
        #[arg(long)]
        out: PathBuf,
    },
    /// Publish a finished working folder (reproduced/<profile>/) into results/: each of its
    /// points replaces the published rows of that point whole; the other points stay.
    Publish {
        /// The working folder, e.g. reproduced/quick.
        from: PathBuf,
        #[arg(long, default_value = "results")]
        to: PathBuf,
        /// Replace each experiment's published tables whole (points the plan no longer has go).
        #[arg(long)]
        replace: bool,
    },
    /// Run every experiment at its `smoke` profile into a temporary folder and check the tables.
    Verify {
        #[arg(default_value = "experiments")]
        paths: Vec<PathBuf>,
        #[command(flatten)]
        data: DataArgs,
    },
    /// Check that experiment files parse and expand (no training).
    Check {
        #[arg(default_value = "experiments")]
        paths: Vec<PathBuf>,
        #[arg(long, default_value = "quick")]
        profile: String,
        #[command(flatten)]
        data: DataArgs,
    },
    /// Write results/<experiment>/README.md and plots from the Parquet tables.
    Report {
        #[arg(default_value = "results")]
        root: PathBuf,
    },
    /// Print a results table.
    /// Print a results table (a Parquet file or an experiment folder). Accuracy tables take
    /// filters, show a 95 % Wilson interval over the examples for accuracies, and pivot by N.
    Show {
        path: PathBuf,
        #[arg(long, default_value_t = 50)]
        rows: usize,
        /// Only this dataset (accuracy tables).
        #[arg(long)]
        dataset: Option<String>,
        /// Only this metric, e.g. accuracy, f1, retrieval_accuracy (accuracy tables).
        #[arg(long)]
        metric: Option<String>,
        /// Only this split: test or validation (accuracy tables).
        #[arg(long)]
        split: Option<String>,
        /// One line per model, one column per N (mean over seeds), the change against N = 1
        /// beside each value.
        #[arg(long)]
        pivot: bool,
    },
    /// Inference throughput of the sentence MuxNet (small, base; L = 128) and the MNIST ViT
    /// for every N, with a per-stage breakdown and a training step; rows into <out>/bench/.
    Bench {
        /// Sizes of the text model.
        #[arg(long, value_enum, value_delimiter = ',', default_value = "small,base")]
        sizes: Vec<BenchSize>,
        #[arg(long, value_delimiter = ',', default_value = "1,2,5,10,20,40")]
        n: Vec<usize>,
        #[arg(long, default_value_t = 128)]
        seq_len: usize,
        /// Muxed rows per forward call of the text model, the same at every N (the reference
        /// times a fixed batch of muxed rows, method.md §9.2).
        #[arg(long, default_value_t = 8)]
        rows: usize,
        /// Text instances per timed pass, the same at every N; a multiple of rows x N for every
        /// N (default: rows x the largest N).
        #[arg(long)]
        batch_instances: Option<usize>,
        /// Muxed rows per forward call of the MNIST models (the ViT's rows are 16 patches long).
        #[arg(long, default_value_t = 64)]
        vit_rows: usize,
        /// The MNIST models to time: vit, mlp, lenet (experiments/mnist.toml's settings), lenet-hrr
        /// (docs/images.md).
        #[arg(long, value_enum, value_delimiter = ',', default_value = "vit")]
        images: Vec<datamux_runner::bench::ImageModel>,
        /// Instances in the timed training step (one call), the same at every N.
        #[arg(long, default_value_t = 40)]
        train_instances: usize,
        #[arg(long, default_value_t = 5)]
        iters: usize,
        #[arg(long, default_value_t = 30522)]
        vocab: usize,
        /// Skip the MNIST models (`--images` none).
        #[arg(long)]
        no_vit: bool,
        #[arg(long, default_value = "results")]
        out: PathBuf,
    },
    /// Answer inputs with a trained model, one JSON line per input (stdin or --input).
    Predict(serve::PredictArgs),
    /// Serve a trained model over HTTP/JSON, multiplexing by a policy (docs/serving.md).
    Serve(serve::ServeArgs),
    /// Open-loop Poisson load against a server, every answer checked against its label; rows
    /// into <out>/serve/serve.parquet.
    Loadtest(serve::loadtest::LoadtestArgs),
    /// Train (or reuse) the serve experiments' models, then load-test each under fixed:1,
    /// fixed:N_max and adaptive over one ladder of rates (`just serve-bench`).
    ServeBench(serve::bench::ServeBenchArgs),
    /// Internal: run one job from a spec file and stream JSON lines (used by `run`).
    #[command(hide = true)]
    Worker { spec: PathBuf },
}

fn command_line() -> String {
    let args: Vec<String> = std::env::args().collect();
    let mut out = vec!["datamux".to_string()];
    out.extend(args.into_iter().skip(1));
    out.join(" ")
}

fn env_for(data: &DataArgs, profile: &str) -> Result<Env> {
    let root = std::env::current_dir()?;
    Ok(Env {
        data_dir: data.data_dir.clone(),
        // Resolved (and checked to exist) here, so a worker sees the folder the command named.
        models_dir: datamux_data::ModelResolver::from_env(data.models_dir.clone(), data.offline)?
            .models_dir,
        offline: data.offline,
        runs_dir: root.join("runs"),
        cache_dir: root.join(".cache"),
        profile: profile.to_string(),
        // This run's own folder (the process id and the time): the next run tries again.
        hub_attempts: Some(root.join(".cache/hub-attempts").join(format!(
            "{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs())
        ))),
    })
}

/// The catalogue of the data directory (the built-in one, with `<data dir>/catalogue.toml`
/// merged over it). A missing mirror (or models folder) is reported once, up front, rather than
/// as an unavailable row per run.
fn catalogue(data: &DataArgs) -> Result<Catalogue> {
    let resolver = datamux_data::Resolver::from_env(data.data_dir.clone(), data.offline)?;
    // A models folder that is named must exist, checked as early as the data directory.
    datamux_data::ModelResolver::from_env(data.models_dir.clone(), data.offline)?;
    Ok(Catalogue::load(resolver.data_dir.as_deref())?)
}

/// A fault-injection seam for the test of a worker's panic report
/// (`DATAMUX_TEST_WORKER_PANIC=<message>`): no setting can make a worker panic once the files
/// are checked.
#[allow(clippy::panic)]
fn panic_seam() {
    if let Some(msg) = std::env::var_os("DATAMUX_TEST_WORKER_PANIC") {
        panic!("{}", msg.to_string_lossy());
    }
}

fn main() -> ExitCode {
    datamux_kernels::keep_freed_memory();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("DATAMUX_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match real_main() {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            // One line: the error and its causes.
            eprintln!("error: {}", format!("{e:#}").replace('\n', " | "));
            ExitCode::from(2)
        }
    }
}

fn real_main() -> Result<u8> {
    let cli = Cli::parse();
    match cli.command {
        Cmd::Run {
            paths,
            profile,
            out,
            compare_with,
            shard,
            jobs,
            threads,
            overrides,
            no_speed,
            no_report,
            data,
        } => {
            if jobs == Some(0) || threads == 0 {
                bail!("--jobs and --threads must be at least 1");
            }
            let overrides = overrides
                .iter()
                .map(|s| config::parse_override(s))
                .collect::<Result<Vec<_>>>()?;
            let mut experiments =
                sweep::load_experiments(&paths, &profile, &overrides, &catalogue(&data)?)?;
            if let Some(shard) = shard {
                sweep::shard::restrict(&mut experiments, shard);
                eprintln!(
                    "shard {}/{}: {} run(s) of the plan; expectations are checked on the merged folder",
                    shard.index + 1,
                    shard.count,
                    experiments.iter().map(|e| e.runs.len()).sum::<usize>()
                );
            }
            let cores = std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1);
            let out = out.unwrap_or_else(|| PathBuf::from("reproduced").join(&profile));
            let plan = Plan {
                experiments,
                out_dir: out.clone(),
                env: env_for(&data, &profile)?,
                jobs: jobs.unwrap_or((cores / threads.max(1)).max(1)),
                threads: threads.max(1),
                speed: !no_speed,
                command: command_line(),
                worker_exe: std::env::current_exe().context("cannot find the datamux binary")?,
            };
            let mut outcome = sweep::run(&plan)?;
            if let Some(published) = &compare_with {
                outcome.outside = reproduce::compare_plan(&plan.experiments, &out, published)?;
            }
            if !no_report {
                for p in report::write_reports(&out, &format!("datamux report {}", out.display()))?
                {
                    eprintln!("wrote {}", p.display());
                }
            }
            eprintln!("{}", outcome.summary());
            Ok(outcome.code())
        }
        Cmd::Verify { paths, data } => {
            let experiments = sweep::load_experiments(&paths, "smoke", &[], &catalogue(&data)?)?;
            let tmp = std::env::temp_dir().join(format!("datamux-verify-{}", std::process::id()));
            let plan = Plan {
                experiments,
                out_dir: tmp.clone(),
                env: Env {
                    runs_dir: tmp.join("runs"),
                    ..env_for(&data, "smoke")?
                },
                jobs: 1,
                threads: std::thread::available_parallelism()
                    .map(|n| n.get())
                    .unwrap_or(1),
                speed: true,
                command: command_line(),
                worker_exe: std::env::current_exe().context("cannot find the datamux binary")?,
            };
            let outcome = sweep::run(&plan)?;
            report::write_reports(&tmp, "datamux verify")?;
            eprintln!(
                "verify: {} (tables in {})",
                outcome.summary(),
                tmp.display()
            );
            Ok(outcome.code())
        }
        Cmd::Check {
            paths,
            profile,
            data,
        } => {
            let env = env_for(&data, &profile)?;
            for e in sweep::load_experiments(&paths, &profile, &[], &catalogue(&data)?)? {
                // The largest memory estimate, as `run` checks it against the machine.
                let largest = e
                    .runs
                    .iter()
                    .filter_map(|r| {
                        let (need, _) = sweep::memory_need(&Job::Train(r.clone()), &env)?;
                        Some((need, r.run_id()))
                    })
                    .max();
                let shown = out::line(format!(
                    "{}: {} run(s) at profile {}{}",
                    e.name,
                    e.runs.len(),
                    e.profile,
                    largest.map_or(String::new(), |(b, id)| format!(
                        "; largest memory estimate {} ({id})",
                        datamux_pipeline::memory::gib(b)
                    ))
                ));
                if !shown {
                    break;
                }
            }
            Ok(Outcome::SUCCESS)
        }
        Cmd::Bench {
            sizes,
            n,
            seq_len,
            rows,
            batch_instances,
            vit_rows,
            images,
            train_instances,
            iters,
            vocab,
            no_vit,
            out,
        } => {
            let sizes: Vec<datamux_text::Size> = sizes.into_iter().map(Into::into).collect();
            anyhow::ensure!(n.iter().all(|n| *n >= 1), "every N must be at least 1");
            anyhow::ensure!(
                rows >= 1 && vit_rows >= 1 && train_instances >= 1,
                "--rows, --vit-rows and --train-instances must be at least 1"
            );
            let timing = |rows: usize, instances: Option<usize>| {
                datamux_runner::bench::pass_timing(&n, rows, instances, iters)
            };
            let cfg = datamux_runner::bench::BenchConfig {
                sizes,
                seq_len,
                vocab,
                timing: timing(rows, batch_instances)?,
                vit_timing: timing(vit_rows, None)?,
                train_instances,
                ns: n,
                images: if no_vit { Vec::new() } else { images },
                train_step: true,
                out: out.clone(),
                command: command_line(),
            };
            datamux_runner::bench::run(&cfg)?;
            report::write_reports(
                &out.join("bench"),
                &format!("datamux report {}", out.join("bench").display()),
            )?;
            Ok(Outcome::SUCCESS)
        }
        Cmd::Merge { shards, out } => {
            for dir in reproduce::merge(&shards, &out)? {
                for p in report::write_reports(&dir, &format!("datamux report {}", dir.display()))?
                {
                    out::line(format!("wrote {}", p.display()));
                }
            }
            Ok(Outcome::SUCCESS)
        }
        Cmd::Publish { from, to, replace } => {
            let dirs = reproduce::publish(&from, &to, replace)?;
            for dir in &dirs {
                for p in report::write_reports(dir, &format!("datamux report {}", dir.display()))? {
                    out::line(format!("wrote {}", p.display()));
                }
            }
            Ok(Outcome::SUCCESS)
        }
        Cmd::Report { root } => {
            let written =
                report::write_reports(&root, &format!("datamux report {}", root.display()))?;
            if written.is_empty() {
                bail!(
                    "{} holds no experiment tables (accuracy.parquet or speed.parquet in a folder per experiment)",
                    root.display()
                );
            }
            for p in written {
                out::line(format!("wrote {}", p.display()));
            }
            Ok(Outcome::SUCCESS)
        }
        Cmd::Show {
            path,
            rows,
            dataset,
            metric,
            split,
            pivot,
        } => {
            let is_speed = path.file_name().is_some_and(|f| f == "speed.parquet");
            if is_speed {
                anyhow::ensure!(
                    dataset.is_none() && metric.is_none() && split.is_none() && !pivot,
                    "--dataset, --metric, --split and --pivot apply to accuracy tables"
                );
                out::line(report::show(&path, rows)?);
            } else {
                let filter = datamux_runner::show::Filter {
                    dataset,
                    metric,
                    split,
                    pivot,
                };
                out::line(datamux_runner::show::accuracy(&path, rows, &filter)?);
            }
            Ok(Outcome::SUCCESS)
        }
        Cmd::Predict(args) => {
            serve::predict(&args)?;
            Ok(Outcome::SUCCESS)
        }
        Cmd::Serve(args) => {
            serve::serve(&args)?;
            Ok(Outcome::SUCCESS)
        }
        Cmd::Loadtest(args) => {
            serve::loadtest::run(&args)?;
            Ok(Outcome::SUCCESS)
        }
        Cmd::ServeBench(args) => {
            let data = DataArgs {
                data_dir: args.data_dir.clone(),
                models_dir: None,
                offline: args.offline,
            };
            let cat = catalogue(&data)?;
            let plan = Plan {
                experiments: sweep::load_experiments(&args.experiments, &args.profile, &[], &cat)?,
                out_dir: args.out.clone(),
                env: env_for(&data, &args.profile)?,
                jobs: std::thread::available_parallelism().map_or(1, |n| n.get()),
                threads: 1,
                speed: false,
                command: command_line(),
                worker_exe: std::env::current_exe().context("cannot find the datamux binary")?,
            };
            serve::bench::run(&args, || serve::bench::train(&plan))?;
            Ok(Outcome::SUCCESS)
        }
        Cmd::Worker { spec } => {
            let text = std::fs::read_to_string(&spec)
                .with_context(|| format!("cannot read {}", spec.display()))?;
            let (job, env): (Job, Env) = serde_json::from_str(&text)?;
            let emit = |m: &Message| {
                if let Ok(line) = serde_json::to_string(m) {
                    out::line(&line);
                }
            };
            let mut report = |t: Tick| emit(&Message::Tick(t));
            // A panic is a bug, but it must still reach the table as the run's error, with its
            // message and place, not as "worker exited" and the last stderr line.
            let panic = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
            let seen = panic.clone();
            std::panic::set_hook(Box::new(move |info| {
                let msg = info
                    .payload()
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| info.payload().downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "(no message)".into());
                let at = info
                    .location()
                    .map(|l| format!(" at {}:{}", l.file(), l.line()))
                    .unwrap_or_default();
                let line = format!("worker panicked{at}: {msg}");
                eprintln!("{line}");
                if let Ok(mut p) = seen.lock() {
                    *p = line;
                }
            }));
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                panic_seam();
                datamux_runner::job::execute(&job, &env, &mut report)
            }))
            .unwrap_or_else(|_| {
                let msg = panic.lock().map(|p| p.clone()).unwrap_or_default();
                datamux_runner::job::failed_result(&job, &env, &anyhow::anyhow!("{msg}"))
            });
            emit(&Message::Done(Box::new(result)));
            Ok(Outcome::SUCCESS)
        }
    }
}
