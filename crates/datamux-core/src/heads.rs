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
        let z = one_per_instance(z, "sequence")?; // (B·N, D)
        z.apply(&self.dense)?.gelu_erf()?.apply(&self.out)
    }
}

/// `(B, N, 1, D) -> (B·N, D)` for a head that reads one position per instance; another `L` is
/// an error naming the `head`.
fn one_per_instance(z: &Tensor, head: &str) -> Result<Tensor> {
    let (b, n, l, d) = z.dims4()?;
    if l != 1 {
        candle_core::bail!(
            "{head} head expects one position per instance, got {:?}",
            z.shape()
        );
    }
    z.reshape((b * n, d))
}

/// An instance embedding: `e = z + E·z + e₀` on one position per instance, the embedding
/// tasks' head (a cosine loss to a target embedding). The residual makes it start near the
/// identity (`E` is small at initialisation), so that a readout which already is the
/// embedding, a pretrained encoder's mean at N = 1, starts at its target.
#[derive(Clone, Debug)]
pub struct EmbeddingHead {
    out: Linear,
}

impl EmbeddingHead {
    pub fn new(d: usize, vb: VarBuilder<'_>) -> Result<Self> {
        Ok(Self {
            out: layers::linear(d, d, vb.pp("embedding"))?,
        })
    }

    /// `(B, N, 1, D) -> (B·N, D)`.
    pub fn forward(&self, z: &Tensor) -> Result<Tensor> {
        let z = one_per_instance(z, "embedding")?; // (B·N, D)
        z.apply(&self.out)? + z
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

/// A mean readout for [`SequenceHead`]: demultiplexed `(B, N, L, D)` and padding flags
/// `(B, N, L)` (1 = padding) -> `(B, N, 1, D)`, the mean over each instance's own positions. An
/// all-padding (dummy) instance gives zeros.
///
/// The sum is one batched matmul with a 0/1 row, as in `mux::slot_mean`: candle's reduction
/// over a non-last axis took 7.3 ms where this takes 0.35 ms, with the same result (B = 16,
/// N = 10, L = 64, D = 128, one thread), and it runs on every step of the mean readout.
pub fn masked_mean(z: &Tensor, pad: &Tensor) -> Result<Tensor> {
    let (b, n, l, d) = z.dims4()?;
    let keep = pad.ones_like()?.sub(pad)?.to_dtype(z.dtype())?; // (B, N, L)
    let count = keep.sum_keepdim(2)?.clamp(1f32, f32::MAX)?; // (B, N, 1)
    let rows = keep.reshape((b * n, 1, l))?; // (B·N, 1, L)
    let z = z.contiguous()?.reshape((b * n, l, d))?; // (B·N, L, D)
    let sum = rows.matmul(&z)?.reshape((b, n, 1, d))?; // (B·N, 1, D) -> (B, N, 1, D)
    sum.broadcast_div(&count.unsqueeze(3)?)
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    #[test]
    fn masked_mean_averages_each_instances_own_positions() {
        // B = 1, N = 3, L = 3, D = 2; instance 0 keeps 2 positions, 1 keeps 3, 2 is a dummy.
        let z: Vec<f32> = (0..18).map(|v| v as f32).collect();
        let z = Tensor::from_vec(z, (1, 3, 3, 2), &Device::Cpu).unwrap();
        let pad =
            Tensor::from_vec(vec![0u8, 0, 1, 0, 0, 0, 1, 1, 1], (1, 3, 3), &Device::Cpu).unwrap();
        let m = masked_mean(&z, &pad).unwrap();
        assert_eq!(m.dims(), [1, 3, 1, 2]);
        let got: Vec<f32> = m.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(got, [1.0, 2.0, 8.0, 9.0, 0.0, 0.0]);
    }
}
