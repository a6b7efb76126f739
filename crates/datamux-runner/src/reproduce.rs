//! Published against reproduced results. The committed tables under `results/` are the
//! project's published results; `datamux run` computes into a working folder (`reproduced/` by
//! default, ignored by git) and, with `--compare-with results/`, compares every point of its plan
//! with the published one (`comparison.parquet` and a section of the working folder's README).
//! `datamux publish` is the one command that writes into `results/`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use crate::config::Experiment;
use crate::results::{self, AccuracyRow, Identity, Row, SpeedRow, Status};

/// Where an experiment's tables of `profile` live under a results root: `quick` directly
/// (`results/<experiment>/`), every other profile one level down (`results/<profile>/...`), as
/// `just reproduce` and `just publish` lay them out.
pub fn profile_dir(root: &Path, profile: &str, experiment: &str) -> PathBuf {
    if profile == "quick" {
        root.join(experiment)
    } else {
        root.join(profile).join(experiment)
    }
}

/// How far a reproduced value may lie from the published one and still count as reproduced, by
/// metric (values are fractions). Same seed on the same build and machine reproduces bit for bit;
/// across machines and builds (AVX-512 against AVX2 kernels, another summation order) a run
/// takes another path through training, and a test split of ~1 000 examples moves by about a
/// point. The per-slot extremes move more than the mean over slots.
pub fn tolerance(metric: &str) -> f64 {
    match metric {
        "accuracy" | "retrieval_accuracy" | "warmup_retrieval_accuracy" => 0.01,
        "f1" | "cosine" | "nn_agreement" => 0.02,
        m if m.ends_with("_slot_min") || m.ends_with("_slot_max") => 0.03,
        _ => 0.02,
    }
}

/// What a comparison row says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// Same settings, `|reproduced - published| <= tolerance`.
    Within,
    /// Same settings and revision, outside the tolerance: a failure.
    Outside,
    /// Same settings, outside the tolerance, but the published value was measured by another
    /// revision of the code (another git revision, or the same one with and without local
    /// changes): reported, not a failure.
    RevisionDiffers,
    /// The published point was run with other settings (another run id).
    SettingsDiffer,
    /// The point has no published value.
    NotPublished,
    /// The published point has no reproduced value (its run failed or its data was unavailable).
    NotReproduced,
}

impl Verdict {
    fn name(self) -> &'static str {
        match self {
            Self::Within => "within",
            Self::Outside => "outside",
            Self::RevisionDiffers => "revision differs",
            Self::SettingsDiffer => "settings differ",
            Self::NotPublished => "not published",
            Self::NotReproduced => "not reproduced",
        }
    }
}

table! {
    /// One (point, split, metric) of `comparison.parquet`.
    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    pub struct ComparisonRow {
        pub experiment: String,
        pub profile: String,
        pub dataset: String,
        pub backbone: String,
        pub model_size: String,
        pub mux: String,
        pub demux: String,
        pub n_instances: i64,
        pub seed: i64,
        pub warmup: bool,
        pub split: String,
        pub metric: String,
        pub published: f64,
        pub reproduced: f64,
        /// reproduced - published.
        pub difference: f64,
        pub tolerance: f64,
        pub verdict: String,
        pub published_rev: String,
        pub reproduced_rev: String,
    }
}

fn rev(id: &Identity) -> String {
    format!("{}{}", id.git_rev, if id.git_dirty { "+dirty" } else { "" })
}

/// The comparison of an experiment's reproduced rows with its published ones, over the points of
/// `exp` (published points outside the plan are left out: a `--set sweep.*` subset compares only
/// its own).
pub fn compare(
    exp: &Experiment,
    reproduced: &[AccuracyRow],
    published: &[AccuracyRow],
) -> Vec<ComparisonRow> {
    let ids: std::collections::BTreeSet<String> = exp.runs.iter().map(|r| r.run_id()).collect();
    let ours: Vec<&AccuracyRow> = reproduced
        .iter()
        .filter(|r| ids.contains(&r.id.run_id))
        .collect();
    let points: std::collections::BTreeSet<String> = ours.iter().map(|r| r.id.point()).collect();
    let key = |r: &AccuracyRow| (r.id.point(), r.split.clone(), r.metric.clone());
    let theirs: BTreeMap<_, &AccuracyRow> = published
        .iter()
        .filter(|r| r.id.status == Status::Ok && points.contains(&r.id.point()))
        .map(|r| (key(r), r))
        .collect();
    let mut out = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    for r in ours.iter().filter(|r| r.id.status == Status::Ok) {
        let k = key(r);
        let p = theirs.get(&k).copied();
        seen.insert(k);
        out.push(row(r, p, Some(r)));
    }
    for (k, p) in &theirs {
        if !seen.contains(k) {
            out.push(row(p, Some(p), None));
        }
    }
    out
}

