//! A 2-D convolution as im2col + one matmul, for training on the CPU.
//!
//! Why not `candle_nn::Conv2d` (still used off the CPU or for other dtypes): in candle-core 0.11.1 the gradient of a
//! convolution's input is a `conv_transpose2d`, which the CPU backend runs as a direct loop of
//! short dot products, and the kernel's gradient a convolution of the whole batch with the
//! output gradient as kernel. On the MNIST CNN that was about two thirds of a training step
//! (docs/performance.md). Here the patches are gathered by a custom op ([`Im2Col`]) whose
//! backward is its adjoint ([`Col2Im`], patches summed back into the image), so every
//! multiply-add, forward and backward, is a matmul. The parameters are candle-nn's (`weight`
//! `(C_out, C_in / G, k, k)`, `bias` `(C_out)`, its initialisation), so checkpoints are the same.
//! Grouped convolutions are one batched matmul over the groups.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, Layout, Module, Result, Shape, Tensor};
use candle_nn::{Conv2dConfig, VarBuilder};

use datamux_core::layers;

/// Geometry of a square-kernel convolution on `(C, H, W)` images.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Geometry {
    c: usize,
    h: usize,
    w: usize,
    k: usize,
    pad: usize,
    stride: usize,
}

impl Geometry {
    fn out_hw(&self) -> (usize, usize) {
        let o = |s: usize| (s + 2 * self.pad - self.k) / self.stride + 1;
        (o(self.h), o(self.w))
    }

    /// Columns of one patch, `C·k·k`, in the order of a `(C, k, k)` kernel.
    fn patch(&self) -> usize {
        self.c * self.k * self.k
    }

    /// For each (output position, patch column), row-major as `(Ho·Wo, C·k·k)`, the flat
    /// `(C, H, W)` index it reads, or `u32::MAX` in the padding. Built once per call and shared
    /// by every image of the batch; both directions use it.
    fn sources(&self) -> Vec<u32> {
        let (ho, wo) = self.out_hw();
        let mut out = Vec::with_capacity(ho * wo * self.patch());
        for oy in 0..ho {
            for ox in 0..wo {
                for c in 0..self.c {
                    for ky in 0..self.k {
                        let y = (oy * self.stride + ky).checked_sub(self.pad);
                        for kx in 0..self.k {
                            let x = (ox * self.stride + kx).checked_sub(self.pad);
                            out.push(match (y, x) {
                                (Some(y), Some(x)) if y < self.h && x < self.w => {
                                    ((c * self.h + y) * self.w + x) as u32
                                }
                                _ => u32::MAX,
                            });
                        }
                    }
                }
            }
        }
        out
    }
}

fn f32_contiguous<'a>(storage: &'a CpuStorage, layout: &Layout, op: &str) -> Result<&'a [f32]> {
    let CpuStorage::F32(data) = storage else {
        candle_core::bail!("{op}: f32 only, got {:?}", storage.dtype());
    };
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("{op}: the input must be contiguous"),
    }
}

/// `(B, C, H, W) -> (B, Ho·Wo, C·k·k)`: the patch under each output position.
struct Im2Col(Geometry);

/// The adjoint of [`Im2Col`]: `(B, Ho·Wo, C·k·k) -> (B, C, H, W)`, every patch entry added back
/// to the pixel it came from.
struct Col2Im(Geometry);

impl CustomOp1 for Im2Col {
    fn name(&self) -> &'static str {
        "im2col"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = self.0;
        let src = f32_contiguous(storage, layout, self.name())?;
        let (b, c, h, w) = layout.shape().dims4()?;
        if (c, h, w) != (g.c, g.h, g.w) {
            candle_core::bail!("im2col built for {:?}, got {:?}", g, layout.shape());
        }
        let (ho, wo) = g.out_hw();
        let per_out = ho * wo * g.patch();
        let sources = g.sources();
        let mut dst = Vec::with_capacity(b * per_out);
        for img in src.chunks_exact(c * h * w) {
            dst.extend(
                sources
                    .iter()
                    .map(|&at| img.get(at as usize).copied().unwrap_or(0.0)),
            );
        }
        Ok((CpuStorage::F32(dst), Shape::from((b, ho * wo, g.patch()))))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad.contiguous()?.apply_op1(Col2Im(self.0))?))
    }
}

