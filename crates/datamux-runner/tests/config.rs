//! Experiment files: every committed file validates at every profile, and mistakes fail at parse
//! time with the file, the line and the numbers.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

mod common;

use common::{experiments_dir, load};
use datamux_runner::config;

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(format!("{name}.toml"));
    std::fs::write(&p, text).unwrap();
    p
}

const BASE: &str = r#"
name = "t"
modality = "vision"
[data]
dataset = "mnist"
[model]
backbone = "lenet"
mux = { kind = "identity" }
demux = { kind = "mlp" }
[train]
steps = 10
batch_size = 12
[sweep]
n_instances = [1, 2, 3]
"#;

#[test]
fn every_committed_experiment_validates_at_every_profile() {
    let files = datamux_runner::sweep::experiment_files(&[experiments_dir()]).unwrap();
    assert!(files.len() >= 2);
    for f in &files {
        for profile in ["quick", "standard", "paper", "smoke"] {
            let e = load(f, profile, &[])
                .unwrap_or_else(|e| panic!("{}: {profile}: {e:#}", f.display()));
            assert!(
                !e.runs.is_empty(),
                "{} has no runs at {profile}",
                f.display()
            );
        }
    }
}

#[test]
fn a_misspelt_key_fails_with_file_line_and_column() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(dir.path(), "t", &BASE.replace("steps = 10", "stpes = 10"));
    let e = format!("{:#}", load(&p, "default", &[]).expect_err("typo accepted"));
    assert!(e.contains("t.toml:11:1") && e.contains("stpes"), "{e}");
    // Also inside a variant and a profile.
    let text = format!(
        "{BASE}\n[[variant]]\nwhen = {{ n_instances = [2] }}\nmodel = {{ cnn = {{ chanels = [4] }} }}\n"
    );
    let e = format!(
        "{:#}",
        load(&write(dir.path(), "t", &text), "default", &[]).expect_err("typo accepted")
    );
    assert!(e.contains("chanels"), "{e}");
    let text = format!("{BASE}\n[profile.quick]\ntrain = {{ lr_warmup = 3 }}\n");
    let e = format!(
        "{:#}",
        load(&write(dir.path(), "t", &text), "quick", &[]).expect_err("typo accepted")
    );
    assert!(e.contains("lr_warmup"), "{e}");
}

#[test]
fn overrides_are_checked_like_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(dir.path(), "t", BASE);
    let ok = load(
        &p,
        "default",
        &[config::parse_override("train.steps=7").unwrap()],
    )
    .unwrap();
    assert!(ok.runs.iter().all(|r| r.train.steps == 7));
    let bad = config::parse_override("train.step=7").unwrap();
    let e = format!(
        "{:#}",
        load(&p, "default", &[bad]).expect_err("misspelt override accepted")
    );
    assert!(e.contains("step"), "{e}");
}

#[test]
fn cross_field_errors_name_the_numbers() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(
        dir.path(),
        "t",
        &BASE.replace("batch_size = 12", "batch_size = 10"),
    );
    let e = format!(
        "{:#}",
        load(&p, "default", &[]).expect_err("10 % 3 accepted")
    );
    assert!(
        e.contains("batch_size 10") && e.contains("n_instances 3"),
        "{e}"
    );
    let p = write(
        dir.path(),
        "t",
        &BASE
            .replace(
                "backbone = \"lenet\"",
                "backbone = \"vit\"\nvit = { patch_size = 5 }",
            )
            .replace("demux = { kind = \"mlp\" }", "demux = { kind = \"index\" }"),
    );
    let e = format!(
        "{:#}",
        load(&p, "default", &[]).expect_err("patch 5 of 28 accepted")
    );
    assert!(e.contains("patch size 5") && e.contains("28"), "{e}");
    let p = write(
        dir.path(),
        "t",
        &BASE.replace("demux = { kind = \"mlp\" }", "demux = { kind = \"index\" }"),
    );
    let e = format!(
        "{:#}",
        load(&p, "default", &[]).expect_err("index demux on a CNN accepted")
    );
    assert!(
        e.contains("index demultiplexer needs a sequence backbone"),
        "{e}"
    );
    let p = write(dir.path(), "t", &BASE.replace("\"mnist\"", "\"imagenet\""));
    let e = format!(
        "{:#}",
        load(&p, "default", &[]).expect_err("unknown dataset accepted")
    );
    assert!(e.contains("unknown dataset `imagenet`"), "{e}");
    let p = write(
        dir.path(),
        "t",
        &BASE.replace("\"mnist\"", "\"rt-snippets\""),
    );
    let e = format!(
        "{:#}",
        load(&p, "default", &[]).expect_err("text data in a vision run accepted")
    );
    assert!(e.contains("text_classification"), "{e}");
    let p = write(dir.path(), "other", BASE);
    let e = format!(
        "{:#}",
        load(&p, "default", &[]).expect_err("name/stem mismatch accepted")
    );
    assert!(e.contains("file stem `other`"), "{e}");
}

