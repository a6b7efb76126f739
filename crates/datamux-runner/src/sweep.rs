//! Running experiments: expand every file into runs, skip the finished ones, train the rest in
//! worker processes side by side (single-threaded each: faster on a small CPU than one
//! multi-threaded run, house-style §2.14), then time the speed points one at a time with every
//! core, and write the tables after each run so an interruption loses at most the runs in flight.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;

use anyhow::{Context, Result, bail};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};

use crate::config::{self, Experiment, RunConfig};
use crate::results::{self, AccuracyRow, SpeedRow};
use crate::run::{Job, JobResult, RunEnv, Tick};

/// What `datamux run` was asked to do.
#[derive(Debug, Clone)]
pub struct Plan {
    pub experiments: Vec<Experiment>,
    pub out_dir: PathBuf,
    pub env: RunEnv,
    /// Training jobs side by side.
    pub jobs: usize,
    /// Threads per training job.
    pub threads: usize,
    pub speed: bool,
    pub command: String,
    /// The `datamux` binary that runs the workers (`datamux worker <spec>`).
    pub worker_exe: PathBuf,
}

/// A line a worker writes on stdout.
#[derive(Debug, Serialize, Deserialize)]
pub enum Message {
    Tick(Tick),
    Done(Box<JobResult>),
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
) -> Result<Vec<Experiment>> {
    experiment_files(paths)?
        .iter()
        .map(|f| config::load(f, profile, overrides))
        .collect()
}

/// Run the worker for one job in a child process and stream its messages.
fn spawn_worker(
    exe: &Path,
    job: &Job,
    env: &RunEnv,
    threads: usize,
    spec_dir: &Path,
    tx: &mpsc::Sender<(usize, Message)>,
    slot: usize,
) -> Result<JobResult> {
    std::fs::create_dir_all(spec_dir)?;
    let spec = spec_dir.join(format!(
        "{}-{}.json",
        job.run().run_id(),
        if matches!(job, Job::Speed(_)) {
            "speed"
        } else {
            "train"
        }
    ));
    std::fs::write(&spec, serde_json::to_string(&(job, env))?)?;
    let mut child = Command::new(exe)
        .arg("worker")
        .arg(&spec)
        .env("RAYON_NUM_THREADS", threads.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot start a worker process")?;
    let stderr = child.stderr.take();
    let err_thread = std::thread::spawn(move || {
        let mut tail = Vec::new();
        if let Some(e) = stderr {
            for line in BufReader::new(e).lines().map_while(Result::ok) {
                tail.push(line);
                if tail.len() > 20 {
                    tail.remove(0);
                }
            }
        }
        tail
    });
    let mut done = None;
    if let Some(out) = child.stdout.take() {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            match serde_json::from_str::<Message>(&line) {
                Ok(Message::Done(r)) => done = Some(*r),
                Ok(m) => {
                    let _ = tx.send((slot, m));
                }
                Err(_) => {}
            }
        }
    }
    let status = child.wait()?;
    let tail = err_thread.join().unwrap_or_default();
    match done {
        Some(r) => Ok(r),
        None => bail!(
            "worker exited with {status} before reporting: {}",
            tail.last().cloned().unwrap_or_default()
        ),
    }
}

/// Tables of one experiment, kept in memory and written after every finished job.
struct Tables {
    dir: PathBuf,
    accuracy: Vec<AccuracyRow>,
    speed: Vec<SpeedRow>,
}

impl Tables {
    fn open(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        Ok(Self {
            dir: dir.to_path_buf(),
            accuracy: results::read_table(&dir.join("accuracy.parquet"))?,
            speed: results::read_table(&dir.join("speed.parquet"))?,
        })
    }