impl CustomOp1 for Col2Im {
    fn name(&self) -> &'static str {
        "col2im"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = self.0;
        let src = f32_contiguous(storage, layout, self.name())?;
        let (b, p, cols) = layout.shape().dims3()?;
        let (ho, wo) = g.out_hw();
        if (p, cols) != (ho * wo, g.patch()) {
            candle_core::bail!("col2im built for {:?}, got {:?}", g, layout.shape());
        }
        let per_img = g.c * g.h * g.w;
        let sources = g.sources();
        let mut dst = vec![0f32; b * per_img];
        for (patches, img) in src
            .chunks_exact(p * cols)
            .zip(dst.chunks_exact_mut(per_img))
        {
            for (&at, &v) in sources.iter().zip(patches) {
                if let Some(px) = img.get_mut(at as usize) {
                    *px += v;
                }
            }
        }
        Ok((CpuStorage::F32(dst), Shape::from((b, g.c, g.h, g.w))))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad.contiguous()?.apply_op1(Im2Col(self.0))?))
    }
}

/// A square-kernel 2-D convolution with bias, `(B, C_in, H, W) -> (B, C_out, Ho, Wo)`: candle-nn's
/// layer, whose parameters the CPU path uses as they are.
#[derive(Clone, Debug)]
pub struct Conv2d {
    inner: candle_nn::Conv2d,
}

impl Conv2d {
    /// candle-nn's parameters and initialisation (`candle_nn::conv2d`); dilation 1 only.
    pub fn new(
        c_in: usize,
        c_out: usize,
        k: usize,
        cfg: Conv2dConfig,
        vb: VarBuilder<'_>,
    ) -> Result<Self> {
        if cfg.dilation != 1 || cfg.groups == 0 || c_in % cfg.groups != 0 {
            candle_core::bail!("conv2d: dilation 1 and groups dividing C_in only, got {cfg:?}");
        }
        Ok(Self {
            inner: candle_nn::conv2d(c_in, c_out, k, cfg, vb)?,
        })
    }
}

impl Module for Conv2d {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        if !xs.device().is_cpu() || xs.dtype() != candle_core::DType::F32 {
            // The custom op is CPU / f32 only; candle's convolution elsewhere (a GPU, the paper
            // profile).
            return self.inner.forward(xs);
        }
        let ys = self.channels_last(xs)?; // (B, Ho·Wo, C_out)
        let (b, c_out) = (ys.dim(0)?, ys.dim(2)?);
        let (ho, wo) = self.geometry(xs)?.out_hw();
        // (B, P, C_out) -> (B, C_out, P) -> (B, C_out, Ho, Wo)
        ys.transpose(1, 2)?
            .contiguous()?
            .reshape((b, c_out, ho, wo))
    }
}

impl Conv2d {
    /// The patch geometry of `xs` `(B, C, H, W)`, checked against the kernel: its channels and
    /// an image no smaller than the kernel (so `out_hw` cannot underflow).
    fn geometry(&self, xs: &Tensor) -> Result<Geometry> {
        let cfg = self.inner.config();
        let (_, c_in_g, k, _) = self.inner.weight().dims4()?; // (C_out, C_in / G, k, k)
        let (_, c, h, w) = xs.dims4()?;
        if c != c_in_g * cfg.groups {
            candle_core::bail!(
                "conv2d expects {} channels, got {:?}",
                c_in_g * cfg.groups,
                xs.shape()
            );
        }
        if h + 2 * cfg.padding < k || w + 2 * cfg.padding < k {
            candle_core::bail!("conv2d: {h}x{w} image smaller than its {k}x{k} kernel");
        }
        Ok(Geometry {
            c,
            h,
            w,
            k,
            pad: cfg.padding,
            stride: cfg.stride,
        })
    }

    fn bias(&self) -> Result<&Tensor> {
        self.inner
            .bias()
            .ok_or_else(|| candle_core::Error::Msg("conv2d built without a bias".into()))
    }

    /// The convolution with channels last, `(B, C_in, H, W) -> (B, Ho·Wo, C_out)`: the matmul's
    /// own layout, without the transpose to `(B, C_out, Ho, Wo)` (a full copy of the output), for
    /// a caller that wants pixels as positions (the shared stem). CPU / f32 only.
    pub fn channels_last(&self, xs: &Tensor) -> Result<Tensor> {
        self.channels_last_n(xs, 1)
    }

