//! The `datamux` runner: experiment files, sweeps of worker processes, the Parquet tables, the
//! report and the bench. Modalities plug in through `datamux_pipeline::Modality`, registered in
//! [`registry`]; the training loop, evaluation and speed harness they use live in
//! `datamux-pipeline`. The binary (`main.rs`) is a thin clap layer over this library, which the
//! integration tests drive directly.

// First: its `table!` macro declares the tables of the modules below.
#[macro_use]
pub mod results;

pub mod bench;
pub mod comparison;
pub mod config;
pub mod job;
pub mod out;
pub mod plot;
pub mod provenance;
pub mod registry;
pub mod report;
pub mod reproduce;
pub mod serve;
pub mod show;
pub mod sweep;
