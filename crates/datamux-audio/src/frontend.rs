//! Frames `(B, N, L, F)` -> embeddings `(B, N, L, D)`: a linear projection of each frame, plus a
//! learned position embedding, LayerNorm and dropout; padding positions are zeroed so they add
//! nothing to the mix, and the padding mask goes to the encoder.
//!
//! The frame analogue of text's embedding block (method.md §2): multiplexing happens after it.

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

use datamux_core::layers::{self, Linear, PositionEmbedding};
use datamux_core::model::{Embedded, Frontend};

/// Normalised frames `(B, N, L, F)` f32 (zeros at padding) and padding flags `(B, N, L)` u8
/// (1 = padding).
#[derive(Clone, Debug)]
pub struct FrameInput {
    pub frames: Tensor,
    pub pad: Tensor,
}

/// Parameter paths: `proj.{weight,bias}`, `positions.weight`, `norm.*`.
#[derive(Clone, Debug)]
pub struct FrameFrontend {
    proj: Linear,
    tail: PositionEmbedding,
    d: usize,
}

impl FrameFrontend {
    /// `dim` numbers a frame, at most `max_frames` frames, width `d`.
    pub fn new(
        dim: usize,
        max_frames: usize,
        d: usize,
        norm: bool,
        dropout: f64,
        eps: f64,
        vb: VarBuilder<'_>,
    ) -> Result<Self> {
        Ok(Self {
            proj: layers::linear(dim, d, vb.pp("proj"))?,
            tail: PositionEmbedding::new(max_frames, d, norm, dropout, eps, vb)?,
            d,
        })
    }
}

impl Frontend for FrameFrontend {
    type Input = FrameInput;

    /// `(B, N, L, F)` -> `(B, N, L, D)`.
    fn embed(&self, input: &FrameInput, train: bool) -> Result<Embedded> {
        let (b, n, l, f) = input.frames.dims4()?;
        self.tail.check_len(l)?;
        // (B·N·L, F) -> (B·N·L, D) -> (B, N, L, D)
        let xs = input
            .frames
            .reshape((b * n * l, f))?
            .apply(&self.proj)?
            .reshape((b, n, l, self.d))?;
        self.tail.forward_t(&xs, &input.pad, train)
    }

    fn hidden_size(&self) -> usize {
        self.d
    }
}
