//! `datamux loadtest`: open-loop Poisson arrivals at each offered rate against a server, real
//! inputs from a dataset in a seeded order (the same for every policy), every answer checked
//! against its label, one row per (model, policy, rate) in `<out>/serve/serve.parquet`.
//!
//! Open loop: request i is sent at its scheduled time whether or not earlier ones were
//! answered, and its latency counts from that time, so a slow server cannot hide queueing
//! behind a client that waits (coordinated omission).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};
use base64::Engine as _;
use datamux_data::{Catalogue, Examples, Resolver};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_distr::{Distribution, Exp};
use serde::{Deserialize, Serialize};

use crate::provenance::Provenance;

/// `datamux loadtest`.
#[derive(clap::Args, Debug, Clone)]
pub struct LoadtestArgs {
    /// The server, e.g. http://127.0.0.1:8080 (loopback only).
    #[arg(long)]
    pub url: String,
    /// The dataset whose inputs are sent (its labels check the answers).
    #[arg(long)]
    pub dataset: String,
    #[arg(long, default_value = "test")]
    pub split: String,
    /// Offered rates, requests per second.
    #[arg(long, value_delimiter = ',', required = true)]
    pub rates: Vec<f64>,
    /// Seconds of arrivals at each rate.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// The seed of the input order and the arrival times.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Seconds a request may take before it counts as an error.
    #[arg(long, default_value_t = 10.0)]
    pub timeout: f64,
    /// Requests at one rate at most (a bound on the loop, whatever the rate and duration).
    #[arg(long, default_value_t = 50_000)]
    pub max_requests: usize,
    /// The working folder: rows into <out>/serve/serve.parquet.
    #[arg(long, default_value = "reproduced/serve")]
    pub out: PathBuf,
    /// The mirror of the datasets (else DATAMUX_DATA_DIR).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    #[arg(long)]
    pub offline: bool,
}

table! {
    /// One (model, policy, offered rate) of `serve.parquet`.
    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    pub struct ServeRow {
        pub model: String,
        pub experiment: String,
        pub modality: String,
        pub dataset: String,
        pub split: String,
        pub serve_n: String,
        pub policy: String,
        pub max_rows: i64,
        pub offered_rate: f64,
        pub duration_s: f64,
        pub requests: i64,
        pub answered: i64,
        /// Answered requests per second, over the span from the first send to the last answer.
        pub achieved_rate: f64,
        pub latency_ms_p50: f64,
        pub latency_ms_p90: f64,
        pub latency_ms_p99: f64,
        pub latency_ms_max: f64,
        /// Failed requests: 5xx other than 503, timeouts, transport errors, wrong-shaped answers.
        pub errors: i64,
        /// 503 answers (the queue was full).
        pub rejections: i64,
        /// The mean N of the rows that answered the requests.
        pub mean_n: f64,
        /// Correct answers over answered requests.
        pub accuracy: f64,
        /// The server's inference threads.
        pub threads: i64,
        pub git_rev: String,
        pub git_dirty: bool,
        pub seed: i64,
    }
}

/// What the server says about itself (`GET /health`).
#[derive(Debug, Deserialize)]
struct Health {
    model: String,
    experiment: String,
    modality: String,
    input: String,
    labels: Vec<String>,
    serve_n: Vec<usize>,
    policy: String,
    max_rows: usize,
    threads: usize,
}

/// One request's fate.
#[derive(Debug, Clone, Copy)]
enum Fate {
    Answered { ms: f64, correct: bool, n: usize },
    Rejected,
    Failed,
}

/// The table's path under a working folder.
pub fn table_path(out: &Path) -> PathBuf {
    out.join("serve").join("serve.parquet")
}

pub fn run(args: &LoadtestArgs) -> Result<()> {
    let rows = measure(args)?;
    write_rows(&table_path(&args.out), rows, false)
}

