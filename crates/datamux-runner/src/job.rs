//! One job of a sweep, executed in a worker process: load the run's splits, hand them to its
//! modality to train (or time), and turn what it returns into table rows. A job never fails as a
//! whole: errors become rows with a status.

use anyhow::{Result, anyhow};
use datamux_data::{Catalogue, Cut, DataError, Resolver, Splits, read};
use datamux_pipeline::{Context, Env, Modality, RunConfig, Tick};
use serde::{Deserialize, Serialize};

use crate::provenance::Provenance;
use crate::registry;
use crate::results::{AccuracyRow, Identity, SpeedRow, Status};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Job {
    /// Train, select on validation, score validation and test.
    Train(RunConfig),
    /// Time inference of the run's model (fresh weights: speed does not depend on them).
    Speed(RunConfig),
}

impl Job {
    pub fn run(&self) -> &RunConfig {
        match self {
            Self::Train(r) | Self::Speed(r) => r,
        }
    }

    /// The warm-ups this job trains or loads before anything else (`Modality::warmups`), so the
    /// scheduler keeps a worker from waiting on a warm-up another worker is training.
    pub fn warmups(&self) -> Vec<String> {
        match self {
            Self::Train(r) => registry::modality(&r.modality)
                .map(|m| m.warmups(r))
                .unwrap_or_default(),
            Self::Speed(_) => Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct JobResult {
    pub accuracy: Vec<AccuracyRow>,
    pub speed: Vec<SpeedRow>,
}

/// Whether a run of `m` trains a warm-up stage first (the `warmup` column).
pub fn warms_up(m: &dyn Modality, run: &RunConfig) -> bool {
    m.has_warmup() && run.warmup.enabled
}

/// The identity columns of a run.
pub fn identity(run: &RunConfig, profile: &str, source: &str) -> Identity {
    let m = &run.model;
    let modality = registry::modality(&run.modality).ok();
    Identity {
        experiment: run.experiment.clone(),
        profile: profile.to_string(),
        run_id: run.run_id(),
        modality: run.modality.clone(),
        dataset: run.data.dataset.clone(),
        data_source: source.to_string(),
        backbone: m.backbone.clone(),
        model_size: modality
            .and_then(|md| md.model_size(run).ok())
            .map(|size| size + &serve_suffix(&m.mux.serve_n))
            .unwrap_or_default(),
        mux: m.mux.kind.name().into(),
        demux: m.demux.kind.name().into(),
        n_instances: m.n_instances as i64,
        seed: run.seed as i64,
        warmup: modality.is_some_and(|md| warms_up(md, run)),
        config_hash: run.config_hash(),
        ..Identity::default()
    }
    .with_provenance(&Provenance::current())
}

/// ` serve1-2-5-10` after the size of a model of several widths (`mux.serve_n`): one
/// checkpoint scored at each of its widths is a model apart from the dedicated one of each N.
pub fn serve_suffix(serve_n: &[usize]) -> String {
    if serve_n.is_empty() {
        return String::new();
    }
    let ns: Vec<String> = serve_n.iter().map(usize::to_string).collect();
    format!(" serve{}", ns.join("-"))
}

/// `unavailable` when the data (or a pretrained model) cannot be had, `error` for anything else.
pub fn status_of(err: &anyhow::Error) -> Status {
    let unavailable = err.chain().any(|e| {
        matches!(
            e.downcast_ref::<DataError>(),
            Some(
                DataError::NotFound { .. }
                    | DataError::NoDataDir { .. }
                    | DataError::UnknownSplit { .. }
                    | DataError::Download { .. }
                    | DataError::ModelNotFound { .. }
                    | DataError::ModelDownload { .. }
            )
        )
    });
    if unavailable {
        Status::Unavailable
    } else {
        Status::Error
    }
}

/// Run a job; failures become one row with the status and the first line of the error.
pub fn execute(job: &Job, env: &Env, report: &mut dyn FnMut(Tick)) -> JobResult {
    let out = match job {
        Job::Train(run) => train_job(run, env, report).map(|accuracy| JobResult {
            accuracy,
            speed: vec![],
        }),
        Job::Speed(run) => speed_job(run, env, report).map(|speed| JobResult {
            accuracy: vec![],
            speed,
        }),
    };
    out.unwrap_or_else(|e| failed_result(job, env, &e))
}

/// The rows of a job that failed: one row with the status and the first line of the error.
pub fn failed_result(job: &Job, env: &Env, e: &anyhow::Error) -> JobResult {
    let run = job.run();
    let msg = format!("{e:#}");
    let id = identity(run, &env.profile, "").with_status(status_of(e), &msg);
    match job {
        Job::Train(_) => JobResult {
            accuracy: vec![AccuracyRow {
                id,
                split: String::new(),
                metric: String::new(),
                value: f64::NAN,
                n_examples: 0,
                steps: 0,
                best_step: 0,
                train_seconds: f64::NAN,
            }],
            speed: vec![],
        },
        Job::Speed(_) => JobResult {
            accuracy: vec![],
            speed: vec![SpeedRow {
                id,
                mode: "inference".into(),
                seq_len: 0,
                batch_instances: 0,
                warmup_iters: 0,
                iters: 0,
                latency_ms_median: f64::NAN,
                latency_ms_mad: f64::NAN,
                latency_ms_min: f64::NAN,
                latency_ms_max: f64::NAN,
                throughput_instances_per_s: f64::NAN,
            }],
        },
    }
}

/// The catalogue and resolver of a job's environment.
fn data_access(env: &Env) -> Result<(Catalogue, Resolver)> {
    Ok((
        Catalogue::load(env.data_dir.as_deref())?,
        Resolver {
            hub_attempts: env.hub_attempts.clone(),
            ..Resolver::from_env(env.data_dir.clone(), env.offline)?
        },
    ))
}

/// The train, validation and test splits of a run (datamux-data's `Splits`).
pub fn load_splits(run: &RunConfig, cat: &Catalogue, resolver: &Resolver) -> Result<Splits> {
    use datamux_core::init::rng_for;
    let dataset = &run.data.dataset;
    let entry = cat.get(dataset)?;
    let load = |s: &str| read::load(cat, resolver, dataset, s);
    let train = load("train")?;
    let valid = entry
        .has_split("validation")
        .then(|| load("validation"))
        .transpose()?;
    let test = entry.has_split("test").then(|| load("test")).transpose()?;
    // Seed 0 whatever the run seed: every run of an experiment sees the same data split.
    let cut = Cut {
        holdout: run.data.validation_holdout,
        limit: run.data.train_limit,
        holdout_rng: rng_for(0, "data.holdout"),
        limit_rng: rng_for(0, "data.limit"),
    };
    Ok(Splits::assemble(dataset, train, valid, test, cut)?)
}

fn train_job(run: &RunConfig, env: &Env, report: &mut dyn FnMut(Tick)) -> Result<Vec<AccuracyRow>> {
    let modality = registry::modality(&run.modality)?;
    let (cat, resolver) = data_access(env)?;
    let load = |d: &str, s: &str| -> Result<datamux_data::Split> {
        Ok(read::load(&cat, &resolver, d, s)?)
    };
    let mut ctx = Context::new(env, report, &load);
    ctx.tick(
        datamux_pipeline::Stage::Data,
        0,
        1,
        format!("loading {}", run.data.dataset),
    );
    let splits = load_splits(run, &cat, &resolver)?;
    let id = identity(run, &env.profile, &splits.train.source.describe());
    let records = modality.train(run, &splits, &mut ctx)?;
    Ok(records
        .into_iter()
        .map(|r| AccuracyRow {
            id: Identity {
                n_instances: r.n_instances.map_or(id.n_instances, |n| n as i64),
                ..id.clone().with_status(Status::Ok, "")
            },
            split: r.split,
            metric: r.metric,
            value: r.value,
            n_examples: r.n_examples as i64,
            steps: r.steps as i64,
            best_step: r.best_step as i64,
            train_seconds: r.train_seconds,
        })
        .collect())
}

fn speed_job(run: &RunConfig, env: &Env, report: &mut dyn FnMut(Tick)) -> Result<Vec<SpeedRow>> {
    let modality = registry::modality(&run.modality)?;
    let (cat, resolver) = data_access(env)?;
    let load = |d: &str, s: &str| -> Result<datamux_data::Split> {
        Ok(read::load(&cat, &resolver, d, s)?)
    };
    let mut ctx = Context::new(env, report, &load);
    let splits = load_splits(run, &cat, &resolver)?;
    let id = identity(run, &env.profile, &splits.test.source.describe());
    let point = modality.speed(run, &splits, &mut ctx)?;
    let timing = &point.timing;
    if timing.latencies_ms.is_empty() {
        return Err(anyhow!("no timed iteration completed"));
    }
    Ok(vec![SpeedRow {
        id: id.with_status(Status::Ok, ""),
        mode: "inference".into(),
        seq_len: point.seq_len as i64,
        batch_instances: timing.instances as i64,
        warmup_iters: timing.warmup_iters as i64,
        iters: timing.latencies_ms.len() as i64,
        latency_ms_median: timing.median(),
        latency_ms_mad: timing.mad(),
        latency_ms_min: timing.min(),
        latency_ms_max: timing.max(),
        throughput_instances_per_s: timing.throughput(),
    }])
}
