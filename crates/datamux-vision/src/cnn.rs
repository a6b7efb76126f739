//! CNNs on images. Frontend: a learned per-slot convolutional stem, the reference notebook's
//! `nonlinear-expand` multiplexer (conv 3x3, activation, conv 3x3, activation; one set of weights per
//! instance slot), `(B, N, C, H, W) -> (B, N, H·W, K)`; the core multiplexer then averages the N
//! stem outputs. Backbone: a LeNet-style or a small ResNet-style CNN, pooled to one vector,
//! `(B, H·W, K) -> (B, 1, D)`.
//!
//! Reference: `princeton-nlp/DataMUX`, `vision/vision_multiplexing.ipynb`, `MuxLeNet` with
//! `mod = "nonlinear-expand"` (method.md §3.2, §6.2). The stems' nonlinearity is a setting: the
//! notebook's tanh, which the MNIST experiment uses, or ReLU (the default, the earlier runs'
//! choice). ReLU stems are faster (candle's CPU tanh is a scalar libm call per element, a sixth of a
//! training step in a profile) but lose whole slots: at N = 4 (MNIST, 1000 steps of 64) two of
//! four ReLU slots stayed at chance (10.4 %, mean 52 %) where every tanh slot learned (83.6 -
//! 86.6 %, mean 85.3 %); without the output ReLU, 65.5 % with one slot at chance. Difference:
//! cross-entropy instead of MSE on ±1 targets.
//!
//! With `stem = "shared"` the frontend is instead one 3x3 convolution shared by every slot, with no
//! activation, `(B, N, C, H, W) -> (B, N, H·W, K)`, and the multiplexer's keys tell the instances
//! apart (MIMONets' MIMOConv binds after the first convolution, arXiv 2312.02829): `hrr` binds per
//! pixel over the K channels. Its per-instance cost is 9·C·K multiply-adds a pixel, where the
//! per-slot stems' is 9·(C·S + S·K) (S = `stem_hidden`): what an instance costs before the trunk
//! is what multiplexing cannot share.
//!
//! The N per-slot stems are one grouped convolution (`groups = N`) over the `(B, N·C, H, W)` stack, so no
//! loop over slots runs in the model code. Every convolution is [`crate::conv::Conv2d`]: im2col
//! as a custom op with its adjoint as backward, then matmuls (candle's own convolution trains
//! slowly on the CPU; an earlier im2col built from primitives was slower still, its backward
//! padding and adding one full-size gradient per kernel offset).

use candle_core::{Result, Tensor};
use candle_nn::{Conv2dConfig, VarBuilder};
use serde::{Deserialize, Serialize};

use datamux_core::layers::{self, Linear};

use crate::conv::Conv2d;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Hidden channels of each per-slot stem.
    pub stem_hidden: usize,
    /// Output channels `K` of each stem, the width that is multiplexed.
    pub stem_channels: usize,
    /// Channels of the trunk's stages.
    pub channels: Vec<usize>,
    /// Width `D` of the pooled output.
    #[serde(deserialize_with = "datamux_core::range::at_least_one")]
    pub hidden_size: usize,
    #[serde(deserialize_with = "datamux_core::range::probability")]
    pub dropout: f64,
    /// The stems' nonlinearity. Left out of the serialised settings when `relu`, so runs made
    /// before the field existed keep their settings hash (and are not recomputed).
    #[serde(skip_serializing_if = "StemActivation::is_relu")]
    pub stem_activation: StemActivation,
    /// Per-slot stems (the notebook's) or one shared convolution. Left out of the serialised
    /// settings when `per_slot`, so earlier runs keep their settings hash.
    #[serde(skip_serializing_if = "StemKind::is_per_slot")]
    pub stem: StemKind,
    /// ReLU after the trunk's output layer (the default). Off, the `D`-wide output is linear,
    /// which an unbinding demux (`hrr`, a linear map per slot) reads without the half of the
    /// superposition a ReLU zeroes. Left out of the serialised settings when on.
    #[serde(skip_serializing_if = "is_true")]
    pub out_relu: bool,
}