fn row(
    at: &AccuracyRow,
    published: Option<&AccuracyRow>,
    reproduced: Option<&AccuracyRow>,
) -> ComparisonRow {
    let tol = tolerance(&at.metric);
    let value = |r: Option<&AccuracyRow>| r.map_or(f64::NAN, |r| r.value);
    let (p, q) = (value(published), value(reproduced));
    let verdict = match (published, reproduced) {
        (None, _) => Verdict::NotPublished,
        (_, None) => Verdict::NotReproduced,
        (Some(a), Some(b)) if a.id.run_id != b.id.run_id => Verdict::SettingsDiffer,
        // A NaN on either side is never within.
        _ if (q - p).abs() <= tol + 1e-12 => Verdict::Within,
        (Some(a), Some(b)) if rev(&a.id) != rev(&b.id) => Verdict::RevisionDiffers,
        _ => Verdict::Outside,
    };
    let id = &at.id;
    ComparisonRow {
        experiment: id.experiment.clone(),
        profile: id.profile.clone(),
        dataset: id.dataset.clone(),
        backbone: id.backbone.clone(),
        model_size: id.model_size.clone(),
        mux: id.mux.clone(),
        demux: id.demux.clone(),
        n_instances: id.n_instances,
        seed: id.seed,
        warmup: id.warmup,
        split: at.split.clone(),
        metric: at.metric.clone(),
        published: p,
        reproduced: q,
        difference: q - p,
        tolerance: tol,
        verdict: verdict.name().to_string(),
        published_rev: published.map(|r| rev(&r.id)).unwrap_or_default(),
        reproduced_rev: reproduced.map(|r| rev(&r.id)).unwrap_or_default(),
    }
}

/// Compare every experiment of a finished plan (tables in `out/<experiment>/`) with the published
/// tables under `published_root`, write `comparison.parquet` beside each, print one line per
/// experiment, and return how many rows are outside their tolerance.
pub fn compare_plan(
    experiments: &[Experiment],
    out: &Path,
    published_root: &Path,
) -> Result<usize> {
    let mut outside = 0;
    for exp in experiments {
        let dir = out.join(&exp.name);
        let ours: Vec<AccuracyRow> = results::read_table(&dir.join("accuracy.parquet"))?;
        let pub_dir = profile_dir(published_root, &exp.profile, &exp.name);
        let theirs: Vec<AccuracyRow> = results::read_table(&pub_dir.join("accuracy.parquet"))?;
        let rows = compare(exp, &ours, &theirs);
        let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
        for r in &rows {
            *counts.entry(r.verdict.as_str()).or_default() += 1;
        }
        outside += counts.get(Verdict::Outside.name()).copied().unwrap_or(0);
        let counts: Vec<String> = counts.iter().map(|(v, c)| format!("{c} {v}")).collect();
        eprintln!(
            "{}: against {}: {}",
            exp.name,
            pub_dir.display(),
            if counts.is_empty() {
                "nothing to compare".to_string()
            } else {
                counts.join(", ")
            }
        );
        for r in rows.iter().filter(|r| r.verdict == Verdict::Outside.name()) {
            eprintln!(
                "{}: outside tolerance: {} {} {} {} N={} seed {} {} {}: published {:.4}, reproduced {:.4} (tolerance {})",
                exp.name,
                r.dataset,
                r.backbone,
                r.mux,
                r.demux,
                r.n_instances,
                r.seed,
                r.split,
                r.metric,
                r.published,
                r.reproduced,
                r.tolerance
            );
        }
        results::write_table(&dir.join("comparison.parquet"), &rows)?;
    }
    Ok(outside)
}

