//! `datamux report`: `results/<exp>/README.md` with the tables and PNG plots (accuracy vs N and
//! speedup vs N, one line per backbone and mux/demux), generated from the Parquet files only.
//! `datamux show`: a table in the terminal.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use datamux_core::DemuxKind;

use crate::plot::{self, Curve};
use crate::registry;
use crate::results::{self, AccuracyRow, SpeedRow, Status};

/// A series of the plots: one model family on one dataset across N.
pub(crate) type Series = (String, String, String, String, String); // (dataset, backbone, size, mux, demux)

fn series_of(id: &crate::results::Identity) -> Series {
    (
        id.dataset.clone(),
        id.backbone.clone(),
        id.model_size.clone(),
        id.mux.clone(),
        id.demux.clone(),
    )
}

/// The dataset is named only where the experiment has several.
fn label(s: &Series, several: bool) -> String {
    let model = format!("{} {} {}+{}", s.1, s.2, s.3, s.4);
    if several {
        format!("{} {model}", s.0)
    } else {
        model
    }
}

/// The metric a dataset is reported by: entity F1 where its runs have it, else accuracy, else
/// the mean cosine of an embedding task (a classifier with the distillation term has both).
pub(crate) fn main_metric<'a>(rows: &[AccuracyRow], dataset: &str) -> &'a str {
    let has = |m: &str| {
        rows.iter()
            .any(|r| r.id.dataset == dataset && r.metric == m)
    };
    if has("f1") {
        "f1"
    } else if has("accuracy") || !has("cosine") {
        "accuracy"
    } else {
        "cosine"
    }
}

/// The reported split of an experiment: `test` where runs have it, else `validation`.
fn reported_split(rows: &[AccuracyRow]) -> &'static str {
    if rows.iter().any(|r| r.split == "test") {
        "test"
    } else {
        "validation"
    }
}

/// Mean over seeds of a metric, by (series, warmup, N); `None` as the metric takes each
/// dataset's [`main_metric`].
pub(crate) fn table(
    rows: &[AccuracyRow],
    split: &str,
    metric: Option<&str>,
) -> BTreeMap<(Series, bool, i64), (f64, usize)> {
    let mut acc: BTreeMap<(Series, bool, i64), (f64, usize)> = BTreeMap::new();
    for r in rows.iter().filter(|r| {
        r.id.status == Status::Ok
            && r.split == split
            && r.metric == metric.unwrap_or_else(|| main_metric(rows, &r.id.dataset))
    }) {
        let e = acc
            .entry((series_of(&r.id), r.id.warmup, r.id.n_instances))
            .or_insert((0.0, 0));
        e.0 += r.value;
        e.1 += 1;
    }
    acc
}

fn pct(v: Option<f64>) -> String {
    v.map_or("–".into(), |v| format!("{:.1}", 100.0 * v))
}

/// The ideal speedup over N = 1 when only the backbone's cost counts: `N·L / (L + P)` against
/// `L / (L + P₁)`, with the prefix length `P` of the demultiplexer (`DemuxKind::prefix_len`);
/// the issue's `N·L / (L + N + 1)` for the index prefix.
pub fn ideal_speedup(n: usize, seq_len: usize, demux: DemuxKind, sequence: bool) -> f64 {
    let l = seq_len.max(1) as f64;
    let p = demux.prefix_len(n, sequence) as f64;
    let p1 = demux.prefix_len(1, sequence) as f64;
    n as f64 * (l + p1) / (l + p)
}

/// The ideal speedup of a speed row, from its demultiplexer and whether its modality's backbone
/// keeps positions; `None` for a row whose modality, backbone or demultiplexer is unknown here.
fn row_ideal(r: &SpeedRow) -> Option<f64> {
    let demux: DemuxKind = serde_json::from_value(r.id.demux.clone().into()).ok()?;
    let sequence = registry::modality(&r.id.modality)
        .and_then(|m| m.is_sequence(&r.id.backbone))
        .ok()?;
    Some(ideal_speedup(
        r.id.n_instances.max(1) as usize,
        r.seq_len.max(0) as usize,
        demux,
        sequence,
    ))
}