fn is_true(b: &bool) -> bool {
    *b
}

/// What turns each image into the `K`-channel map that is multiplexed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StemKind {
    /// Two 3x3 convolutions with weights of their own per slot (`stem_activation` after each).
    #[default]
    PerSlot,
    /// One 3x3 convolution `C -> K` shared by every slot, no activation; the mux's keys bind.
    Shared,
}

impl StemKind {
    pub fn is_per_slot(&self) -> bool {
        *self == Self::PerSlot
    }
}

/// Nonlinearity of the per-slot stems.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StemActivation {
    /// conv -> ReLU -> conv -> ReLU.
    Relu,
    /// conv -> ReLU -> conv: no activation on the stem's output.
    ReluLinear,
    /// conv -> tanh -> conv -> tanh, as the notebook.
    Tanh,
}

impl StemActivation {
    pub fn is_relu(&self) -> bool {
        *self == Self::Relu
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            stem_hidden: 16,        // the notebook's nonlinear stem
            stem_channels: 8,       // the notebook's nonlinear-expand width
            channels: vec![32, 64], // wider than LeNet's 10/16, for the capacity large N needs
            hidden_size: 128,
            dropout: 0.0,
            // What every run before the field had; experiments choose `tanh` (experiments/mnist.toml).
            stem_activation: StemActivation::Relu,
            stem: StemKind::PerSlot,
            out_relu: true,
        }
    }
}

/// Per-slot stems as grouped convolutions, or one shared convolution.
#[derive(Clone, Debug)]
pub struct ConvStem {
    conv1: Conv2d,
    /// The per-slot stems' second convolution; `None` for the shared stem.
    conv2: Option<Conv2d>,
    n: usize,
    k: usize,
    act: StemActivation,
}

impl ConvStem {
    pub fn new(cfg: &Config, n: usize, channels: usize, vb: VarBuilder<'_>) -> Result<Self> {
        let k = cfg.stem_channels;
        if cfg.stem == StemKind::Shared {
            let same = Conv2dConfig {
                padding: 1,
                ..Default::default()
            };
            return Ok(Self {
                conv1: Conv2d::new(channels, k, 3, same, vb.pp("stem"))?,
                conv2: None,
                n,
                k,
                act: cfg.stem_activation,
            });
        }
        let grouped = Conv2dConfig {
            padding: 1,
            groups: n,
            ..Default::default()
        };
        Ok(Self {
            conv1: Conv2d::new(
                n * channels,
                n * cfg.stem_hidden,
                3,
                grouped,
                vb.pp("stem1"),
            )?,
            conv2: Some(Conv2d::new(
                n * cfg.stem_hidden,
                n * k,
                3,
                grouped,
                vb.pp("stem2"),
            )?),
            n,
            k,
            act: cfg.stem_activation,
        })
    }

    pub fn hidden_size(&self) -> usize {
        self.k
    }

    /// `(B, N, C, H, W) -> (B, N, H·W, K)`.
    pub fn forward(&self, pixels: &Tensor) -> Result<Tensor> {
        let (b, n, c, h, w) = pixels.dims5()?;
        if n != self.n {
            candle_core::bail!("stem built for N = {}, got {:?}", self.n, pixels.shape());
        }
        let Some(conv2) = &self.conv2 else {
            // (B, N, C, H, W) -> (B·N, C, H, W) -> (B, H·W, N, K), one set of weights, each
            // pixel's N maps side by side as the hrr mux's matmul reads them, returned as its
            // (B, N, H·W, K) view: the mux's transpose back to (B, H·W, N, K) copies nothing.
            let xs = self
                .conv1
                .channels_last_slots(&pixels.reshape((b * n, c, h, w))?, n)?;
            return xs.transpose(1, 2); // (B, N, H·W, K)
        };
        let xs = pixels.reshape((b, n * c, h, w))?; // slot i owns channels i·C..(i+1)·C
        let xs = match self.act {
            StemActivation::Relu => xs.apply(&self.conv1)?.relu()?.apply(conv2)?.relu()?,
            StemActivation::ReluLinear => xs.apply(&self.conv1)?.relu()?.apply(conv2)?,
            StemActivation::Tanh => xs.apply(&self.conv1)?.tanh()?.apply(conv2)?.tanh()?,
        }; // (B, N·K, H, W)
        // (B, N·K, H, W) -> (B, N, K, H·W) -> (B, N, H·W, K)
        xs.reshape((b, n, self.k, h * w))?
            .transpose(2, 3)?
            .contiguous()
    }
}

