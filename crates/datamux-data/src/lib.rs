//! Datasets for datamux: the catalogue, resolution from a local mirror or the Hugging Face hub,
//! and Parquet reading through polars into plain Rust columns.
//!
//! Nothing here returns a tensor or a polars type: the runner takes [`Examples`] and hands them
//! to a modality crate, which never links polars.
//!
//! Resolution order for a split: the local mirror directory (`--data-dir` / `DATAMUX_DATA_DIR`),
//! then the hf-hub cache (read offline), then a download through hf-hub unless offline
//! (`HF_HUB_OFFLINE=1` or the caller's flag). A split that cannot be found is an error naming every
//! path looked at and how to provide the data.

pub mod catalogue;
pub mod error;
pub mod read;
pub mod resolve;

pub use catalogue::{Catalogue, Columns, DatasetEntry, Kind};
pub use error::DataError;
pub use read::{Examples, Split};
pub use resolve::{Resolver, Source};