/// The N = 1 row a speed row's speedup is taken against: the same series where it has one, else
/// the same dataset, backbone and size with another mux or demux (their cost at N = 1 differs by
/// the mux and the demux alone, a small share of the pass), so that every line has a speedup.
fn speed_base<'a>(rows: &[&'a SpeedRow], r: &SpeedRow) -> Option<&'a SpeedRow> {
    let same = |b: &&&SpeedRow| b.id.n_instances == 1 && b.seq_len == r.seq_len;
    let s = series_of(&r.id);
    rows.iter()
        .filter(same)
        .find(|b| series_of(&b.id) == s)
        .or_else(|| {
            rows.iter().filter(same).find(|b| {
                series_of(&b.id).0 == s.0 && series_of(&b.id).1 == s.1 && series_of(&b.id).2 == s.2
            })
        })
        .copied()
}

/// Examples scored per (series, warm-up, N) for the reported split and each dataset's metric
/// (the same for every seed), for the Wilson intervals of accuracies.
fn examples(rows: &[AccuracyRow], split: &str) -> BTreeMap<(Series, bool, i64), i64> {
    rows.iter()
        .filter(|r| r.id.status == Status::Ok && r.split == split && r.metric == "accuracy")
        .map(|r| {
            (
                (series_of(&r.id), r.id.warmup, r.id.n_instances),
                r.n_examples,
            )
        })
        .collect()
}

/// Chance accuracy of a dataset (one over its classes, from the built-in catalogue), in %.
fn chance(dataset: &str) -> Option<f64> {
    let cat = datamux_data::Catalogue::builtin().ok()?;
    let k = cat.get(dataset).ok()?.labels.len();
    (k >= 2).then(|| 100.0 / k as f64)
}