impl ConvStem {
    /// One convolution shared by every slot (`stem = "shared"`), linear.
    pub fn is_shared(&self) -> bool {
        self.conv2.is_none()
    }

    /// The shared stem and a mux that is one matrix `maps` `(N·K, D)` in one linear map,
    /// `(B, N, C, H, W) -> (B, H·W, D)` = `[stem(x₁) … stem(x_N)] · maps` per pixel, the maps
    /// folded into the kernel ([`Conv2d::channels_last_mapped`]). `None` for per-slot stems
    /// (nonlinear) and where the convolution has no such path.
    pub fn forward_mapped(&self, pixels: &Tensor, maps: &Tensor) -> Result<Option<Tensor>> {
        let (b, n, c, h, w) = pixels.dims5()?;
        if n != self.n || !self.is_shared() {
            return Ok(None);
        }
        // (B, N, C, H, W) -> (B·N, C, H, W)
        self.conv1
            .channels_last_mapped(&pixels.reshape((b * n, c, h, w))?, n, maps)
    }
}

/// Which trunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trunk {
    /// conv-ReLU-maxpool per stage, then a linear layer on the flattened map.
    Lenet,
    /// a residual block per stage, stride-2 convolutions between stages, global average pooling.
    Resnet,
}

#[derive(Clone, Debug)]
struct Residual {
    conv1: Conv2d,
    conv2: Conv2d,
}

