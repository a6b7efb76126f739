//! The committed experiment files against what is committed beside them: the published tables
//! hold what they plan, every grid has its N = 1 speed point, every run fits this machine.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{experiments_dir, load};
use datamux_runner::config;

/// The published tables (`results/`, `results/standard/`) hold a finished run for every run
/// the committed experiment files plan on their datasets, under the same run id: a rerun of
/// either profile trains nothing that is published. A changed hash (a setting, a default, or
/// the way settings are serialised) fails here first.
#[test]
fn the_published_tables_are_what_the_experiments_plan() {
    use std::collections::BTreeSet;

    use datamux_runner::results::{self, AccuracyRow, Status};
    let root = experiments_dir().join("..");
    // The grid of `just reproduce`, and the serve models of `just serve-bench`.
    let files = datamux_runner::sweep::experiment_files(&[
        experiments_dir(),
        experiments_dir().join("serve"),
    ])
    .unwrap();
    let mut checked = 0;
    for (profile, dir) in [("quick", "results"), ("standard", "results/standard")] {
        for f in &files {
            let e = load(f, profile, &[]).unwrap();
            let table = root.join(dir).join(&e.name).join("accuracy.parquet");
            if !table.is_file() {
                continue;
            }
            let rows: Vec<AccuracyRow> = results::read_table(&table).unwrap();
            // Runs whose rows are all ok (the runner's own test of a finished run).
            let finished = results::finished(&rows);
            let datasets: BTreeSet<&str> = rows
                .iter()
                .filter(|r| r.id.status == Status::Ok)
                .map(|r| r.id.dataset.as_str())
                .collect();
            let planned: BTreeSet<String> = e
                .runs
                .iter()
                .filter(|r| datasets.contains(r.data.dataset.as_str()))
                .map(|r| r.run_id())
                .collect();
            let missing: Vec<&String> = planned
                .iter()
                .filter(|id| !finished.contains(id.as_str()))
                .collect();
            assert!(
                missing.is_empty(),
                "{}: {} runs planned at {profile} have no finished rows in {}: {missing:?}",
                e.name,
                missing.len(),
                table.display()
            );
            checked += planned.len();
            // Every speed point of those datasets is timed, the N = 1 bases included.
            let speed: Vec<results::SpeedRow> =
                results::read_table(&table.with_file_name("speed.parquet")).unwrap();
            let timed = results::finished(&speed);
            let untimed: Vec<String> = e
                .speed
                .iter()
                .filter(|r| datasets.contains(r.data.dataset.as_str()))
                .map(|r| r.run_id())
                .filter(|id| !timed.contains(id.as_str()))
                .collect();
            assert!(
                untimed.is_empty(),
                "{}: speed points planned at {profile} without a row: {untimed:?}",
                e.name
            );
        }
    }
    // 39 quick and 47 standard runs of MNIST, rt-snippets and wnut16 when this was written.
    assert!(checked >= 86, "only {checked} published runs checked");
}

/// A width that the grid trains only at N > 1 gets an N = 1 speed point of its own (which
/// trains nothing), so its speedup is taken against the same width.
#[test]
fn every_size_of_a_grid_has_an_n1_speed_point() {
    let e = load(
        &experiments_dir().join("text-sentence.toml"),
        "standard",
        &[],
    )
    .unwrap();
    let text = datamux_runner::registry::modality("text").unwrap();
    let width = |r: &datamux_runner::config::RunConfig| text.model_size(r).unwrap();
    let wide = "2x256";
    assert!(
        e.runs
            .iter()
            .any(|r| width(r) == wide && r.model.n_instances == 5)
    );
    assert!(
        !e.runs
            .iter()
            .any(|r| width(r) == wide && r.model.n_instances == 1)
    );
    let bases: Vec<_> = e
        .speed
        .iter()
        .filter(|r| width(r) == wide && r.model.n_instances == 1)
        .collect();
    assert_eq!(bases.len(), 1);
    assert!(bases[0].warmup.from_n.is_none());
    let quick = load(&experiments_dir().join("text-sentence.toml"), "quick", &[]).unwrap();
    assert!(
        quick
            .speed
            .iter()
            .all(|s| quick.runs.iter().any(|r| r.run_id() == s.run_id()))
    );
}

/// The memory estimate refuses no run of the committed grids on a machine like this one (24 GiB,
/// two runs side by side), and refuses what cannot fit anywhere.
#[test]
fn every_committed_run_fits_the_memory_estimate_of_this_machine() {
    use datamux_runner::job::Job;
    use datamux_runner::sweep::too_big;
    let files = datamux_runner::sweep::experiment_files(&[experiments_dir()]).unwrap();
    let machine = Some(24u64 << 30);
    let env = datamux_pipeline::Env {
        data_dir: None,
        // The committed tiny models only: a pretrained run is estimated at BERT-base.
        models_dir: None,
        offline: true,
        runs_dir: std::env::temp_dir(),
        cache_dir: std::env::temp_dir(),
        profile: "quick".into(),
        hub_attempts: None,
    };
    let mut largest = (0u64, String::new());
    for f in &files {
        for profile in ["quick", "standard"] {
            let e = load(f, profile, &[]).unwrap();
            for r in &e.runs {
                let job = Job::Train(r.clone());
                assert_eq!(
                    too_big(&job, &env, machine, 2),
                    None,
                    "{profile}: {}",
                    r.run_id()
                );
                let (b, _) = datamux_runner::sweep::memory_need(&job, &env).unwrap();
                if b > largest.0 {
                    largest = (b, format!("{profile} {}", r.run_id()));
                }
            }
            for r in &e.speed {
                assert_eq!(
                    too_big(&Job::Speed(r.clone()), &env, machine, 1),
                    None,
                    "{}",
                    r.run_id()
                );
            }
        }
    }
    eprintln!(
        "largest estimate: {} ({})",
        datamux_pipeline::memory::gib(largest.0),
        largest.1
    );
    let huge = [config::parse_override("sweep.n_instances=[1024]").unwrap()];
    let e = load(
        &experiments_dir().join("text-sentence.toml"),
        "quick",
        &huge,
    );
    // Refused by the batch rule first (a batch must hold N instances) or by the estimate.
    if let Ok(e) = e {
        let why = too_big(&Job::Train(e.runs[0].clone()), &env, machine, 2);
        assert!(why.is_some_and(|w| w.contains("available")));
    }
}