pub fn render(dir: &Path, command: &str) -> Result<String> {
    let name = dir
        .file_name()
        .and_then(|s| s.to_str())
        .unwrap_or("experiment")
        .to_string();
    let acc: Vec<AccuracyRow> = results::read_table(&dir.join("accuracy.parquet"))?;
    let speed: Vec<SpeedRow> = results::read_table(&dir.join("speed.parquet"))?;
    let mut md = format!("<!-- generated by `{command}`, do not edit -->\n\n# {name}\n\n");
    // The datasets with results (a sweep's unavailable datasets have none to tell apart).
    let mut datasets: Vec<&str> = Vec::new();
    for r in acc.iter().filter(|r| r.id.status == Status::Ok) {
        if !datasets.contains(&r.id.dataset.as_str()) {
            datasets.push(&r.id.dataset);
        }
    }
    let several = datasets.len() > 1;
    if let Some(r) = acc.first() {
        // Rows of one table may come from several builds (a changed setting reruns only its
        // runs), so every revision is named, in the order the rows first use it.
        let mut revs: Vec<String> = Vec::new();
        for row in &acc {
            let rev = format!(
                "`{}`{}",
                row.id.git_rev,
                if row.id.git_dirty { " (dirty)" } else { "" }
            );
            if !revs.contains(&rev) {
                revs.push(rev);
            }
        }
        let sources: Vec<String> = datasets
            .iter()
            .filter_map(|d| acc.iter().find(|r| r.id.dataset == *d))
            .map(|r| format!("`{}` ({})", r.id.dataset, r.id.data_source))
            .collect();
        let sources = if sources.is_empty() {
            vec![format!("`{}`", r.id.dataset)] // no run has results
        } else {
            sources
        };
        md += &format!(
            "Profile `{}`, {} {}, git {}. Settings of every run: `resolved.toml`; machine: `env.txt`.\n\n",
            r.id.profile,
            if several { "datasets" } else { "dataset" },
            sources.join(", "),
            revs.join(", ")
        );
    }
    let split = reported_split(&acc);
    let metric_name = |d: &str| main_metric(&acc, d);
    let means = |m: &str| table(&acc, split, Some(m));
    // Per-slot spreads: of accuracy, or of the cosine for embedding tasks (a run has one).
    let either = |a: &str, b: &str| {
        let mut t = means(a);
        t.extend(means(b));
        t
    };
    let (main, lo, hi, ret, wret, nn) = (
        table(&acc, split, None),
        either("accuracy_slot_min", "cosine_slot_min"),
        either("accuracy_slot_max", "cosine_slot_max"),
        means("retrieval_accuracy"),
        means("warmup_retrieval_accuracy"),
        means("nn_agreement"),
    );
    md += &format!("## Accuracy ({split} split, %, mean over seeds)\n\n");
    md += "| dataset | backbone | size | mux | demux | warm-up | N | metric | value | 95 % interval | slot min | slot max | retrieval | warm-up retrieval | seeds |\n";
    md += "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n";
    let counts = examples(&acc, split);
    // The Wilson interval of an accuracy over the split's examples (of the mean, for seeds).
    let interval = |k: &(Series, bool, i64), metric: &str| -> Option<(f64, f64)> {
        if metric != "accuracy" {
            return None;
        }
        let v = main.get(k).map(|(s, c)| s / *c as f64)?;
        crate::show::wilson(v, *counts.get(k)?)
    };
    let get = |t: &BTreeMap<(Series, bool, i64), (f64, usize)>, k: &(Series, bool, i64)| {
        t.get(k).map(|(s, c)| s / *c as f64)
    };
    // The warm-up column means something only for modalities with a warm-up stage.
    let warms_up = acc
        .iter()
        .any(|r| registry::modality(&r.id.modality).is_ok_and(|m| m.has_warmup()));
    for (k, (_, seeds)) in &main {
        let (s, warm, n) = k;
        md += &format!(
            "| {} | {} | {} | {} | {} | {} | {n} | {} | {} | {} | {} | {} | {} | {} | {seeds} |\n",
            s.0,
            s.1,
            s.2,
            s.3,
            s.4,
            if warms_up {
                if *warm { "yes" } else { "no (B1)" }
            } else {
                "–"
            },
            metric_name(&s.0),
            pct(get(&main, k)),
            interval(k, metric_name(&s.0)).map_or("–".into(), |(a, b)| format!(
                "{:.1} - {:.1}",
                100.0 * a,
                100.0 * b
            )),
            pct(get(&lo, k)),
            pct(get(&hi, k)),
            pct(get(&ret, k)),
            pct(get(&wret, k)),
        );
    }
    if !nn.is_empty() {
        let cos = means("cosine");
        md += "\nMultiplexed embeddings: the cosine of each instance's embedding to the N = 1 model's \
               own, and the share of instances whose nearest neighbour among the others is the \
               one it has at N = 1 (%).\n\n| dataset | mux | demux | N | cosine | nearest-neighbour agreement |\n|---|---|---|---|---|---|\n";
        for k in nn.keys() {
            let (s, _, n) = k;
            md += &format!(
                "| {} | {} | {} | {n} | {} | {} |\n",
                s.0,
                s.3,
                s.4,
                pct(get(&cos, k)),
                pct(get(&nn, k)),
            );
        }
    }
    let others = crate::comparison::load(dir, split)?;
    let (beside, compared_curves) = crate::comparison::section(&acc, split, &others);
    md += &beside;
    md += &crate::reproduce::section(dir, split)?;
    let failed: Vec<&AccuracyRow> = acc.iter().filter(|r| r.id.status != Status::Ok).collect();
    if !failed.is_empty() {
        md += "\nRuns without results:\n\n| run | status | reason |\n|---|---|---|\n";
        for r in failed {
            md += &format!(
                "| {} | {} | {} |\n",
                r.id.run_id,
                r.id.status,
                r.id.error.replace('|', "\\|")
            );
        }
    }
    // Speed: throughput by series and N, speedup over the same series at N = 1.
    let ok_speed: Vec<&SpeedRow> = speed
        .iter()
        .filter(|r| r.id.status == Status::Ok && r.mode == "inference")
        .collect();
    if !ok_speed.is_empty() {
        md += "\n## Speed (inference, instances per second)\n\n";
        md += "| dataset | backbone | size | mux | demux | N | L | batch | instances/s | latency ms (median ± MAD) | speedup vs N=1 | ideal | threads |\n";
        md += "|---|---|---|---|---|---|---|---|---|---|---|---|---|\n";
        let mut sorted = ok_speed.clone();
        sorted.sort_by_key(|r| (series_of(&r.id), r.id.n_instances));
        for r in &sorted {
            let speedup = speed_base(&ok_speed, r)
                .map(|b| r.throughput_instances_per_s / b.throughput_instances_per_s);
            md += &format!(
                "| {} | {} | {} | {} | {} | {} | {} | {} | {:.1} | {:.2} ± {:.2} | {} | {} | {} |\n",
                r.id.dataset,
                r.id.backbone,
                r.id.model_size,
                r.id.mux,
                r.id.demux,
                r.id.n_instances,
                r.seq_len,
                r.batch_instances,
                r.throughput_instances_per_s,
                r.latency_ms_median,
                r.latency_ms_mad,
                speedup.map_or("–".into(), |s| format!("{s:.2}")),
                row_ideal(r).map_or("–".into(), |s| format!("{s:.2}")),
                r.id.threads,
            );
        }
    }
    let mut plots = Vec::new();
    let mut acc_curves: Vec<Curve> = Vec::new();
    for (k, (v, c)) in &main {
        let (series, warm, n) = k;
        let name = format!(
            "{}{}",
            label(series, several),
            if *warm { "" } else { " B1" }
        );
        let ci = interval(k, metric_name(&series.0)).map(|(a, b)| (100.0 * a, 100.0 * b));
        let point = (*n as f64, 100.0 * v / *c as f64, ci);
        match acc_curves.iter_mut().find(|c| c.name == name) {
            Some(curve) => curve.points.push(point),
            None => acc_curves.push(Curve {
                name,
                points: vec![point],
                reference: false,
            }),
        }
    }
    for (name, pts) in compared_curves {
        acc_curves.push(Curve {
            name,
            points: pts.into_iter().map(|(x, y)| (x, y, None)).collect(),
            reference: false,
        });
    }
    if !acc_curves.is_empty() {
        for d in datasets.iter().filter(|d| metric_name(d) == "accuracy") {
            if let Some(c) = chance(d) {
                acc_curves.push(Curve {
                    name: format!("chance, {d} ({c:.1} %)"),
                    points: vec![(1.0, c, None)],
                    reference: true,
                });
            }
        }
        for c in &mut acc_curves {
            c.points.sort_by(|a, b| a.0.total_cmp(&b.0));
        }
        let f = "accuracy_vs_n.png";
        let mut metrics: Vec<&str> = datasets.iter().map(|d| metric_name(d)).collect();
        metrics.sort_unstable();
        metrics.dedup();
        let metrics = metrics.join(" / ");
        plot::draw(
            &dir.join(f),
            &format!("{metrics} ({split}) vs N, 95 % intervals over the examples"),
            &format!("{metrics} (%)"),
            &acc_curves,
        )?;
        plots.push(f);
    }
    let speed_points: BTreeMap<String, Vec<(f64, f64)>> =
        group_points(ok_speed.iter().filter_map(|r| {
            let base = speed_base(&ok_speed, r)?;
            Some((
                label(&series_of(&r.id), several),
                r.id.n_instances as f64,
                r.throughput_instances_per_s / base.throughput_instances_per_s,
            ))
        }));
    if !speed_points.is_empty() {
        let mut curves: Vec<Curve> = speed_points
            .into_iter()
            .map(|(name, pts)| Curve {
                name,
                points: pts.into_iter().map(|(x, y)| (x, y, None)).collect(),
                reference: false,
            })
            .collect();
        // The ideal of each (demultiplexer, length) the rows have, once.
        let ideals: BTreeMap<String, Vec<(f64, f64)>> =
            group_points(ok_speed.iter().filter_map(|r| {
                Some((
                    format!("ideal, {} demux, L = {}", r.id.demux, r.seq_len),
                    r.id.n_instances as f64,
                    row_ideal(r)?,
                ))
            }));
        for (name, mut pts) in ideals {
            pts.dedup_by(|a, b| a.0 == b.0);
            curves.push(Curve {
                name,
                points: pts.into_iter().map(|(x, y)| (x, y, None)).collect(),
                reference: true,
            });
        }
        let f = "speedup_vs_n.png";
        plot::draw(
            &dir.join(f),
            "speedup over N = 1 (same backbone and size) vs N",
            "speedup (x)",
            &curves,
        )?;
        plots.push(f);
    }
    if !plots.is_empty() {
        md += "\n## Plots\n\n";
        for p in plots {
            md += &format!("![{p}]({p})\n\n");
        }
    }
    Ok(md)
}