/// The README section of a working folder's comparison (empty without `comparison.parquet`):
/// the counts by verdict, then every row that is not within its tolerance.
pub fn section(dir: &Path, split: &str) -> Result<String> {
    let path = dir.join("comparison.parquet");
    if !path.exists() {
        return Ok(String::new());
    }
    let rows: Vec<ComparisonRow> = results::read_table(&path)?;
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for r in &rows {
        *counts.entry(r.verdict.as_str()).or_default() += 1;
    }
    let mut md = String::from(
        "\n## Against the published tables\n\nEvery (point, split, metric) of this run beside the \
         published value (`comparison.parquet`; tolerances in docs/results.md: accuracy and \
         retrieval 1 point, F1, cosine and agreement 0.02, per-slot extremes 0.03). ",
    );
    let counts: Vec<String> = counts.iter().map(|(v, c)| format!("{c} {v}")).collect();
    md += &format!("Rows: {}.\n\n", counts.join(", "));
    let shown: Vec<&ComparisonRow> = rows
        .iter()
        .filter(|r| r.verdict != Verdict::Within.name())
        .filter(|r| r.split == split || r.verdict == Verdict::Outside.name())
        .collect();
    if shown.is_empty() {
        return Ok(md);
    }
    md += &format!(
        "Rows not within tolerance ({split} split, and any split outside):\n\n\
         | dataset | backbone | mux | demux | N | warm-up | split | metric | published | reproduced | difference | verdict |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|\n"
    );
    let f = |v: f64| {
        if v.is_nan() {
            "–".to_string()
        } else {
            format!("{v:.4}")
        }
    };
    for r in shown {
        md += &format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            r.dataset,
            r.backbone,
            r.mux,
            r.demux,
            r.n_instances,
            r.warmup,
            r.split,
            r.metric,
            f(r.published),
            f(r.reproduced),
            f(r.difference),
            r.verdict
        );
    }
    Ok(md)
}

/// `datamux publish`: copy every finished experiment of a working folder into the published
/// root. Each point of the working folder replaces the published rows of that point whole
/// (every split and metric, whatever settings they were run with: no stale rows stay); the
/// other published points are kept. `resolved.toml` gains the published runs' settings and
/// `env.txt` is the working folder's. Runs that did not finish are not published. Returns the
/// folders written.
/// With `replace`, each experiment's published tables become the working folder's whole: the
/// points it no longer plans (a cut variant) go too.
pub fn publish(from: &Path, to: &Path, replace: bool) -> Result<Vec<PathBuf>> {
    let mut written = copy_finished(from, replace, |profile, name| {
        profile_dir(to, profile, name)
    })?;
    // The serving table (`datamux loadtest`), whatever the profile: its rows replace the
    // published ones of the same model, policy and rate.
    let serve = crate::serve::loadtest::table_path(from);
    if serve.is_file() {
        let rows = results::read_table(&serve)?;
        let dest = crate::serve::loadtest::table_path(to);
        crate::serve::loadtest::write_rows(&dest, rows, true)?;
        written.push(dest.parent().unwrap_or(to).to_path_buf());
    }
    if written.is_empty() {
        bail!("{} holds no experiment tables to publish", from.display());
    }
    Ok(written)
}

/// `datamux merge`: the experiment folders of every shard folder (`datamux run --shard`) into
/// `out/<experiment>/`, as one machine's run would have written them (row order aside: rows are
/// in the order runs finished). Returns the folders written.
pub fn merge(shards: &[PathBuf], out: &Path) -> Result<Vec<PathBuf>> {
    let mut written = Vec::new();
    let mut profiles: BTreeMap<String, String> = BTreeMap::new();
    for shard in shards {
        for dir in copy_finished(shard, false, |profile, name| {
            profiles
                .entry(name.to_string())
                .or_insert_with(|| profile.to_string());
            out.join(name)
        })? {
            if !written.contains(&dir) {
                written.push(dir);
            }
        }
    }
    if written.is_empty() {
        bail!("none of the shard folders holds experiment tables");
    }
    // A table holds one profile (`datamux run` refuses to mix them, and so does this).
    for dir in &written {
        let rows: Vec<AccuracyRow> = results::read_table(&dir.join("accuracy.parquet"))?;
        if let Some(r) = rows
            .iter()
            .find(|r| Some(&r.id.profile) != profiles.get(&r.id.experiment))
        {
            bail!(
                "{} would mix profiles `{}` and `{}`: merge the shards of one profile",
                dir.display(),
                r.id.profile,
                profiles.get(&r.id.experiment).map_or("?", |p| p.as_str())
            );
        }
    }
    Ok(written)
}

