//! Reliability (issue 19), one regression test per failure it lists: a worker's panic reported
//! with its message, checkpoints that a kill or a truncation cannot break, locks that no dead or
//! unrelated process can hold, concurrent runs on one folder that keep every row, an N too large
//! refused up front, and a full disk named as such. Every run here is a few seconds on the
//! fixtures; every wait is bounded.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use datamux_runner::results::{self, AccuracyRow, SpeedRow, Status};

use common::{command, mirror, stderr, tiny_vision, values, workspace};

fn output(mut c: Command) -> Output {
    c.output().expect("run datamux")
}

/// A two-point MNIST experiment (N = 1, 2) on the fixture with speed points, a few steps each.
fn write_tiny(dir: &Path) -> PathBuf {
    let path = dir.join("experiments/tiny.toml");
    std::fs::write(
        &path,
        tiny_vision(
            "tiny",
            "mnist",
            "[1, 2]",
            "[speed]\nbatch_instances = 8\niters = 2\nwarmup_iters = 1\n",
        ),
    )
    .unwrap();
    path
}

fn run_tiny(dir: &Path, out: &str, extra: &[&str]) -> Command {
    let m = mirror();
    let mut args = vec![
        "run",
        "experiments/tiny.toml",
        "--out",
        out,
        "--data-dir",
        &m,
    ];
    args.extend(extra);
    command(dir, &args)
}

/// The text experiment's smoke profile on rt-snippets alone at N = 2: a retrieval warm-up, then
/// the task.
fn run_text(dir: &Path, out: &str) -> Command {
    command(
        dir,
        &[
            "run",
            "experiments/text-sentence.toml",
            "--profile",
            "smoke",
            "--out",
            out,
            "--data-dir",
            &mirror(),
            "--no-speed",
            "--set",
            "sweep.dataset=[\"rt-snippets\"]",
            "--set",
            "sweep.n_instances=[2]",
        ],
    )
}

fn accuracy(dir: &Path) -> Vec<AccuracyRow> {
    results::read_table(&dir.join("accuracy.parquet")).unwrap()
}

fn files_under(dir: &Path, found: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            files_under(&p, found);
        }
        found.push(p);
    }
}

/// Files or folders named like a writer's temporary (`.<name>.tmp-*`) anywhere under `dir`.
fn temporaries(dir: &Path) -> Vec<PathBuf> {
    let mut all = Vec::new();
    files_under(dir, &mut all);
    all.into_iter()
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().contains(".tmp"))
        })
        .collect()
}

#[test]
fn a_worker_panic_reaches_the_table_and_the_exit_code() {
    let ws = workspace();
    let dir = ws.path();
    write_tiny(dir);
    let mut c = run_tiny(dir, "out", &["--jobs", "1"]);
    c.env("DATAMUX_TEST_WORKER_PANIC", "boom in the seam");
    let o = output(c);
    let e = stderr(&o);
    // Every training run and every speed point failed, each with the panic's message and place.
    assert_eq!(o.status.code(), Some(1), "{e}");
    assert!(
        e.contains("2 failed") && e.contains("2 speed point(s) failed"),
        "{e}"
    );
    let rows = accuracy(&dir.join("out/tiny"));
    assert!(rows.iter().all(|r| r.id.status == Status::Error
        && r.id.error.contains("worker panicked at")
        && r.id.error.contains("boom in the seam")));
    let speed: Vec<SpeedRow> = results::read_table(&dir.join("out/tiny/speed.parquet")).unwrap();
    assert_eq!(speed.len(), 2);
    assert!(
        speed
            .iter()
            .all(|r| r.id.error.contains("boom in the seam"))
    );
    // Without a terminal (as here) the failures are printed as lines, not hidden bars.
    assert!(e.contains("speed error"), "{e}");

    // The settings that used to panic in a worker now fail in the file, at their place.
    for (key, bad, rule) in [
        ("batch_instances", "0", "at least 1"),
        ("max_seconds", "-1", "above 0"),
    ] {
        let text = std::fs::read_to_string(dir.join("experiments/tiny.toml")).unwrap();
        let broken = text.replace("iters = 2\n", &format!("iters = 2\n{key} = {bad}\n"));
        let broken = if key == "batch_instances" {
            broken.replace("batch_instances = 8\n", "")
        } else {
            broken
        };
        std::fs::write(dir.join("experiments/bad.toml"), broken).unwrap();
        let o = output(command(dir, &["check", "experiments/bad.toml"]));
        let e = stderr(&o);
        assert_eq!(o.status.code(), Some(2), "{e}");
        assert!(
            e.contains("bad.toml:")
                && e.contains(&format!("[speed] `{key} = {bad}`"))
                && e.contains(rule)
                && !e.contains("panicked"),
            "{e}"
        );
    }
}

