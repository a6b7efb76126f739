//! An MLP on pixels. Frontend: one linear embedding of the flattened image shared by every
//! instance, `(B, N, C, H, W) -> (B, N, 1, D)`; the core multiplexer's keys then tell the
//! instances apart (a Gaussian key after a shared linear map is a per-instance linear map).
//! Backbone: `num_layers` x (Linear, GELU, dropout), `(B, 1, D) -> (B, 1, D)`.
//!
//! The paper's MLP architecture is unconfirmed (method.md §6.2); this one is ours.

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use datamux_core::layers::{self, Linear};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    #[serde(deserialize_with = "datamux_core::range::at_least_one")]
    pub hidden_size: usize,
    pub num_layers: usize,
    #[serde(deserialize_with = "datamux_core::range::probability")]
    pub dropout: f64,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            hidden_size: 256, // wide enough for MNIST at N = 1 to reach ~98 %
            num_layers: 2,    // two hidden layers after the embedding
            dropout: 0.0,     // short CPU budgets underfit before they overfit
        }
    }
}

/// `(B, N, C, H, W) -> (B, N, 1, D)`.
#[derive(Clone, Debug)]
pub struct PixelEmbedding {
    proj: Linear,
    d: usize,
}

impl PixelEmbedding {
    pub fn new(cfg: &Config, pixels: usize, vb: VarBuilder<'_>) -> Result<Self> {
        Ok(Self {
            proj: candle_nn::linear(pixels, cfg.hidden_size, vb.pp("proj"))?.into(),
            d: cfg.hidden_size,
        })
    }

    pub fn hidden_size(&self) -> usize {
        self.d
    }

    pub fn forward(&self, pixels: &Tensor) -> Result<Tensor> {
        let (b, n, c, h, w) = pixels.dims5()?;
        // (B, N, C, H, W) -> (B, N, 1, C·H·W) -> (B, N, 1, D)
        pixels.reshape((b, n, 1, c * h * w))?.apply(&self.proj)
    }
}

/// ref: none in the reference code (its MLP experiments are not published).
#[derive(Clone, Debug)]
pub struct Mlp {
    layers: Vec<Linear>,
    dropout: f64,
    d: usize,
}

impl Mlp {
    pub fn new(cfg: &Config, vb: VarBuilder<'_>) -> Result<Self> {
        let layers = (0..cfg.num_layers)
            .map(|i| {
                candle_nn::linear(cfg.hidden_size, cfg.hidden_size, vb.pp("layers").pp(i))
                    .map(Linear::from)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            layers,
            dropout: cfg.dropout,
            d: cfg.hidden_size,
        })
    }

    pub fn hidden_size(&self) -> usize {
        self.d
    }

    /// `(B, 1, D) -> (B, 1, D)`.
    pub fn forward_t(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        let mut xs = xs.gelu_erf()?;
        for layer in &self.layers {
            xs = layers::dropout(&xs.apply(layer)?.gelu_erf()?, self.dropout, train)?;
        }
        Ok(xs)
    }
}
