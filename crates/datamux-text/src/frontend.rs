//! Token and position embeddings, `(B, N, L)` ids -> `(B, N, L, D)`, and the text backbone (the
//! core encoder, optionally behind a LayerNorm on the muxed sequence).
//!
//! Reference: RoBERTa's embedding block (word + position embeddings, LayerNorm, dropout), which
//! the reference multiplexes after (method.md §2). Positions count from 0 per instance; padding
//! positions are zeroed so they add nothing to the mix, and prefix slots take no positions.

use candle_core::{DType, Result, Tensor};
use candle_nn::VarBuilder;

use datamux_core::encoder::{self, Encoder};
use datamux_core::layers::{self, LayerNorm};
use datamux_core::model::{Backbone, Embedded, Frontend};

/// Token ids `(B, N, L)` u32 and padding flags `(B, N, L)` u8 (1 = padding).
#[derive(Clone, Debug)]
pub struct TextInput {
    pub ids: Tensor,
    pub pad: Tensor,
}

/// Parameter paths: `tokens.weight`, `positions.weight`, `norm.*`.
#[derive(Clone, Debug)]
pub struct TextFrontend {
    tokens: Tensor,
    positions: Tensor,
    norm: Option<LayerNorm>,
    dropout: f64,
    d: usize,
}

impl TextFrontend {
    pub fn new(
        vocab: usize,
        max_length: usize,
        d: usize,
        norm: bool,
        dropout: f64,
        eps: f64,
        vb: VarBuilder<'_>,
    ) -> Result<Self> {
        Ok(Self {
            tokens: layers::embedding_table(vocab, d, vb.pp("tokens"))?,
            positions: layers::embedding_table(max_length, d, vb.pp("positions"))?,
            norm: if norm {
                Some(LayerNorm::new(d, eps, vb.pp("norm"))?)
            } else {
                None
            },
            dropout,
            d,
        })
    }
}

impl Frontend for TextFrontend {
    type Input = TextInput;

    /// `(B, N, L)` -> `(B, N, L, D)`.
    fn embed(&self, input: &TextInput, train: bool) -> Result<Embedded> {
        let (b, n, l) = input.ids.dims3()?;
        let max = self.positions.dim(0)?;
        if l > max {
            candle_core::bail!("sequence length {l} exceeds the {max} position embeddings");
        }
        // (B·N·L) ids -> (B·N·L, D) -> (B, N, L, D)
        let tok = self
            .tokens
            .index_select(&input.ids.flatten_all()?, 0)?
            .reshape((b, n, l, self.d))?;
        let xs = tok.broadcast_add(&self.positions.narrow(0, 0, l)?)?; // + (L, D)
        let xs = match &self.norm {
            Some(norm) => norm.forward_t(&xs, train)?,
            None => xs,
        };
        let xs = layers::dropout(&xs, self.dropout, train)?;
        // Zero the padding: (B, N, L) -> (B, N, L, 1) keep-mask.
        let keep = (1.0 - input.pad.to_dtype(DType::F32)?)?.unsqueeze(3)?;
        Ok(Embedded {
            xs: xs.broadcast_mul(&keep)?,
            pad: Some(input.pad.clone()),
        })
    }

    fn hidden_size(&self) -> usize {
        self.d
    }
}

/// The core encoder, optionally behind a LayerNorm on the muxed input (`mux_norm`).
#[derive(Clone, Debug)]
pub struct TextBackbone {
    norm: Option<LayerNorm>,
    encoder: Encoder,
}

impl TextBackbone {
    pub fn new(cfg: &encoder::Config, mux_norm: bool, vb: VarBuilder<'_>) -> Result<Self> {
        let norm = if mux_norm {
            Some(LayerNorm::new(
                cfg.hidden_size,
                cfg.layer_norm_eps,
                vb.pp("mux_norm"),
            )?)
        } else {
            None
        };
        Ok(Self {
            norm,
            encoder: Encoder::new(cfg, vb)?,
        })
    }

    pub fn encoder(&self) -> &Encoder {
        &self.encoder
    }
}

impl Backbone for TextBackbone {
    fn forward_t(&self, xs: &Tensor, pad: Option<&Tensor>, train: bool) -> Result<Tensor> {
        match &self.norm {
            Some(norm) => self
                .encoder
                .forward_t(&norm.forward_t(xs, train)?, pad, train),
            None => self.encoder.forward_t(xs, pad, train),
        }
    }

    fn hidden_size(&self) -> usize {
        Backbone::hidden_size(&self.encoder)
    }

    fn name(&self) -> String {
        "the text transformer".into()
    }
}
