//! Serving trained models: `datamux predict` (inputs from stdin or a file, answers as JSON
//! lines), `datamux serve` (HTTP/JSON with a policy that picks N per forward) and `datamux
//! loadtest` (open-loop Poisson load with every answer checked; `serve/serve.parquet`).
//! docs/serving.md is the user's guide.

pub mod bench;
pub mod engine;
pub mod http;
pub mod listener;
pub mod loadtest;
pub mod metrics;
pub mod report;

use std::io::BufRead;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use base64::Engine as _;
use datamux_pipeline::serve::{Answer, Card, Input, InputKind};

use engine::{Engine, Policy, Settings};

/// `datamux serve`.
#[derive(clap::Args, Debug, Clone)]
pub struct ServeArgs {
    /// A trained model's folder (runs/<experiment>/<run id>/, with its datamux.json).
    #[arg(long)]
    pub model: PathBuf,
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub addr: SocketAddr,
    /// fixed:N (every row carries N inputs; fixed:1 is a plain dynamic batcher) or adaptive
    /// (N from the queue depth, docs/serving.md).
    #[arg(long, default_value = "adaptive")]
    pub policy: Policy,
    /// Muxed rows per forward at most.
    #[arg(long, default_value_t = 8)]
    pub max_rows: usize,
    /// The latency budget (milliseconds): the longest the oldest queued request waits for its
    /// row to fill, and, for `adaptive`, the time within which the queue should drain.
    #[arg(long, default_value_t = 100)]
    pub max_delay_ms: u64,
    /// Queued inputs at most; past it a request gets 503 with Retry-After.
    #[arg(long, default_value_t = 4096)]
    pub queue: usize,
    /// Inputs per request at most.
    #[arg(long, default_value_t = 64)]
    pub max_inputs: usize,
    /// Request bodies at most (bytes).
    #[arg(long, default_value_t = 4 << 20)]
    pub body_limit: usize,
    /// Open connections at most; past it new clients wait to be accepted.
    #[arg(long, default_value_t = 1024)]
    pub max_connections: usize,
}

impl ServeArgs {
    fn settings(&self) -> Settings {
        Settings {
            policy: self.policy,
            max_rows: self.max_rows,
            max_delay: Duration::from_millis(self.max_delay_ms),
            queue_limit: self.queue,
        }
    }
}

/// Serve until SIGTERM or Ctrl-C: stop accepting, finish what is in flight, return.
pub fn serve(args: &ServeArgs) -> Result<()> {
    let metrics = Arc::new(metrics::Metrics::default());
    let engine = Engine::start(&args.model, args.settings(), metrics.clone())?;
    let app = Arc::new(http::App {
        engine,
        metrics,
        max_inputs: args.max_inputs.max(1),
        threads: candle_core::utils::get_num_threads(),
    });
    // Preparing inputs (tokenising, decoding) is short CPU work: a few blocking threads, not
    // tokio's default of 512, each of which would keep its own allocator heap under a burst.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(4)
        .enable_all()
        .build()?;
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind(args.addr)
            .await
            .with_context(|| format!("cannot listen on {}", args.addr))?;
        let addr = listener.local_addr()?;
        // The first line on stdout says where it listens (a test binding port 0 reads it).
        crate::out::line(format!(
            "datamux serve: {} ({}, {}) on http://{addr}",
            app.engine.card.run_id, args.policy, app.engine.card.modality
        ));
        tokio::spawn(lag_probe(app.metrics.clone()));
        let router = http::router(app.clone(), args.body_limit);
        let listener = listener::Limited::new(listener, args.max_connections);
        axum::serve(listener, router)
            .with_graceful_shutdown(shutdown())
            .await
            .context("the server stopped")
    })?;
    app.engine.close();
    eprintln!("datamux serve: stopped");
    Ok(())
}

/// How late a 5 ms timer fires on the HTTP runtime, smoothed over about 25 ms of ticks: when
/// its workers cannot keep up with reading requests, the timer's task waits behind them.
async fn lag_probe(metrics: Arc<metrics::Metrics>) {
    const PERIOD: Duration = Duration::from_millis(5);
    let mut lag = 0.0;
    loop {
        let t = std::time::Instant::now();
        tokio::time::sleep(PERIOD).await;
        let late = t.elapsed().saturating_sub(PERIOD).as_secs_f64();
        lag = 0.8 * lag + 0.2 * late;
        metrics.runtime_lag.set(lag);
    }
}

async fn shutdown() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = term => {},
        _ = tokio::signal::ctrl_c() => {},
    }
}

/// `datamux predict`.
#[derive(clap::Args, Debug, Clone)]
pub struct PredictArgs {
    /// A trained model's folder (runs/<experiment>/<run id>/).
    #[arg(long)]
    pub model: PathBuf,
    /// One input per line: a text, or an image file's path for an image model (default: stdin).
    #[arg(long)]
    pub input: Option<PathBuf>,
    /// Inputs per muxed row (one of the model's serve_n; default: its largest).
    #[arg(long)]
    pub n: Option<usize>,
}

/// Answer every input line as one JSON line, in order.
pub fn predict(args: &PredictArgs) -> Result<()> {
    let card = Card::read(&args.model)?;
    let n = args.n.unwrap_or(card.n_instances);
    if !card.serve_n.contains(&n) {
        bail!("the model serves N in {:?}, not {n}", card.serve_n);
    }
    let lines: Vec<String> = match &args.input {
        Some(p) => std::fs::read_to_string(p)
            .with_context(|| format!("cannot read {}", p.display()))?
            .lines()
            .map(str::to_string)
            .collect(),
        None => std::io::stdin()
            .lock()
            .lines()
            .collect::<std::io::Result<_>>()?,
    };
    let lines: Vec<&String> = lines.iter().filter(|l| !l.trim().is_empty()).collect();
    let model = crate::registry::modality(&card.modality)?.load_served(&args.model, &card)?;
    let prep = model.preparer();
    let mut prepared = Vec::with_capacity(lines.len());
    for (i, line) in lines.iter().enumerate() {
        let bytes;
        let input = match card.input {
            InputKind::Text => Input::Text(line),
            InputKind::Image => {
                let path = line.trim();
                bytes = match std::fs::read(path) {
                    Ok(b) => b,
                    // A line that is not a file may be the image itself, in base64.
                    Err(_) => base64::engine::general_purpose::STANDARD
                        .decode(path)
                        .with_context(|| format!("input line {}: no file {path}", i + 1))?,
                };
                Input::Image(&bytes)
            }
        };
        prepared.push(
            prep.prepare(input)
                .map_err(|e| anyhow::anyhow!("input line {}: {e}", i + 1))?,
        );
    }
    let answers = model.answer(&prepared, n)?;
    let mut out = crate::out::Stdout::lock();
    for a in answers {
        let line = match a {
            Answer::Class {
                label,
                probabilities,
            } => serde_json::json!({
                "label": label,
                "name": card.labels.get(label),
                "probabilities": probabilities,
            }),
            Answer::Embedding(v) => serde_json::json!({ "embedding": v }),
        };
        if !out.line(&line.to_string()) {
            break;
        }
    }
    Ok(())
}