#[test]
fn sweeps_variants_and_skips_expand_as_written() {
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "{BASE}\n[[variant]]\nwhen = {{ n_instances = [3] }}\ntrain = {{ lr = 0.5 }}\n[[variant]]\nwhen = {{ n_instances = [2] }}\nskip = true\n"
    );
    let e = load(&write(dir.path(), "t", &text), "default", &[]).unwrap();
    assert_eq!(e.modality, "vision");
    let ns: Vec<usize> = e.runs.iter().map(|r| r.model.n_instances).collect();
    assert_eq!(ns, [1, 3]);
    assert_eq!(e.runs[1].train.lr, 0.5);
    assert_ne!(e.runs[0].train.lr, 0.5);
    // Run ids are stable and differ with the settings.
    let again = load(&write(dir.path(), "t", &text), "default", &[]).unwrap();
    assert_eq!(e.runs[0].run_id(), again.runs[0].run_id());
    assert_ne!(e.runs[0].run_id(), e.runs[1].run_id());
}

/// `train.distill` gives every N > 1 run the N = 1 run of its sweep point as its teacher, that
/// run exactly (variants included); the N = 1 run itself trains without it and keeps the id it
/// has in a file that does not distil. A skipped N = 1 and a modality without distillation are
/// one-line errors.
#[test]
fn distillation_names_the_sweeps_n1_run_as_teacher() {
    let dir = tempfile::tempdir().unwrap();
    let plain = load(&write(dir.path(), "t", BASE), "default", &[]).unwrap();
    let text =
        format!("{BASE}\n[[variant]]\nwhen = {{ n_instances = [1] }}\ntrain = {{ lr = 0.25 }}\n")
            .replace(
                "batch_size = 12",
                "batch_size = 12\ndistill = { weight = 0.5, temperature = 3.0 }",
            );
    let e = load(&write(dir.path(), "t", &text), "default", &[]).unwrap();
    let n1 = &e.runs[0];
    assert_eq!(n1.model.n_instances, 1);
    assert!(!n1.train.distill.enabled() && n1.teacher.is_none());
    assert_eq!(n1.train.lr, 0.25);
    for r in &e.runs[1..] {
        assert_eq!(r.train.distill.weight, 0.5);
        assert_eq!(r.teacher.as_deref(), Some(n1));
    }
    let unvaried = load(
        &write(dir.path(), "t", &text.replace("lr = 0.25", "lr = 1e-3")),
        "default",
        &[],
    )
    .unwrap();
    assert_eq!(unvaried.runs[0].run_id(), plain.runs[0].run_id());
    assert_ne!(unvaried.runs[1].run_id(), plain.runs[1].run_id());
    // `init` off is left out of the settings (ids unchanged); a warm start alone needs the teacher.
    assert!(
        !serde_json::to_string(&unvaried.runs[1].train)
            .unwrap()
            .contains("init")
    );
    let warm = text.replace(
        "weight = 0.5, temperature = 3.0",
        "weight = 0.0, init = true",
    );
    let warm = load(&write(dir.path(), "t", &warm), "default", &[]).unwrap();
    for r in &warm.runs[1..] {
        assert!(r.train.distill.init && !r.train.distill.enabled());
        assert_eq!(r.teacher.as_deref(), Some(&warm.runs[0]));
    }

    let err = |text: &str| {
        let p = write(dir.path(), "t", text);
        format!("{:#}", load(&p, "default", &[]).unwrap_err())
    };
    let skipped = format!("{text}\n[[variant]]\nwhen = {{ n_instances = [1] }}\nskip = true\n");
    let e = err(&skipped);
    assert!(e.contains("train.distill needs the run at N = 1"), "{e}");
    let speech = text
        .replace("modality = \"vision\"", "modality = \"audio\"")
        .replace("dataset = \"mnist\"", "dataset = \"spoken-digits\"")
        .replace("backbone = \"lenet\"", "backbone = \"transformer\"");
    let e = err(&speech);
    assert!(e.contains("has no distillation"), "{e}");
}