/// Copy the finished runs of every experiment folder under `from` into `dest(profile, name)`.
fn copy_finished(
    from: &Path,
    replace: bool,
    mut dest_of: impl FnMut(&str, &str) -> PathBuf,
) -> Result<Vec<PathBuf>> {
    if !from.is_dir() {
        bail!("no folder at {}", from.display());
    }
    // A shard that drew no run has no tables: nothing to copy.
    let dirs = crate::report::experiment_dirs(from)?;
    let mut written = Vec::new();
    for dir in dirs {
        let acc: Vec<AccuracyRow> = results::read_table(&dir.join("accuracy.parquet"))?;
        let speed: Vec<SpeedRow> = results::read_table(&dir.join("speed.parquet"))?;
        let Some(first) = acc
            .iter()
            .map(|r| &r.id)
            .chain(speed.iter().map(|r| &r.id))
            .next()
        else {
            continue;
        };
        let dest = dest_of(&first.profile, &first.experiment);
        std::fs::create_dir_all(&dest)
            .with_context(|| format!("cannot create {}", dest.display()))?;
        // The destination's lock, as a run writing there holds it (docs/reliability.md).
        let _lock = datamux_data::lock::Lock::folder(&dest, || {
            eprintln!(
                "waiting for another datamux command writing {}",
                dest.display()
            );
        })?;
        let done = results::finished(&acc);
        let done_speed = results::finished(&speed);
        if replace {
            for f in ["accuracy.parquet", "speed.parquet", "resolved.toml"] {
                match std::fs::remove_file(dest.join(f)) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                        return Err(e)
                            .with_context(|| format!("cannot replace {}", dest.display()));
                    }
                    _ => {}
                }
            }
        }
        let acc_ids = merge_into(&dest.join("accuracy.parquet"), acc, &done)?;
        let speed_ids = merge_into(&dest.join("speed.parquet"), speed, &done_speed)?;
        merge_resolved(&dir, &dest, &acc_ids, &speed_ids)?;
        let revs = published_revs(&dest)?;
        publish_env(&dir.join("env.txt"), &dest.join("env.txt"), replace, &revs)?;
        written.push(dest);
    }
    Ok(written)
}

/// The published `env.txt`: the working folder's section after those of the published one
/// (unless `replace`) whose revision some row of the published tables still carries: the rows
/// kept from earlier runs were computed on the machines those sections name. A section already
/// there is not repeated, and the working folder's is left out when no published row carries
/// its revision (a later command, `serve-bench` say, rewrote it over rows it did not compute).
fn publish_env(from: &Path, dest: &Path, replace: bool, revs: &BTreeSet<String>) -> Result<()> {
    let read = |p: &Path| datamux_data::atomic::read_optional(p).map(Option::unwrap_or_default);
    let new = read(from)?;
    if new.trim().is_empty() {
        return Ok(());
    }
    let old = if replace { String::new() } else { read(dest)? };
    // Sections are separated by a blank line and each starts with `command:`.
    let rev_of = |section: &str| {
        section
            .lines()
            .find_map(|l| l.strip_prefix("git_rev: "))
            .map(|r| r.trim().to_string())
    };
    let mut sections: Vec<&str> = old
        .split("\n\n")
        .map(str::trim)
        .filter(|s| s.starts_with("command:"))
        .filter(|s| rev_of(s).is_some_and(|r| revs.contains(&r)))
        .filter(|s| *s != new.trim())
        .collect();
    if rev_of(new.trim()).is_none_or(|r| revs.contains(&r)) {
        sections.push(new.trim());
    }
    if sections.is_empty() {
        return Ok(());
    }
    let text = format!("{}\n", sections.join("\n\n"));
    if text == old {
        return Ok(());
    }
    Ok(datamux_data::atomic::write_bytes(dest, text.as_bytes())?)
}