fn group_points(it: impl Iterator<Item = (String, f64, f64)>) -> BTreeMap<String, Vec<(f64, f64)>> {
    let mut out: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    for (k, x, y) in it {
        out.entry(k).or_default().push((x, y));
    }
    for v in out.values_mut() {
        v.sort_by(|a, b| a.0.total_cmp(&b.0));
    }
    out
}

/// Experiment folders under `root` (those with an `accuracy.parquet` or `speed.parquet`), or
/// `root` itself when it is one.
pub fn experiment_dirs(root: &Path) -> Result<Vec<PathBuf>> {
    let is_exp =
        |d: &Path| d.join("accuracy.parquet").is_file() || d.join("speed.parquet").is_file();
    if is_exp(root) {
        return Ok(vec![root.to_path_buf()]);
    }
    let mut dirs = Vec::new();
    for sub in std::fs::read_dir(root)
        .with_context(|| format!("cannot list {}", root.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir())
    {
        if is_exp(&sub) {
            dirs.push(sub);
        } else {
            // One level more: results/<profile>/<experiment> of the non-default profiles.
            dirs.extend(
                std::fs::read_dir(&sub)
                    .with_context(|| format!("cannot list {}", sub.display()))?
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| is_exp(p)),
            );
        }
    }
    dirs.sort();
    Ok(dirs)
}