    /// [`Self::channels_last`] for `B·N` images that are the `N` slots of `B` rows, `(B·N, C_in,
    /// H, W) -> (B, Ho·Wo, N, C_out)`: each pixel's `N` maps side by side, the row a mux that
    /// mixes slots per pixel reads (`hrr`: one matmul row per pixel), so nothing transposes the
    /// output. The patches are reordered instead: `C_in·k·k` values a pixel, not `C_out` (9
    /// against 32 for the MNIST stem). CPU / f32 and one group for the reordered patches;
    /// elsewhere the output is transposed.
    pub fn channels_last_slots(&self, xs: &Tensor, n: usize) -> Result<Tensor> {
        let b = xs.dim(0)?;
        if n == 0 || b % n != 0 {
            candle_core::bail!("conv2d: {b} images are not rows of N = {n} slots");
        }
        match (self.inner.config().groups, n) {
            (1, 1) => return self.channels_last(xs)?.unsqueeze(2), // (B, P, 1, C_out)
            (1, _) => return self.channels_last_n(xs, n),
            _ => {}
        }
        let ys = self.channels_last(xs)?; // (B·N, P, C_out)
        let (_, p, c_out) = ys.dims3()?;
        // (B, N, P, C_out) -> (B, P, N, C_out)
        ys.reshape((b / n, n, p, c_out))?
            .transpose(1, 2)?
            .contiguous()
    }

    /// The convolution of `B·N` images (the `N` slots of `B` rows) followed by a linear map of
    /// each pixel's `N` outputs, `maps` `(N·C_out, D)`: `(B·N, C_in, H, W) -> (B, Ho·Wo, D)` =
    /// `[conv(x₁) … conv(x_N)] · maps` at each pixel, as one matmul of the pixel's `N·C_in·k·k`
    /// patch values with the folded kernel `[Kᵀ M₁; …; Kᵀ M_N]` (`Mᵢ` the `(C_out, D)` block of
    /// slot `i`), plus the bias `b · Σᵢ Mᵢ`. The `N·C_out` outputs are never written: at the MNIST
    /// stem (9 patch values, 32 channels) that is the mux's input at a third of its size.
    /// `None` off CPU / f32 or with groups.
    pub fn channels_last_mapped(
        &self,
        xs: &Tensor,
        n: usize,
        maps: &Tensor,
    ) -> Result<Option<Tensor>> {
        let on_cpu = xs.device().is_cpu() && xs.dtype() == candle_core::DType::F32;
        if !on_cpu || self.inner.config().groups != 1 {
            return Ok(None);
        }
        let weight = self.inner.weight(); // (C_out, C, k, k)
        let c_out = weight.dim(0)?;
        let (rows, d) = maps.dims2()?;
        let b = xs.dim(0)?;
        if rows != n * c_out || n == 0 || b % n != 0 {
            candle_core::bail!(
                "conv2d: maps {:?} for N = {n} slots of {c_out} channels, images {:?}",
                maps.shape(),
                xs.shape()
            );
        }
        let geometry = self.geometry(xs)?;
        let (ho, wo) = geometry.out_hw();
        let (patch, p) = (geometry.patch(), ho * wo);
        let blocks = maps.reshape((n, c_out, d))?; // (N, C_out, D)
        // (C·k·k, C_out) · (N, C_out, D) -> (N, C·k·k, D) -> (N·C·k·k, D)
        let kernel = weight.reshape((c_out, patch))?.t()?.contiguous()?;
        let folded = kernel.unsqueeze(0)?.broadcast_matmul(&blocks)?;
        let folded = folded.reshape((n * patch, d))?;
        // (1, C_out) · (C_out, D) -> (1, D)
        let bias = self
            .bias()?
            .unsqueeze(0)?
            .matmul(&blocks.sum(0)?)?
            .squeeze(0)?;
        let cols = xs.contiguous()?.apply_op1(Im2Col(geometry))?; // (B·N, P, C·k·k)
        // (B, N, P, C·k·k) -> (B, P, N, C·k·k) -> (B·P, N·C·k·k)
        let cols = cols
            .reshape((b / n, n, p, patch))?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((b / n * p, n * patch))?;
        let ys = layers::add_trailing(&cols.matmul(&folded)?, &bias)?; // (B·P, D)
        Ok(Some(ys.reshape((b / n, p, d))?)) // (B, P, D)
    }

