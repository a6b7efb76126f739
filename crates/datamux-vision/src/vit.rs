//! A Vision Transformer: non-overlapping patches, a linear patch embedding and learned position
//! embeddings, `(B, N, C, H, W) -> (B, N, L, D)` with `L = (H / p)·(W / p)`, then the core
//! encoder. The index prefix plays the role of ViT's CLS token, so there is none here.
//! Dosovitskiy et al., arXiv 2010.11929; the multiplexed ViT is an extension beyond the paper
//! (method.md §6.1).

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use datamux_core::encoder;
use datamux_core::layers::{self, LayerNorm, Linear};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub patch_size: usize,
    /// Channels of a 3x3 convolution (with ReLU) before patchifying; 0 for a plain ViT. Early
    /// convolutions make ViTs converge much faster on small data (Xiao et al. 2021,
    /// arXiv 2106.14881), which is what a CPU budget needs.
    pub conv_stem: usize,
    pub encoder: encoder::Config,
    /// What the head reads per slot. Left out of the serialised settings at `summary`, so runs
    /// made before it keep their ids.
    #[serde(skip_serializing_if = "Readout::is_summary")]
    pub readout: Readout,
}

/// What the classification head reads for slot i.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Readout {
    /// The demultiplexed summary position (the prefix, ViT's CLS token).
    #[default]
    Summary,
    /// The mean over the patch positions, each demultiplexed: the summary is one `D`-wide vector
    /// for all N slots, the patches are `L` of them (16 on MNIST).
    Mean,
}

impl Readout {
    pub fn is_summary(&self) -> bool {
        *self == Self::Summary
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            patch_size: 7, // 16 patches on MNIST: cheap enough for CPU sweeps
            conv_stem: 0,
            encoder: encoder::Config {
                num_hidden_layers: 4,
                hidden_size: 64,
                num_attention_heads: 4,
                intermediate_size: 128,
                hidden_dropout_prob: 0.0, // short budgets underfit first
                attention_probs_dropout_prob: 0.0,
                pre_layer_norm: true, // ViTs are pre-LN
                ..encoder::Config::base()
            },
            readout: Readout::Summary,
        }
    }
}

/// Patch and position embeddings, then a LayerNorm (CLIP's `ln_pre`), so the embeddings enter the
/// mux at unit scale like the demultiplexer's prefix rows; parameter paths `patch`, `positions`,
/// `norm`.
#[derive(Clone, Debug)]
pub struct PatchEmbedding {
    stem: Option<candle_nn::Conv2d>,
    patch: Linear,
    positions: Tensor,
    norm: LayerNorm,
    p: usize,
    d: usize,
}

impl PatchEmbedding {
    pub fn new(
        cfg: &Config,
        channels: usize,
        image_size: usize,
        vb: VarBuilder<'_>,
    ) -> Result<Self> {
        let p = cfg.patch_size;
        if p == 0 || image_size % p != 0 {
            candle_core::bail!("patch size {p} does not divide image size {image_size}");
        }
        let d = cfg.encoder.hidden_size;
        let l = (image_size / p) * (image_size / p);
        let stem = if cfg.conv_stem > 0 {
            let same = candle_nn::Conv2dConfig {
                padding: 1,
                ..Default::default()
            };
            Some(candle_nn::conv2d(
                channels,
                cfg.conv_stem,
                3,
                same,
                vb.pp("stem"),
            )?)
        } else {
            None
        };
        let c = if cfg.conv_stem > 0 {
            cfg.conv_stem
        } else {
            channels
        };
        Ok(Self {
            stem,
            patch: layers::linear(c * p * p, d, vb.pp("patch"))?,
            positions: layers::embedding_table(l, d, vb.pp("positions"))?,
            norm: LayerNorm::new(d, cfg.encoder.layer_norm_eps, vb.pp("norm"))?,
            p,
            d,
        })
    }

    pub fn hidden_size(&self) -> usize {
        self.d
    }

    /// `(B, N, C, H, W) -> (B, N, L, D)`.
    pub fn forward_t(&self, pixels: &Tensor, train: bool) -> Result<Tensor> {
        let (b, n, c, h, w) = pixels.dims5()?;
        let (p, gh, gw) = (self.p, h / self.p, w / self.p);
        let (pixels, c) = match &self.stem {
            Some(stem) => {
                // (B·N, C, H, W) -> (B·N, C', H, W), shared by every instance.
                let xs = pixels.reshape((b * n, c, h, w))?.apply(stem)?.relu()?;
                let c2 = xs.dim(1)?;
                (xs.reshape((b, n, c2, h, w))?, c2)
            }
            None => (pixels.clone(), c),
        };
        // (B·N, C, gh, p, gw, p) -> (B·N, gh, gw, C, p, p) -> (B·N, L, C·p·p)
        let patches = pixels
            .reshape((b * n, c, gh, p, gw, p))?
            .permute((0, 2, 4, 1, 3, 5))?
            .contiguous()?
            .reshape((b * n, gh * gw, c * p * p))?;
        let xs = layers::add_trailing(&patches.apply(&self.patch)?, &self.positions)?; // (B·N, L, D)
        self.norm
            .forward_t(&xs, train)?
            .reshape((b, n, gh * gw, self.d))
    }
}
