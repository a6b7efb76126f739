//! `datamux show`: an accuracy table in the terminal, filtered, as rows or pivoted by N, with a
//! 95 % Wilson interval over the test examples for the metrics that are proportions of them.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Result;

use crate::results::{self, AccuracyRow, Status};

/// What `datamux show` keeps and how it lays it out.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub dataset: Option<String>,
    pub metric: Option<String>,
    pub split: Option<String>,
    /// One line per model, one column per N (mean over seeds), the change against N = 1 beside.
    pub pivot: bool,
}

impl Filter {
    fn keeps(&self, r: &AccuracyRow) -> bool {
        let is = |want: &Option<String>, have: &str| want.as_deref().is_none_or(|w| w == have);
        r.id.status == Status::Ok
            && is(&self.dataset, &r.id.dataset)
            && is(&self.metric, &r.metric)
            && is(&self.split, &r.split)
    }
}

/// The 95 % Wilson score interval of a proportion `p` of `n` examples, as `(low, high)`; `None`
/// without examples or for a value outside [0, 1].
pub fn wilson(p: f64, n: i64) -> Option<(f64, f64)> {
    if n <= 0 || !(0.0..=1.0).contains(&p) {
        return None;
    }
    let (z, n) = (1.959_963_984_540_054_f64, n as f64);
    let z2n = z * z / n;
    let centre = (p + z2n / 2.0) / (1.0 + z2n);
    let half = z * (p * (1.0 - p) / n + z2n / (4.0 * n)).sqrt() / (1.0 + z2n);
    Some((centre - half, centre + half))
}

/// Whether a metric is a proportion of the split's examples (so [`wilson`] applies): the
/// retrieval accuracies count positions, F1 and the cosine are not proportions.
pub fn is_example_proportion(metric: &str) -> bool {
    metric == "accuracy" || metric.starts_with("accuracy_slot_") || metric == "nn_agreement"
}

fn pct(v: f64) -> String {
    format!("{:.2}", 100.0 * v)
}

/// The accuracy table at `path` (a file, or an experiment folder holding `accuracy.parquet`).
pub fn accuracy(path: &Path, limit: usize, filter: &Filter) -> Result<String> {
    let file = if path.is_dir() {
        path.join("accuracy.parquet")
    } else {
        path.to_path_buf()
    };
    anyhow::ensure!(file.is_file(), "no accuracy table at {}", file.display());
    let rows: Vec<AccuracyRow> = results::read_table(&file)?;
    let kept: Vec<&AccuracyRow> = rows.iter().filter(|r| filter.keeps(r)).collect();
    if kept.is_empty() {
        let values = |f: fn(&AccuracyRow) -> &str| {
            let mut v: Vec<&str> = rows.iter().map(f).collect();
            v.sort();
            v.dedup();
            v.join(", ")
        };
        anyhow::bail!(
            "no ok row of {} matches: datasets {}; metrics {}; splits {}",
            file.display(),
            values(|r| &r.id.dataset),
            values(|r| &r.metric),
            values(|r| &r.split)
        );
    }
    Ok(if filter.pivot {
        pivot(&kept)
    } else {
        listing(&kept, limit)
    })
}

fn listing(rows: &[&AccuracyRow], limit: usize) -> String {
    let mut out = String::from(
        "dataset | backbone | size | mux | demux | N | seed | warm-up | split | metric | value % | 95 % interval | examples\n",
    );
    for r in rows.iter().take(limit) {
        let ci = if is_example_proportion(&r.metric) {
            wilson(r.value, r.n_examples)
                .map(|(lo, hi)| format!("{} - {}", pct(lo), pct(hi)))
                .unwrap_or_default()
        } else {
            String::new()
        };
        out += &format!(
            "{} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {}\n",
            r.id.dataset,
            r.id.backbone,
            r.id.model_size,
            r.id.mux,
            r.id.demux,
            r.id.n_instances,
            r.id.seed,
            r.id.warmup,
            r.split,
            r.metric,
            pct(r.value),
            ci,
            r.n_examples
        );
    }
    out + &format!("({} of {} rows)", rows.len().min(limit), rows.len())
}

fn pivot(rows: &[&AccuracyRow]) -> String {
    type Key = (String, String, String, String, String, bool, String, String);
    // (model and split and metric) -> N -> (sum, seeds)
    let mut cells: BTreeMap<Key, BTreeMap<i64, (f64, usize)>> = BTreeMap::new();
    for r in rows {
        let id = &r.id;
        let key = (
            id.dataset.clone(),
            id.backbone.clone(),
            id.model_size.clone(),
            id.mux.clone(),
            id.demux.clone(),
            id.warmup,
            r.split.clone(),
            r.metric.clone(),
        );
        let cell = cells
            .entry(key)
            .or_default()
            .entry(id.n_instances)
            .or_default();
        cell.0 += r.value;
        cell.1 += 1;
    }
    let mut ns: Vec<i64> = cells.values().flat_map(|m| m.keys().copied()).collect();
    ns.sort();
    ns.dedup();
    let mut out =
        String::from("dataset | backbone | size | mux | demux | warm-up | split | metric");
    for n in &ns {
        out += &format!(" | N = {n}");
    }
    out += "\n";
    for (k, by_n) in &cells {
        out += &format!(
            "{} | {} | {} | {} | {} | {} | {} | {}",
            k.0, k.1, k.2, k.3, k.4, k.5, k.6, k.7
        );
        let mean = |n: &i64| by_n.get(n).map(|(s, c)| s / *c as f64);
        let base = mean(&1);
        for n in &ns {
            out += &match (mean(n), base) {
                (Some(v), Some(b)) if *n != 1 => {
                    format!(" | {} ({:+.2})", pct(v), 100.0 * (v - b))
                }
                (Some(v), _) => format!(" | {}", pct(v)),
                (None, _) => " | –".to_string(),
            };
        }
        out += "\n";
    }
    out + "(%, mean over seeds; in brackets the change against N = 1 of the same model, points)"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wilson_matches_the_textbook_values() {
        // 50 of 100: 40.38 % to 59.62 %.
        let (lo, hi) = wilson(0.5, 100).unwrap();
        assert!(
            (lo - 0.4038).abs() < 1e-4 && (hi - 0.5962).abs() < 1e-4,
            "{lo} {hi}"
        );
        // All correct still has a lower bound below 1.
        let (lo, hi) = wilson(1.0, 20).unwrap();
        assert!(
            (lo - 0.8389).abs() < 1e-4 && (hi - 1.0).abs() < 1e-9,
            "{lo} {hi}"
        );
        assert!(wilson(0.5, 0).is_none() && wilson(f64::NAN, 10).is_none());
        assert!(is_example_proportion("accuracy_slot_min") && !is_example_proportion("f1"));
    }
}
