//! The modality pipeline of datamux and what every modality shares.
//!
//! A modality (text, vision, audio, ...) is one crate that implements [`Modality`]: its settings
//! (`[model.<section>]` tables), the dataset kinds it trains on, its stages and its speed point.
//! It builds them from the pieces here, written once for every modality:
//!
//! - [`settings`]: the resolved settings of a run ([`RunConfig`]) and its id;
//! - [`train`]: the one training loop (AdamW, warm-up then linear decay, clipping, selection on
//!   validation);
//! - [`eval`]: scoring every example of a split;
//! - [`speed`]: the inference timing harness;
//! - [`stages`]: schedules, a stage with progress, records of the selected checkpoint;
//! - [`checkpoint`]: saving, loading, locking and growing checkpoints;
//! - [`serve`]: the card of a servable checkpoint and the one inference pass a server runs.
//!
//! The runner (`datamux-runner`) expands experiment files into runs, loads their data, schedules
//! jobs and writes the tables; a modality never sees polars or the tables.

pub mod checkpoint;
pub mod eval;
pub mod memory;
pub mod modality;
pub mod serve;
pub mod settings;
pub mod speed;
pub mod stages;
pub mod teacher;
pub mod train;

pub use modality::{Context, Env, Modality, Record, SpeedPoint, Stage, Tick, parse_backbone};
pub use settings::{
    DataConfig, ModelConfig, RunConfig, Sections, SpeedConfig, TrainConfig, WarmupConfig,
    section_json,
};