/// The rows of `args`' rates, measured one rate after the other.
pub fn measure(args: &LoadtestArgs) -> Result<Vec<ServeRow>> {
    let url = args.url.trim_end_matches('/').to_string();
    let host = reqwest::Url::parse(&url)
        .with_context(|| format!("`{url}` is not a URL"))?
        .host_str()
        .unwrap_or_default()
        .to_string();
    ensure!(
        host == "127.0.0.1" || host == "localhost" || host == "[::1]",
        "datamux loadtest sends traffic to loopback addresses only, not {host}"
    );
    ensure!(
        args.duration > 0.0 && args.rates.iter().all(|r| *r > 0.0 && r.is_finite()),
        "--duration and every rate must be positive"
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs_f64(args.timeout))
        .pool_max_idle_per_host(256)
        .build()?;
    let health: Health = rt
        .block_on(async {
            client
                .get(format!("{url}/health"))
                .send()
                .await?
                .json()
                .await
        })
        .with_context(|| format!("no datamux server answers at {url}/health"))?;
    let (bodies, labels) = inputs(args, &health)?;
    let route = if health.labels.is_empty() {
        "embed"
    } else {
        "classify"
    };
    let bodies = Arc::new(bodies);
    let labels = Arc::new(labels);
    let mut rows = Vec::new();
    for &rate in &args.rates {
        eprintln!(
            "loadtest: {} {} at {rate} requests/s for {} s ...",
            health.model, health.policy, args.duration
        );
        let fates = rt.block_on(offer(
            &client,
            &format!("{url}/v1/{route}"),
            rate,
            args,
            bodies.clone(),
            labels.clone(),
            Arc::new(health.labels.clone()),
        ));
        let (fates, span) = fates?;
        let row = summarise(&health, args, rate, &fates, span);
        eprintln!(
            "  achieved {:.1}/s, p50 {:.1} ms, p99 {:.1} ms, errors {}, rejections {}, mean N {:.2}, accuracy {:.2} %",
            row.achieved_rate,
            row.latency_ms_p50,
            row.latency_ms_p99,
            row.errors,
            row.rejections,
            row.mean_n,
            100.0 * row.accuracy
        );
        rows.push(row);
    }
    Ok(rows)
}

/// The request bodies (one input each) in the seeded order, and the label of each.
fn inputs(args: &LoadtestArgs, health: &Health) -> Result<(Vec<String>, Vec<String>)> {
    let resolver = Resolver::from_env(args.data_dir.clone(), args.offline)?;
    let cat = Catalogue::load(resolver.data_dir.as_deref())?;
    let split = datamux_data::read::load(&cat, &resolver, &args.dataset, &args.split)?;
    let names = &split.label_names;
    let (raw, labels): (Vec<serde_json::Value>, Vec<u32>) = match (&split.examples, &*health.input)
    {
        (Examples::Text { texts, labels, .. }, "text") => (
            texts.iter().map(|t| serde_json::json!(t)).collect(),
            labels.clone(),
        ),
        (Examples::Images { images, labels }, "image") => (
            images
                .iter()
                .map(|b| serde_json::json!(base64::engine::general_purpose::STANDARD.encode(b)))
                .collect(),
            labels.clone(),
        ),
        _ => bail!(
            "dataset `{}` split `{}` does not hold the {} inputs the server reads",
            args.dataset,
            args.split,
            health.input
        ),
    };
    ensure!(
        !raw.is_empty(),
        "dataset `{}` split `{}` is empty",
        args.dataset,
        args.split
    );
    let mut order: Vec<usize> = (0..raw.len()).collect();
    order.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(args.seed));
    let bodies = order
        .iter()
        .map(|i| serde_json::json!({ "inputs": [raw[*i]] }).to_string())
        .collect();
    let labels = order
        .iter()
        .map(|i| names.get(labels[*i] as usize).cloned().unwrap_or_default())
        .collect();
    Ok((bodies, labels))
}

/// Send the Poisson arrivals of `rate` for the duration; every request's fate and the span
/// from the first send to the last answer.
async fn offer(
    client: &reqwest::Client,
    url: &str,
    rate: f64,
    args: &LoadtestArgs,
    bodies: Arc<Vec<String>>,
    labels: Arc<Vec<String>>,
    names: Arc<Vec<String>>,
) -> Result<(Vec<Fate>, f64)> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(args.seed ^ rate.to_bits());
    let gap = Exp::new(rate).context("the rate")?;
    let mut at = Vec::new();
    let mut t = 0.0;
    loop {
        t += gap.sample(&mut rng);
        if t >= args.duration || at.len() >= args.max_requests {
            break;
        }
        at.push(t);
    }
    let start = tokio::time::Instant::now() + Duration::from_millis(50);
    let mut tasks = tokio::task::JoinSet::new();
    for (i, t) in at.iter().enumerate() {
        let send = start + Duration::from_secs_f64(*t);
        let (client, url) = (client.clone(), url.to_string());
        let (bodies, labels, names) = (bodies.clone(), labels.clone(), names.clone());
        tasks.spawn(async move {
            tokio::time::sleep_until(send).await;
            let j = i % bodies.len();
            let fate = request(&client, &url, bodies[j].clone(), &labels[j], &names, send).await;
            (i, fate, Instant::now())
        });
    }
    let mut fates = vec![Fate::Failed; at.len()];
    let mut last = Instant::now();
    let begin = Instant::now() + Duration::from_millis(50);
    while let Some(done) = tasks.join_next().await {
        let (i, fate, when) = done.context("a request task")?;
        fates[i] = fate;
        last = last.max(when);
    }
    Ok((fates, last.saturating_duration_since(begin).as_secs_f64()))
}