    fn add(&mut self, r: JobResult) -> Result<()> {
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

/// A rough cost of a run for scheduling: muxed rows processed over all steps.
fn job_cost(r: &RunConfig) -> usize {
    let n = r.model.n_instances.max(1);
    let warm = if r.modality == config::Modality::Text && r.warmup.enabled {
        r.warmup.steps * r.warmup.batch_size / n
    } else {
        0
    };
    r.train.steps * r.train.batch_size / n + warm
}

/// One speed point per distinct model: the first seed of each (backbone, mux, demux, N).
fn speed_runs(exp: &Experiment) -> Vec<RunConfig> {
    let mut seen = BTreeSet::new();
    exp.runs
        .iter()
        .filter(|r| r.speed.enabled)
        .filter(|r| {
            let m = &r.model;
            seen.insert((
                m.backbone.clone(),
                m.mux.kind.name(),
                m.demux.kind.name(),
                m.n_instances,
                r.warmup.enabled,
            ))
        })
        .cloned()
        .collect()
}

fn bar_style() -> ProgressStyle {
    ProgressStyle::with_template("{prefix:>40.dim} {bar:24} {pos:>6}/{len:6} {wide_msg}")
        .unwrap_or_else(|_| ProgressStyle::default_bar())
}

/// The jobs left to start, in order, and the retrieval warm-ups each worker's job may still be
/// training.
struct Queue {
    /// (experiment index, job, the job's warm-ups: `Job::warmups`).
    left: std::collections::VecDeque<(usize, Job, Vec<String>)>,
    /// Per worker slot: the run id of its job and the warm-ups it may still be training.
    warming: Vec<(String, Vec<String>)>,
}

impl Queue {
    fn new(list: Vec<(usize, Job)>, slots: usize) -> Self {
        Self {
            left: list
                .into_iter()
                .map(|(exp, job)| {
                    let w = job.warmups();
                    (exp, job, w)
                })
                .collect(),
            warming: vec![(String::new(), Vec::new()); slots],
        }
    }

    /// The next job for `slot`: the first that needs no warm-up another worker may be training
    /// (it would wait on that warm-up's lock with a core idle: the N = 10 warm-up of the
    /// curriculum starts from the N = 5 one); the first of all when every job left does.
    fn next(&mut self, slot: usize) -> Option<(usize, Job)> {
        let warming = &self.warming;
        let busy = |w: &String| warming.iter().any(|(_, ws)| ws.contains(w));
        let i = self
            .left
            .iter()
            .position(|(_, _, ws)| !ws.iter().any(busy))
            .unwrap_or(0);
        let (exp, job, ws) = self.left.remove(i)?;
        self.warming[slot] = (job.run().run_id(), ws);
        Some((exp, job))
    }

    /// The job `run_id` of `slot` is past its warm-ups (or finished). A message of the slot's
    /// previous job, read after the slot took its next one, names that job and changes nothing.
    fn warmed_up(&mut self, slot: usize, run_id: &str) {
        if self.warming[slot].0 == run_id {
            self.warming[slot].1.clear();
        }
    }
}

/// Run a list of jobs, `jobs` at a time; results are passed to `on_done` as they finish.
fn run_jobs(
    list: Vec<(usize, Job)>,
    plan: &Plan,
    jobs: usize,
    threads: usize,
    title: &str,
    mut on_done: impl FnMut(usize, &Job, JobResult) -> Result<()>,
) -> Result<()> {
    if list.is_empty() {
        return Ok(());
    }
    let mp = MultiProgress::new();
    let overall = mp.add(ProgressBar::new(list.len() as u64));
    overall.set_style(
        ProgressStyle::with_template(
            "{prefix:>40.bold} {bar:24} {pos:>6}/{len:6} elapsed {elapsed}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    overall.set_prefix(title.to_string());
    let bars: Vec<ProgressBar> = (0..jobs)
        .map(|_| {
            let b = mp.add(ProgressBar::new(1));
            b.set_style(bar_style());
            b
        })
        .collect();
    let spec_dir = plan.env.runs_dir.join("specs");
    let queue = std::sync::Arc::new(std::sync::Mutex::new(Queue::new(list, jobs)));
    let (tx, rx) = mpsc::channel::<(usize, Message)>();
    let (done_tx, done_rx) = mpsc::channel::<(usize, usize, Job, Result<JobResult>)>();
    let mut handles = Vec::new();
    for slot in 0..jobs {
        let queue = queue.clone();
        let tx = tx.clone();
        let done_tx = done_tx.clone();
        let env = plan.env.clone();
        let spec_dir = spec_dir.clone();
        let exe = plan.worker_exe.clone();
        handles.push(std::thread::spawn(move || {
            loop {
                let next = queue.lock().ok().and_then(|mut q| q.next(slot));
                let Some((exp, job)) = next else { break };
                let _ = tx.send((
                    slot,
                    Message::Tick(Tick {
                        stage: "start".into(),
                        pos: 0,
                        len: 1,
                        msg: job.run().run_id(),
                    }),
                ));
                let r = spawn_worker(&exe, &job, &env, threads, &spec_dir, &tx, slot);
                let _ = done_tx.send((slot, exp, job, r));
            }
        }));
    }
    drop(tx);
    drop(done_tx);
    let mut names: Vec<String> = vec![String::new(); jobs];
    let mut failures = Vec::new();
    // Without a terminal the bars are hidden; validation lines keep a log readable instead.
    let log_lines = !std::io::IsTerminal::is_terminal(&std::io::stderr());
    loop {
        while let Ok((slot, Message::Tick(t))) = rx.try_recv() {
            if log_lines && t.msg.contains(" val ") {
                eprintln!("{} {} {}/{} {}", names[slot], t.stage, t.pos, t.len, t.msg);
            }
            // A job's warm-ups are finished (trained or loaded) once it trains its task.
            if t.stage == "train" {
                if let Ok(mut q) = queue.lock() {
                    q.warmed_up(slot, &names[slot]);
                }
            }
            let b = &bars[slot];
            if t.stage == "start" {
                names[slot] = t.msg.clone();
                b.set_prefix(short(&t.msg));
                b.reset();
                continue;
            }
            b.set_length(t.len as u64);
            b.set_position(t.pos as u64);
            b.set_message(format!("{} {}", t.stage, t.msg));
        }
        match done_rx.recv_timeout(std::time::Duration::from_millis(100)) {
            Ok((slot, exp, job, r)) => {
                if let Ok(mut q) = queue.lock() {
                    q.warmed_up(slot, &job.run().run_id());
                }
                let r = r.unwrap_or_else(|e| {
                    failures.push(format!("{}: {e:#}", job.run().run_id()));
                    crate::run::failed_result(&job, &plan.env, &e)
                });
                for row in &r.accuracy {
                    if row.id.status != "ok" {
                        mp.println(format!(
                            "{} {}: {}",
                            row.id.status, row.id.run_id, row.id.error
                        ))
                        .ok();
                    }
                }
                for row in &r.speed {
                    if row.id.status != "ok" {
                        mp.println(format!(
                            "speed {} {}: {}",
                            row.id.status, row.id.run_id, row.id.error
                        ))
                        .ok();
                    }
                }
                on_done(exp, &job, r)?;
                bars[slot].set_message("");
                overall.inc(1);
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    for h in handles {
        let _ = h.join();
    }
    overall.finish();
    for b in bars {
        b.finish_and_clear();
    }
    Ok(())
}

fn short(run_id: &str) -> String {
    let n = run_id.chars().count();
    if n > 40 {
        run_id.chars().skip(n - 40).collect()
    } else {
        run_id.to_string()
    }
}

/// Run every experiment of the plan; returns whether every row is ok and every expectation met.
pub fn run(plan: &Plan) -> Result<bool> {
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
        write_resolved(&dir, exp, &t.run_ids())?;
        std::fs::write(
            dir.join("env.txt"),
            crate::provenance::env_txt(&plan.command),
        )?;
        let done = results::finished(&t.accuracy);
        let done_speed = results::finished(&t.speed);
        let unavailable: BTreeSet<&str> = t
            .accuracy
            .iter()
            .filter(|r| r.id.status == "unavailable")
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
            for r in speed_runs(exp) {
                if !done_speed.contains(&r.run_id()) {
                    speed_list.push((i, Job::Speed(r)));
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
    // Longest first, so side-by-side workers finish together: cost ~ rows x steps.
    train_list.sort_by_key(|(_, job)| std::cmp::Reverse(job_cost(job.run())));
    run_jobs(
        train_list,
        plan,
        plan.jobs,
        plan.threads,
        "training runs",
        |exp, _, r| tables[exp].add(r),
    )?;
    // Timing runs alone, with every core: nothing else may run beside a measurement.
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    run_jobs(speed_list, plan, 1, cores, "speed points", |exp, _, r| {
        tables[exp].add(r)
    })?;
    let mut ok = true;
    for (exp, t) in plan.experiments.iter().zip(&tables) {
        // Again at the end, when the rows of replaced runs are gone.
        write_resolved(&plan.out_dir.join(&exp.name), exp, &t.run_ids())?;
        let ids: BTreeSet<String> = exp.runs.iter().map(RunConfig::run_id).collect();
        let failed: Vec<&AccuracyRow> = t
            .accuracy
            .iter()
            .filter(|r| ids.contains(&r.id.run_id) && r.id.status != "ok")
            .collect();
        for r in &failed {
            eprintln!(
                "{}: {} {}: {}",
                exp.name, r.id.status, r.id.run_id, r.id.error
            );
        }
        ok &= failed.iter().all(|r| r.id.status == "unavailable");
        for miss in check_expectations(exp, &t.accuracy) {
            eprintln!("{}: expectation missed: {miss}", exp.name);
            ok = false;
        }
    }
    Ok(ok)
}

/// The expectations of an experiment that its rows do not meet.
pub fn check_expectations(exp: &Experiment, rows: &[AccuracyRow]) -> Vec<String> {
    let ids: BTreeSet<String> = exp.runs.iter().map(RunConfig::run_id).collect();
    let mut misses = Vec::new();
    for e in &exp.expect {
        let hits: Vec<&AccuracyRow> = rows
            .iter()
            .filter(|r| ids.contains(&r.id.run_id) && r.id.status == "ok")
            .filter(|r| r.split == e.split && r.metric == e.metric)
            .filter(|r| e.n_instances.is_none_or(|n| r.id.n_instances == n as i64))
            .filter(|r| e.backbone.as_ref().is_none_or(|b| &r.id.backbone == b))
            .filter(|r| e.mux.is_none_or(|m| r.id.mux == m.name()))
            .filter(|r| e.demux.is_none_or(|d| r.id.demux == d.name()))
            .filter(|r| e.warmup.is_none_or(|w| r.id.warmup == w))
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
            // A run that could not get its data is reported as unavailable, not as a miss.
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

/// `resolved.toml`: the settings of every run in the folder's tables and of every run of this
/// invocation. A table grows over invocations (`--set sweep.*` subsets), so the entries of
/// earlier runs that still have rows are kept; those of replaced runs are dropped.
fn write_resolved(dir: &Path, exp: &Experiment, in_tables: &BTreeSet<String>) -> Result<()> {
    let path = dir.join("resolved.toml");
    let earlier = match std::fs::read_to_string(&path) {
        Ok(text) => text
            .parse::<toml::Table>()
            .with_context(|| format!("{} is not TOML", path.display()))?
            .remove("runs")
            .and_then(|r| r.as_table().cloned())
            .unwrap_or_default(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => toml::Table::new(),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    let mut runs: BTreeMap<String, toml::Value> = earlier
        .into_iter()
        .filter(|(id, _)| in_tables.contains(id))
        .collect();
    for r in &exp.runs {
        runs.insert(r.run_id(), toml::Value::try_from(r)?);
    }
    let mut doc = toml::Table::new();
    doc.insert("experiment".into(), exp.name.clone().into());
    doc.insert("profile".into(), exp.profile.clone().into());
    doc.insert("source".into(), exp.path.display().to_string().into());
    doc.insert(
        "runs".into(),
        toml::Value::Table(runs.into_iter().collect()),
    );
    let text = format!(
        "# generated by `datamux run`: every run's resolved settings, by run_id\n{}",
        toml::to_string(&doc)?
    );
    let tmp = dir.join("resolved.toml.tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(tmp, dir.join("resolved.toml"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_worker_does_not_start_a_job_whose_warm_up_another_is_training() {
        let path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../experiments/text-sentence.toml");
        let runs = config::load(&path, "smoke", &[]).unwrap().runs;
        let find = |n: usize, warm: bool| {
            let r = runs
                .iter()
                .find(|r| {
                    r.data.dataset == "rt-snippets"
                        && r.model.n_instances == n
                        && r.warmup.enabled == warm
                })
                .unwrap();
            Job::Train(r.clone())
        };
        // The smoke profile's N = 2 warm-up starts from the N = 1 one.
        let (n2, n1, b1) = (find(2, true), find(1, true), find(1, false));
        assert_eq!(n2.warmups().len(), 2);
        assert_eq!(n2.warmups()[1], n1.warmups()[0]);
        assert!(b1.warmups().is_empty());
        assert!(Job::Speed(n2.run().clone()).warmups().is_empty());
        let id = |j: &(usize, Job)| j.1.run().run_id();

        let mut q = Queue::new(vec![(0, n2.clone()), (1, n1.clone()), (2, b1.clone())], 2);
        assert_eq!(id(&q.next(0).unwrap()), n2.run().run_id());
        // N = 1's warm-up is being trained by slot 0 (as the source of N = 2's): B1 goes first.
        assert_eq!(id(&q.next(1).unwrap()), b1.run().run_id());
        q.warmed_up(1, &b1.run().run_id());
        // When every job left waits on a warm-up, the first goes anyway.
        assert_eq!(id(&q.next(1).unwrap()), n1.run().run_id());
        assert!(q.next(0).is_none());

        // Once slot 0 fine-tunes, its warm-ups are finished and block nothing.
        let mut q = Queue::new(vec![(0, n2.clone()), (1, n1.clone()), (2, b1.clone())], 2);
        q.next(0);
        // A late message of another job of slot 0 changes nothing.
        q.warmed_up(0, &b1.run().run_id());
        assert_eq!(id(&q.next(1).unwrap()), b1.run().run_id());
        q.warmed_up(0, &n2.run().run_id());
        assert_eq!(id(&q.next(1).unwrap()), n1.run().run_id());
    }
}
