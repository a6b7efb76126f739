//! The catalogue of bad inputs (`tests/bad_inputs.toml`): every case exits with its code and
//! one line on stderr that says what is wrong, never panics, and leaves no file behind.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use common::{datamux, mirror, stderr};

const VISION: &str = r#"name = "t"
modality = "vision"
[data]
dataset = "mnist"
validation_holdout = 50
[model]
backbone = "mlp"
mux = { kind = "gaussian_hadamard" }
demux = { kind = "mlp", dropout = 0.1 }
[train]
steps = 10
batch_size = 12
lr = 0.001
eval_every = 5
[sweep]
n_instances = [1, 2, 3]
seeds = [0]
"#;

const TEXT: &str = r#"name = "t"
modality = "text"
[data]
dataset = "rt-snippets"
[model]
backbone = "transformer"
[train]
steps = 10
batch_size = 12
[sweep]
n_instances = [1, 2]
"#;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Case {
    name: String,
    #[serde(default)]
    base: Option<String>,
    #[serde(default)]
    replace: Option<[String; 2]>,
    #[serde(default)]
    append: Option<String>,
    #[serde(default)]
    args: Option<Vec<String>>,
    #[serde(default = "two")]
    code: i32,
    expect: String,
}

fn two() -> i32 {
    2
}

#[derive(Debug, Deserialize)]
struct Catalogue {
    case: Vec<Case>,
}

fn listing(dir: &Path) -> BTreeSet<PathBuf> {
    let mut out = BTreeSet::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p.clone());
            }
            out.insert(p.strip_prefix(dir).unwrap().to_path_buf());
        }
    }
    out
}

#[test]
fn every_bad_input_gives_its_one_line_error_and_leaves_nothing() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/bad_inputs.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    let catalogue: Catalogue = toml::from_str(&text).unwrap();
    assert!(catalogue.case.len() >= 40, "{} cases", catalogue.case.len());
    let mut names = BTreeSet::new();
    let mut failures = Vec::new();
    for case in &catalogue.case {
        assert!(names.insert(&case.name), "two cases named {}", case.name);
        let ws = tempfile::tempdir().unwrap();
        let dir = ws.path();
        std::fs::create_dir_all(dir.join("experiments")).unwrap();
        let base = match case.base.as_deref() {
            None | Some("vision") => VISION,
            Some("text") => TEXT,
            Some(other) => panic!("{}: unknown base {other}", case.name),
        };
        let mut file = base.to_string();
        if let Some([from, to]) = &case.replace {
            assert!(file.contains(from.as_str()), "{}: no `{from}`", case.name);
            file = file.replacen(from.as_str(), to, 1);
        }
        if let Some(extra) = &case.append {
            file.push_str(extra);
        }
        std::fs::write(dir.join("experiments/t.toml"), &file).unwrap();
        let before = listing(dir);
        let m = mirror();
        let args: Vec<String> = case
            .args
            .clone()
            .unwrap_or_else(|| vec!["check".into(), "experiments/t.toml".into()])
            .into_iter()
            .map(|a| if a == "MIRROR" { m.clone() } else { a })
            .collect();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let o = datamux(dir, &args);
        let e = stderr(&o);
        let lines: Vec<&str> = e.lines().filter(|l| !l.trim().is_empty()).collect();
        let mut wrong = Vec::new();
        if o.status.code() != Some(case.code) {
            wrong.push(format!(
                "exit {:?}, expected {}",
                o.status.code(),
                case.code
            ));
        }
        // clap's own errors (an unknown option, a bad value) come with a hint or usage block;
        // ours are one line.
        let is_clap = e.contains("For more information, try '--help'");
        if !is_clap && lines.len() != 1 {
            wrong.push(format!("{} stderr lines", lines.len()));
        }
        if !e.contains(case.expect.as_str()) {
            wrong.push(format!("no `{}`", case.expect));
        }
        if e.contains("panicked") {
            wrong.push("panicked".into());
        }
        let after = listing(dir);
        let left: Vec<&PathBuf> = after.difference(&before).collect();
        if !left.is_empty() {
            wrong.push(format!("left {left:?}"));
        }
        if !wrong.is_empty() {
            failures.push(format!("{}: {} | stderr: {e}", case.name, wrong.join("; ")));
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}
