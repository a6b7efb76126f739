//! The report's comparison with other experiments (`compare = [...]` in an experiment file,
//! recorded in its `resolved.toml`): for every dataset the experiment reports, the best run at
//! each N of each compared experiment in the same results folder (so the same profile), beside
//! this experiment's best: a pretrained backbone against the from-scratch ones.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result};

use crate::report::{Series, main_metric, table};
use crate::results::{self, AccuracyRow};

/// The best of one experiment on one dataset at one N.
#[derive(Debug, Clone, PartialEq)]
pub struct Best {
    pub value: f64,
    /// `size mux+demux`, with ` B1` for a run without the warm-up.
    pub run: String,
}

/// `(dataset, N) -> best` of one experiment's rows on `split`, each dataset by its main metric.
pub fn best_by_n(rows: &[AccuracyRow], split: &str) -> BTreeMap<(String, i64), Best> {
    let mut out: BTreeMap<(String, i64), Best> = BTreeMap::new();
    for ((s, warm, n), (sum, count)) in table(rows, split, None) {
        let value = sum / count as f64;
        let key = (s.0.clone(), n);
        if out.get(&key).is_none_or(|b| value > b.value) {
            out.insert(
                key,
                Best {
                    value,
                    run: run_label(&s, warm),
                },
            );
        }
    }
    out
}

fn run_label(s: &Series, warm: bool) -> String {
    format!("{} {}+{}{}", s.2, s.3, s.4, if warm { "" } else { " B1" })
}

/// The experiments `dir`'s `resolved.toml` compares with; none when it names none.
pub fn compared(dir: &Path) -> Result<Vec<String>> {
    let path = dir.join("resolved.toml");
    if !path.is_file() {
        return Ok(Vec::new());
    }
    let doc: toml::Table = toml::from_str(&std::fs::read_to_string(&path)?)
        .with_context(|| format!("{} is not TOML", path.display()))?;
    Ok(doc
        .get("compare")
        .and_then(toml::Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default())
}

/// One compared experiment: its best per `(dataset, N)`, or why it has none.
pub struct Compared {
    pub name: String,
    pub best: Result<BTreeMap<(String, i64), Best>, String>,
}

/// The compared experiments of `dir`, read from its sibling folders.
pub fn load(dir: &Path, split: &str) -> Result<Vec<Compared>> {
    let root = dir.parent().unwrap_or(Path::new("."));
    Ok(compared(dir)?
        .into_iter()
        .map(|name| {
            let table = root.join(&name).join("accuracy.parquet");
            let best = if table.is_file() {
                results::read_table::<AccuracyRow>(&table)
                    .map(|rows| best_by_n(&rows, split))
                    .map_err(|e| format!("{}: {e}", table.display()))
            } else {
                Err(format!("no {} in this results folder", table.display()))
            };
            Compared { name, best }
        })
        .collect())
}

/// The report's section: a table of this experiment's best beside each compared one's, per
/// dataset and N, and the compared curves for the accuracy plot (`label -> (N, %)`).
pub fn section(
    rows: &[AccuracyRow],
    split: &str,
    others: &[Compared],
) -> (String, BTreeMap<String, Vec<(f64, f64)>>) {
    let mut curves: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    if others.is_empty() {
        return (String::new(), curves);
    }
    let here = best_by_n(rows, split);
    let names: Vec<&str> = others.iter().map(|c| c.name.as_str()).collect();
    let mut md = format!(
        "\n## Beside {}\n\nThe best run at each N ({split} split, %, mean over seeds) of this \
         experiment and of each compared one on the same dataset, from this results folder.\n\n\
         | dataset | N | metric | here | run | compared | its best | its run |\n\
         |---|---|---|---|---|---|---|---|\n",
        names.join(", ")
    );
    let mut missing = Vec::new();
    for c in others {
        let best = match &c.best {
            Ok(b) => b,
            Err(why) => {
                missing.push(format!("`{}`: {why}", c.name));
                continue;
            }
        };
        for ((dataset, n), b) in best {
            // Only this experiment's datasets; the curve keeps every N the compared one has.
            if !here.keys().any(|(d, _)| d == dataset) {
                continue;
            }
            curves
                .entry(format!("{dataset} {} (best)", c.name))
                .or_default()
                .push((*n as f64, 100.0 * b.value));
            if let Some(h) = here.get(&(dataset.clone(), *n)) {
                md += &format!(
                    "| {dataset} | {n} | {} | {:.1} | {} | {} | {:.1} | {} |\n",
                    main_metric(rows, dataset),
                    100.0 * h.value,
                    h.run,
                    c.name,
                    100.0 * b.value,
                    b.run
                );
            }
        }
    }
    for m in missing {
        md += &format!("\nNot compared: {m}.\n");
    }
    (md, curves)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::results::{Identity, Status};

    fn row(dataset: &str, size: &str, n: i64, value: f64) -> AccuracyRow {
        AccuracyRow {
            id: Identity {
                dataset: dataset.into(),
                model_size: size.into(),
                mux: "gaussian_hadamard".into(),
                demux: "index".into(),
                n_instances: n,
                warmup: true,
                status: Status::Ok,
                ..Identity::default()
            },
            split: "test".into(),
            metric: "accuracy".into(),
            value,
            n_examples: 10,
            steps: 1,
            best_step: 1,
            train_seconds: 1.0,
        }
    }

    #[test]
    fn the_best_of_each_n_sits_beside_ours_on_shared_datasets_only() {
        let here = vec![row("rt", "minilm", 1, 0.8), row("rt", "minilm", 2, 0.7)];
        let theirs = vec![
            row("rt", "2x128", 2, 0.6),
            row("rt", "2x256", 2, 0.65),
            row("rt", "2x256", 5, 0.5),
            row("sst2", "2x128", 2, 0.9),
        ];
        let others = vec![Compared {
            name: "scratch".into(),
            best: Ok(best_by_n(&theirs, "test")),
        }];
        let (md, curves) = section(&here, "test", &others);
        assert!(md.contains("| rt | 2 | accuracy | 70.0 | minilm gaussian_hadamard+index | scratch | 65.0 | 2x256 gaussian_hadamard+index |"), "{md}");
        assert!(!md.contains("sst2"), "{md}");
        assert_eq!(curves["rt scratch (best)"], [(2.0, 65.0), (5.0, 50.0)]);
        assert_eq!(curves.len(), 1);
    }
}