    /// `(B·N, C_in, H, W) -> (B·N, P, C_out)` at `n = 1`, `(B, P, N, C_out)` otherwise (one
    /// group only, checked by the caller).
    fn channels_last_n(&self, xs: &Tensor, n: usize) -> Result<Tensor> {
        if !xs.device().is_cpu() || xs.dtype() != candle_core::DType::F32 {
            // candle's convolution, then (B, C_out, Ho, Wo) -> (B, Ho·Wo, C_out).
            let ys = self.inner.forward(xs)?;
            let (b, c_out, ho, wo) = ys.dims4()?;
            // (B·N, C_out, P) -> (B, N, C_out, P) -> (B, P, N, C_out); at n = 1 (B, P, C_out)
            let ys = ys
                .reshape((b / n, n, c_out, ho * wo))?
                .permute((0, 3, 1, 2))?;
            return match n {
                1 => ys.reshape((b, ho * wo, c_out)),
                _ => ys.contiguous(),
            };
        }
        let weight = self.inner.weight(); // (C_out, C_in / G, k, k)
        let c_out = weight.dim(0)?;
        let g = self.inner.config().groups;
        let b = xs.dim(0)?;
        let geometry = self.geometry(xs)?;
        let bias = self.bias()?;
        let (ho, wo) = geometry.out_hw();
        let (patch_g, c_out_g) = (geometry.patch() / g, c_out / g);
        // (C_out, C/G, k, k) -> (G, C_out/G, C/G·k·k) -> (G, C/G·k·k, C_out/G)
        let kernel = weight.reshape((g, c_out_g, patch_g))?.transpose(1, 2)?;
        let cols = xs.contiguous()?.apply_op1(Im2Col(geometry))?; // (B, P, C·k·k), P = Ho·Wo
        let ys = if g == 1 {
            // With N slots: (B/N, N, P, C·k·k) -> (B/N, P, N, C·k·k), rows in the output's order.
            let cols = match n {
                1 => cols,
                _ => cols
                    .reshape((b / n, n, ho * wo, patch_g))?
                    .transpose(1, 2)?
                    .contiguous()?,
            };
            // (B·P, C·k·k) x (C·k·k, C_out) -> (B·P, C_out)
            cols.reshape((b * ho * wo, patch_g))?
                .matmul(&kernel.squeeze(0)?)?
        } else {
            // (B, P, G, C/G·k·k) -> (G, B·P, C/G·k·k) x (G, C/G·k·k, C_out/G) -> (G, B·P, C_out/G)
            let cols = cols
                .reshape((b * ho * wo, g, patch_g))?
                .transpose(0, 1)?
                .contiguous()?;
            // (G, B·P, C_out/G) -> (B·P, G, C_out/G) -> (B·P, C_out)
            cols.matmul(&kernel)?
                .transpose(0, 1)?
                .reshape((b * ho * wo, c_out))?
        };
        // (B·P, C_out) -> (B, P, C_out), or (B/N, P, N, C_out) with N slots
        let ys = layers::add_trailing(&ys, bias)?;
        match n {
            1 => ys.reshape((b, ho * wo, c_out)),
            _ => ys.reshape((b / n, ho * wo, n, c_out)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};

    /// Same values and gradients as candle's convolution, at odd sizes, with groups and strides.
    #[test]
    fn matches_candle_conv2d_and_its_gradients() -> Result<()> {
        let dev = Device::Cpu;
        for (c_in, c_out, groups, stride, pad, side) in [
            (3, 5, 1, 1, 1, 7),
            (6, 9, 3, 1, 1, 5),
            (4, 6, 2, 2, 1, 9),
            (2, 3, 1, 2, 0, 6),
        ] {
            let map = candle_nn::VarMap::new();
            let vb = VarBuilder::from_varmap(&map, DType::F32, &dev);
            let cfg = Conv2dConfig {
                padding: pad,
                stride,
                groups,
                ..Default::default()
            };
            let ours = Conv2d::new(c_in, c_out, 3, cfg, vb.pp("c"))?;
            // Same variables: the map already holds them.
            let theirs = candle_nn::conv2d(c_in, c_out, 3, cfg, vb.pp("c"))?;
            let x = Var::from_tensor(&Tensor::randn(0f32, 1., (2, c_in, side, side), &dev)?)?;
            let (a, b) = (ours.forward(&x)?, theirs.forward(&x)?);
            assert_eq!(a.dims(), b.dims());
            let close = |p: &Tensor, q: &Tensor, what: &str| -> Result<()> {
                let diff = (p - q)?.abs()?.max_all()?.to_scalar::<f32>()?;
                let size = q.abs()?.max_all()?.to_scalar::<f32>()?;
                assert!(size > 1e-3, "{what}: degenerate");
                assert!(
                    diff <= 1e-4 * size.max(1.0),
                    "{what}: diff {diff} of {size}"
                );
                Ok(())
            };
            close(&a, &b, "forward")?;
            // A loss that weighs every output differently.
            let r = Tensor::randn(0f32, 1., a.dims(), &dev)?;
            let (ga, gb) = (
                (a * &r)?.sum_all()?.backward()?,
                (b * &r)?.sum_all()?.backward()?,
            );
            close(ga.get(&x).unwrap(), gb.get(&x).unwrap(), "input gradient")?;
            for var in map.all_vars() {
                let what = format!("gradient of {:?}", var.shape());
                close(ga.get(&var).unwrap(), gb.get(&var).unwrap(), &what)?;
            }
        }
        // Slots side by side: (B·N, C, H, W) -> (B, P, N, C_out) is the plain output reordered,
        // at one group (patches reordered) and two (output transposed).
        for (groups, n) in [(1, 3), (2, 3), (1, 1)] {
            let (b, c_in, c_out, side) = (2, 2, 4, 5);
            let map = candle_nn::VarMap::new();
            let vb = VarBuilder::from_varmap(&map, DType::F32, &dev);
            let cfg = Conv2dConfig {
                padding: 1,
                groups,
                ..Default::default()
            };
            let conv = Conv2d::new(c_in, c_out, 3, cfg, vb)?;
            let x = Tensor::randn(0f32, 1., (b * n, c_in, side, side), &dev)?;
            let p = side * side;
            let want = conv
                .channels_last(&x)? // (B·N, P, C_out)
                .reshape((b, n, p, c_out))?
                .transpose(1, 2)?; // (B, P, N, C_out)
            let got = conv.channels_last_slots(&x, n)?;
            assert_eq!(got.dims(), [b, p, n, c_out]);
            let diff = (got - want)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(diff < 1e-6, "groups {groups}: {diff}");
            assert!(
                conv.channels_last_slots(&x, 4).is_err(),
                "2·N images, N = 4"
            );
        }
        // A linear map of the slots folded into the kernel: the convolution, then the map.
        let (b, n, c_in, c_out, d, side) = (2, 3, 2, 4, 5, 6);
        let map = candle_nn::VarMap::new();
        let vb = VarBuilder::from_varmap(&map, DType::F32, &dev);
        let same = Conv2dConfig {
            padding: 1,
            ..Default::default()
        };
        let conv = Conv2d::new(c_in, c_out, 3, same, vb)?;
        let x = Tensor::randn(0f32, 1., (b * n, c_in, side, side), &dev)?;
        let maps = Tensor::randn(0f32, 1., (n * c_out, d), &dev)?;
        let p = side * side;
        let want = conv
            .channels_last_slots(&x, n)? // (B, P, N, C_out)
            .reshape((b * p, n * c_out))?
            .matmul(&maps)?
            .reshape((b, p, d))?;
        let got = conv.channels_last_mapped(&x, n, &maps)?.expect("cpu f32");
        let diff = (got - &want)?.abs()?.max_all()?.to_scalar::<f32>()?;
        let size = want.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-4 * size, "{diff} of {size}");
        assert!(
            conv.channels_last_mapped(&x, 2, &maps).is_err(),
            "maps for N = 3"
        );
        // An image smaller than the kernel is an error, not an underflow.
        let map = candle_nn::VarMap::new();
        let vb = VarBuilder::from_varmap(&map, DType::F32, &dev);
        let conv = Conv2d::new(1, 2, 3, Conv2dConfig::default(), vb)?;
        assert!(
            conv.forward(&Tensor::zeros((1, 1, 2, 2), DType::F32, &dev)?)
                .is_err()
        );
        Ok(())
    }
}
