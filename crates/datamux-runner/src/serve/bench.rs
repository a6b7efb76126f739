//! `datamux serve-bench` (`just serve-bench`): train (or reuse) the models of several widths of
//! the serve experiments, then for each serve it under `fixed:1`, `fixed:N_max` and `adaptive`
//! and offer all three the same rates, the same request sequence, the same answers checked;
//! rows into `<out>/serve/serve.parquet`, then its report.
//!
//! The rates are a ladder over the capacity of `fixed:1`, measured first: `0.9 × capacity ×`
//! 0.5, 0.75, 1, 1.5, 2.25, 3, 4.5, 6.75. Three steps up the ladder is 3× the rate, so the rate
//! C that `fixed:1` sustains and 3 C are both on it, whichever step C is. The 0.9 keeps the
//! rungs off the capacity itself, where queueing time wanders by a factor of several between
//! rounds for every policy (docs/serving.md).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};

use super::loadtest::{self, LoadtestArgs, ServeRow};

/// The ladder of offered rates, as multiples of 0.9 x the capacity of `fixed:1`.
pub const LADDER: [f64; 8] = [0.5, 0.75, 1.0, 1.5, 2.25, 3.0, 4.5, 6.75];
/// Where the ladder's 1 sits, as a share of the measured capacity.
pub const BASE: f64 = 0.9;

/// `datamux serve-bench`.
#[derive(clap::Args, Debug, Clone)]
pub struct ServeBenchArgs {
    /// Experiment files whose runs are models of several widths (`mux.serve_n`).
    #[arg(default_values = ["experiments/serve/serve-text.toml", "experiments/serve/serve-mnist.toml"])]
    pub experiments: Vec<PathBuf>,
    #[arg(long, default_value = "quick")]
    pub profile: String,
    /// The working folder: the training tables, and serve/serve.parquet.
    #[arg(long, default_value = "reproduced/quick")]
    pub out: PathBuf,
    /// Seconds of arrivals at each rate.
    #[arg(long, default_value_t = 8.0)]
    pub duration: f64,
    /// Muxed rows per forward of every policy.
    #[arg(long, default_value_t = 8)]
    pub max_rows: usize,
    /// The latency budget of every server (`datamux serve --max-delay-ms`).
    #[arg(long, default_value_t = 100)]
    pub max_delay_ms: u64,
    /// Inference threads of the server (the load generator runs beside it).
    #[arg(long, default_value_t = 1)]
    pub server_threads: usize,
    /// The mirror of the datasets (else DATAMUX_DATA_DIR).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    #[arg(long)]
    pub offline: bool,
}

/// A server child process and where it listens.
struct Server {
    child: Child,
    url: String,
}

