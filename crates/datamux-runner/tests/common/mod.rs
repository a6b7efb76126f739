//! What the runner's end-to-end tests share: the checkout, the binary run in a scratch
//! workspace (offline, its own hf-hub cache holding the committed tiny BERT), the fixtures.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn root() -> PathBuf {
    // Read at run time: a test binary built from another checkout that shares the target folder
    // (CI) would otherwise look in that checkout.
    Path::new(&std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo test sets CARGO_MANIFEST_DIR"))
        .join("../..")
}

/// The binary in `dir`, offline, with its own hf-hub cache and no data or models folder from
/// the environment; for a test that sets more (an environment variable) or spawns it.
pub fn command(dir: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_datamux"));
    c.args(args)
        .current_dir(dir)
        .env("HF_HUB_OFFLINE", "1")
        .env("HF_HOME", dir.join("hf"))
        .env_remove("DATAMUX_DATA_DIR")
        .env_remove("DATAMUX_MODELS_DIR");
    c
}

pub fn datamux(dir: &Path, args: &[&str]) -> Output {
    command(dir, args).output().expect("run datamux")
}

/// A two-point MNIST-shaped experiment (`n_instances` as given, the MLP, a few steps each) on
/// `dataset`; `tail` is appended (a `[speed]` table, `[[expect]]`s).
pub fn tiny_vision(name: &str, dataset: &str, ns: &str, tail: &str) -> String {
    format!(
        r#"name = "{name}"
modality = "vision"
[data]
dataset = "{dataset}"
validation_holdout = 50
[model]
backbone = "mlp"
mux = {{ kind = "gaussian_hadamard" }}
demux = {{ kind = "mlp" }}
[train]
steps = 6
batch_size = 8
eval_every = 3
[sweep]
n_instances = {ns}
{tail}"#
    )
}

/// (run, split, metric, value) of every row, sorted: a table without its timing columns and its
/// order (runs finish in any order).
pub fn values(
    rows: &[datamux_runner::results::AccuracyRow],
) -> Vec<(String, String, String, String)> {
    let mut v: Vec<_> = rows
        .iter()
        .map(|r| {
            (
                r.id.run_id.clone(),
                r.split.clone(),
                r.metric.clone(),
                format!("{:?}", r.value),
            )
        })
        .collect();
    v.sort();
    v
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

/// The committed experiment files, by name (`mnist`, `text-sentence`, ...).
pub fn experiment_names() -> Vec<String> {
    datamux_runner::sweep::experiment_files(&[root().join("experiments")])
        .unwrap()
        .iter()
        .filter_map(|f| f.file_stem().map(|s| s.to_string_lossy().to_string()))
        .collect()
}

pub fn copy_tree(from: &Path, to: &Path) {
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
pub fn workspace() -> tempfile::TempDir {
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

pub fn mirror() -> String {
    root().join("fixtures/mirror").display().to_string()
}

/// An experiment file at a profile (expanded, not run), against the built-in catalogue.
pub fn load(
    path: &Path,
    profile: &str,
    overrides: &[(String, toml::Value)],
) -> anyhow::Result<datamux_runner::config::Experiment> {
    datamux_runner::config::load(
        path,
        profile,
        overrides,
        &datamux_data::Catalogue::builtin()?,
    )
}

pub fn experiments_dir() -> PathBuf {
    // Read at run time: a test binary built from another checkout that shares the target folder
    // (CI) would otherwise look in that checkout.
    Path::new(&std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo test sets CARGO_MANIFEST_DIR"))
        .join("../../experiments")
}