#[test]
fn profiles_override_file_variants_and_set_overrides_everything() {
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "{BASE}\n[[variant]]\nwhen = {{ backbone = [\"lenet\"] }}\ntrain = {{ steps = 1000 }}\n[profile.smoke]\ntrain = {{ steps = 20 }}\n[[profile.smoke.variant]]\nwhen = {{ n_instances = [3] }}\ntrain = {{ steps = 30 }}\n"
    );
    let p = write(dir.path(), "t", &text);
    let steps = |e: &config::Experiment| e.runs.iter().map(|r| r.train.steps).collect::<Vec<_>>();
    assert_eq!(steps(&load(&p, "quick", &[]).unwrap()), [1000, 1000, 1000]);
    assert_eq!(steps(&load(&p, "smoke", &[]).unwrap()), [20, 20, 30]);
    let set = [config::parse_override("train.steps=7").unwrap()];
    assert_eq!(steps(&load(&p, "smoke", &set).unwrap()), [7, 7, 7]);
}

#[test]
fn expectations_filter_on_the_warm_up() {
    let e = load(&experiments_dir().join("text-sentence.toml"), "quick", &[]).unwrap();
    let row = |warm: bool, value: f64| {
        let run = e
            .runs
            .iter()
            .find(|r| {
                r.run_id()
                    .starts_with("rt-snippets-transformer-gaussian_hadamard-index-n1-")
                    && r.run_id().contains("nowarm") != warm
            })
            .unwrap();
        datamux_runner::results::AccuracyRow {
            id: datamux_runner::results::Identity {
                run_id: run.run_id(),
                backbone: "transformer".into(),
                mux: "gaussian_hadamard".into(),
                demux: "index".into(),
                n_instances: 1,
                warmup: warm,
                status: datamux_runner::results::Status::Ok,
                ..Default::default()
            },
            split: "test".into(),
            metric: "accuracy".into(),
            value,
            n_examples: 7,
            steps: 1,
            best_step: 1,
            train_seconds: 0.0,
        }
    };
    // The N = 1 target is for B2 (warm-up): a low B1 is not a miss, a low B2 is.
    // Only N = 1 rows are given: the expectations about other N match no row, which is a miss
    // of its own, left out here.
    let all = |rows: &[_]| datamux_runner::sweep::check_expectations(&e, rows);
    let check = |rows: &[_]| {
        all(rows)
            .into_iter()
            .filter(|m| !m.contains("no row matches"))
            .collect::<Vec<_>>()
    };
    assert!(check(&[row(true, 0.75), row(false, 0.60)]).is_empty());
    assert!(
        all(&[row(true, 0.75)])
            .iter()
            .any(|m| m.contains("N 2") && m.contains("no row matches"))
    );
    let misses = check(&[row(true, 0.60), row(false, 0.75)]);
    assert_eq!(misses.len(), 1, "{misses:?}");
    assert!(misses[0].contains("warm-up true"), "{misses:?}");
}

#[test]
fn warm_up_dropout_changes_only_the_warm_up_model() {
    let path = experiments_dir().join("text-sentence.toml");
    let plain = load(&path, "quick", &[]).unwrap();
    let run = &plain.runs[0];
    assert_eq!(run.warmup.dropout, None);
    // Unset, it is not serialised: the hashes of runs that predate it do not move.
    assert!(
        !serde_json::to_string(&run.warmup)
            .unwrap()
            .contains("dropout")
    );
    let warmup_run = |r| datamux_text::pipeline::warmup_run(r).unwrap();
    let text =
        |r: &config::RunConfig| -> datamux_text::Config { r.model.sections.get("text").unwrap() };
    // The warm-up reads the default sentence readout, which quick already has.
    assert_eq!(&warmup_run(run), run);

    let set = [config::parse_override("warmup.dropout=0.0").unwrap()];
    let e = load(&path, "quick", &set).unwrap();
    let run = &e.runs[0];
    assert_ne!(run.config_hash(), plain.runs[0].config_hash());
    let warm = warmup_run(run);
    let enc = text(&warm).encoder();
    assert_eq!(enc.hidden_dropout_prob, 0.0);
    assert_eq!(enc.attention_probs_dropout_prob, 0.0);
    assert_eq!(text(&warm).embedding_dropout, 0.0);
    assert_eq!(warm.model.demux.dropout, 0.0);
    // The widths are those of the task model, so its checkpoint loads into the task.
    assert_eq!(enc.hidden_size, text(run).encoder().hidden_size);
    assert!(text(run).embedding_dropout > 0.0);

    let bad = [config::parse_override("warmup.dropout=1.5").unwrap()];
    let err = format!("{:#}", load(&path, "quick", &bad).unwrap_err());
    assert!(
        err.contains("dropout probability, in [0, 1); got 1.5"),
        "{err}"
    );
}

