//! Configuration errors, raised when a config is validated, before any tensor is built.

/// A configuration that cannot be built. Every variant names the values that break the rule.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    #[error("n_instances must be at least 1, got {n_instances}")]
    NoInstances { n_instances: usize },
    #[error("hidden_size {hidden_size} is not divisible by num_attention_heads {num_heads}")]
    HeadsDoNotDivideHidden {
        hidden_size: usize,
        num_heads: usize,
    },
    #[error(
        "binary_hadamard needs hidden_size >= n_instances, got hidden_size {hidden_size} and n_instances {n_instances}"
    )]
    TooManyChunks {
        hidden_size: usize,
        n_instances: usize,
    },
    #[error("binary_hadamard epsilon must be in [0, 1), got {epsilon}")]
    BadEpsilon { epsilon: f64 },
    #[error("gaussian_hadamard norm must be positive and finite, got {norm}")]
    BadNorm { norm: f64 },
    #[error("mux offset must be finite, got {offset}")]
    BadOffset { offset: f64 },
    #[error(
        "the index demultiplexer needs a sequence backbone; {backbone} has no positions to prefix"
    )]
    IndexNeedsSequence { backbone: String },
    #[error("batch_size {batch_size} (instances) is not divisible by n_instances {n_instances}")]
    InstancesDoNotDivideBatch {
        batch_size: usize,
        n_instances: usize,
    },
    #[error("{what} must be in [0, 1), got {value}")]
    BadProbability { what: &'static str, value: f64 },
    #[error("{what} must be at least 1, got 0")]
    Zero { what: &'static str },
    #[error("sequence length {len} plus prefix {prefix} exceeds max_position_embeddings {max}")]
    TooLong {
        len: usize,
        prefix: usize,
        max: usize,
    },
    #[error("image size {image_size} is not divisible by patch size {patch_size}")]
    PatchDoesNotDivideImage {
        image_size: usize,
        patch_size: usize,
    },
    #[error("{0}")]
    Other(String),
}
