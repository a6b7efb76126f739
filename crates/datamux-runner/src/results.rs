//! The two tidy tables of an experiment, `accuracy.parquet` and `speed.parquet`, written through
//! polars. Rows are plain structs; a static schema fixes each column's name and type. Files are
//! written to a temporary name and renamed, so an interrupted run never leaves a half-written
//! table. Failed and unavailable runs are rows too, with a status and the first line of the error.

use std::path::Path;

use anyhow::{Context, Result, bail};
use polars::prelude::{
    Column, DataFrame, IntoColumn, NamedFrom, ParquetReader, ParquetWriter, SerReader, Series,
};
use serde::{Deserialize, Serialize, de::DeserializeOwned};

use crate::provenance::Provenance;

/// Floats that may be NaN (a failed run has no value): JSON, which carries rows between the
/// worker and the tables, has no NaN, so NaN travels as null and comes back as NaN.
mod nan {
    use serde::{Deserialize, Deserializer};

    pub fn de<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
        Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
    }
}

/// Whether a run has results: `ok`, `error` (it failed), or `unavailable` (its data could not be
/// had). Stored as those strings in the `status` column.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    #[default]
    Ok,
    Error,
    Unavailable,
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Ok => "ok",
            Self::Error => "error",
            Self::Unavailable => "unavailable",
        })
    }
}

/// Column types of the tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Col {
    Str,
    F64,
    I64,
    Bool,
}

/// A table row with a fixed schema.
pub trait Row: Serialize + DeserializeOwned {
    const SCHEMA: &'static [(&'static str, Col)];
    /// Rows of one run share this key; a rerun replaces them all.
    fn key(&self) -> &str;
    fn status(&self) -> Status;
    fn identity(&self) -> &Identity;
}

/// Identity and provenance columns shared by both tables.
macro_rules! identity_schema {
    ($($extra:tt)*) => {
        &[
            ("experiment", Col::Str),
            ("profile", Col::Str),
            ("run_id", Col::Str),
            ("modality", Col::Str),
            ("dataset", Col::Str),
            ("data_source", Col::Str),
            ("backbone", Col::Str),
            ("model_size", Col::Str),
            ("mux", Col::Str),
            ("demux", Col::Str),
            ("n_instances", Col::I64),
            ("seed", Col::I64),
            ("warmup", Col::Bool),
            $($extra)*
            ("status", Col::Str),
            ("error", Col::Str),
            ("git_rev", Col::Str),
            ("git_dirty", Col::Bool),
            ("config_hash", Col::Str),
            ("threads", Col::I64),
            ("candle_version", Col::Str),
            ("device", Col::Str),
            ("dtype", Col::Str),
        ]
    };
}

/// The columns that say which run a row belongs to and where it came from.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Identity {
    pub experiment: String,
    pub profile: String,
    pub run_id: String,
    pub modality: String,
    pub dataset: String,
    pub data_source: String,
    pub backbone: String,
    pub model_size: String,
    pub mux: String,
    pub demux: String,
    pub n_instances: i64,
    pub seed: i64,
    pub warmup: bool,
    pub status: Status,
    pub error: String,
    pub git_rev: String,
    pub git_dirty: bool,
    pub config_hash: String,
    pub threads: i64,
    pub candle_version: String,
    pub device: String,
    pub dtype: String,
}

impl Identity {
    /// The point of a sweep this row stands for: the columns the report groups by, seed
    /// included. Two runs of one point differ only in settings, and the newer one supersedes.
    pub fn point(&self) -> String {
        format!(
            "{}|{}|{}|{}|{}|{}|{}|{}|{}|{}",
            self.experiment,
            self.profile,
            self.dataset,
            self.backbone,
            self.model_size,
            self.mux,
            self.demux,
            self.n_instances,
            self.seed,
            self.warmup
        )
    }

    pub fn with_provenance(mut self, p: &Provenance) -> Self {
        self.git_rev = p.git_rev.clone();
        self.git_dirty = p.git_dirty;
        self.candle_version = p.candle_version.clone();
        self.device = p.device.clone();
        self.dtype = p.dtype.clone();
        self.threads = p.threads;
        self
    }

    /// Status `ok`, or `error` / `unavailable` with the first line of the message (candle
    /// appends a backtrace when `RUST_BACKTRACE` is set).
    pub fn with_status(mut self, status: Status, error: &str) -> Self {
        self.status = status;
        self.error = error.lines().next().unwrap_or_default().to_string();
        self
    }
}