async fn request(
    client: &reqwest::Client,
    url: &str,
    body: String,
    label: &str,
    names: &[String],
    sent: tokio::time::Instant,
) -> Fate {
    let r = client
        .post(url)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await;
    let Ok(r) = r else {
        return Fate::Failed;
    };
    if r.status() == reqwest::StatusCode::SERVICE_UNAVAILABLE {
        return Fate::Rejected;
    }
    if !r.status().is_success() {
        return Fate::Failed;
    }
    let Ok(v) = r.json::<serde_json::Value>().await else {
        return Fate::Failed;
    };
    let ms = sent.elapsed().as_secs_f64() * 1000.0;
    let n = v.get("n").and_then(|n| n.as_u64()).unwrap_or(0) as usize;
    let out = v.get("outputs").and_then(|o| o.get(0));
    let correct = if names.is_empty() {
        out.and_then(|o| o.get("embedding")).is_some()
    } else {
        match out.and_then(|o| o.get("label")).and_then(|l| l.as_u64()) {
            Some(l) => names.get(l as usize).is_some_and(|name| name == label),
            None => return Fate::Failed,
        }
    };
    Fate::Answered { ms, correct, n }
}

fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn summarise(h: &Health, args: &LoadtestArgs, rate: f64, fates: &[Fate], span: f64) -> ServeRow {
    let mut ms = Vec::new();
    let (mut correct, mut n_sum, mut errors, mut rejections) = (0usize, 0usize, 0, 0);
    for f in fates {
        match f {
            Fate::Answered {
                ms: m,
                correct: c,
                n,
            } => {
                ms.push(*m);
                correct += usize::from(*c);
                n_sum += n;
            }
            Fate::Rejected => rejections += 1,
            Fate::Failed => errors += 1,
        }
    }
    ms.sort_by(f64::total_cmp);
    let answered = ms.len();
    let p = Provenance::current();
    let per = |x: usize| {
        if answered > 0 {
            x as f64 / answered as f64
        } else {
            f64::NAN
        }
    };
    ServeRow {
        model: h.model.clone(),
        experiment: h.experiment.clone(),
        modality: h.modality.clone(),
        dataset: args.dataset.clone(),
        split: args.split.clone(),
        serve_n: h
            .serve_n
            .iter()
            .map(usize::to_string)
            .collect::<Vec<_>>()
            .join(","),
        policy: h.policy.clone(),
        max_rows: h.max_rows as i64,
        offered_rate: rate,
        duration_s: args.duration,
        requests: fates.len() as i64,
        answered: answered as i64,
        achieved_rate: if span > 0.0 {
            answered as f64 / span
        } else {
            f64::NAN
        },
        latency_ms_p50: quantile(&ms, 0.5),
        latency_ms_p90: quantile(&ms, 0.9),
        latency_ms_p99: quantile(&ms, 0.99),
        latency_ms_max: ms.last().copied().unwrap_or(f64::NAN),
        errors,
        rejections,
        mean_n: per(n_sum),
        accuracy: per(correct),
        threads: h.threads as i64,
        git_rev: p.git_rev,
        git_dirty: p.git_dirty,
        seed: args.seed as i64,
    }
}

/// Add `rows` to the table at `path` under the folder's lock, replacing the rows of the same
/// model, policy and rate, or with `whole_models` every row of their models (a bench's ladder
/// of rates is measured afresh each time: no row of an older ladder stays).
pub fn write_rows(path: &Path, rows: Vec<ServeRow>, whole_models: bool) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let _lock = datamux_data::lock::Lock::acquire(&dir.join(".lock"), || {
        eprintln!("waiting for another writer of {}", dir.display())
    })?;
    let key = |r: &ServeRow| (r.model.clone(), r.policy.clone(), r.offered_rate.to_bits());
    let new: std::collections::BTreeSet<_> = rows.iter().map(key).collect();
    let models: std::collections::BTreeSet<String> = rows.iter().map(|r| r.model.clone()).collect();
    let mut all: Vec<ServeRow> = crate::results::read_table(path)?
        .into_iter()
        .filter(|r| !(new.contains(&key(r)) || whole_models && models.contains(&r.model)))
        .collect();
    all.extend(rows);
    all.sort_by(|a, b| {
        (a.modality.as_str(), a.model.as_str(), a.policy.as_str())
            .cmp(&(b.modality.as_str(), b.model.as_str(), b.policy.as_str()))
            .then(a.offered_rate.total_cmp(&b.offered_rate))
    });
    crate::results::write_table(path, &all)?;
    eprintln!("wrote {}", path.display());
    Ok(())
}
