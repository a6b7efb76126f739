//! Worker processes: each job runs in a child `datamux worker <spec>` that streams JSON lines
//! (progress ticks, then the result); `jobs` of them side by side, with progress bars.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;

use anyhow::{Context as _, Result, bail};
use datamux_pipeline::{Env, Stage, Tick};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};

use super::Plan;
use super::queue::Queue;
use crate::job::{Job, JobResult};
use crate::results::Status;

/// A line a worker writes on stdout.
#[derive(Debug, Serialize, Deserialize)]
pub enum Message {
    Tick(Tick),
    Done(Box<JobResult>),
}

/// Run the worker for one job in a child process and stream its messages.
fn spawn_worker(
    exe: &Path,
    job: &Job,
    env: &Env,
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
    // The line that says why: a panic's own line where there is one (the backtrace note
    // follows it), else the last.
    let why = tail
        .iter()
        .rev()
        .find(|l| l.contains("panicked"))
        .or(tail.last())
        .cloned()
        .unwrap_or_default();
    match done {
        Some(r) => Ok(r),
        None => bail!("worker exited with {status} before reporting: {why}"),
    }
}

fn bar_style() -> ProgressStyle {
    ProgressStyle::with_template("{prefix:>40.dim} {bar:24} {pos:>6}/{len:6} {wide_msg}")
        .unwrap_or_else(|_| ProgressStyle::default_bar())
}

/// Run a list of jobs, `jobs` at a time; results are passed to `on_done` as they finish.
pub fn run_jobs(
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
        let dirs: Vec<std::path::PathBuf> = plan
            .experiments
            .iter()
            .map(|e| plan.out_dir.join(&e.name))
            .collect();
        handles.push(std::thread::spawn(move || {
            loop {
                let next = queue.lock().ok().and_then(|mut q| q.next(slot));
                let Some((exp, job)) = next else { break };
                let _ = tx.send((
                    slot,
                    Message::Tick(Tick {
                        stage: Stage::Start,
                        pos: 0,
                        len: 1,
                        msg: job.run().run_id(),
                    }),
                ));
                // One process at a time per job, across runs on one folder: a second run waits
                // for the first and then finds the job finished (a file lock: a killed run
                // leaves none behind).
                let r = (|| {
                    let kind = if matches!(job, Job::Speed(_)) {
                        "speed"
                    } else {
                        "train"
                    };
                    let path = env
                        .runs_dir
                        .join("locks")
                        .join(format!("{}-{kind}.lock", job.run().run_id()));
                    let _lock = datamux_data::lock::Lock::acquire(&path, || {
                        let _ = tx.send((
                            slot,
                            Message::Tick(Tick {
                                stage: Stage::Data,
                                pos: 0,
                                len: 1,
                                msg: format!("waiting: another run has {}", job.run().run_id()),
                            }),
                        ));
                    })?;
                    if super::finished_in(&dirs[exp], &job)? {
                        return Ok(JobResult {
                            accuracy: vec![],
                            speed: vec![],
                        });
                    }
                    spawn_worker(&exe, &job, &env, threads, &spec_dir, &tx, slot)
                })();
                let _ = done_tx.send((slot, exp, job, r));
            }
        }));
    }
    drop(tx);
    drop(done_tx);
    let mut names: Vec<String> = vec![String::new(); jobs];
    // Without a terminal the bars are hidden; validation lines keep a log readable instead.
    let log_lines = !std::io::IsTerminal::is_terminal(&std::io::stderr());
    loop {
        while let Ok((slot, Message::Tick(t))) = rx.try_recv() {
            if log_lines && (t.msg.contains(" val ") || t.msg.starts_with("waiting")) {
                eprintln!("{} {} {}/{} {}", names[slot], t.stage, t.pos, t.len, t.msg);
            }
            // A job's warm-ups are finished (trained or loaded) once it trains its task.
            if t.stage == Stage::Train {
                if let Ok(mut q) = queue.lock() {
                    q.warmed_up(slot, &names[slot], false);
                }
            }
            let b = &bars[slot];
            if t.stage == Stage::Start {
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
                    q.warmed_up(slot, &job.run().run_id(), true);
                }
                // The error becomes the job's row (and is printed below with the others).
                let r = r.unwrap_or_else(|e| crate::job::failed_result(&job, &plan.env, &e));
                // Hidden bars (no terminal) print nothing: a log gets the line directly.
                let say = |line: String| {
                    if log_lines {
                        eprintln!("{line}");
                    } else {
                        mp.println(line).ok();
                    }
                };
                for row in r.accuracy.iter().filter(|r| r.id.status != Status::Ok) {
                    say(format!(
                        "{} {}: {}",
                        row.id.status, row.id.run_id, row.id.error
                    ));
                }
                for row in r.speed.iter().filter(|r| r.id.status != Status::Ok) {
                    say(format!(
                        "speed {} {}: {}",
                        row.id.status, row.id.run_id, row.id.error
                    ));
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