/// One (run, split, metric) of `accuracy.parquet`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AccuracyRow {
    #[serde(flatten)]
    pub id: Identity,
    pub split: String,
    pub metric: String,
    #[serde(deserialize_with = "nan::de")]
    pub value: f64,
    /// Real examples scored; equals the split size (dummies are never counted).
    pub n_examples: i64,
    pub steps: i64,
    pub best_step: i64,
    #[serde(deserialize_with = "nan::de")]
    pub train_seconds: f64,
}

impl Row for AccuracyRow {
    const SCHEMA: &'static [(&'static str, Col)] = identity_schema!(
        ("split", Col::Str),
        ("metric", Col::Str),
        ("value", Col::F64),
        ("n_examples", Col::I64),
        ("steps", Col::I64),
        ("best_step", Col::I64),
        ("train_seconds", Col::F64),
    );
    fn key(&self) -> &str {
        &self.id.run_id
    }
    fn identity(&self) -> &Identity {
        &self.id
    }
    fn status(&self) -> Status {
        self.id.status
    }
}

/// One timed point of `speed.parquet`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SpeedRow {
    #[serde(flatten)]
    pub id: Identity,
    /// `inference` (forward only) or `train_step` (forward, backward, AdamW).
    pub mode: String,
    /// Positions per instance (tokens, or patches for a ViT; pixels rows for others).
    pub seq_len: i64,
    pub batch_instances: i64,
    pub warmup_iters: i64,
    pub iters: i64,
    #[serde(deserialize_with = "nan::de")]
    pub latency_ms_median: f64,
    #[serde(deserialize_with = "nan::de")]
    pub latency_ms_mad: f64,
    #[serde(deserialize_with = "nan::de")]
    pub latency_ms_min: f64,
    #[serde(deserialize_with = "nan::de")]
    pub latency_ms_max: f64,
    #[serde(deserialize_with = "nan::de")]
    pub throughput_instances_per_s: f64,
}

impl Row for SpeedRow {
    const SCHEMA: &'static [(&'static str, Col)] = identity_schema!(
        ("mode", Col::Str),
        ("seq_len", Col::I64),
        ("batch_instances", Col::I64),
        ("warmup_iters", Col::I64),
        ("iters", Col::I64),
        ("latency_ms_median", Col::F64),
        ("latency_ms_mad", Col::F64),
        ("latency_ms_min", Col::F64),
        ("latency_ms_max", Col::F64),
        ("throughput_instances_per_s", Col::F64),
    );
    fn key(&self) -> &str {
        &self.id.run_id
    }
    fn identity(&self) -> &Identity {
        &self.id
    }
    fn status(&self) -> Status {
        self.id.status
    }
}

fn frame<R: Row>(rows: &[R]) -> Result<DataFrame> {
    let values: Vec<serde_json::Value> = rows
        .iter()
        .map(serde_json::to_value)
        .collect::<Result<_, _>>()?;
    let mut columns: Vec<Column> = Vec::with_capacity(R::SCHEMA.len());
    for (name, col) in R::SCHEMA {
        let get = |v: &serde_json::Value| v.get(*name).cloned().unwrap_or(serde_json::Value::Null);
        let name = (*name).into();
        let series = match col {
            Col::Str => Series::new(
                name,
                values
                    .iter()
                    .map(|v| get(v).as_str().unwrap_or_default().to_string())
                    .collect::<Vec<_>>(),
            ),
            // NaN marks a value that does not exist (a failed run's row).
            Col::F64 => Series::new(
                name,
                values
                    .iter()
                    .map(|v| get(v).as_f64().unwrap_or(f64::NAN))
                    .collect::<Vec<_>>(),
            ),
            Col::I64 => Series::new(
                name,
                values
                    .iter()
                    .map(|v| get(v).as_i64().unwrap_or_default())
                    .collect::<Vec<_>>(),
            ),
            Col::Bool => Series::new(
                name,
                values
                    .iter()
                    .map(|v| get(v).as_bool().unwrap_or_default())
                    .collect::<Vec<_>>(),
            ),
        };
        columns.push(series.into_column());
    }
    Ok(DataFrame::new_infer_height(columns)?)
}

/// Write `rows` to `path` atomically (temporary file, then rename).
pub fn write_table<R: Row>(path: &Path, rows: &[R]) -> Result<()> {
    let mut df = frame(rows)?;
    let tmp = path.with_extension(format!("parquet.tmp-{}", std::process::id()));
    {
        let file = std::fs::File::create(&tmp)
            .with_context(|| format!("cannot create {}", tmp.display()))?;
        ParquetWriter::new(file)
            .finish(&mut df)
            .with_context(|| format!("cannot write {}", tmp.display()))?;
    }
    std::fs::rename(&tmp, path)
        .with_context(|| format!("cannot move {} to {}", tmp.display(), path.display()))?;
    Ok(())
}

