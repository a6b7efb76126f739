//! Running experiments: expand every file into runs, skip the finished ones, train the rest in
//! worker processes side by side (single-threaded each: faster on a small CPU than one
//! multi-threaded run, house-style §2.14), then time the speed points one at a time with every
//! core, and write the tables after each run so an interruption loses at most the runs in flight.

//!
//! - `queue.rs`: which job a free worker takes next;
//! - `workers.rs`: the worker processes and the progress bars.

mod queue;
pub mod shard;
mod workers;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use datamux_data::Catalogue;
use datamux_pipeline::Env;

use crate::config::{self, Expect, Experiment, RunConfig};
use crate::job::{Job, JobResult};
use crate::registry;
use crate::results::{self, AccuracyRow, Identity, SpeedRow, Status};

pub use workers::Message;

/// What `datamux run` was asked to do.
#[derive(Debug, Clone)]
pub struct Plan {
    pub experiments: Vec<Experiment>,
    pub out_dir: PathBuf,
    pub env: Env,
    /// Training jobs side by side.
    pub jobs: usize,
    /// Threads per training job.
    pub threads: usize,
    pub speed: bool,
    pub command: String,
    /// The `datamux` binary that runs the workers (`datamux worker <spec>`).
    pub worker_exe: PathBuf,
}

