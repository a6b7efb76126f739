//! Images for datamux: decoding through `image`, and three backbone families behind the core
//! traits, each with the frontend that feeds it:
//!
//! - [`mlp`]: a shared linear embedding of the pixels, muxed by the core keys, then an MLP;
//! - [`cnn`]: a learned per-slot convolutional stem (the reference notebook's `nonlinear-expand`
//!   multiplexer), then a LeNet-style or small ResNet-style CNN;
//! - [`vit`]: patch embeddings through the core encoder, with the same index / mlp / rsa
//!   demultiplexers as text.
//!
//! [`task::ImageTask`] puts one of them in a `MuxNet` with a shared classification head;
//! [`pipeline::Vision`] is the modality the runner drives. The runner hands this crate plain
//! Rust inputs (encoded image bytes and label ids), never polars.

pub mod cnn;
pub mod conv;
pub mod image;
pub mod mlp;
pub mod model;
pub mod pipeline;
pub mod serve;
pub mod task;
pub mod vit;

pub use image::{ImageData, ImageSpec, VisionError};
pub use model::{Arch, Config, ImageInput, VisionBackbone, VisionFrontend};
pub use pipeline::Vision;
pub use task::ImageTask;
