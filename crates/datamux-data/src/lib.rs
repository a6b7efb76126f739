//! Datasets for datamux: the catalogue, resolution from a local mirror or the Hugging Face hub,
//! Parquet reading through polars into plain Rust columns, and the splits of a run.
//!
//! Nothing here returns a tensor or a polars type. The plain parts (the catalogue, [`Examples`],
//! [`Splits`]) build without polars: a modality crate depends on this crate with
//! `default-features = false` and never links it. The `io` feature (on by default) adds reading
//! and resolution, which the runner uses.
//!
//! Resolution order for a split: the local mirror directory (`--data-dir` / `DATAMUX_DATA_DIR`),
//! then the repository's shipped `data/` folder, then the hf-hub cache (read offline), then a
//! download through hf-hub unless offline (`HF_HUB_OFFLINE=1` or the caller's flag), at most one
//! failed attempt per repository in a run ([`Resolver::hub_attempts`]). A split that cannot be found is an error naming every
//! path looked at and how to provide the data. Pretrained models resolve the same way
//! ([`models`]), from a models folder (`--models-dir` / `DATAMUX_MODELS_DIR`) laid out
//! `<owner>/<name>/`.

#[cfg(feature = "hub")]
pub mod atomic;
mod attempts;
pub mod catalogue;
pub mod error;
pub mod examples;
pub mod lock;
#[cfg(feature = "hub")]
pub mod models;
#[cfg(feature = "io")]
pub mod read;
#[cfg(feature = "io")]
pub mod resolve;
pub mod splits;

pub use catalogue::{Catalogue, Columns, DatasetEntry, Kind};
pub use error::DataError;
pub use examples::{Examples, Frames, Source, Split};
#[cfg(feature = "hub")]
pub use models::{ModelResolver, ModelSource, ResolvedModel};
#[cfg(feature = "io")]
pub use resolve::Resolver;
pub use splits::{Cut, Splits};
