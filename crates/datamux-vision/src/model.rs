//! The vision architectures as one frontend enum and one backbone enum, so the runner builds a
//! single concrete `MuxNet<VisionFrontend, VisionBackbone>` with one `match` on the architecture.

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use datamux_core::encoder::Encoder;
use datamux_core::model::{Backbone, Embedded, Frontend};

use crate::cnn::{self, Cnn, ConvStem, Trunk};
use crate::image::ImageSpec;
use crate::mlp::{self, Mlp, PixelEmbedding};
use crate::vit::{self, PatchEmbedding};

/// The backbone family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Arch {
    Mlp,
    Lenet,
    Resnet,
    Vit,
}

impl Arch {
    pub fn name(self) -> &'static str {
        match self {
            Self::Mlp => "mlp",
            Self::Lenet => "lenet",
            Self::Resnet => "resnet",
            Self::Vit => "vit",
        }
    }

    /// Whether the backbone keeps positions (and so takes a demux prefix).
    pub fn is_sequence(self) -> bool {
        self == Self::Vit
    }
}

/// Sizes of every family; only the chosen one is used.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub mlp: mlp::Config,
    pub cnn: cnn::Config,
    pub vit: vit::Config,
}

impl Config {
    /// Width of what is multiplexed, and of the backbone output.
    pub fn widths(&self, arch: Arch) -> (usize, usize) {
        match arch {
            Arch::Mlp => (self.mlp.hidden_size, self.mlp.hidden_size),
            Arch::Lenet | Arch::Resnet => (self.cnn.stem_channels, self.cnn.hidden_size),
            Arch::Vit => (self.vit.encoder.hidden_size, self.vit.encoder.hidden_size),
        }
    }

    pub fn validate(&self, arch: Arch, spec: &ImageSpec) -> std::result::Result<(), String> {
        spec.validate()?;
        match arch {
            Arch::Vit => {
                let p = self.vit.patch_size;
                if p == 0 || spec.size % p != 0 {
                    return Err(format!(
                        "patch size {p} does not divide image size {}",
                        spec.size
                    ));
                }
                self.vit.encoder.validate().map_err(|e| e.to_string())
            }
            Arch::Lenet | Arch::Resnet if self.cnn.channels.is_empty() => {
                Err("cnn.channels needs at least one stage".into())
            }
            Arch::Lenet if spec.size >> self.cnn.channels.len() == 0 => Err(format!(
                "image size {} is too small for {} pooling stages",
                spec.size,
                self.cnn.channels.len()
            )),
            _ => Ok(()),
        }
    }
}

/// A batch of images: `(B, N, C, H, W)` normalised pixels.
#[derive(Clone, Debug)]
pub struct ImageInput {
    pub pixels: Tensor,
}

#[derive(Clone, Debug)]
pub enum VisionFrontend {
    Pixels(PixelEmbedding),
    Stem(ConvStem),
    Patches(PatchEmbedding),
}

impl VisionFrontend {
    pub fn new(
        arch: Arch,
        cfg: &Config,
        spec: &ImageSpec,
        n: usize,
        vb: VarBuilder<'_>,
    ) -> Result<Self> {
        Ok(match arch {
            Arch::Mlp => Self::Pixels(PixelEmbedding::new(&cfg.mlp, spec.pixels(), vb)?),
            Arch::Lenet | Arch::Resnet => {
                Self::Stem(ConvStem::new(&cfg.cnn, n, spec.channels, vb)?)
            }
            Arch::Vit => {
                Self::Patches(PatchEmbedding::new(&cfg.vit, spec.channels, spec.size, vb)?)
            }
        })
    }
}

impl Frontend for VisionFrontend {
    type Input = ImageInput;

    /// `(B, N, C, H, W)` -> `(B, N, L, D)`; images have no padding.
    fn embed(&self, input: &ImageInput, train: bool) -> Result<Embedded> {
        let xs = match self {
            Self::Pixels(f) => f.forward(&input.pixels)?,
            Self::Stem(f) => f.forward(&input.pixels)?,
            Self::Patches(f) => f.forward_t(&input.pixels, train)?,
        };
        Ok(Embedded { xs, pad: None })
    }

    /// The shared stem folds the mux's maps into its kernel; other frontends take two steps.
    fn embed_mapped(
        &self,
        input: &ImageInput,
        maps: &dyn Fn() -> Result<Tensor>,
    ) -> Result<Option<Embedded>> {
        let xs = match self {
            Self::Stem(f) if f.is_shared() => f.forward_mapped(&input.pixels, &maps()?)?,
            Self::Stem(_) | Self::Pixels(_) | Self::Patches(_) => None,
        };
        Ok(xs.map(|xs| Embedded { xs, pad: None }))
    }

    fn hidden_size(&self) -> usize {
        match self {
            Self::Pixels(f) => f.hidden_size(),
            Self::Stem(f) => f.hidden_size(),
            Self::Patches(f) => f.hidden_size(),
        }
    }
}

#[derive(Clone, Debug)]
pub enum VisionBackbone {
    Mlp(Mlp),
    Cnn(Cnn),
    Vit(Encoder),
}

impl VisionBackbone {
    pub fn new(arch: Arch, cfg: &Config, spec: &ImageSpec, vb: VarBuilder<'_>) -> Result<Self> {
        Ok(match arch {
            Arch::Mlp => Self::Mlp(Mlp::new(&cfg.mlp, vb)?),
            Arch::Lenet => Self::Cnn(Cnn::new(&cfg.cnn, Trunk::Lenet, spec.size, vb)?),
            Arch::Resnet => Self::Cnn(Cnn::new(&cfg.cnn, Trunk::Resnet, spec.size, vb)?),
            Arch::Vit => Self::Vit(Encoder::new(&cfg.vit.encoder, vb)?),
        })
    }
}

impl Backbone for VisionBackbone {
    fn forward_t(&self, xs: &Tensor, pad: Option<&Tensor>, train: bool) -> Result<Tensor> {
        match self {
            Self::Mlp(m) => m.forward_t(xs, train),
            Self::Cnn(m) => m.forward_t(xs, train),
            Self::Vit(m) => m.forward_t(xs, pad, train),
        }
    }

    fn hidden_size(&self) -> usize {
        match self {
            Self::Mlp(m) => m.hidden_size(),
            Self::Cnn(m) => m.hidden_size(),
            Self::Vit(m) => Backbone::hidden_size(m),
        }
    }

    fn is_sequence(&self) -> bool {
        matches!(self, Self::Vit(_))
    }

    fn forward_flops(&self, rows: usize, len: usize) -> Option<f64> {
        match self {
            Self::Vit(m) => m.forward_flops(rows, len),
            Self::Mlp(_) | Self::Cnn(_) => None,
        }
    }

    fn forward_prefix(
        &self,
        xs: &Tensor,
        pad: Option<&Tensor>,
        train: bool,
        rows: usize,
    ) -> Result<Tensor> {
        match self {
            Self::Vit(m) => m.forward_prefix(xs, pad, train, rows),
            _ => self.forward_t(xs, pad, train)?.narrow(1, 0, rows),
        }
    }

    fn prefix_flops(&self, rows: usize, len: usize, keep: usize) -> Option<f64> {
        match self {
            Self::Vit(m) => m.prefix_flops(rows, len, keep),
            Self::Mlp(_) | Self::Cnn(_) => None,
        }
    }

    fn name(&self) -> String {
        match self {
            Self::Mlp(_) => "the MLP".into(),
            Self::Cnn(_) => "the CNN".into(),
            Self::Vit(_) => "the ViT".into(),
        }
    }
}
