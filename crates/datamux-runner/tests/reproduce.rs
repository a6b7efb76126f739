//! Published against reproduced: `datamux run --compare-with` and `datamux publish` on a tiny
//! grid, and what `datamux run` exits with.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;

use datamux_runner::reproduce::ComparisonRow;
use datamux_runner::results::{self, AccuracyRow, Status};

use common::{datamux, root, stderr, tiny_vision, values, workspace};

/// A two-point MNIST experiment on the fixture, a few steps each, with one expectation that
/// holds (accuracy >= 0) and, when `missing`, one about an N the sweep does not have.
fn write_experiment(dir: &Path, missing: bool) {
    write_grid(dir, missing, "[1, 2]");
}

fn write_grid(dir: &Path, missing: bool, ns: &str) {
    let extra = if missing {
        "\n[[expect]]\nn_instances = 7\nmin = 0.0\n"
    } else {
        ""
    };
    std::fs::write(
        dir.join("experiments/tiny.toml"),
        tiny_vision(
            "tiny",
            "mnist",
            ns,
            &format!("[speed]\nenabled = false\n[[expect]]\nmin = 0.0\n{extra}"),
        ),
    )
    .unwrap();
}

fn comparison(dir: &Path) -> Vec<ComparisonRow> {
    results::read_table(&dir.join("tiny/comparison.parquet")).unwrap()
}

