//! Shared task heads on demultiplexed representations; one set of weights for all N instances.
//!
//! Reference: `princeton-nlp/DataMUX`, `models/multiplexing.py`, the classification layers of
//! `RobertaIndexDemultiplexerSequenceClassification` (`dense`, `out_proj`) and of the token model
//! (method.md §4.1).

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

use crate::layers::{self, Linear};

/// Sentence (or image) classification: `logits = O·GELU(F·z + f) + o`.
#[derive(Clone, Debug)]
pub struct SequenceHead {
    dense: Linear,
    out: Linear,
}

impl SequenceHead {
    pub fn new(d: usize, classes: usize, vb: VarBuilder<'_>) -> Result<Self> {
        Ok(Self {
            dense: layers::linear(d, d, vb.pp("dense"))?,
            out: layers::linear(d, classes, vb.pp("classifier"))?,
        })
    }

    /// `(B, N, 1, D) -> (B·N, C)`; row `b·N + i` belongs to instance i of muxed row b.
    pub fn forward(&self, z: &Tensor) -> Result<Tensor> {
        let (b, n, l, d) = z.dims4()?;
        if l != 1 {
            candle_core::bail!(
                "sequence head expects one position per instance, got {:?}",
                z.shape()
            );
        }
        let z = z.reshape((b * n, d))?; // (B·N, D)
        z.apply(&self.dense)?.gelu_erf()?.apply(&self.out)
    }
}

/// Token classification: `logits = O·z + o` at every position.
#[derive(Clone, Debug)]
pub struct TokenHead {
    out: Linear,
}

impl TokenHead {
    pub fn new(d: usize, classes: usize, vb: VarBuilder<'_>) -> Result<Self> {
        Ok(Self {
            out: layers::linear(d, classes, vb.pp("classifier"))?,
        })
    }

    /// `(B, N, L, D) -> (B·N, L, C)`.
    pub fn forward(&self, z: &Tensor) -> Result<Tensor> {
        let (b, n, l, d) = z.dims4()?;
        z.reshape((b * n, l, d))?.apply(&self.out) // (B·N, L, D) -> (B·N, L, C)
    }
}