/// Write `README.md` (and plots) for every experiment under `root`.
pub fn write_reports(root: &Path, command: &str) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for dir in experiment_dirs(root)? {
        // The folder's lock, as every writer of it holds (a run still writing waits for this).
        let _lock = datamux_data::lock::Lock::folder(&dir, || {})?;
        let md = render(&dir, command)?;
        let path = dir.join("README.md");
        datamux_data::atomic::write_bytes(&path, md.as_bytes())?;
        out.push(path);
    }
    // The serving table under `root`, or `root` itself the serving folder.
    out.extend(crate::serve::report::write(root)?);
    if root.join("serve.parquet").is_file() {
        out.extend(crate::serve::report::write(root.parent().unwrap_or(root))?);
    }
    Ok(out)
}

/// `datamux show`: the key columns of a Parquet table in the terminal.
pub fn show(path: &Path, rows: usize) -> Result<String> {
    use polars::prelude::{ParquetReader, SerReader};
    let file =
        std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let df = ParquetReader::new(file)
        .finish()
        .with_context(|| format!("cannot read {}", path.display()))?;
    let names: Vec<String> = df
        .get_column_names()
        .iter()
        .map(|s| s.to_string())
        .collect();
    let wanted: &[&str] = if names.iter().any(|n| n == "metric") {
        &[
            "backbone",
            "mux",
            "demux",
            "n_instances",
            "seed",
            "warmup",
            "split",
            "metric",
            "value",
            "n_examples",
            "status",
        ]
    } else {
        &[
            "backbone",
            "mux",
            "demux",
            "n_instances",
            "mode",
            "seq_len",
            "batch_instances",
            "latency_ms_median",
            "throughput_instances_per_s",
            "status",
        ]
    };
    let cols: Vec<&str> = wanted
        .iter()
        .copied()
        .filter(|w| names.iter().any(|n| n == w))
        .collect();
    let view = if cols.is_empty() {
        df
    } else {
        df.select(cols)?
    };
    Ok(format!(
        "{}\n({} rows; all columns: {})",
        view.head(Some(rows)),
        view.height(),
        names.join(", ")
    ))
}
