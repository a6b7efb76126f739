//! Speech for datamux: clips of feature frames (MFCCs: `F` coefficients a frame, tens of frames
//! a clip), normalised per clip, projected frame by frame into the core Transformer encoder with
//! a key-padding mask, multiplexed and demultiplexed like text (DataMUX, arXiv 2202.09318).
//!
//! - [`config`]: the `[model.audio]` table;
//! - [`frames`]: a split's clips, truncated and normalised on the host;
//! - [`frontend`]: frames `(B, N, L, F)` -> embeddings `(B, N, L, D)`;
//! - [`task`]: clip classification as a core `Task`;
//! - [`pipeline`]: [`Audio`], the modality the runner drives.
//!
//! The runner hands this crate plain Rust columns (`datamux_data::Frames`), never polars.

pub mod config;
pub mod frames;
pub mod frontend;
pub mod pipeline;
pub mod task;

pub use config::{Augment, Config, Normalise, Readout};
pub use frames::{AudioError, FrameData};
pub use frontend::{FrameFrontend, FrameInput};
pub use pipeline::Audio;
pub use task::AudioTask;
