//! The multiplexing core of datamux: one network, N inputs, one forward pass.
//!
//! DataMUX (Murahari et al., NeurIPS 2022, arXiv 2202.09318) tags each of N inputs with a fixed
//! per-instance transform, averages them into one representation, runs the backbone once and
//! separates the result back into N representations for a shared task head. This crate holds the
//! modality-agnostic parts, with no I/O:
//!
//! - [`mux`]: the multiplexers, `(B, N, L, D) -> (B, L, D)`;
//! - [`cache`]: matrices built from learned keys, kept between inference calls;
//! - [`demux`]: the index prefix and the demultiplexers, `(B, P+L, D) -> (B, N, L', D)`;
//! - [`retrieval`]: the retrieval warm-up head and its target sampling;
//! - [`fused`]: fused CPU kernels with backward passes (attention, GELU) the encoder runs on;
//! - [`optim`]: AdamW updating f32 CPU parameters in place, candle-nn's arithmetic;
//! - [`encoder`]: the Transformer encoder with a key-padding mask, shared by text and ViT;
//! - [`model`]: [`MuxNet`], the one assembly of frontend, prefix, mux, backbone and demux;
//! - [`heads`]: shared classification heads on demultiplexed representations;
//! - [`group`]: grouping M examples into `ceil(M / N)` muxed rows with flagged dummies;
//! - [`init`] and [`keys`]: seeded initialisation independent of candle's RNG;
//! - [`task`]: the [`Task`] trait the runner's training loop and speed harness drive.
//!
//! Shape letters: `B` muxed rows, `N` instances per row, `L` sequence length, `P` prefix length,
//! `D` hidden size, `C` classes, `V` vocabulary (see `docs/architecture.md`).

pub mod cache;
pub mod demux;
pub mod encoder;
pub mod error;
pub mod fused;
pub mod group;
pub mod heads;
pub mod init;
pub mod keys;
pub mod layers;
pub mod model;
pub mod mux;
pub mod optim;
pub mod range;
pub mod retrieval;
pub mod task;

pub use demux::{Demux, DemuxKind, Positions};
pub use encoder::Encoder;
pub use error::ConfigError;
pub use group::Groups;
pub use init::SeededVarMap;
pub use model::{Backbone, Embedded, Encoded, Frontend, MuxNet};
pub use mux::{Multiplexer, MuxKind};
pub use retrieval::{RetrievalHead, RetrievalTargets};
pub use task::{EmbeddingPair, Losses, Score, Task};