const TEXT: &str = r#"
name = "t"
modality = "text"
[data]
dataset = "rt-snippets"
[model]
backbone = "transformer"
mux = { kind = "gaussian_hadamard" }
demux = { kind = "index" }
[warmup]
steps = 7
batch_size = 6
[train]
steps = 10
batch_size = 6
[sweep]
n_instances = [1, 3]
"#;

#[test]
fn a_warm_up_from_a_smaller_n_carries_that_run() {
    let dir = tempfile::tempdir().unwrap();
    // The N = 3 warm-up starts from the N = 1 one, whose own variant (more steps) applies to it.
    let text = format!(
        "{TEXT}[[variant]]\nwhen = {{ n_instances = [1] }}\nwarmup = {{ steps = 11 }}\n\
         [[variant]]\nwhen = {{ n_instances = [3] }}\nwarmup = {{ from_n = 1 }}\n"
    );
    let e = load(&write(dir.path(), "t", &text), "default", &[]).unwrap();
    let at = |n: usize| e.runs.iter().find(|r| r.model.n_instances == n).unwrap();
    assert_eq!(at(1).warmup_source, None);
    let source = at(3).warmup_source.as_deref().unwrap();
    assert_eq!(source, at(1));
    assert_eq!(source.warmup.steps, 11);
    // The source is part of the settings: a changed source is a new run.
    let text2 = text.replace("steps = 11", "steps = 13");
    let e2 = load(&write(dir.path(), "t", &text2), "default", &[]).unwrap();
    let at2 = |n: usize| e2.runs.iter().find(|r| r.model.n_instances == n).unwrap();
    assert_ne!(at2(3).config_hash(), at(3).config_hash());
    // Unset, nothing is serialised: older hashes do not move.
    let json = serde_json::to_string(at(1)).unwrap();
    assert!(
        !json.contains("from_n") && !json.contains("warmup_source"),
        "{json}"
    );

    // Mistakes: not a smaller N, a demultiplexer with per-slot parameters, a skipped source,
    // and the resolved field written by hand.
    let err = |text: &str| {
        let p = write(dir.path(), "t", text);
        format!("{:#}", load(&p, "default", &[]).unwrap_err())
    };
    let e = err(&format!(
        "{TEXT}[[variant]]\nwhen = {{ n_instances = [3] }}\nwarmup = {{ from_n = 3 }}\n"
    ));
    assert!(
        e.contains("warmup.from_n must be a smaller N, in 1..3, got 3"),
        "{e}"
    );
    let e = err(&format!(
        "{}[[variant]]\nwhen = {{ n_instances = [3] }}\nwarmup = {{ from_n = 1 }}\n",
        TEXT.replace("demux = { kind = \"index\" }", "demux = { kind = \"mlp\" }")
    ));
    assert!(
        e.contains("warmup.from_n needs the index demultiplexer"),
        "{e}"
    );
    let e = err(&format!(
        "{TEXT}[[variant]]\nwhen = {{ n_instances = [1] }}\nskip = true\n\
         [[variant]]\nwhen = {{ n_instances = [3] }}\nwarmup = {{ from_n = 1 }}\n"
    ));
    assert!(e.contains("the run at N = 1 is skipped"), "{e}");
    let e = err(&format!("{TEXT}[warmup_source]\nseed = 1\n"));
    assert!(e.contains("warmup_source"), "{e}");
}