impl Residual {
    fn new(c: usize, vb: VarBuilder<'_>) -> Result<Self> {
        let same = Conv2dConfig {
            padding: 1,
            ..Default::default()
        };
        Ok(Self {
            conv1: Conv2d::new(c, c, 3, same, vb.pp("conv1"))?,
            conv2: Conv2d::new(c, c, 3, same, vb.pp("conv2"))?,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let y = xs.apply(&self.conv1)?.relu()?.apply(&self.conv2)?;
        (xs + y)?.relu()
    }
}

/// ref: `MuxLeNet`'s trunk (conv, pool, conv, pool, dense) in the notebook.
#[derive(Clone, Debug)]
pub struct Cnn {
    trunk: Trunk,
    convs: Vec<Conv2d>,
    blocks: Vec<Residual>,
    out: Linear,
    side: usize,
    k: usize,
    d: usize,
    dropout: f64,
    out_relu: bool,
}

impl Cnn {
    pub fn new(cfg: &Config, trunk: Trunk, image_size: usize, vb: VarBuilder<'_>) -> Result<Self> {
        if cfg.channels.is_empty() {
            candle_core::bail!("the CNN needs at least one stage in `channels`");
        }
        let mut convs = Vec::new();
        let mut blocks = Vec::new();
        let mut c_in = cfg.stem_channels;
        let mut side = image_size;
        for (i, &c) in cfg.channels.iter().enumerate() {
            let vb = vb.pp("stages").pp(i);
            match trunk {
                Trunk::Lenet => {
                    let same = Conv2dConfig {
                        padding: 1,
                        ..Default::default()
                    };
                    convs.push(Conv2d::new(c_in, c, 3, same, vb.pp("conv"))?);
                    side /= 2; // max-pool 2
                }
                Trunk::Resnet => {
                    // The first stage keeps the size; later ones halve it with a stride.
                    let stride = if i == 0 { 1 } else { 2 };
                    let cfg = Conv2dConfig {
                        padding: 1,
                        stride,
                        ..Default::default()
                    };
                    convs.push(Conv2d::new(c_in, c, 3, cfg, vb.pp("conv"))?);
                    blocks.push(Residual::new(c, vb.pp("block"))?);
                    if i > 0 {
                        side = side.div_ceil(2);
                    }
                }
            }
            c_in = c;
            if side == 0 {
                candle_core::bail!(
                    "image size {image_size} is too small for {} stages",
                    cfg.channels.len()
                );
            }
        }
        let flat = match trunk {
            Trunk::Lenet => c_in * side * side,
            Trunk::Resnet => c_in, // global average pooling
        };
        Ok(Self {
            trunk,
            convs,
            blocks,
            out: candle_nn::linear(flat, cfg.hidden_size, vb.pp("out"))?.into(),
            side: image_size,
            k: cfg.stem_channels,
            d: cfg.hidden_size,
            dropout: cfg.dropout,
            out_relu: cfg.out_relu,
        })
    }

    pub fn hidden_size(&self) -> usize {
        self.d
    }

    /// `(B, H·W, K) -> (B, 1, D)`.
    pub fn forward_t(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        let (b, l, k) = xs.dims3()?;
        if l != self.side * self.side || k != self.k {
            candle_core::bail!(
                "CNN expects (B, {}, {}), got {:?}",
                self.side * self.side,
                self.k,
                xs.shape()
            );
        }
        // (B, H·W, K) -> (B, K, H·W) -> (B, K, H, W)
        let mut xs = xs
            .transpose(1, 2)?
            .contiguous()?
            .reshape((b, k, self.side, self.side))?;
        for (i, conv) in self.convs.iter().enumerate() {
            xs = xs.apply(conv)?.relu()?;
            xs = match self.trunk {
                Trunk::Lenet => xs.max_pool2d(2)?,
                Trunk::Resnet => self.blocks[i].forward(&xs)?,
            };
        }
        let flat = match self.trunk {
            Trunk::Lenet => xs.flatten_from(1)?, // (B, C·H'·W')
            Trunk::Resnet => xs.mean((2, 3))?,   // (B, C)
        };
        let ys = layers::dropout(&flat, self.dropout, train)?.apply(&self.out)?;
        let ys = if self.out_relu { ys.relu()? } else { ys };
        ys.unsqueeze(1) // (B, 1, D)
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device};
    use datamux_core::SeededVarMap;

    use super::*;

    /// The shared stem: one set of weights whatever N, `(B, N, C, H, W) -> (B, N, H·W, K)`, and
    /// an image gives the same map in every slot.
    #[test]
    fn a_shared_stem_maps_every_slot_with_the_same_weights() -> Result<()> {
        let cfg = Config {
            stem: StemKind::Shared,
            stem_channels: 5,
            ..Config::default()
        };
        let (b, n, c, side) = (2, 3, 1, 7);
        let map = SeededVarMap::new(0);
        let stem = ConvStem::new(&cfg, n, c, map.var_builder(DType::F32, &Device::Cpu))?;
        // 9·C·K weights and K biases: nothing per slot.
        let params: usize = map
            .sorted_vars()?
            .iter()
            .map(|(_, v)| v.as_tensor().elem_count())
            .sum();
        assert_eq!(params, 9 * c * 5 + 5);
        let img = Tensor::randn(0f32, 1.0, (1, 1, c, side, side), &Device::Cpu)?;
        let xs = img.repeat((b, n, 1, 1, 1))?;
        let ys = stem.forward(&xs)?;
        assert_eq!(ys.dims(), [b, n, side * side, 5]);
        let first = ys.narrow(1, 0, 1)?;
        let last = ys.narrow(1, n - 1, 1)?;
        let diff = (first - last)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert_eq!(diff, 0.0);
        // Distinct images keep their slots: slot (1, 2)'s map is that image's alone.
        let xs = Tensor::randn(0f32, 1.0, (b, n, c, side, side), &Device::Cpu)?;
        let one = stem.forward(
            &xs.narrow(0, 1, 1)?
                .narrow(1, 2, 1)?
                .repeat((1, n, 1, 1, 1))?,
        )?;
        let diff = (stem.forward(&xs)?.get(1)?.get(2)? - one.get(0)?.get(0)?)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        assert!(diff < 1e-6, "{diff}");
        // Channels last is the (B, K, H, W) convolution transposed.
        let want = img
            .reshape((1, c, side, side))?
            .apply(&stem.conv1)? // (1, K, H, W)
            .reshape((5, side * side))?
            .t()?;
        let got = ys.get(0)?.get(0)?; // (H·W, K)
        let diff = (got - want)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-6, "{diff}");
        Ok(())
    }

    /// At inference the shared stem folds a matrix mux into its kernel: the same `(B, H·W, K)`
    /// as the stem, then the mux (hrr, learned keys written off their start; random_ortho).
    #[test]
    fn the_stem_and_a_matrix_mux_fold_into_one_map() -> Result<()> {
        use datamux_core::mux::{self, Multiplexer, MuxKind};
        let cfg = Config {
            stem: StemKind::Shared,
            stem_channels: 6,
            ..Config::default()
        };
        let (b, n, c, side) = (2, 3, 1, 5);
        let dev = Device::Cpu;
        let xs = Tensor::randn(0f32, 1.0, (b, n, c, side, side), &dev)?;
        for kind in [MuxKind::Hrr, MuxKind::RandomOrtho] {
            let map = SeededVarMap::new(1);
            let vb = map.var_builder(DType::F32, &dev);
            let stem = ConvStem::new(&cfg, n, c, vb.pp("stem"))?;
            let learned = mux::Config {
                learn: true,
                ..mux::Config::with_kind(kind)
            };
            let m = Multiplexer::new(&learned, n, 6, 1, vb.pp("mux"))?;
            let delta = map.varmap().data().lock().unwrap()["mux.delta"].clone();
            delta.set(&Tensor::randn(0f32, 0.1, delta.shape(), &dev)?)?;
            let want = m.forward(&stem.forward(&xs)?)?; // (B, H·W, K)
            let maps = m.slot_maps()?.expect("a matrix mux");
            let got = stem
                .forward_mapped(&xs, &maps)?
                .expect("the shared stem folds");
            let diff = (got - &want)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(diff < 1e-4, "{kind:?}: {diff}");
        }
        Ok(())
    }

    /// `out_relu = false` leaves the trunk's output linear: the same weights give the ReLU'd
    /// output's positive part and negative values besides, `(B, H·W, K) -> (B, 1, D)`.
    #[test]
    fn the_output_relu_is_a_setting() -> Result<()> {
        let (side, k, d) = (5, 3, 7);
        let xs = Tensor::randn(0f32, 1.0, (2, side * side, k), &Device::Cpu)?;
        let out = |out_relu| -> Result<Tensor> {
            let cfg = Config {
                stem_channels: k,
                channels: vec![4],
                hidden_size: d,
                out_relu,
                ..Config::default()
            };
            let map = SeededVarMap::new(0);
            let cnn = Cnn::new(
                &cfg,
                Trunk::Lenet,
                side,
                map.var_builder(DType::F32, &Device::Cpu),
            )?;
            cnn.forward_t(&xs, false)
        };
        let (relu, linear) = (out(true)?, out(false)?);
        assert_eq!(linear.dims(), [2, 1, d]);
        assert!(linear.min_all()?.to_scalar::<f32>()? < 0.0);
        let diff = (linear.relu()? - relu)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        assert_eq!(diff, 0.0);
        Ok(())
    }
}
