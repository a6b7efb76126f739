//! The two tidy tables of an experiment, `accuracy.parquet` and `speed.parquet`, written through
//! polars. Rows are plain structs, each declared once with [`table!`], which also gives its
//! columns: a field is a column of its name and type, a nested table struct (the identity) its
//! columns in place. Files are written to a temporary name and renamed, so an interrupted run
//! never leaves a half-written table. Failed and unavailable runs are rows too, with a status and
//! the first line of the error.

use std::path::Path;

use anyhow::{Context, Result, bail};
use polars::prelude::{
    Column, DataFrame, IntoColumn, NamedFrom, ParquetReader, ParquetWriter, SerReader, Series,
};
use serde::{Deserialize, Serialize};

use crate::provenance::Provenance;

/// Floats that may be NaN (a failed run has no value): JSON, which carries rows from a worker to
/// the tables, has no NaN, so NaN travels as null and comes back as NaN.
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

impl Status {
    const ALL: [Self; 3] = [Self::Ok, Self::Error, Self::Unavailable];
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

/// A field type that is one column.
pub trait Cell: Sized {
    const COL: Col;
    fn series(name: &str, values: Vec<&Self>) -> Series;
    /// The column's values; `Err` names what was found instead.
    fn values(s: &Series) -> std::result::Result<Vec<Self>, String>;
}

fn found(s: &Series) -> String {
    format!("type {}", s.dtype())
}

impl Cell for String {
    const COL: Col = Col::Str;
    fn series(name: &str, values: Vec<&Self>) -> Series {
        let v: Vec<&str> = values.into_iter().map(String::as_str).collect();
        Series::new(name.into(), v)
    }
    fn values(s: &Series) -> std::result::Result<Vec<Self>, String> {
        let ca = s.str().map_err(|_| found(s))?;
        Ok(ca
            .iter()
            .map(|v| v.unwrap_or_default().to_string())
            .collect())
    }
}

/// NaN marks a value that does not exist (a failed run's row); a null reads as NaN.
impl Cell for f64 {
    const COL: Col = Col::F64;
    fn series(name: &str, values: Vec<&Self>) -> Series {
        Series::new(name.into(), values.into_iter().copied().collect::<Vec<_>>())
    }
    fn values(s: &Series) -> std::result::Result<Vec<Self>, String> {
        let ca = s.f64().map_err(|_| found(s))?;
        Ok(ca.iter().map(|v| v.unwrap_or(f64::NAN)).collect())
    }
}

impl Cell for i64 {
    const COL: Col = Col::I64;
    fn series(name: &str, values: Vec<&Self>) -> Series {
        Series::new(name.into(), values.into_iter().copied().collect::<Vec<_>>())
    }
    fn values(s: &Series) -> std::result::Result<Vec<Self>, String> {
        let ca = s.i64().map_err(|_| found(s))?;
        Ok(ca.iter().map(Option::unwrap_or_default).collect())
    }
}

impl Cell for bool {
    const COL: Col = Col::Bool;
    fn series(name: &str, values: Vec<&Self>) -> Series {
        Series::new(name.into(), values.into_iter().copied().collect::<Vec<_>>())
    }
    fn values(s: &Series) -> std::result::Result<Vec<Self>, String> {
        let ca = s.bool().map_err(|_| found(s))?;
        Ok(ca.iter().map(Option::unwrap_or_default).collect())
    }
}

impl Cell for Status {
    const COL: Col = Col::Str;
    fn series(name: &str, values: Vec<&Self>) -> Series {
        let v: Vec<String> = values.into_iter().map(ToString::to_string).collect();
        Series::new(name.into(), v)
    }
    fn values(s: &Series) -> std::result::Result<Vec<Self>, String> {
        String::values(s)?
            .into_iter()
            .map(|v| {
                Status::ALL
                    .into_iter()
                    .find(|st| st.to_string() == v)
                    .ok_or_else(|| format!("the status `{v}`"))
            })
            .collect()
    }
}

/// A struct whose fields are columns (or nested column structs), declared with [`table!`].
pub trait Columns: Sized {
    /// `(name, type)` of every column, in order.
    fn schema(out: &mut Vec<(&'static str, Col)>);
    /// One column per schema entry, from `rows`.
    fn columns(rows: Vec<&Self>, out: &mut Vec<Column>);
    /// The rows of `df`; an error names the column.
    fn read(df: &DataFrame) -> Result<Vec<Self>>;
}

/// How a field of a [`table!`] struct becomes columns: a [`Cell`] is one column named after the
/// field, a [`Columns`] struct its own columns.
pub trait Part: Sized {
    fn schema(name: &'static str, out: &mut Vec<(&'static str, Col)>);
    fn columns(name: &'static str, values: Vec<&Self>, out: &mut Vec<Column>);
    fn read(name: &'static str, df: &DataFrame) -> Result<Vec<Self>>;
}

/// The typed column of `name`.
fn cell_values<T: Cell>(name: &str, df: &DataFrame) -> Result<Vec<T>> {
    let Ok(c) = df.column(name) else {
        bail!("it has no column `{name}`: it was written by another version of datamux");
    };
    T::values(c.as_materialized_series())
        .map_err(|what| anyhow::anyhow!("column `{name}` holds {what}, expected {:?}", T::COL))
}

macro_rules! cell_part {
    ($($t:ty),*) => {$(
        impl Part for $t {
            fn schema(name: &'static str, out: &mut Vec<(&'static str, Col)>) {
                out.push((name, <$t as Cell>::COL));
            }
            fn columns(name: &'static str, values: Vec<&Self>, out: &mut Vec<Column>) {
                out.push(<$t as Cell>::series(name, values).into_column());
            }
            fn read(name: &'static str, df: &DataFrame) -> Result<Vec<Self>> {
                cell_values::<$t>(name, df)
            }
        }
    )*};
}
cell_part!(String, f64, i64, bool, Status);

/// Declare a table struct: its fields in column order, each a [`Cell`] or a nested [`table!`]
/// struct (`#[part]`), which contributes its columns in place.
macro_rules! table {
    (
        $(#[$meta:meta])*
        pub struct $name:ident {
            $( $(#[$fmeta:meta])* pub $field:ident : $ty:ty, )*
        }
    ) => {
        $(#[$meta])*
        pub struct $name {
            $( $(#[$fmeta])* pub $field: $ty, )*
        }

        impl $crate::results::Columns for $name {
            fn schema(out: &mut Vec<(&'static str, $crate::results::Col)>) {
                $( <$ty as $crate::results::Part>::schema(stringify!($field), out); )*
            }
            fn columns(rows: Vec<&Self>, out: &mut Vec<::polars::prelude::Column>) {
                $( <$ty as $crate::results::Part>::columns(
                    stringify!($field),
                    rows.iter().map(|r| &r.$field).collect(),
                    out,
                ); )*
            }
            fn read(df: &::polars::prelude::DataFrame) -> ::anyhow::Result<Vec<Self>> {
                $( let mut $field = <$ty as $crate::results::Part>::read(stringify!($field), df)?.into_iter(); )*
                ::anyhow::Context::context(
                    (0..df.height())
                        .map(|_| Some(Self { $( $field: $field.next()?, )* }))
                        .collect::<Option<Vec<_>>>(),
                    "a column is shorter than the table",
                )
            }
        }

        impl $crate::results::Part for $name {
            fn schema(_: &'static str, out: &mut Vec<(&'static str, $crate::results::Col)>) {
                <Self as $crate::results::Columns>::schema(out)
            }
            fn columns(_: &'static str, values: Vec<&Self>, out: &mut Vec<::polars::prelude::Column>) {
                <Self as $crate::results::Columns>::columns(values, out)
            }
            fn read(_: &'static str, df: &::polars::prelude::DataFrame) -> ::anyhow::Result<Vec<Self>> {
                <Self as $crate::results::Columns>::read(df)
            }
        }
    };
}

/// A table row.
pub trait Row: Columns + Serialize + serde::de::DeserializeOwned {
    /// Rows of one run share this key; a rerun replaces them all.
    fn key(&self) -> &str;
    fn status(&self) -> Status;
    fn identity(&self) -> &Identity;

    /// `(name, type)` of every column, in order.
    fn schema() -> Vec<(&'static str, Col)> {
        let mut out = Vec::new();
        <Self as Columns>::schema(&mut out);
        out
    }
}

table! {
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

table! {
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
}

impl Row for AccuracyRow {
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

table! {
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
}

impl Row for SpeedRow {
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

/// Write `rows` to `path` atomically (temporary file, then rename; `datamux_data::atomic`).
pub fn write_table<R: Columns>(path: &Path, rows: &[R]) -> Result<()> {
    write_table_through(path, rows, |f| f)
}

/// [`write_table`] through a wrapper of the file: the seam a test fails the disk with.
pub fn write_table_through<R: Columns, W: std::io::Write + Send>(
    path: &Path,
    rows: &[R],
    wrap: impl FnOnce(std::fs::File) -> W,
) -> Result<()> {
    let mut columns = Vec::new();
    R::columns(rows.iter().collect(), &mut columns);
    let mut df = DataFrame::new_infer_height(columns)?;
    datamux_data::atomic::write_through(path, wrap, |w| {
        ParquetWriter::new(w).finish(&mut df).map(|_| ())
    })?;
    Ok(())
}

/// Read a table written by [`write_table`]; a missing file is an empty table. Columns are found
/// by name, so tables written with another column order read the same.
pub fn read_table<R: Columns>(path: &Path) -> Result<Vec<R>> {
    if !path.exists() {
        return Ok(Vec::new());
    }
    let file =
        std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let df = ParquetReader::new(file)
        .finish()
        .with_context(|| format!("cannot read {}", path.display()))?;
    R::read(&df).with_context(|| {
        format!(
            "{}: not a table of this version of datamux; move it aside to start afresh",
            path.display()
        )
    })
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