/// Experiment files under `paths` (files, or folders of `*.toml`), sorted.
pub fn experiment_files(paths: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for p in paths {
        if p.is_dir() {
            let mut files: Vec<PathBuf> = std::fs::read_dir(p)
                .with_context(|| format!("cannot list {}", p.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|f| f.extension().is_some_and(|x| x == "toml"))
                .collect();
            files.sort();
            out.extend(files);
        } else if p.is_file() {
            out.push(p.clone());
        } else {
            bail!("no experiment file or folder at {}", p.display());
        }
    }
    if out.is_empty() {
        bail!(
            "no experiment files (*.toml) in {}",
            paths
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    Ok(out)
}

pub fn load_experiments(
    paths: &[PathBuf],
    profile: &str,
    overrides: &[(String, toml::Value)],
    catalogue: &Catalogue,
) -> Result<Vec<Experiment>> {
    experiment_files(paths)?
        .iter()
        .map(|f| config::load(f, profile, overrides, catalogue))
        .collect()
}

/// Tables of one experiment, written after every finished job. Every write reads the tables
/// again under the folder's lock and upserts into what it finds, so two runs on one folder keep
/// each other's rows; the copy in memory is the folder's as of the last write.
struct Tables {
    dir: PathBuf,
    accuracy: Vec<AccuracyRow>,
    speed: Vec<SpeedRow>,
}

impl Tables {
    fn open(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let mut t = Self {
            dir: dir.to_path_buf(),
            accuracy: Vec::new(),
            speed: Vec::new(),
        };
        let _lock = t.lock()?;
        // Every write into the folder holds its lock, so a temporary found while holding it
        // is a killed writer's.
        datamux_data::atomic::remove_stale(dir)?;
        t.reload()?;
        Ok(t)
    }

    /// The folder's lock, held while a table or `resolved.toml` is read and written.
    fn lock(&self) -> Result<datamux_data::lock::Lock> {
        // Said once per process: two runs on one folder meet at every write.
        static SAID: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
        Ok(datamux_data::lock::Lock::folder(&self.dir, || {
            if !SAID.swap(true, std::sync::atomic::Ordering::Relaxed) {
                eprintln!(
                    "waiting for another datamux run writing {} (its writes and ours take turns)",
                    self.dir.display()
                );
            }
        })?)
    }

    fn reload(&mut self) -> Result<()> {
        self.accuracy = results::read_table(&self.dir.join("accuracy.parquet"))?;
        self.speed = results::read_table(&self.dir.join("speed.parquet"))?;
        Ok(())
    }

    fn add(&mut self, r: JobResult) -> Result<()> {
        let _lock = self.lock()?;
        self.reload()?;
        if !r.accuracy.is_empty() {
            results::upsert(&mut self.accuracy, r.accuracy);
            results::write_table(&self.dir.join("accuracy.parquet"), &self.accuracy)?;
        }
        if !r.speed.is_empty() {
            results::upsert(&mut self.speed, r.speed);
            results::write_table(&self.dir.join("speed.parquet"), &self.speed)?;
        }
        Ok(())
    }

    /// The runs that have rows in either table.
    fn run_ids(&self) -> BTreeSet<String> {
        let ids = self.accuracy.iter().map(|r| &r.id);
        ids.chain(self.speed.iter().map(|r| &r.id))
            .map(|id| id.run_id.clone())
            .collect()
    }
}

/// Whether the experiment folder `dir` holds finished rows of `job`: another run on the folder
/// may have finished it since this one planned. Read under the folder's lock.
pub(super) fn finished_in(dir: &Path, job: &Job) -> Result<bool> {
    let id = job.run().run_id();
    let _lock = datamux_data::lock::Lock::folder(dir, || {})?;
    Ok(match job {
        Job::Train(_) => {
            let rows: Vec<AccuracyRow> = results::read_table(&dir.join("accuracy.parquet"))?;
            results::finished(&rows).contains(&id)
        }
        Job::Speed(_) => {
            let rows: Vec<SpeedRow> = results::read_table(&dir.join("speed.parquet"))?;
            results::finished(&rows).contains(&id)
        }
    })
}

/// The memory estimate of `job` (bytes) and the shape it is taken from: a training step, or
/// for a speed point one timed call of its rows; `None` where the modality gives no shape.
pub fn memory_need(
    job: &Job,
    env: &datamux_pipeline::Env,
) -> Option<(u64, datamux_pipeline::memory::Shape)> {
    let run = job.run();
    let mut shape = registry::modality(&run.modality)
        .ok()?
        .memory_shape(run, env)
        .ok()??;
    let speed = matches!(job, Job::Speed(_));
    if speed {
        let n = run.model.n_instances.max(1);
        let rows = run
            .speed
            .rows_per_call
            .unwrap_or(run.speed.batch_instances.div_ceil(n));
        shape.rows = rows as u64;
    }
    Some((datamux_pipeline::memory::bytes(&shape, speed), shape))
}

/// Why `job` cannot run here: its memory estimate (`datamux_pipeline::memory`) above what
/// the machine has available for each of the `side_by_side` jobs; `None` when it fits or has no
/// estimate.
pub fn too_big(
    job: &Job,
    env: &datamux_pipeline::Env,
    available: Option<u64>,
    side_by_side: usize,
) -> Option<String> {
    use datamux_pipeline::memory;
    let available = available?;
    let (need, shape) = memory_need(job, env)?;
    let share = available / side_by_side.max(1) as u64;
    (need > share).then(|| {
        format!(
            "needs about {} of memory (estimated from its shape: {} rows x {} positions, width {}, {} outputs per position), but {} are available{}; lower N or the batch size{}",
            memory::gib(need),
            shape.rows,
            shape.seq,
            shape.width,
            shape.outputs,
            memory::gib(available),
            if side_by_side > 1 {
                format!(", {} for each of {side_by_side} runs side by side", memory::gib(share))
            } else {
                String::new()
            },
            if side_by_side > 1 { ", or run with --jobs 1" } else { "" }
        )
    })
}

/// A rough cost of a run for scheduling: muxed rows processed over all steps.
fn job_cost(r: &RunConfig) -> usize {
    let n = r.model.n_instances.max(1);
    let warms_up = registry::modality(&r.modality).is_ok_and(|m| crate::job::warms_up(m, r));
    let warm = if warms_up {
        r.warmup.steps * r.warmup.batch_size / n
    } else {
        0
    };
    r.train.steps * r.train.batch_size / n + warm
}

/// Run every experiment of the plan; the outcome counts its runs and missed expectations.
pub fn run(plan: &Plan) -> Result<Outcome> {
    let mut tables = Vec::new();
    let mut train_list = Vec::new();
    let mut speed_list = Vec::new();
    // Runs whose data could not be had are tried again (cheap), in case it can be had now.
    let mut retry = 0;
    for (i, exp) in plan.experiments.iter().enumerate() {
        let dir = plan.out_dir.join(&exp.name);
        let t = Tables::open(&dir)?;
        // The report groups rows by model and N, not by profile: one table, one profile.
        if let Some(other) = t
            .accuracy
            .iter()
            .map(|r| &r.id)
            .chain(t.speed.iter().map(|r| &r.id))
            .map(|id| &id.profile)
            .find(|p| **p != exp.profile)
        {
            anyhow::bail!(
                "{} holds results of profile `{other}`; a `{}` run would mix them into one table: \
                 give it its own --out (`just reproduce {}` writes results/{}/)",
                dir.display(),
                exp.profile,
                exp.profile,
                exp.profile
            );
        }
        {
            let _lock = t.lock()?;
            write_resolved(&dir, exp, &t.run_ids())?;
            datamux_data::atomic::write_bytes(
                &dir.join("env.txt"),
                crate::provenance::env_txt(&plan.command).as_bytes(),
            )?;
        }
        let done = results::finished(&t.accuracy);
        let done_speed = results::finished(&t.speed);
        let unavailable: BTreeSet<&str> = t
            .accuracy
            .iter()
            .filter(|r| r.id.status == Status::Unavailable)
            .map(|r| r.id.run_id.as_str())
            .collect();
        for r in &exp.runs {
            let id = r.run_id();
            if unavailable.contains(id.as_str()) {
                retry += 1;
            }
            if !done.contains(&id) {
                train_list.push((i, Job::Train(r.clone())));
            }
        }
        if plan.speed {
            for r in &exp.speed {
                if !done_speed.contains(&r.run_id()) {
                    speed_list.push((i, Job::Speed(r.clone())));
                }
            }
        }
        tables.push(t);
    }
    let total: usize = plan.experiments.iter().map(|e| e.runs.len()).sum();
    eprintln!(
        "{} experiment(s), {total} run(s): {} to train, {} already finished, {retry} unavailable before (looked up again); {} speed point(s) to time",
        plan.experiments.len(),
        train_list.len() - retry,
        total - train_list.len(),
        speed_list.len()
    );
    // Runs that cannot fit are refused here, with both figures, before any worker starts.
    let available = datamux_pipeline::memory::available();
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let mut refused = 0;
    for (list, side_by_side) in [(&mut train_list, plan.jobs), (&mut speed_list, 1)] {
        let mut kept = Vec::new();
        for (i, job) in list.drain(..) {
            match too_big(&job, &plan.env, available, side_by_side) {
                Some(why) => {
                    eprintln!("refused {}: {why}", job.run().run_id());
                    let e = anyhow::anyhow!("{why}");
                    tables[i].add(crate::job::failed_result(&job, &plan.env, &e))?;
                    refused += 1;
                }
                None => kept.push((i, job)),
            }
        }
        *list = kept;
    }
    if refused > 0 {
        eprintln!("{refused} job(s) refused: they cannot fit in this machine's memory");
    }
    // Longest first, so side-by-side workers finish together: cost ~ rows x steps.
    train_list.sort_by_key(|(_, job)| std::cmp::Reverse(job_cost(job.run())));
    workers::run_jobs(
        train_list,
        plan,
        plan.jobs,
        plan.threads,
        "training runs",
        |exp, _, r| tables[exp].add(r),
    )?;
    // Timing runs alone, with every core: nothing else may run beside a measurement.
    workers::run_jobs(speed_list, plan, 1, cores, "speed points", |exp, _, r| {
        tables[exp].add(r)
    })?;
    if let Some(dir) = &plan.env.hub_attempts {
        // The marks are this run's; a missing folder (no attempt failed) is fine.
        let _ = std::fs::remove_dir_all(dir);
    }
    let mut outcome = Outcome::default();
    for (exp, t) in plan.experiments.iter().zip(&mut tables) {
        // Again at the end, when the rows of replaced runs are gone (and with the rows of any
        // other run on the folder).
        let _lock = t.lock()?;
        t.reload()?;
        write_resolved(&plan.out_dir.join(&exp.name), exp, &t.run_ids())?;
        outcome.add(exp, &t.accuracy);
        if plan.speed {
            outcome.add_speed(exp, &t.speed);
        }
    }
    Ok(outcome)
}

/// How a plan ended, counted over its runs' rows: what `datamux run` exits with.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Outcome {
    /// Runs with results.
    pub ok: usize,
    /// Runs that failed.
    pub failed: usize,
    /// Runs whose data could not be had.
    pub unavailable: usize,
    /// Expectations not met, or that matched no row.
    pub missed: usize,
    /// Reproduced rows outside their tolerance of the published ones (`--compare-with`).
    pub outside: usize,
    /// Speed points that failed (or never reported).
    pub speed_failed: usize,
}

impl Outcome {
    /// Every run finished and every expectation held.
    pub const SUCCESS: u8 = 0;
    /// A run failed, an expectation was missed or matched no row, or nothing could run at all.
    pub const FAILURE: u8 = 1;
    /// Everything that could run ran and met its expectations, but some data was unavailable.
    pub const UNAVAILABLE: u8 = 3;

    /// Count one experiment's runs (from its rows) and expectations, printing every failed run
    /// and every missed expectation.
    pub fn add(&mut self, exp: &Experiment, rows: &[AccuracyRow]) {
        let ids: BTreeSet<String> = exp.runs.iter().map(RunConfig::run_id).collect();
        let mut status: BTreeMap<&str, &AccuracyRow> = BTreeMap::new();
        for r in rows.iter().filter(|r| ids.contains(&r.id.run_id)) {
            status.entry(&r.id.run_id).or_insert(r);
        }
        for r in status.values() {
            match r.id.status {
                Status::Ok => self.ok += 1,
                Status::Error => self.failed += 1,
                Status::Unavailable => self.unavailable += 1,
            }
            if r.id.status != Status::Ok {
                eprintln!(
                    "{}: {} {}: {}",
                    exp.name, r.id.status, r.id.run_id, r.id.error
                );
            }
        }
        // A run of the plan without any row did not finish (interrupted): a failure.
        self.failed += ids.len() - status.len();
        for miss in check_expectations(exp, rows) {
            eprintln!("{}: expectation missed: {miss}", exp.name);
            self.missed += 1;
        }
    }

    /// Count one experiment's failed speed points, printing each. A speed point whose data
    /// was unavailable is not counted again: its training run says so.
    pub fn add_speed(&mut self, exp: &Experiment, rows: &[SpeedRow]) {
        for r in &exp.speed {
            let id = r.run_id();
            match rows.iter().find(|row| row.id.run_id == id) {
                Some(row) if row.id.status == Status::Error => {
                    eprintln!("{}: speed point failed {id}: {}", exp.name, row.id.error);
                    self.speed_failed += 1;
                }
                Some(_) => {}
                None => {
                    eprintln!("{}: speed point did not finish {id}", exp.name);
                    self.speed_failed += 1;
                }
            }
        }
    }

    /// One line: the counts and what the exit code means.
    pub fn summary(&self) -> String {
        let verdict = match self.code() {
            Self::SUCCESS if self.ok == 0 => "nothing to run",
            Self::SUCCESS => "every run finished and every expectation held",
            Self::UNAVAILABLE => "everything that could run ran; some data was unavailable",
            _ if self.ok == 0 && self.failed == 0 => "nothing could run",
            _ => "FAILED",
        };
        format!(
            "{} run(s) ok, {} failed, {} unavailable; {} speed point(s) failed; {} expectation(s) missed; {} reproduced row(s) outside tolerance: {verdict} (exit {})",
            self.ok,
            self.failed,
            self.unavailable,
            self.speed_failed,
            self.missed,
            self.outside,
            self.code()
        )
    }

    /// The exit code (`datamux run --help`).
    pub fn code(&self) -> u8 {
        let runs = self.ok + self.failed + self.unavailable;
        if runs == 0 && self.missed == 0 && self.outside == 0 && self.speed_failed == 0 {
            // An empty plan (a shard that drew no run) did all it had to.
            Self::SUCCESS
        } else if self.failed > 0
            || self.missed > 0
            || self.outside > 0
            || self.speed_failed > 0
            || self.ok == 0
        {
            Self::FAILURE
        } else if self.unavailable > 0 {
            Self::UNAVAILABLE
        } else {
            Self::SUCCESS
        }
    }
}

/// The expectations of an experiment that its rows do not meet.
pub fn check_expectations(exp: &Experiment, rows: &[AccuracyRow]) -> Vec<String> {
    let ids: BTreeSet<String> = exp.runs.iter().map(RunConfig::run_id).collect();
    let mut misses = Vec::new();
    for e in &exp.expect {
        let hits: Vec<&AccuracyRow> = rows
            .iter()
            .filter(|r| ids.contains(&r.id.run_id) && r.id.status == Status::Ok)
            .filter(|r| r.split == e.split && r.metric == e.metric)
            .filter(|r| matches_run(e, &r.id))
            .collect();
        let what = format!(
            "{} {} >= {} (backbone {}, N {}, warm-up {})",
            e.split,
            e.metric,
            e.min,
            e.backbone.as_deref().unwrap_or("any"),
            e.n_instances.map_or("any".into(), |n| n.to_string()),
            e.warmup.map_or("any".into(), |w| w.to_string())
        );
        if hits.is_empty() {
            // A run that could not get its data is reported as unavailable, not as a miss; an
            // expectation that no run of the plan could meet is one.
            let unavailable = rows
                .iter()
                .filter(|r| ids.contains(&r.id.run_id) && r.id.status == Status::Unavailable)
                .any(|r| matches_run(e, &r.id));
            if !unavailable {
                misses.push(format!("{what}: no row matches"));
            }
            continue;
        }
        for r in hits {
            if r.value.is_nan() || r.value < e.min {
                misses.push(format!("{what}: {} has {:.4}", r.id.run_id, r.value));
            }
        }
    }
    misses
}

/// Whether a row's run is one an expectation is about (N, backbone, mux, demux, warm-up).
fn matches_run(e: &Expect, id: &Identity) -> bool {
    e.n_instances.is_none_or(|n| id.n_instances == n as i64)
        && e.backbone.as_ref().is_none_or(|b| &id.backbone == b)
        && e.mux.is_none_or(|m| id.mux == m.name())
        && e.demux.is_none_or(|d| id.demux == d.name())
        && e.warmup.is_none_or(|w| id.warmup == w)
}

/// `resolved.toml`: the settings of every run in the folder's tables and of every run of this
/// invocation. A table grows over invocations (`--set sweep.*` subsets), so the entries of
/// earlier runs that still have rows are kept; those of replaced runs are dropped.
fn write_resolved(dir: &Path, exp: &Experiment, in_tables: &BTreeSet<String>) -> Result<()> {
    let path = dir.join("resolved.toml");
    let earlier = match datamux_data::atomic::read_optional(&path)? {
        Some(text) => text
            .parse::<toml::Table>()
            .with_context(|| format!("{} is not TOML", path.display()))?
            .remove("runs")
            .and_then(|r| r.as_table().cloned())
            .unwrap_or_default(),
        None => toml::Table::new(),
    };
    let mut runs: BTreeMap<String, toml::Value> = earlier
        .into_iter()
        .filter(|(id, _)| in_tables.contains(id))
        .collect();
    for r in exp.runs.iter().chain(&exp.speed) {
        runs.insert(r.run_id(), r.to_toml()?);
    }
    let mut doc = toml::Table::new();
    doc.insert("experiment".into(), exp.name.clone().into());
    doc.insert("profile".into(), exp.profile.clone().into());
    doc.insert("source".into(), exp.path.display().to_string().into());
    if !exp.compare.is_empty() {
        doc.insert("compare".into(), exp.compare.clone().into());
    }
    doc.insert(
        "runs".into(),
        toml::Value::Table(runs.into_iter().collect()),
    );
    write_resolved_doc(dir, &doc, "datamux run")
}

/// Write `doc` as `dir/resolved.toml` through a temporary file, headed by the command that
/// generated it (`datamux run`, `datamux publish`).
pub(crate) fn write_resolved_doc(dir: &Path, doc: &toml::Table, by: &str) -> Result<()> {
    let text = format!(
        "# generated by `{by}`: every run's resolved settings, by run_id\n{}",
        toml::to_string(doc)?
    );
    datamux_data::atomic::write_bytes(&dir.join("resolved.toml"), text.as_bytes())?;
    Ok(())
}