#[test]
fn reproduce_compares_with_the_published_tables_and_publish_is_explicit() {
    let ws = workspace();
    let dir = ws.path();
    write_experiment(dir, false);
    let mirror = root().join("fixtures/mirror").display().to_string();
    let run = |out: &str| {
        datamux(
            dir,
            &[
                "run",
                "experiments/tiny.toml",
                "--out",
                out,
                "--compare-with",
                "published",
                "--data-dir",
                &mirror,
            ],
        )
    };
    // Nothing published yet: every row says so, and that is not a failure.
    let first = run("work");
    assert_eq!(first.status.code(), Some(0), "{}", stderr(&first));
    let rows = comparison(&dir.join("work"));
    assert!(!rows.is_empty());
    assert!(
        rows.iter().all(|r| r.verdict == "not published"),
        "{rows:?}"
    );
    assert!(
        !dir.join("published").exists(),
        "run never writes the published tables"
    );

    // Publishing copies the finished tables (the default profile, quick, sits at the top).
    let o = datamux(dir, &["publish", "work", "--to", "published"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let published = dir.join("published/tiny/accuracy.parquet");
    let work: Vec<AccuracyRow> =
        results::read_table(&dir.join("work/tiny/accuracy.parquet")).unwrap();
    let pubd: Vec<AccuracyRow> = results::read_table(&published).unwrap();
    assert_eq!(values(&pubd), values(&work));
    assert!(dir.join("published/tiny/README.md").is_file());
    // `show` filters and pivots by N, the change against N = 1 beside each value.
    let o = datamux(
        dir,
        &[
            "show",
            "published/tiny",
            "--split",
            "test",
            "--metric",
            "accuracy",
            "--pivot",
        ],
    );
    let table = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        table.contains("| N = 1 | N = 2") && table.lines().count() == 3,
        "{table}"
    );
    let o = datamux(dir, &["show", "published/tiny", "--dataset", "nope"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("datasets mnist"), "{}", stderr(&o));
    assert!(dir.join("published/tiny/resolved.toml").is_file());
    let bytes = std::fs::read(&published).unwrap();

    // A fresh working folder reproduces the published points bit for bit (same seed, build).
    let again = run("work2");
    assert_eq!(again.status.code(), Some(0), "{}", stderr(&again));
    let rows = comparison(&dir.join("work2"));
    assert!(
        rows.iter()
            .all(|r| r.verdict == "within" && r.difference == 0.0),
        "{rows:?}"
    );
    assert_eq!(
        std::fs::read(&published).unwrap(),
        bytes,
        "published untouched"
    );
    let md = std::fs::read_to_string(dir.join("work2/tiny/README.md")).unwrap();
    assert!(md.contains("## Against the published tables"), "{md}");

    // A published value moved past its tolerance is a failure, named on stderr.
    let mut moved = pubd.clone();
    let i = moved
        .iter()
        .position(|r| r.split == "test" && r.metric == "accuracy")
        .unwrap();
    moved[i].value += 0.5;
    results::write_table(&published, &moved).unwrap();
    let off = run("work2");
    let e = stderr(&off);
    assert_eq!(off.status.code(), Some(1), "{e}");
    assert!(
        e.contains("outside tolerance") && e.contains("test accuracy"),
        "{e}"
    );
    let rows = comparison(&dir.join("work2"));
    assert_eq!(rows.iter().filter(|r| r.verdict == "outside").count(), 1);

    // Republishing replaces the moved point whole.
    let o = datamux(dir, &["publish", "work2", "--to", "published"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let repub: Vec<AccuracyRow> = results::read_table(&published).unwrap();
    assert_eq!(values(&repub), values(&work));

    // Plain publishing keeps the points a smaller plan leaves out; --replace drops them.
    let o = datamux(
        dir,
        &[
            "run",
            "experiments/tiny.toml",
            "--out",
            "work3",
            "--data-dir",
            &mirror,
            "--set",
            "sweep.n_instances=[1]",
        ],
    );
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let ns = |rows: &[AccuracyRow]| {
        let mut v: Vec<i64> = rows.iter().map(|r| r.id.n_instances).collect();
        v.sort();
        v.dedup();
        v
    };
    // The same points again: the table is not rewritten (its modification time stays).
    let mtime = || std::fs::metadata(&published).unwrap().modified().unwrap();
    let was = mtime();
    std::thread::sleep(std::time::Duration::from_millis(20));
    let o = datamux(dir, &["publish", "work2", "--to", "published"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(mtime(), was);
    // env.txt keeps the sections of the revisions whose rows stay, each once.
    let env_path = dir.join("published/tiny/env.txt");
    let env = || std::fs::read_to_string(&env_path).unwrap();
    let sections = |t: &str| t.matches("command: ").count();
    let before = sections(&env());
    std::fs::write(
        &env_path,
        format!("command: gone\ngit_rev: 000000000000\n\n{}", env()),
    )
    .unwrap();
    let o = datamux(dir, &["publish", "work3", "--to", "published"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(ns(&results::read_table(&published).unwrap()), [1, 2]);
    assert!(!env().contains("command: gone"), "{}", env());
    assert!(env().contains("--out work3"), "{}", env());
    assert_eq!(sections(&env()), before + 1, "{}", env());
    let o = datamux(dir, &["publish", "work3", "--to", "published"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(sections(&env()), before + 1, "{}", env());
    let o = datamux(dir, &["publish", "work3", "--to", "published", "--replace"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(ns(&results::read_table(&published).unwrap()), [1]);
    assert_eq!(sections(&env()), 1, "{}", env());
}

#[test]
fn exit_codes_say_what_happened() {
    let ws = workspace();
    let dir = ws.path();
    let mirror = root().join("fixtures/mirror").display().to_string();
    // An expectation that matches no row is a failure, not silence.
    write_experiment(dir, true);
    let args = [
        "run",
        "experiments/tiny.toml",
        "--out",
        "work",
        "--data-dir",
        &mirror,
    ];
    let o = datamux(dir, &args);
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{e}");
    assert!(e.contains("N 7") && e.contains("no row matches"), "{e}");

    // Nothing able to run at all (offline, a hub-only dataset) is 1, not 3.
    let o = datamux(
        dir,
        &[
            "run",
            "experiments/text-sentence.toml",
            "--profile",
            "smoke",
            "--out",
            "hub",
            "--no-speed",
            "--set",
            "sweep.dataset=[\"sst2\"]",
        ],
    );
    let e = stderr(&o);
    let rows: Vec<AccuracyRow> =
        results::read_table(&dir.join("hub/text-sentence/accuracy.parquet")).unwrap();
    assert!(
        !rows.is_empty() && rows.iter().all(|r| r.id.status == Status::Unavailable),
        "{e}"
    );
    assert_eq!(o.status.code(), Some(1), "{e}");
    assert!(e.contains("nothing could run"), "{e}");
}

#[test]
fn three_shards_merge_into_the_one_machine_tables() {
    let ws = workspace();
    let dir = ws.path();
    write_grid(dir, false, "[1, 2, 4, 8]");
    let mirror = root().join("fixtures/mirror").display().to_string();
    let run = |out: &str, shard: Option<&str>| {
        let mut args = vec![
            "run",
            "experiments/tiny.toml",
            "--out",
            out,
            "--data-dir",
            &mirror,
            "--jobs",
            "1",
        ];
        if let Some(s) = shard {
            args.extend(["--shard", s]);
        }
        let o = datamux(dir, &args);
        assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    };
    run("whole", None);
    for k in 1..=3 {
        run(&format!("shard{k}"), Some(&format!("{k}/3")));
    }
    let o = datamux(
        dir,
        &["merge", "shard1", "shard2", "shard3", "--out", "merged"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let read = |d: &str| -> Vec<AccuracyRow> {
        results::read_table(&dir.join(d).join("tiny/accuracy.parquet")).unwrap()
    };
    let whole = read("whole");
    assert_eq!(values(&read("merged")), values(&whole));
    let ids = |rows: Vec<AccuracyRow>| {
        rows.into_iter()
            .map(|r| r.id.run_id)
            .collect::<std::collections::BTreeSet<_>>()
    };
    let shards: Vec<_> = (1..=3).map(|k| ids(read(&format!("shard{k}")))).collect();
    assert_eq!(
        shards.iter().map(|s| s.len()).sum::<usize>(),
        ids(whole).len()
    );
    // The merged folder is complete: a run there trains nothing and checks the expectations.
    let o = datamux(
        dir,
        &[
            "run",
            "experiments/tiny.toml",
            "--out",
            "merged",
            "--data-dir",
            &mirror,
        ],
    );
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(stderr(&o).contains("0 to train"), "{}", stderr(&o));
    let bad = datamux(dir, &["run", "experiments/tiny.toml", "--shard", "4/3"]);
    assert_eq!(bad.status.code(), Some(2));
}