/// The warm-up checkpoint folders under `runs/` (those holding `outcome.json`).
fn warmups(dir: &Path) -> Vec<PathBuf> {
    let mut all = Vec::new();
    files_under(&dir.join("runs"), &mut all);
    all.into_iter()
        .filter(|p| p.file_name().is_some_and(|n| n == "outcome.json"))
        .filter_map(|p| p.parent().map(Path::to_path_buf))
        .collect()
}

#[test]
fn a_broken_warm_up_checkpoint_is_trained_again() {
    let ws = workspace();
    let dir = ws.path();
    let first = output(run_text(dir, "a"));
    assert_eq!(first.status.code(), Some(0), "{}", stderr(&first));
    // The smoke profile's N = 2 warm-up starts from the N = 1 one (a curriculum): two folders.
    let found = warmups(dir);
    let ckpt = found
        .iter()
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("n2-"))
        })
        .unwrap_or_else(|| panic!("{found:?}"));
    let weights = ckpt.join("model.safetensors");
    let size = std::fs::metadata(&weights).unwrap().len();
    let reference = values(&accuracy(&dir.join("a/text-sentence")));

    // A truncated weights file; then a folder without its outcome (the kill between the two
    // writes of old). Each time a fresh output folder, so that the run needs the warm-up again.
    for (out, breakage) in [
        ("b", "truncate"),
        ("c", "no outcome"),
        ("d", "old pid lock"),
    ] {
        match breakage {
            "truncate" => {
                let f = std::fs::OpenOptions::new()
                    .write(true)
                    .open(&weights)
                    .unwrap();
                f.set_len(size / 2).unwrap();
            }
            "no outcome" => std::fs::remove_file(ckpt.join("outcome.json")).unwrap(),
            // The lock of old: a file naming a live process (this test's), which hung a run.
            _ => std::fs::write(ckpt.join("lock"), std::process::id().to_string()).unwrap(),
        }
        let o = output(run_text(dir, out));
        let e = stderr(&o);
        assert_eq!(o.status.code(), Some(0), "{breakage}: {e}");
        // Retrained (or reused) to the same numbers: same seed, same build.
        assert_eq!(
            values(&accuracy(&dir.join(out).join("text-sentence"))),
            reference,
            "{breakage}"
        );
        assert_eq!(
            std::fs::metadata(&weights).unwrap().len(),
            size,
            "{breakage}"
        );
        assert!(ckpt.join("outcome.json").is_file() && ckpt.join("manifest.json").is_file());
    }
    assert!(temporaries(dir).is_empty(), "{:?}", temporaries(dir));
}

#[test]
fn a_run_killed_at_any_moment_reruns_to_the_same_tables() {
    let ws = workspace();
    let dir = ws.path();
    let t0 = Instant::now();
    let clean = output(run_text(dir, "clean"));
    let took = t0.elapsed();
    assert_eq!(clean.status.code(), Some(0), "{}", stderr(&clean));
    let reference = values(&accuracy(&dir.join("clean/text-sentence")));
    std::fs::remove_dir_all(dir.join("runs")).unwrap();
    // Killed early (data, tokenizer), mid warm-up and near the end; each time resumed.
    let mut interrupted = 0;
    for (i, share) in [0.15, 0.4, 0.7, 0.9].into_iter().enumerate() {
        let after_ms = (took.as_secs_f64() * share * 1000.0) as u64;
        let out = format!("killed{i}");
        let mut c = run_text(dir, &out);
        let mut child = c
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(after_ms));
        // SIGKILL: no destructor, no cleanup of its own. Its workers are killed with it below.
        child.kill().unwrap();
        child.wait().unwrap();
        let _ = Command::new("pkill")
            .args(["-9", "-f", &format!("datamux worker .*{}", dir.display())])
            .status();
        let table = dir.join(&out).join("text-sentence/accuracy.parquet");
        let rows: Vec<AccuracyRow> = results::read_table(&table).unwrap_or_default();
        if values(&rows) != reference {
            interrupted += 1;
        }
        let again = output(run_text(dir, &out));
        assert_eq!(again.status.code(), Some(0), "{}", stderr(&again));
        assert_eq!(
            values(&accuracy(&dir.join(&out).join("text-sentence"))),
            reference,
            "killed after {after_ms} ms"
        );
        let stray: Vec<PathBuf> = temporaries(&dir.join(&out));
        assert!(stray.is_empty(), "{stray:?}");
        std::fs::remove_dir_all(dir.join("runs")).unwrap();
    }
    // The kills landed before the end, where there was something to break.
    assert!(
        interrupted >= 2,
        "only {interrupted} of 4 kills came before the tables were done"
    );
}

#[test]
fn a_job_another_run_holds_is_waited_for_and_said() {
    let ws = workspace();
    let dir = ws.path();
    let path = write_tiny(dir);
    let exp = datamux_runner::config::load(
        &path,
        "quick",
        &[],
        &datamux_data::Catalogue::builtin().unwrap(),
    )
    .unwrap();
    let id = exp.runs[0].run_id();
    let lock_path = dir.join("runs/locks").join(format!("{id}-train.lock"));
    let held = datamux_data::lock::Lock::acquire(&lock_path, || {}).unwrap();
    let mut child = run_tiny(dir, "out", &["--jobs", "1", "--no-speed"])
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    // Held for a while: the run waits (saying so) instead of training it beside us.
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        child.try_wait().unwrap().is_none(),
        "finished while the job was held"
    );
    drop(held);
    let o = child.wait_with_output().unwrap();
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(0), "{e}");
    assert!(e.contains(&format!("waiting: another run has {id}")), "{e}");
}