/// The git revisions that the rows of the published tables in `dir` carry.
fn published_revs(dir: &Path) -> Result<BTreeSet<String>> {
    let acc: Vec<AccuracyRow> = results::read_table(&dir.join("accuracy.parquet"))?;
    let speed: Vec<SpeedRow> = results::read_table(&dir.join("speed.parquet"))?;
    Ok(acc
        .iter()
        .map(|r| &r.id)
        .chain(speed.iter().map(|r| &r.id))
        .map(|id| id.git_rev.clone())
        .collect())
}

/// Upsert the finished runs of `rows` into the table at `path` (not rewritten when no row
/// changes: republishing the same runs leaves the file as it was); the run ids the table holds
/// afterwards.
fn merge_into<R: Row + Clone + std::fmt::Debug>(
    path: &Path,
    rows: Vec<R>,
    finished: &std::collections::BTreeSet<String>,
) -> Result<std::collections::BTreeSet<String>> {
    let mut table: Vec<R> = results::read_table(path)?;
    let mut by_run: BTreeMap<String, Vec<R>> = BTreeMap::new();
    for r in rows.into_iter().filter(|r| finished.contains(r.key())) {
        by_run.entry(r.key().to_string()).or_default().push(r);
    }
    if by_run.is_empty() && !path.exists() {
        return Ok(Default::default());
    }
    let before = table.clone();
    for (_, rows) in by_run {
        results::upsert(&mut table, rows);
    }
    // Upserting moves a run's rows to the end: equal as sets is unchanged. Compared as text,
    // where a NaN (a metric that a run could not compute) equals itself.
    let text = |rows: &[R]| {
        let mut t: Vec<String> = rows.iter().map(|r| format!("{r:?}")).collect();
        t.sort();
        t
    };
    let unchanged = path.exists() && text(&before) == text(&table);
    if !unchanged {
        results::write_table(path, &table)?;
    }
    Ok(table.iter().map(|r| r.key().to_string()).collect())
}

/// The published `resolved.toml`: the entries of the runs the published tables hold, from the
/// working folder where it has them, else from the published file.
fn merge_resolved(
    from: &Path,
    dest: &Path,
    acc: &std::collections::BTreeSet<String>,
    speed: &std::collections::BTreeSet<String>,
) -> Result<()> {
    let read = |p: &Path| -> Result<Option<toml::Table>> {
        datamux_data::atomic::read_optional(p)?
            .map(|text| {
                text.parse::<toml::Table>()
                    .with_context(|| format!("{} is not TOML", p.display()))
            })
            .transpose()
    };
    let Some(mut doc) = read(&from.join("resolved.toml"))? else {
        return Ok(());
    };
    let runs_of = |t: &mut toml::Table| match t.remove("runs") {
        Some(toml::Value::Table(r)) => r,
        _ => toml::Table::new(),
    };
    let mut runs = read(&dest.join("resolved.toml"))?
        .map(|mut t| runs_of(&mut t))
        .unwrap_or_default();
    runs.extend(runs_of(&mut doc));
    runs.retain(|id, _| acc.contains(id) || speed.contains(id));
    doc.insert("runs".into(), toml::Value::Table(runs));
    crate::sweep::write_resolved_doc(dest, &doc, "datamux publish")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_txt_names_only_revisions_whose_rows_are_published() {
        let d = tempfile::tempdir().unwrap();
        let (from, dest) = (d.path().join("from.txt"), d.path().join("dest.txt"));
        let old = "command: train\ngit_rev: aaa\n";
        std::fs::write(&dest, old).unwrap();
        std::fs::write(&from, "command: bench\ngit_rev: bbb\n").unwrap();
        let revs = |r: &[&str]| r.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>();
        // The rows are still those of aaa: the file is left as it was.
        publish_env(&from, &dest, false, &revs(&["aaa"])).unwrap();
        assert_eq!(std::fs::read_to_string(&dest).unwrap(), old);
        publish_env(&from, &dest, false, &revs(&["aaa", "bbb"])).unwrap();
        assert_eq!(
            std::fs::read_to_string(&dest).unwrap(),
            "command: train\ngit_rev: aaa\n\ncommand: bench\ngit_rev: bbb\n"
        );
    }
}