impl Server {
    fn start(model: &Path, policy: &str, a: &ServeBenchArgs) -> Result<Self> {
        let exe = std::env::current_exe()?;
        let mut child = Command::new(exe)
            .args(["serve", "--model"])
            .arg(model)
            .args(["--addr", "127.0.0.1:0", "--policy", policy])
            .args(["--max-rows", &a.max_rows.to_string()])
            .args(["--max-delay-ms", &a.max_delay_ms.to_string()])
            .env("RAYON_NUM_THREADS", a.server_threads.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("cannot start datamux serve")?;
        let mut line = String::new();
        if let Some(out) = child.stdout.take() {
            BufReader::new(out).read_line(&mut line)?;
        }
        let Some(addr) = line.rsplit("http://").next().map(str::trim) else {
            bail!("the server said `{line}`, not its address");
        };
        if !addr.starts_with("127.0.0.1:") {
            let _ = child.kill();
            bail!("the server did not start: `{}`", line.trim());
        }
        Ok(Self {
            url: format!("http://{addr}"),
            child,
        })
    }

    /// SIGTERM, and its exit within 30 s.
    fn stop(mut self) -> Result<()> {
        let pid = self.child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status()?;
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(30) {
            if let Some(s) = self.child.try_wait()? {
                if !s.success() {
                    bail!("the server exited with {s}");
                }
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        bail!("the server did not stop within 30 s of SIGTERM")
    }
}

fn load_args(
    a: &ServeBenchArgs,
    url: &str,
    dataset: &str,
    rates: Vec<f64>,
    duration: f64,
) -> LoadtestArgs {
    LoadtestArgs {
        url: url.to_string(),
        dataset: dataset.to_string(),
        split: "test".into(),
        rates,
        duration,
        seed: 0,
        timeout: 10.0,
        max_requests: 50_000,
        out: a.out.clone(),
        data_dir: a.data_dir.clone(),
        offline: a.offline,
    }
}

/// Whether a row is sustained: every request answered, p99 under 250 ms.
pub fn sustained(r: &ServeRow) -> bool {
    r.errors == 0 && r.rejections == 0 && r.answered == r.requests && r.latency_ms_p99 < 250.0
}

/// The load test of one model folder under every policy.
pub fn bench_model(a: &ServeBenchArgs, model: &Path) -> Result<Vec<ServeRow>> {
    let card = datamux_pipeline::serve::Card::read(model)?;
    let dataset = card.run.data.dataset.clone();
    let n_max = card.n_instances;
    // The capacity of fixed:1: doubling offered rates, 3 s each, until it is not sustained.
    let server = Server::start(model, "fixed:1", a)?;
    let mut capacity: f64 = 0.0;
    let mut rate = 25.0;
    for _ in 0..10 {
        let rows = loadtest::measure(&load_args(a, &server.url, &dataset, vec![rate], 3.0))?;
        let r = &rows[0];
        capacity = capacity.max(r.achieved_rate);
        if !sustained(r) {
            break;
        }
        rate *= 2.0;
    }
    server.stop()?;
    eprintln!(
        "serve-bench: {}: fixed:1 answers at most {capacity:.0} requests/s",
        card.run_id
    );
    // Rounded, so the table's rates read plainly.
    let rates: Vec<f64> = LADDER
        .iter()
        .map(|m| (m * BASE * capacity).round().max(1.0))
        .collect();
    let mut rows = Vec::new();
    for policy in [
        "fixed:1".to_string(),
        format!("fixed:{n_max}"),
        "adaptive".into(),
    ] {
        let server = Server::start(model, &policy, a)?;
        let got = loadtest::measure(&load_args(
            a,
            &server.url,
            &dataset,
            rates.clone(),
            a.duration,
        ));
        server.stop()?;
        rows.extend(got?);
    }
    Ok(rows)
}

/// Train (or find finished) every run of `plan`, and the folders of its servable models.
pub fn train(plan: &crate::sweep::Plan) -> Result<Vec<PathBuf>> {
    let outcome = crate::sweep::run(plan)?;
    if outcome.code() != 0 {
        bail!(
            "training the serve models did not finish: {}",
            outcome.summary()
        );
    }
    let models: Vec<PathBuf> = plan
        .experiments
        .iter()
        .flat_map(|e| &e.runs)
        .map(|r| datamux_pipeline::checkpoint::run_dir(&plan.env, r))
        .filter(|d| d.join(datamux_pipeline::serve::CARD).is_file())
        .collect();
    if models.is_empty() {
        bail!("the experiments have no servable model");
    }
    Ok(models)
}

pub fn run(a: &ServeBenchArgs, train: impl FnOnce() -> Result<Vec<PathBuf>>) -> Result<()> {
    let models = train()?;
    let mut rows = Vec::new();
    for m in &models {
        rows.extend(bench_model(a, m)?);
    }
    loadtest::write_rows(&loadtest::table_path(&a.out), rows, true)?;
    if let Some(p) = crate::serve::report::write(&a.out)? {
        eprintln!("wrote {}", p.display());
    }
    Ok(())
}