#[test]
fn two_runs_on_one_folder_keep_every_row() {
    let ws = workspace();
    let dir = ws.path();
    write_tiny(dir);
    let start = |out: &str, ns: &str| {
        let set = format!("sweep.n_instances={ns}");
        run_tiny(dir, out, &["--jobs", "1", "--set", &set])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    // Different subsets of one experiment, side by side.
    let (a, b) = (start("shared", "[1]"), start("shared", "[2]"));
    for o in [a.wait_with_output().unwrap(), b.wait_with_output().unwrap()] {
        assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    }
    let rows = accuracy(&dir.join("shared/tiny"));
    let runs: std::collections::BTreeSet<i64> = rows.iter().map(|r| r.id.n_instances).collect();
    assert_eq!(runs.into_iter().collect::<Vec<_>>(), [1, 2]);
    let speed: Vec<SpeedRow> = results::read_table(&dir.join("shared/tiny/speed.parquet")).unwrap();
    assert_eq!(speed.len(), 2, "{speed:?}");
    let resolved = std::fs::read_to_string(dir.join("shared/tiny/resolved.toml")).unwrap();
    assert!(resolved.matches("[runs.").count() >= 2, "{resolved}");

    // The same run twice at once, into a fresh folder: both finish, each row once.
    let (a, b) = (start("fresh", "[1, 2]"), start("fresh", "[1, 2]"));
    let t0 = Instant::now();
    for o in [a.wait_with_output().unwrap(), b.wait_with_output().unwrap()] {
        assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    }
    assert!(t0.elapsed() < Duration::from_secs(300));
    // Each run once (the second waited, then found it finished): the same rows as before.
    assert_eq!(values(&accuracy(&dir.join("fresh/tiny"))), values(&rows));
    assert!(temporaries(&dir.join("shared")).is_empty());
    assert!(temporaries(&dir.join("fresh")).is_empty());
}

#[test]
fn an_n_too_large_is_refused_before_any_worker() {
    let ws = workspace();
    let dir = ws.path();
    write_tiny(dir);
    let o = output(run_tiny(
        dir,
        "out",
        &[
            "--set",
            "sweep.n_instances=[100000]",
            "--set",
            "train.batch_size=100000",
        ],
    ));
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{e}");
    assert!(e.contains("n_instances 100000 is above"), "{e}");
    assert!(!dir.join("out").exists());
}

/// A writer that fails as a full disk does, after `room` bytes.
struct Full<W> {
    inner: W,
    room: usize,
}

impl<W: std::io::Write> std::io::Write for Full<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if buf.len() > self.room {
            return Err(std::io::Error::from_raw_os_error(28));
        }
        self.room -= buf.len();
        self.inner.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

#[test]
fn a_full_disk_says_so_with_the_path_and_leaves_the_table() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("accuracy.parquet");
    let row = AccuracyRow {
        id: results::Identity::default(),
        split: "test".into(),
        metric: "accuracy".into(),
        value: 0.5,
        n_examples: 10,
        steps: 1,
        best_step: 1,
        train_seconds: 1.0,
    };
    results::write_table(&path, std::slice::from_ref(&row)).unwrap();
    let before = std::fs::read(&path).unwrap();
    let err =
        results::write_table_through(&path, &[row.clone(), row], |f| Full { inner: f, room: 64 })
            .unwrap_err();
    let msg = format!("{err:#}");
    assert!(msg.contains("No space left on device"), "{msg}");
    assert!(msg.contains(&path.display().to_string()), "{msg}");
    assert!(!msg.contains("thrift"), "{msg}");
    assert_eq!(std::fs::read(&path).unwrap(), before);
    let names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["accuracy.parquet"]);
}

#[test]
fn a_run_that_cannot_fit_is_refused_with_both_figures() {
    let ws = workspace();
    let dir = ws.path();
    write_tiny(dir);
    // A machine with 900 MiB for the runs: below the process's own allowance of every run.
    let mut c = run_tiny(dir, "out", &["--jobs", "2"]);
    c.env("DATAMUX_MEMORY_LIMIT", "900MiB");
    let o = output(c);
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{e}");
    assert!(
        e.contains("needs about") && e.contains("0.9 GiB are available"),
        "{e}"
    );
    assert!(e.contains("for each of 2 runs side by side"), "{e}");
    let rows = accuracy(&dir.join("out/tiny"));
    assert_eq!(rows.len(), 2);
    assert!(rows.iter().all(|r| r.id.error.contains("needs about")));
}