/// Read a table written by [`write_table`]; a missing file is an empty table.
pub fn read_table<R: Row>(path: &Path) -> Result<Vec<R>> {
    if !path.exists() {
        return Ok(Vec::new());
    }
    let file =
        std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let df = ParquetReader::new(file)
        .finish()
        .with_context(|| format!("cannot read {}", path.display()))?;
    let n = df.height();
    let mut objects = vec![serde_json::Map::new(); n];
    for (name, col) in R::SCHEMA {
        let Ok(c) = df.column(name) else {
            bail!(
                "{} has no column `{name}`: it was written by another version of datamux; move it aside to start afresh",
                path.display()
            );
        };
        let s = c.as_materialized_series();
        let wrong = || {
            anyhow::anyhow!(
                "{}: column `{name}` has type {}, expected {col:?}",
                path.display(),
                s.dtype()
            )
        };
        match col {
            Col::Str => {
                let ca = s.str().map_err(|_| wrong())?;
                for (o, v) in objects.iter_mut().zip(ca.iter()) {
                    o.insert(name.to_string(), v.unwrap_or_default().into());
                }
            }
            Col::F64 => {
                let ca = s.f64().map_err(|_| wrong())?;
                for (o, v) in objects.iter_mut().zip(ca.iter()) {
                    o.insert(
                        name.to_string(),
                        serde_json::Number::from_f64(v.unwrap_or(f64::NAN))
                            .map_or(serde_json::Value::Null, Into::into),
                    );
                }
            }
            Col::I64 => {
                let ca = s.i64().map_err(|_| wrong())?;
                for (o, v) in objects.iter_mut().zip(ca.iter()) {
                    o.insert(name.to_string(), v.unwrap_or_default().into());
                }
            }
            Col::Bool => {
                let ca = s.bool().map_err(|_| wrong())?;
                for (o, v) in objects.iter_mut().zip(ca.iter()) {
                    o.insert(name.to_string(), v.unwrap_or_default().into());
                }
            }
        }
    }
    objects
        .into_iter()
        .map(|o| {
            serde_json::from_value(serde_json::Value::Object(o))
                .with_context(|| format!("{}: a row does not fit the schema", path.display()))
        })
        .collect()
}

/// Replace the rows of each key present in `new`, and the rows of the same sweep point made with
/// other settings (an edited experiment file gives the point a new key, and its old rows would
/// otherwise be averaged with the new ones as if they were another seed); keep the rest, in a
/// stable order.
pub fn upsert<R: Row>(rows: &mut Vec<R>, new: Vec<R>) {
    let keys: std::collections::BTreeSet<String> =
        new.iter().map(|r| r.key().to_string()).collect();
    let points: std::collections::BTreeSet<String> =
        new.iter().map(|r| r.identity().point()).collect();
    rows.retain(|r| !keys.contains(r.key()) && !points.contains(&r.identity().point()));
    rows.extend(new);
}

/// Keys whose rows are all `ok`: finished runs that are never recomputed.
pub fn finished<R: Row>(rows: &[R]) -> std::collections::BTreeSet<String> {
    let mut ok = std::collections::BTreeSet::new();
    let mut bad = std::collections::BTreeSet::new();
    for r in rows {
        if r.status() == Status::Ok {
            ok.insert(r.key().to_string());
        } else {
            bad.insert(r.key().to_string());
        }
    }
    ok.difference(&bad).cloned().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn acc(run_id: &str, n: i64, seed: i64, metric: &str) -> AccuracyRow {
        AccuracyRow {
            id: Identity {
                experiment: "e".into(),
                profile: "quick".into(),
                run_id: run_id.into(),
                backbone: "lenet".into(),
                n_instances: n,
                seed,
                ..Identity::default()
            },
            split: "test".into(),
            metric: metric.into(),
            value: 0.5,
            n_examples: 3,
            steps: 1,
            best_step: 1,
            train_seconds: 1.0,
        }
    }

    #[test]
    fn upsert_replaces_a_run_and_what_its_point_had_under_other_settings() {
        let mut rows = vec![
            acc("n4-old", 4, 0, "accuracy"),
            acc("n4-old", 4, 0, "accuracy_slot_min"),
            acc("n4-seed1", 4, 1, "accuracy"), // another seed: a point of its own
            acc("n2", 2, 0, "accuracy"),
        ];
        upsert(&mut rows, vec![acc("n4-new", 4, 0, "accuracy")]);
        let ids: Vec<&str> = rows.iter().map(|r| r.id.run_id.as_str()).collect();
        assert_eq!(ids, ["n4-seed1", "n2", "n4-new"]);
        upsert(&mut rows, vec![acc("n2", 2, 0, "accuracy")]);
        assert_eq!(rows.len(), 3);
    }
}
