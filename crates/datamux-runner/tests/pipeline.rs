//! The real pipeline end to end on the committed fixtures: `datamux run` at the smoke profile on
//! every committed experiment (each modality), the Parquet schemas, the report, resumption (nothing
//! recomputed, an interrupted run completed with no row lost or duplicated), and the one-line
//! errors of the command line. Offline: HF_HUB_OFFLINE=1, so hub datasets are `unavailable`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use datamux_runner::results::{self, AccuracyRow, Col, Row, SpeedRow, Status};

fn root() -> PathBuf {
    // Read at run time: a test binary built from another checkout that shares the target folder
    // (CI) would otherwise look in that checkout.
    Path::new(&std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo test sets CARGO_MANIFEST_DIR"))
        .join("../..")
}

fn datamux(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_datamux"))
        .args(args)
        .current_dir(dir)
        .env("HF_HUB_OFFLINE", "1")
        .env("HF_HOME", dir.join("hf"))
        .env_remove("DATAMUX_DATA_DIR")
        .env_remove("DATAMUX_MODELS_DIR")
        .output()
        .expect("run datamux")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

/// The committed experiment files, by name (`mnist`, `text-sentence`, ...).
fn experiment_names() -> Vec<String> {
    datamux_runner::sweep::experiment_files(&[root().join("experiments")])
        .unwrap()
        .iter()
        .filter_map(|f| f.file_stem().map(|s| s.to_string_lossy().to_string()))
        .collect()
}

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_tree(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// A workspace with copies of the committed experiments, and the committed hub cache (the tiny
/// random BERT the pretrained experiment's smoke profile names) as its hf-hub cache.
fn workspace() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    copy_tree(&root().join("fixtures/hub"), &dir.path().join("hf/hub"));
    std::fs::create_dir_all(dir.path().join("experiments")).unwrap();
    for name in experiment_names() {
        let file = format!("{name}.toml");
        std::fs::copy(
            root().join("experiments").join(&file),
            dir.path().join("experiments").join(&file),
        )
        .unwrap();
    }
    dir
}

fn mirror() -> String {
    root().join("fixtures/mirror").display().to_string()
}

fn key_counts(rows: &[AccuracyRow]) -> BTreeMap<(String, String, String), usize> {
    let mut m = BTreeMap::new();
    for r in rows {
        *m.entry((r.id.run_id.clone(), r.split.clone(), r.metric.clone()))
            .or_insert(0) += 1;
    }
    m
}

#[test]
fn smoke_profile_end_to_end_with_resume() {
    let ws = workspace();
    let dir = ws.path();
    let args = [
        "run",
        "experiments",
        "--profile",
        "smoke",
        "--out",
        "results",
        "--data-dir",
        &mirror(),
    ];
    let first = datamux(dir, &args);
    assert!(
        first.status.success(),
        "first run failed: {}",
        stderr(&first)
    );
    // Every committed experiment: one end-to-end smoke run per modality at least.
    let names = experiment_names();
    assert!(names.len() >= 3, "{names:?}");
    let mut modalities = std::collections::BTreeSet::new();
    for exp in &names {
        let d = dir.join("results").join(exp);
        let acc: Vec<AccuracyRow> = results::read_table(&d.join("accuracy.parquet")).unwrap();
        let speed: Vec<SpeedRow> = results::read_table(&d.join("speed.parquet")).unwrap();
        assert!(!acc.is_empty() && !speed.is_empty(), "{exp}: empty tables");
        // Every real run scored every example of its splits; hub tasks are unavailable rows.
        for r in &acc {
            match r.id.status {
                Status::Ok => {
                    assert!(r.n_examples > 0 && r.value.is_finite(), "{exp}: {r:?}");
                    if r.split == "test" && r.id.dataset == "mnist" {
                        assert_eq!(r.n_examples, 200, "mnist fixture test split");
                    }
                }
                Status::Unavailable => assert!(
                    r.id.error.contains("HF_HUB_OFFLINE") || r.id.error.contains("not found"),
                    "{}",
                    r.id.error
                ),
                other => panic!(
                    "{exp}: run {} has status {other}: {}",
                    r.id.run_id, r.id.error
                ),
            }
        }
        assert!(
            acc.iter().any(|r| r.id.status == Status::Ok),
            "{exp}: no run succeeded"
        );
        modalities.extend(acc.iter().map(|r| r.id.modality.clone()));
        assert!(
            speed
                .iter()
                .filter(|r| r.id.status == Status::Ok)
                .all(|r| r.throughput_instances_per_s > 0.0)
        );
        assert!(
            d.join("README.md").is_file() && d.join("accuracy_vs_n.png").is_file(),
            "{exp}: no report"
        );
        let md = std::fs::read_to_string(d.join("README.md")).unwrap();
        assert!(md.starts_with("<!-- generated by `datamux report"), "{md}");
    }
    let registered: std::collections::BTreeSet<String> = datamux_runner::registry::MODALITIES
        .iter()
        .map(|m| m.name().to_string())
        .collect();
    assert_eq!(
        modalities, registered,
        "a registered modality has no experiment"
    );
    let mnist: Vec<AccuracyRow> =
        results::read_table(&dir.join("results/mnist/accuracy.parquet")).unwrap();
    let mut grid: Vec<(String, i64)> = mnist
        .iter()
        .map(|r| (r.id.backbone.clone(), r.id.n_instances))
        .collect();
    grid.sort();
    grid.dedup();
    assert_eq!(
        grid,
        [
            ("lenet".into(), 1),
            ("lenet".into(), 2),
            ("vit".into(), 1),
            ("vit".into(), 2)
        ]
    );

    // A second run recomputes nothing.
    let before = std::fs::read(dir.join("results/mnist/accuracy.parquet")).unwrap();
    let second = datamux(dir, &args);
    assert!(second.status.success(), "{}", stderr(&second));
    assert!(
        stderr(&second).contains("0 to train"),
        "{}",
        stderr(&second)
    );
    let after: Vec<AccuracyRow> =
        results::read_table(&dir.join("results/mnist/accuracy.parquet")).unwrap();
    assert_eq!(key_counts(&after), key_counts(&mnist));
    assert!(!before.is_empty());

    // Another profile into the same folder is refused before anything trains.
    let mut other = args;
    other[3] = "quick";
    let mixed = datamux(dir, &other);
    assert!(!mixed.status.success());
    assert!(
        stderr(&mixed).contains("holds results of profile `smoke`"),
        "{}",
        stderr(&mixed)
    );
    let untouched: Vec<AccuracyRow> =
        results::read_table(&dir.join("results/mnist/accuracy.parquet")).unwrap();
    assert_eq!(key_counts(&untouched), key_counts(&mnist));

    // An edited setting makes a point a new run, whose rows replace the old ones.
    let mut edited: Vec<&str> = args.to_vec();
    edited[1] = "experiments/mnist.toml";
    edited.extend(["--set", "train.lr=0.001", "--no-speed"]);
    let third = datamux(dir, &edited);
    assert!(third.status.success(), "{}", stderr(&third));
    let replaced: Vec<AccuracyRow> =
        results::read_table(&dir.join("results/mnist/accuracy.parquet")).unwrap();
    assert_eq!(
        replaced.len(),
        mnist.len(),
        "a row per (point, split, metric), as before"
    );
    assert!(replaced.iter().all(|r| !key_counts(&mnist).contains_key(&(
        r.id.run_id.clone(),
        r.split.clone(),
        r.metric.clone()
    ))));

    // A subset of the sweep keeps in resolved.toml the settings of every run with rows in the
    // tables, not only of the runs it names.
    edited.extend(["--set", "sweep.n_instances=[1]"]);
    let subset = datamux(dir, &edited);
    assert!(subset.status.success(), "{}", stderr(&subset));
    let resolved: toml::Table = std::fs::read_to_string(dir.join("results/mnist/resolved.toml"))
        .unwrap()
        .parse()
        .unwrap();
    let listed: std::collections::BTreeSet<String> = resolved["runs"]
        .as_table()
        .unwrap()
        .keys()
        .cloned()
        .collect();
    // The speed rows, not re-timed under --no-speed, still belong to the earlier runs.
    let speed: Vec<SpeedRow> =
        results::read_table(&dir.join("results/mnist/speed.parquet")).unwrap();
    let in_tables: std::collections::BTreeSet<String> = replaced
        .iter()
        .map(|r| &r.id)
        .chain(speed.iter().map(|r| &r.id))
        .map(|id| id.run_id.clone())
        .collect();
    assert_eq!(in_tables.len(), 8, "{in_tables:?}");
    assert_eq!(listed, in_tables);

    // An interrupted sweep: kill it after its first finished run, run again, lose nothing.
    let out = "results-killed";
    let long = [
        "run",
        "experiments/mnist.toml",
        "--profile",
        "smoke",
        "--out",
        out,
        "--data-dir",
        &mirror(),
        "--jobs",
        "1",
        "--no-speed",
        "--set",
        "train.steps=60",
    ];
    let mut child = Command::new(env!("CARGO_BIN_EXE_datamux"))
        .args(long)
        .current_dir(dir)
        .env("HF_HUB_OFFLINE", "1")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let table = dir.join(out).join("mnist/accuracy.parquet");
    let start = std::time::Instant::now();
    while !table.exists() && start.elapsed().as_secs() < 120 {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let partial: Vec<AccuracyRow> = results::read_table(&table).unwrap();
    let partial_runs: std::collections::BTreeSet<String> =
        partial.iter().map(|r| r.id.run_id.clone()).collect();
    assert!(
        !partial_runs.is_empty() && partial_runs.len() < 4,
        "killed after {} runs",
        partial_runs.len()
    );
    let resumed = datamux(dir, &long);
    assert!(resumed.status.success(), "{}", stderr(&resumed));
    let all: Vec<AccuracyRow> = results::read_table(&table).unwrap();
    let counts = key_counts(&all);
    assert!(
        counts.values().all(|c| *c == 1),
        "duplicated rows: {counts:?}"
    );
    let runs: std::collections::BTreeSet<String> =
        all.iter().map(|r| r.id.run_id.clone()).collect();
    assert_eq!(runs.len(), 4);
    assert!(partial_runs.is_subset(&runs));
    // The finished runs kept their rows exactly.
    for r in &partial {
        assert!(all.contains(r), "row changed after resume: {r:?}");
    }
}

#[test]
fn tables_have_the_documented_schema() {
    use polars::prelude::{DataType, ParquetReader, SerReader};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("accuracy.parquet");
    let row = AccuracyRow {
        id: results::Identity {
            run_id: "r1".into(),
            status: Status::Ok,
            ..Default::default()
        },
        split: "test".into(),
        metric: "accuracy".into(),
        value: 0.5,
        n_examples: 7,
        steps: 3,
        best_step: 2,
        train_seconds: f64::NAN,
    };
    results::write_table(&path, std::slice::from_ref(&row)).unwrap();
    let back: Vec<AccuracyRow> = results::read_table(&path).unwrap();
    assert_eq!(back[0].id, row.id);
    assert!(back[0].train_seconds.is_nan() && back[0].value == 0.5);
    let df = ParquetReader::new(std::fs::File::open(&path).unwrap())
        .finish()
        .unwrap();
    let names: Vec<String> = df
        .get_column_names()
        .iter()
        .map(|s| s.to_string())
        .collect();
    let want: Vec<String> = AccuracyRow::schema()
        .iter()
        .map(|(n, _)| n.to_string())
        .collect();
    assert_eq!(names, want);
    for (name, col) in AccuracyRow::schema() {
        let dtype = df.column(name).unwrap().dtype().clone();
        let expected = match col {
            Col::Str => DataType::String,
            Col::F64 => DataType::Float64,
            Col::I64 => DataType::Int64,
            Col::Bool => DataType::Boolean,
        };
        assert_eq!(dtype, expected, "column {name}");
    }
    for needed in [
        "experiment",
        "modality",
        "dataset",
        "data_source",
        "backbone",
        "model_size",
        "mux",
        "demux",
        "n_instances",
        "seed",
        "split",
        "metric",
        "value",
        "n_examples",
        "steps",
        "train_seconds",
        "status",
        "error",
        "git_rev",
        "config_hash",
        "threads",
    ] {
        assert!(
            want.iter().any(|w| w == needed),
            "accuracy table lacks {needed}"
        );
    }
    for needed in [
        "batch_instances",
        "latency_ms_median",
        "latency_ms_min",
        "latency_ms_max",
        "throughput_instances_per_s",
    ] {
        assert!(
            SpeedRow::schema().iter().any(|(n, _)| *n == needed),
            "speed table lacks {needed}"
        );
    }
}

#[test]
fn command_line_errors_are_one_line_and_non_zero() {
    let ws = workspace();
    let dir = ws.path();
    let bad = dir.join("experiments/bad.toml");
    std::fs::write(
        &bad,
        "name = \"bad\"\nmodality = \"vision\"\n[data]\ndatset = \"mnist\"\n",
    )
    .unwrap();
    let o = datamux(
        dir,
        &["run", "experiments/bad.toml", "--data-dir", &mirror()],
    );
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{e}");
    assert_eq!(e.trim().lines().count(), 1, "{e}");
    assert!(
        e.contains("bad.toml") && e.contains("line 4") && e.contains("datset"),
        "{e}"
    );

    std::fs::write(&bad, "name = \"bad\"\nmodality = \"vision\"\n[data]\ndataset = \"imagenet\"\n[model]\nbackbone = \"mlp\"\n").unwrap();
    let o = datamux(
        dir,
        &["run", "experiments/bad.toml", "--data-dir", &mirror()],
    );
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{e}");
    assert!(
        e.trim().lines().count() == 1 && e.contains("unknown dataset `imagenet`"),
        "{e}"
    );
    std::fs::remove_file(&bad).unwrap();

    let o = datamux(
        dir,
        &[
            "run",
            "experiments/mnist.toml",
            "--data-dir",
            "/no/such/mirror",
        ],
    );
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{e}");
    assert!(
        e.trim().lines().count() == 1
            && e.contains("/no/such/mirror")
            && e.contains("does not exist"),
        "{e}"
    );
    for line in e.lines() {
        assert!(!line.contains("panicked"), "{e}");
    }
}

/// A dataset the built-in catalogue does not know, added by `<data dir>/catalogue.toml`, runs
/// with the released binary; without the file the error says how to add it.
#[test]
fn a_dataset_from_the_data_directory_catalogue_runs_without_rebuilding() {
    let ws = workspace();
    let dir = ws.path();
    let data = dir.join("data");
    std::fs::create_dir_all(data.join("my-digits")).unwrap();
    for f in ["train.parquet", "test.parquet"] {
        std::fs::copy(
            root().join("fixtures/mirror/mnist").join(f),
            data.join("my-digits").join(f),
        )
        .unwrap();
    }
    std::fs::write(
        dir.join("experiments/mine.toml"),
        r#"name = "mine"
modality = "vision"
[data]
dataset = "my-digits"
validation_holdout = 50
[model]
backbone = "mlp"
mux = { kind = "gaussian_hadamard" }
demux = { kind = "mlp" }
[train]
steps = 6
batch_size = 8
eval_every = 3
[sweep]
n_instances = [1, 2]
[speed]
enabled = false
"#,
    )
    .unwrap();
    let args = [
        "run",
        "experiments/mine.toml",
        "--out",
        "results",
        "--data-dir",
        data.to_str().unwrap(),
    ];
    let o = datamux(dir, &args);
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{e}");
    assert!(
        e.contains("unknown dataset `my-digits`") && e.contains("catalogue.toml"),
        "{e}"
    );
    std::fs::write(
        data.join("catalogue.toml"),
        r#"[[dataset]]
name = "my-digits"
kind = "image_classification"
columns = { image = "image", label = "label" }
labels = ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"]
local = { folder = "my-digits", files = { train = ["train.parquet"], test = ["test.parquet"] } }
"#,
    )
    .unwrap();
    let o = datamux(dir, &args);
    assert!(o.status.success(), "{}", stderr(&o));
    let acc: Vec<AccuracyRow> =
        results::read_table(&dir.join("results/mine/accuracy.parquet")).unwrap();
    let ok: Vec<&AccuracyRow> = acc
        .iter()
        .filter(|r| r.id.status == Status::Ok && r.split == "test" && r.metric == "accuracy")
        .collect();
    assert_eq!(ok.len(), 2, "{acc:?}");
    assert!(
        ok.iter()
            .all(|r| r.id.dataset == "my-digits" && r.n_examples == 200)
    );
    assert!(
        ok.iter().all(|r| r.id.data_source.ends_with("my-digits")),
        "{:?}",
        ok[0].id.data_source
    );
}

/// A pretrained model that cannot be had offline is an `unavailable` row with a one-line reason;
/// a folder without `config.json` and a non-BERT config are `error` rows naming the file; a models
/// folder that does not exist stops the command up front. Never a panic.
#[test]
fn bad_pretrained_values_are_rows_or_one_line_errors() {
    let ws = workspace();
    let dir = ws.path();
    let models = dir.join("models");
    std::fs::create_dir_all(models.join("acme/no-config")).unwrap();
    std::fs::create_dir_all(models.join("acme/gpt")).unwrap();
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        std::fs::write(models.join("acme/no-config").join(f), "{}").unwrap();
        std::fs::write(models.join("acme/gpt").join(f), "{}").unwrap();
    }
    std::fs::remove_file(models.join("acme/no-config/config.json")).unwrap();
    std::fs::write(
        models.join("acme/gpt/config.json"),
        r#"{"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}"#,
    )
    .unwrap();
    let cases = [
        ("acme/not-anywhere", Status::Unavailable, "not found"),
        ("acme/no-config", Status::Error, "config.json"),
        ("acme/gpt", Status::Error, "`gpt2`"),
    ];
    for (i, (repo, status, part)) in cases.iter().enumerate() {
        let name = format!("bad{i}");
        let file = dir.join(format!("experiments/{name}.toml"));
        std::fs::write(
            &file,
            format!(
                "name = \"{name}\"\nmodality = \"text\"\n[data]\ndataset = \"rt-snippets\"\n\
                 [model]\nbackbone = \"transformer\"\n[model.text]\npretrained = \"{repo}\"\n\
                 [sweep]\nn_instances = [1]\n[profile.smoke]\ndata = {{ train_limit = 50, \
                 validation_holdout = 20, eval_limit = 20 }}\ntrain = {{ steps = 2, batch_size = 4 }}\n\
                 warmup = {{ steps = 2, batch_size = 4 }}\n"
            ),
        )
        .unwrap();
        let o = datamux(
            dir,
            &[
                "run",
                &format!("experiments/{name}.toml"),
                "--profile",
                "smoke",
                "--out",
                "results",
                "--no-speed",
                "--data-dir",
                &mirror(),
                "--models-dir",
                &models.display().to_string(),
            ],
        );
        let e = stderr(&o);
        assert!(!e.contains("panicked"), "{repo}: {e}");
        let acc: Vec<AccuracyRow> =
            results::read_table(&dir.join(format!("results/{name}/accuracy.parquet"))).unwrap();
        assert!(!acc.is_empty(), "{repo}: no rows; {e}");
        for r in &acc {
            assert_eq!(r.id.status, *status, "{repo}: {}", r.id.error);
            assert!(
                r.id.error.contains(repo)
                    && r.id.error.contains(part)
                    && !r.id.error.contains('\n'),
                "{repo}: {}",
                r.id.error
            );
        }
    }
    let o = datamux(
        dir,
        &["check", "experiments", "--models-dir", "/no/such/models"],
    );
    let e = stderr(&o);
    assert!(
        !o.status.success() && e.trim().lines().count() == 1 && e.contains("/no/such/models"),
        "{e}"
    );
}
