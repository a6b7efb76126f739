//! Text for datamux: a WordPiece tokenizer through the `tokenizers` crate, token and position
//! embeddings feeding the core encoder, and sentence, sentence-pair and token classification
//! tasks with the DataMUX retrieval warm-up (arXiv 2202.09318, method.md §5).
//!
//! The runner hands this crate plain Rust inputs (strings, word lists, label ids), never polars;
//! [`pipeline::Text`] is the modality it drives, with the retrieval warm-up in [`warmup`].
//! The embeddings are a [`datamux_core::Frontend`] and the trunk is the core encoder behind the
//! [`datamux_core::Backbone`] trait. A pretrained BERT checkpoint ([`pretrained`]) loads into
//! the same frontend and encoder (`model.text.pretrained`), without touching the tasks.

pub mod config;
pub mod data;
pub mod embeddings;
pub mod frontend;
pub mod metrics;
pub mod pipeline;
pub mod pretrained;
pub mod serve;
pub mod task;
mod teacher;
pub mod tokenizer;
pub mod warmup;

pub use config::{Config, Objective, SentenceReadout, Size};
pub use frontend::{TextFrontend, TextInput};
pub use pipeline::Text;
pub use pretrained::{Pretrained, PretrainedError};
pub use task::{SentenceData, TextTask, TokenData};
pub use tokenizer::{TextError, TextTokenizer};
