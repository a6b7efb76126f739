//! The `datamux` runner: experiment files, the one training loop, evaluation, the speed
//! harness, the Parquet tables and the report. The binary (`main.rs`) is a thin clap layer over
//! this library, which the integration tests drive directly.

pub mod bench;
pub mod config;
pub mod eval;
pub mod provenance;
pub mod report;
pub mod results;
pub mod run;
pub mod speed;
pub mod sweep;
pub mod train;
