//! Fused CPU kernels with their own backward passes, for the encoder's two most expensive
//! non-matmul stages (docs/performance.md): the attention block between the Q/K/V projections
//! and the output projection, and the FFN's GELU; the linear layer with its bias;
//! LayerNorm, alone or after a residual sum; and the retrieval head's cross-entropy over the vocabulary.
//!
//! Why: composed from candle ops, one attention block is ~10 tensor ops per layer, each a pass
//! over a `(B, H, T, T)` tensor with a fresh allocation, and candle runs the batched score
//! products with its own thread split per `(T, hd) x (hd, T)` product (47 GFLOP/s measured).
//! Here one task per sequence runs all its heads on the calling thread with a `T x T` scratch
//! buffer, and the backward pass recomputes the probabilities instead of keeping them. GELU with
//! candle's `erf` runs a scalar libm-style call per element (4.4 ms for `(1040, 1024)`); here it
//! is a branch-free rational approximation the compiler vectorises, forward and backward.
//!
//! Only f32 on the CPU goes through these kernels; [`supported`] says when, and callers keep
//! the composed path for anything else (a CUDA device, f16). Tests compare both paths' values and
//! gradients at odd sizes.

use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor};
use datamux_kernels::{View, ViewMut};
use rayon::prelude::*;

/// Whether the fused kernels can run on this tensor: f32 on the CPU.
pub fn supported(xs: &Tensor) -> bool {
    xs.device().is_cpu() && xs.dtype() == DType::F32
}

/// The contiguous f32 data of a CPU storage, or an error naming the op.
fn f32_data<'a>(op: &str, s: &'a CpuStorage, l: &Layout) -> Result<&'a [f32]> {
    let CpuStorage::F32(data) = s else {
        candle_core::bail!("{op}: f32 only, got {:?}", s.dtype())
    };
    match l.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("{op}: expects a contiguous input"),
    }
}

fn kernel_err(e: String) -> candle_core::Error {
    candle_core::Error::Msg(e)
}

/// `f` compiled for the widest SIMD level this CPU has (AVX-512, AVX2 + FMA, or the baseline),
/// chosen at run time as gemm does: the plain loops of the `#[inline(always)]` kernels it calls
/// vectorise at that width instead of the SSE2 the build targets.
#[inline(always)]
pub fn vectorized<R>(f: impl FnOnce() -> R) -> R {
    pulp::Arch::new().dispatch(f)
}

/// Lanes of the row reductions: independent partial maxima / sums the compiler keeps in one
/// vector register (a float reduction is not reassociated into SIMD on its own).
const LANES: usize = 16;

/// `row <- softmax(row + bias)` in place.
#[inline(always)]
fn softmax_row(row: &mut [f32], bias: Option<&[f32]>) {
    if let Some(bias) = bias {
        row.iter_mut().zip(bias).for_each(|(s, b)| *s += b);
    }
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let mut chunks = row.chunks_exact(LANES);
    for c in &mut chunks {
        for (m, &x) in lanes.iter_mut().zip(c) {
            *m = if x > *m { x } else { *m };
        }
    }
    let max = chunks
        .remainder()
        .iter()
        .chain(&lanes)
        .fold(f32::NEG_INFINITY, |m, &x| if x > m { x } else { m });
    row.iter_mut().for_each(|s| *s = exp(*s - max));
    let inv = 1.0 / lane_sum(row);
    row.iter_mut().for_each(|s| *s *= inv);
}

/// `Σ row`, in `LANES` partial sums (vectorises inside [`vectorized`]).
#[inline(always)]
pub fn lane_sum(row: &[f32]) -> f32 {
    let mut lanes = [0f32; LANES];
    let mut chunks = row.chunks_exact(LANES);
    for c in &mut chunks {
        lanes.iter_mut().zip(c).for_each(|(s, &x)| *s += x);
    }
    chunks.remainder().iter().sum::<f32>() + lanes.iter().sum::<f32>()
}

/// `Σ a ⊙ b`, in `LANES` partial sums (vectorises inside [`vectorized`]).
#[inline(always)]
pub fn lane_dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for ((s, &x), &y) in lanes.iter_mut().zip(x).zip(y) {
            *s += x * y;
        }
    }
    tail + lanes.iter().sum::<f32>()
}

/// Elements per parallel chunk of the elementwise kernels: large enough that the task overhead
/// is small, small enough that 2+ threads share a `(1040, 1024)` activation evenly.
const CHUNK: usize = 1 << 14;

/// `e^x` to ~2 ulp over the f32 range, branch-free so that loops over it vectorise: Cody-Waite
/// reduction `x = n ln 2 + r`, a degree-6 polynomial for `e^r` on `|r| <= ln 2 / 2` (the
/// coefficients of Cephes' `expf`), and `2^n` built in the exponent bits. Inputs are clamped to
/// `[-87, 88]`, where `e^x` is normal; below that it returns ~1.6e-38 where the exact value
/// underflows to 0.
#[inline(always)]
fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Round to nearest by the 1.5 * 2^23 trick: `round` has no SSE2 instruction.
    const SHIFT: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 88.0);
    let n = (x * LOG2E + SHIFT) - SHIFT;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.987_569_1e-4;
    let p = p * r + 1.398_2e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 0.5;
    let e = p * r * r + r + 1.0;
    // n is in [-126, 127] after the clamp, so the biased exponent is a normal one.
    e * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

/// `erf(x)` to a few f32 ulp: the odd/even rational approximation on `[-4, 4]` used by Eigen's
/// and XLA's f32 `erf` (outside it `erf` is ±1 in f32). Branch-free, so it vectorises.
#[inline(always)]
fn erf(x: f32) -> f32 {
    let x = x.clamp(-4.0, 4.0);
    let x2 = x * x;
    let p = -2.726_142e-10;
    let p = p * x2 + 2.770_681_4e-8;
    let p = p * x2 - 2.101_024e-6;
    let p = p * x2 - 5.692_506_4e-5;
    let p = p * x2 - 7.349_906_3e-4;
    let p = p * x2 - 2.954_6e-3;
    let p = p * x2 - 1.609_603_3e-2;
    let q = -1.456_607_2e-5;
    let q = q * x2 - 2.133_740_6e-4;
    let q = q * x2 - 1.682_827e-3;
    let q = q * x2 - 7.373_329_2e-3;
    let q = q * x2 - 1.426_474e-2;
    x * p / q
}

/// `x Φ(x)` with `Φ` the standard normal CDF: the exact (erf) GELU of BERT and RoBERTa.
#[inline(always)]
fn gelu(x: f32) -> f32 {
    0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2))
}

/// `d/dx x Φ(x) = Φ(x) + x φ(x)`.
#[inline(always)]
fn gelu_grad(x: f32) -> f32 {
    const INV_SQRT_2PI: f32 = 0.398_942_3;
    let cdf = 0.5 * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2));
    cdf + x * INV_SQRT_2PI * exp(-0.5 * x * x)
}

/// The exact GELU, fused on the CPU (with its backward), candle's `gelu_erf` elsewhere.
pub fn gelu_erf(xs: &Tensor) -> Result<Tensor> {
    if supported(xs) {
        xs.contiguous()?.apply_op1(GeluErf)
    } else {
        xs.gelu_erf()
    }
}

struct GeluErf;

impl CustomOp1 for GeluErf {
    fn name(&self) -> &'static str {
        "fused-gelu-erf"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let xs = f32_data(self.name(), s, l)?;
        let mut ys = vec![0f32; xs.len()];
        ys.par_chunks_mut(CHUNK)
            .zip(xs.par_chunks(CHUNK))
            .for_each(|(y, x)| vectorized(|| y.iter_mut().zip(x).for_each(|(y, &x)| *y = gelu(x))));
        Ok((CpuStorage::F32(ys), l.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(
            arg.contiguous()?
                .apply_op2_no_bwd(&grad.contiguous()?, &GeluErfGrad)?,
        ))
    }
}

/// `(x, dy) -> dy * gelu'(x)`.
struct GeluErfGrad;

impl CustomOp2 for GeluErfGrad {
    fn name(&self) -> &'static str {
        "fused-gelu-erf-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (xs, gs) = (
            f32_data(self.name(), s1, l1)?,
            f32_data(self.name(), s2, l2)?,
        );
        if xs.len() != gs.len() {
            candle_core::bail!("{}: {:?} vs {:?}", self.name(), l1.shape(), l2.shape());
        }
        let mut dx = vec![0f32; xs.len()];
        dx.par_chunks_mut(CHUNK)
            .zip(xs.par_chunks(CHUNK).zip(gs.par_chunks(CHUNK)))
            .for_each(|(d, (x, g))| {
                vectorized(|| {
                    for ((d, &x), &g) in d.iter_mut().zip(x).zip(g) {
                        *d = g * gelu_grad(x);
                    }
                })
            });
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}

/// `x (R, I) · wᵀ + b` for `w (O, I)`, `b (O)`: one pass of row blocks in parallel, the bias
/// written into the output before the product accumulates onto it (candle adds it in a second
/// pass over a broadcast or expanded copy). The backward pass is three matmuls, the bias'
/// gradient as `1ᵀ · dy` (a sum over rows would take candle's slow reduction, `layers` docs).
pub fn linear(xs: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let (xs, w) = (xs.contiguous()?, w.contiguous()?);
    match b {
        Some(b) => xs.apply_op3(&w, &b.contiguous()?, FusedLinear),
        None => xs.apply_op2(&w, FusedLinear),
    }
}

struct FusedLinear;

impl FusedLinear {
    fn run(
        &self,
        (s1, l1): (&CpuStorage, &Layout),
        (s2, l2): (&CpuStorage, &Layout),
        bias: Option<(&CpuStorage, &Layout)>,
    ) -> Result<(CpuStorage, Shape)> {
        let name = "fused-linear";
        let (rows, din) = l1.shape().dims2()?;
        let (dout, win) = l2.shape().dims2()?;
        if din != win {
            candle_core::bail!("{name}: input {:?} for weight {:?}", l1.dims(), l2.dims());
        }
        let (x, w) = (f32_data(name, s1, l1)?, f32_data(name, s2, l2)?);
        let b = bias.map(|(s, l)| f32_data(name, s, l)).transpose()?;
        let mut out = vec![0f32; rows * dout];
        datamux_kernels::linear(x, din, w, b, &mut out).map_err(kernel_err)?;
        Ok((CpuStorage::F32(out), Shape::from((rows, dout))))
    }

    /// `(dx, dw)` of `x (R, I)`, `w (O, I)` for `dy (R, O)`.
    fn grads(x: &Tensor, w: &Tensor, dy: &Tensor) -> Result<(Tensor, Tensor)> {
        Ok((dy.matmul(w)?, dy.t()?.matmul(x)?))
    }
}

impl CustomOp2 for FusedLinear {
    fn name(&self) -> &'static str {
        "fused-linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.run((s1, l1), (s2, l2), None)
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dw) = Self::grads(x, w, dy)?;
        Ok((Some(dx), Some(dw)))
    }
}

impl candle_core::CustomOp3 for FusedLinear {
    fn name(&self) -> &'static str {
        "fused-linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.run((s1, l1), (s2, l2), Some((s3, l3)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, dw) = Self::grads(x, w, dy)?;
        // (1, R) · (R, O) -> (1, O) -> (O)
        let ones = Tensor::ones((1, dy.dim(0)?), dy.dtype(), dy.device())?;
        let db = ones.matmul(dy)?.squeeze(0)?;
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

/// LayerNorm over the last dimension, `x (.., D)`, scale and shift `(D)`, with its backward
/// (candle-nn's fused kernel has none, and the composed one is ~10 passes per call).
pub fn layer_norm(xs: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f64) -> Result<Tensor> {
    let dims = xs.dims().to_vec();
    let d = xs.dim(candle_core::D::Minus1)?;
    // (.., D) -> (R, D) -> (.., D)
    let flat = xs.contiguous()?.reshape(((), d))?;
    flat.apply_op3(
        &gamma.contiguous()?,
        &beta.contiguous()?,
        LayerNormOp { eps: eps as f32 },
    )?
    .reshape(dims)
}

/// `layer_norm(a + b)`, the residual sum and the norm in one pass (post-LN Transformer layers):
/// no `(.., D)` sum is written, and the graph has one node where it had two.
pub fn add_layer_norm(
    a: &Tensor,
    b: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f64,
) -> Result<Tensor> {
    if a.dims() != b.dims() {
        candle_core::bail!("add_layer_norm: {:?} + {:?}", a.shape(), b.shape());
    }
    let dims = a.dims().to_vec();
    let d = a.dim(candle_core::D::Minus1)?;
    // (.., D) -> (R, D) -> (.., D); scale and shift stacked (2, D).
    let (a, b) = (
        a.contiguous()?.reshape(((), d))?,
        b.contiguous()?.reshape(((), d))?,
    );
    let gb = Tensor::stack(&[gamma, beta], 0)?;
    a.apply_op3(&b, &gb, AddNorm(LayerNormOp { eps: eps as f32 }))?
        .reshape(dims)
}

/// `(a (R, D), b (R, D), [gamma; beta] (2, D)) -> layer_norm(a + b)`.
struct AddNorm(LayerNormOp);

impl candle_core::CustomOp3 for AddNorm {
    fn name(&self) -> &'static str {
        "fused-add-layer-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let name = self.name();
        let (_, d) = l1.shape().dims2()?;
        if l2.dims() != l1.dims() || l3.dims() != [2, d] {
            candle_core::bail!("{name}: {:?}, {:?}, {:?}", l1.dims(), l2.dims(), l3.dims());
        }
        let (a, b, gb) = (
            f32_data(name, s1, l1)?,
            f32_data(name, s2, l2)?,
            f32_data(name, s3, l3)?,
        );
        let (g, beta) = gb.split_at(d);
        let mut y = vec![0f32; a.len()];
        y.par_chunks_mut(NORM_ROWS * d)
            .zip(a.par_chunks(NORM_ROWS * d).zip(b.par_chunks(NORM_ROWS * d)))
            .for_each(|(y, (a, b))| {
                let mut x = vec![0f32; d];
                vectorized(|| {
                    for ((y, a), b) in y
                        .chunks_exact_mut(d)
                        .zip(a.chunks_exact(d))
                        .zip(b.chunks_exact(d))
                    {
                        x.iter_mut()
                            .zip(a)
                            .zip(b)
                            .for_each(|((x, a), b)| *x = a + b);
                        let (mean, inv) = self.0.stats(&x);
                        for (((y, &x), &g), &c) in y.iter_mut().zip(&x).zip(g).zip(beta) {
                            *y = (x - mean) * inv * g + c;
                        }
                    }
                })
            });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        gb: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let rows = a.dim(0)?;
        // The sum is recomputed here rather than kept from the forward pass.
        let x = (a + b)?;
        let all = x.apply_op3_no_bwd(&gb.get(0)?, &dy.contiguous()?, &LayerNormGrad(self.0))?;
        let dx = all.narrow(0, 0, rows)?;
        Ok((Some(dx.clone()), Some(dx), Some(all.narrow(0, rows, 2)?)))
    }
}

/// Rows per parallel task of the LayerNorm kernels; fixed, so that the order of the scale and
/// shift gradients' partial sums does not depend on the thread count.
const NORM_ROWS: usize = 64;

/// Width, input, scale and shift of one LayerNorm call.
type NormArgs<'a> = (usize, &'a [f32], &'a [f32], &'a [f32]);

#[derive(Clone, Copy)]
struct LayerNormOp {
    eps: f32,
}

impl LayerNormOp {
    /// Mean and inverse standard deviation of one row.
    #[inline(always)]
    fn stats(&self, x: &[f32]) -> (f32, f32) {
        let n = x.len() as f32;
        let mean = lane_sum(x) / n;
        let mut lanes = [0f32; LANES];
        let mut chunks = x.chunks_exact(LANES);
        for c in &mut chunks {
            for (s, &v) in lanes.iter_mut().zip(c) {
                *s += (v - mean) * (v - mean);
            }
        }
        let tail: f32 = chunks
            .remainder()
            .iter()
            .map(|v| (v - mean) * (v - mean))
            .sum();
        let var = (tail + lanes.iter().sum::<f32>()) / n;
        (mean, 1.0 / (var + self.eps).sqrt())
    }

    fn check<'a>(
        name: &str,
        (s1, l1): (&'a CpuStorage, &Layout),
        (s2, l2): (&'a CpuStorage, &Layout),
        (s3, l3): (&'a CpuStorage, &Layout),
    ) -> Result<NormArgs<'a>> {
        let (_, d) = l1.shape().dims2()?;
        if l2.dims() != [d] || l3.dims() != [d] {
            candle_core::bail!(
                "{name}: {:?} with {:?} and {:?}",
                l1.dims(),
                l2.dims(),
                l3.dims()
            );
        }
        Ok((
            d,
            f32_data(name, s1, l1)?,
            f32_data(name, s2, l2)?,
            f32_data(name, s3, l3)?,
        ))
    }
}

impl candle_core::CustomOp3 for LayerNormOp {
    fn name(&self) -> &'static str {
        "fused-layer-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (d, x, g, b) = Self::check(self.name(), (s1, l1), (s2, l2), (s3, l3))?;
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(NORM_ROWS * d)
            .zip(x.par_chunks(NORM_ROWS * d))
            .for_each(|(y, x)| {
                vectorized(|| {
                    for (y, x) in y.chunks_exact_mut(d).zip(x.chunks_exact(d)) {
                        let (mean, inv) = self.stats(x);
                        for (((y, &x), &g), &b) in y.iter_mut().zip(x).zip(g).zip(b) {
                            *y = (x - mean) * inv * g + b;
                        }
                    }
                })
            });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        _beta: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let rows = x.dim(0)?;
        // (R + 2, D): dx, then the scale's and the shift's gradients.
        let all = x.apply_op3_no_bwd(gamma, &dy.contiguous()?, &LayerNormGrad(*self))?;
        Ok((
            Some(all.narrow(0, 0, rows)?),
            Some(all.get(rows)?),
            Some(all.get(rows + 1)?),
        ))
    }
}

/// `(x (R, D), gamma (D), dy (R, D)) -> (R + 2, D)`: `dx` in the first `R` rows, then `dgamma`,
/// then `dbeta`. Per row, with `x̂ = (x - μ) / σ` and `h = dy ⊙ gamma`:
/// `dx = (h - mean(h) - x̂ mean(h ⊙ x̂)) / σ`; `dgamma = Σ_rows dy ⊙ x̂`, `dbeta = Σ_rows dy`.
struct LayerNormGrad(LayerNormOp);

impl candle_core::CustomOp3 for LayerNormGrad {
    fn name(&self) -> &'static str {
        "fused-layer-norm-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let name = self.name();
        let (rows, d) = l1.shape().dims2()?;
        if l2.dims() != [d] || l3.dims() != [rows, d] {
            candle_core::bail!(
                "{name}: {:?} with {:?} and {:?}",
                l1.dims(),
                l2.dims(),
                l3.dims()
            );
        }
        let (x, g, dy) = (
            f32_data(name, s1, l1)?,
            f32_data(name, s2, l2)?,
            f32_data(name, s3, l3)?,
        );
        let mut out = vec![0f32; (rows + 2) * d];
        let (dx, _) = out.split_at_mut(rows * d);
        let op = self.0;
        // Per task: its rows' dx, and its partial (dgamma, dbeta) as one (2, D) buffer.
        let partials: Vec<Vec<f32>> = dx
            .par_chunks_mut(NORM_ROWS * d)
            .zip(
                x.par_chunks(NORM_ROWS * d)
                    .zip(dy.par_chunks(NORM_ROWS * d)),
            )
            .map(|(dx, (x, dy))| {
                let mut acc = vec![0f32; 2 * d];
                let mut h = vec![0f32; d];
                vectorized(|| {
                    let (dg, db) = acc.split_at_mut(d);
                    for ((dx, x), dy) in dx
                        .chunks_exact_mut(d)
                        .zip(x.chunks_exact(d))
                        .zip(dy.chunks_exact(d))
                    {
                        let (mean, inv) = op.stats(x);
                        for ((h, &dy), &g) in h.iter_mut().zip(dy).zip(g) {
                            *h = dy * g;
                        }
                        let n = d as f32;
                        let mean_h = lane_sum(&h) / n;
                        // Σ h ⊙ x̂ = inv · Σ h ⊙ (x - μ)
                        let mut lanes = [0f32; LANES];
                        let (mut ch, mut cx) = (h.chunks_exact(LANES), x.chunks_exact(LANES));
                        for (a, b) in (&mut ch).zip(&mut cx) {
                            for ((s, &a), &b) in lanes.iter_mut().zip(a).zip(b) {
                                *s += a * (b - mean);
                            }
                        }
                        let tail: f32 = ch
                            .remainder()
                            .iter()
                            .zip(cx.remainder())
                            .map(|(a, b)| a * (b - mean))
                            .sum();
                        let mean_hx = (tail + lanes.iter().sum::<f32>()) * inv / n;
                        for ((((dx, &h), &x), &dy), (dg, db)) in dx
                            .iter_mut()
                            .zip(&h)
                            .zip(x)
                            .zip(dy)
                            .zip(dg.iter_mut().zip(db.iter_mut()))
                        {
                            let xhat = (x - mean) * inv;
                            *dx = (h - mean_h - xhat * mean_hx) * inv;
                            *dg += dy * xhat;
                            *db += dy;
                        }
                    }
                });
                acc
            })
            .collect();
        let tail = &mut out[rows * d..];
        for p in &partials {
            tail.iter_mut().zip(p).for_each(|(t, p)| *t += p);
        }
        Ok((CpuStorage::F32(out), Shape::from((rows + 2, d))))
    }
}

/// Mean cross-entropy of `logits (R, V)` against `targets (R)`, as `candle_nn::loss::
/// cross_entropy` computes it; on the CPU in f32 one pass per row forward (the log-sum-exp) and
/// one backward (`softmax - onehot`), where the composed version makes ~8 passes over the
/// `(R, V)` logits each way: the retrieval head's `V = 30 522`-way softmax over ~1 300 rows is
/// 40 M values per pass.
pub fn cross_entropy(logits: &Tensor, targets: &[u32]) -> Result<Tensor> {
    if !supported(logits) {
        let t = Tensor::from_slice(targets, targets.len(), logits.device())?;
        return candle_nn::loss::cross_entropy(logits, &t);
    }
    let op = CrossEntropy {
        targets: Arc::new(targets.to_vec()),
    };
    logits.contiguous()?.apply_op1(op)?.mean_all()
}

/// `logits (R, V) -> (R)` per-row losses `logsumexp(row) - row[target]`.
#[derive(Clone)]
struct CrossEntropy {
    targets: Arc<Vec<u32>>,
}

impl CrossEntropy {
    fn check<'a>(&self, name: &str, s: &'a CpuStorage, l: &Layout) -> Result<(usize, &'a [f32])> {
        let (rows, v) = l.shape().dims2()?;
        if rows != self.targets.len() {
            candle_core::bail!(
                "{name}: {rows} rows of logits for {} targets",
                self.targets.len()
            );
        }
        if let Some(t) = self.targets.iter().find(|&&t| t as usize >= v) {
            candle_core::bail!("{name}: target {t} outside the {v} classes");
        }
        Ok((v, f32_data(name, s, l)?))
    }

    /// `log Σ_j e^{row_j}`, shifted by the row's maximum.
    #[inline(always)]
    fn log_sum_exp(row: &[f32]) -> f32 {
        let mut lanes = [f32::NEG_INFINITY; LANES];
        let mut chunks = row.chunks_exact(LANES);
        for c in &mut chunks {
            for (m, &x) in lanes.iter_mut().zip(c) {
                *m = if x > *m { x } else { *m };
            }
        }
        let max = chunks
            .remainder()
            .iter()
            .chain(&lanes)
            .fold(f32::NEG_INFINITY, |m, &x| if x > m { x } else { m });
        let mut sums = [0f32; LANES];
        let mut chunks = row.chunks_exact(LANES);
        for c in &mut chunks {
            for (s, &x) in sums.iter_mut().zip(c) {
                *s += exp(x - max);
            }
        }
        let tail: f32 = chunks.remainder().iter().map(|&x| exp(x - max)).sum();
        max + (tail + sums.iter().sum::<f32>()).ln()
    }
}

impl CustomOp1 for CrossEntropy {
    fn name(&self) -> &'static str {
        "fused-cross-entropy"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (v, x) = self.check(self.name(), s, l)?;
        let mut loss = vec![0f32; self.targets.len()];
        loss.par_iter_mut()
            .zip(x.par_chunks(v).zip(self.targets.par_iter()))
            .for_each(|(loss, (row, &t))| {
                *loss = vectorized(|| Self::log_sum_exp(row)) - row[t as usize];
            });
        Ok((CpuStorage::F32(loss), Shape::from(self.targets.len())))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let op = CrossEntropyGrad(self.clone());
        Ok(Some(
            arg.contiguous()?
                .apply_op2_no_bwd(&grad.contiguous()?, &op)?,
        ))
    }
}

/// `(logits (R, V), dloss (R)) -> dlogits (R, V) = dloss_r (softmax(row) - onehot(target_r))`.
struct CrossEntropyGrad(CrossEntropy);

impl CustomOp2 for CrossEntropyGrad {
    fn name(&self) -> &'static str {
        "fused-cross-entropy-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (v, x) = self.0.check(self.name(), s1, l1)?;
        let g = f32_data(self.name(), s2, l2)?;
        if g.len() != self.0.targets.len() {
            candle_core::bail!(
                "{}: {} gradients for {} rows",
                self.name(),
                g.len(),
                x.len() / v
            );
        }
        let mut dx = vec![0f32; x.len()];
        dx.par_chunks_mut(v)
            .zip(
                x.par_chunks(v)
                    .zip(g.par_iter().zip(self.0.targets.par_iter())),
            )
            .for_each(|(d, (row, (&g, &t)))| {
                vectorized(|| {
                    let lse = CrossEntropy::log_sum_exp(row);
                    d.iter_mut()
                        .zip(row)
                        .for_each(|(d, &x)| *d = g * exp(x - lse));
                });
                d[t as usize] -= g;
            });
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}

/// Multi-head scaled dot-product attention over packed projections: `qkv (B, T, 3D)` (each row
/// `[q | k | v]`, head `h` at columns `h·hd..(h+1)·hd` of each third) -> context `(B, Q, D)`,
/// `softmax(q kᵀ · scale + bias) · v` per head, for the first `Q = queries` positions as queries
/// (all `T` when `None`; fewer where a caller reads only a prefix of the output). `bias` is an
/// additive key bias `(B·T)` (padding); `keep` an inverted-dropout mask `(B·H·Q·T)` on the
/// probabilities (0 or `1 / (1 - p)`), in the order of a `(B, H, Q, T)` tensor, so it is the mask
/// `layers::dropout` would draw for them.
pub fn attention(
    qkv: &Tensor,
    heads: usize,
    scale: f64,
    queries: Option<usize>,
    bias: Option<Arc<Vec<f32>>>,
    keep: Option<Arc<Vec<f32>>>,
) -> Result<Tensor> {
    qkv.contiguous()?.apply_op1(Attention {
        heads,
        scale: scale as f32,
        queries,
        bias,
        keep,
    })
}

#[derive(Clone)]
struct Attention {
    heads: usize,
    scale: f32,
    queries: Option<usize>,
    bias: Option<Arc<Vec<f32>>>,
    keep: Option<Arc<Vec<f32>>>,
}

/// The sizes of one call, checked against the op's bias and mask: `q` query rows of `t`.
#[derive(Clone, Copy)]
struct Dims {
    b: usize,
    t: usize,
    q: usize,
    d: usize,
    hd: usize,
}

/// `dst (m, n) = scale · lhs (m, k) · rhs (k, n)` over strided views of one sequence's buffers;
/// `(data, offset, row stride, column stride)` per operand.
fn mm(
    (m, n, k): (usize, usize, usize),
    dst: (&mut [f32], usize, usize),
    lhs: (&[f32], usize, usize, usize),
    rhs: (&[f32], usize, usize, usize),
    scale: f32,
) -> Result<()> {
    datamux_kernels::matmul(
        m,
        n,
        k,
        ViewMut {
            data: dst.0,
            offset: dst.1,
            rs: dst.2,
        },
        View {
            data: lhs.0,
            offset: lhs.1,
            rs: lhs.2,
            cs: lhs.3,
        },
        View {
            data: rhs.0,
            offset: rhs.1,
            rs: rhs.2,
            cs: rhs.3,
        },
        scale,
        false,
    )
    .map_err(kernel_err)
}

impl Attention {
    fn dims(&self, shape: &Shape) -> Result<Dims> {
        let (b, t, w) = shape.dims3()?;
        let d = w / 3;
        if w % 3 != 0 || self.heads == 0 || d % self.heads != 0 {
            candle_core::bail!(
                "fused attention: width {w} is not 3 x a multiple of {} heads",
                self.heads
            );
        }
        let q = self.queries.unwrap_or(t);
        if q > t {
            candle_core::bail!("fused attention: {q} queries of {t} positions");
        }
        if let Some(bias) = &self.bias
            && bias.len() != b * t
        {
            candle_core::bail!("fused attention: bias of {} for {b} x {t}", bias.len());
        }
        if let Some(keep) = &self.keep
            && keep.len() != b * self.heads * q * t
        {
            candle_core::bail!("fused attention: dropout mask of {} elements", keep.len());
        }
        Ok(Dims {
            b,
            t,
            q,
            d,
            hd: d / self.heads,
        })
    }

    /// The probabilities of head `h` of sequence `bi` into `p (Q, T)`, before dropout.
    fn probs(&self, qkv: &[f32], bi: usize, h: usize, dm: Dims, p: &mut [f32]) -> Result<()> {
        let (t, d, hd) = (dm.t, dm.d, dm.hd);
        let w = 3 * d;
        // scores (Q, T) = q_h (Q, hd) · k_hᵀ (hd, T), k_hᵀ read in place: (c, j) -> k[j, c].
        mm(
            (dm.q, t, hd),
            (p, 0, t),
            (qkv, h * hd, w, 1),
            (qkv, d + h * hd, 1, w),
            self.scale,
        )?;
        let bias = self.bias.as_ref().map(|b| &b[bi * t..(bi + 1) * t]);
        vectorized(|| p.chunks_exact_mut(t).for_each(|row| softmax_row(row, bias)));
        Ok(())
    }

    fn keep_of(&self, bi: usize, h: usize, dm: Dims) -> Option<&[f32]> {
        let len = dm.q * dm.t;
        let at = (bi * self.heads + h) * len;
        self.keep.as_ref().map(|k| &k[at..at + len])
    }

    /// One sequence's context `(Q, D)` from its `qkv (T, 3D)`.
    fn forward_seq(&self, qkv: &[f32], bi: usize, dm: Dims, out: &mut [f32]) -> Result<()> {
        let (t, d, hd) = (dm.t, dm.d, dm.hd);
        let mut p = vec![0f32; dm.q * t];
        for h in 0..self.heads {
            self.probs(qkv, bi, h, dm, &mut p)?;
            if let Some(keep) = self.keep_of(bi, h, dm) {
                vectorized(|| p.iter_mut().zip(keep).for_each(|(p, k)| *p *= k));
            }
            // ctx_h (Q, hd) = p (Q, T) · v_h (T, hd), written into columns h·hd.. of out.
            mm(
                (dm.q, hd, t),
                (out, h * hd, d),
                (&p, 0, t, 1),
                (qkv, 2 * d + h * hd, 3 * d, 1),
                1.0,
            )?;
        }
        Ok(())
    }

    /// One sequence's `dqkv (T, 3D)` from its `qkv (T, 3D)` and `dctx (Q, D)`; the rows of `dq`
    /// past the queries stay zero.
    fn backward_seq(
        &self,
        qkv: &[f32],
        dctx: &[f32],
        bi: usize,
        dm: Dims,
        dqkv: &mut [f32],
    ) -> Result<()> {
        let (t, q, d, hd) = (dm.t, dm.q, dm.d, dm.hd);
        let w = 3 * d;
        let (mut p, mut g) = (vec![0f32; q * t], vec![0f32; q * t]);
        let mut dropped = if self.keep.is_some() {
            vec![0f32; q * t]
        } else {
            Vec::new()
        };
        for h in 0..self.heads {
            self.probs(qkv, bi, h, dm, &mut p)?;
            let keep = self.keep_of(bi, h, dm);
            let used: &[f32] = match keep {
                Some(keep) => {
                    vectorized(|| {
                        for ((o, p), k) in dropped.iter_mut().zip(&p).zip(keep) {
                            *o = p * k;
                        }
                    });
                    &dropped
                }
                None => &p,
            };
            // dv_h (T, hd) = usedᵀ (T, Q) · dctx_h (Q, hd).
            mm(
                (t, hd, q),
                (dqkv, 2 * d + h * hd, w),
                (used, 0, 1, t),
                (dctx, h * hd, d, 1),
                1.0,
            )?;
            // g (Q, T) = dctx_h (Q, hd) · v_hᵀ (hd, T): the gradient of the used probabilities.
            mm(
                (q, t, hd),
                (&mut g, 0, t),
                (dctx, h * hd, d, 1),
                (qkv, 2 * d + h * hd, 1, w),
                1.0,
            )?;
            // Softmax backward per row: ds = p ⊙ (g - Σ_j g_j p_j), g through the mask first.
            vectorized(|| {
                if let Some(keep) = keep {
                    g.iter_mut().zip(keep).for_each(|(g, k)| *g *= k);
                }
                for (gr, pr) in g.chunks_exact_mut(t).zip(p.chunks_exact(t)) {
                    let dot = lane_dot(gr, pr);
                    gr.iter_mut().zip(pr).for_each(|(g, p)| *g = p * (*g - dot));
                }
            });
            // dq_h (Q, hd) = scale · ds (Q, T) · k_h (T, hd); dk_h (T, hd) = scale · dsᵀ · q_h.
            mm(
                (q, hd, t),
                (dqkv, h * hd, w),
                (&g, 0, t, 1),
                (qkv, d + h * hd, w, 1),
                self.scale,
            )?;
            mm(
                (t, hd, q),
                (dqkv, d + h * hd, w),
                (&g, 0, 1, t),
                (qkv, h * hd, w, 1),
                self.scale,
            )?;
        }
        Ok(())
    }
}

impl CustomOp1 for Attention {
    fn name(&self) -> &'static str {
        "fused-attention"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let qkv = f32_data(self.name(), s, l)?;
        let dm = self.dims(l.shape())?;
        let (t, q, d) = (dm.t, dm.q, dm.d);
        let mut out = vec![0f32; dm.b * q * d];
        // One task per sequence: (T, 3D) in, (Q, D) out.
        out.par_chunks_mut(q * d)
            .zip(qkv.par_chunks(t * 3 * d))
            .enumerate()
            .try_for_each(|(bi, (o, x))| self.forward_seq(x, bi, dm, o))?;
        Ok((CpuStorage::F32(out), Shape::from((dm.b, q, d))))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let grad_op = AttentionGrad(self.clone());
        Ok(Some(
            arg.contiguous()?
                .apply_op2_no_bwd(&grad.contiguous()?, &grad_op)?,
        ))
    }
}

/// `(qkv (B, T, 3D), dctx (B, Q, D)) -> dqkv (B, T, 3D)`.
struct AttentionGrad(Attention);

impl CustomOp2 for AttentionGrad {
    fn name(&self) -> &'static str {
        "fused-attention-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (qkv, dctx) = (
            f32_data(self.name(), s1, l1)?,
            f32_data(self.name(), s2, l2)?,
        );
        let dm = self.0.dims(l1.shape())?;
        let (t, q, d) = (dm.t, dm.q, dm.d);
        if l2.dims() != [dm.b, q, d] {
            candle_core::bail!(
                "{}: gradient {:?} for {:?}",
                self.name(),
                l2.dims(),
                l1.dims()
            );
        }
        let mut dqkv = vec![0f32; qkv.len()];
        dqkv.par_chunks_mut(t * 3 * d)
            .zip(qkv.par_chunks(t * 3 * d).zip(dctx.par_chunks(q * d)))
            .enumerate()
            .try_for_each(|(bi, (dq, (x, g)))| self.0.backward_seq(x, g, bi, dm, dq))?;
        Ok((CpuStorage::F32(dqkv), l1.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{D, Device, Var};

    fn max_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
        (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
    }

    #[test]
    fn exp_and_erf_are_accurate_to_float_tolerance() {
        for i in -2000..=2000 {
            let x = i as f32 * 0.01;
            let (e, want) = (exp(x), x.exp());
            assert!((e - want).abs() <= 4e-7 * want, "exp({x}) = {e} vs {want}");
        }
        assert!(exp(-1e9) < 1e-37 && exp(-1e9) >= 0.0);
        assert!(exp(f32::NEG_INFINITY) < 1e-37);
    }

    /// GELU and its gradient match candle's erf GELU (and its backward) at odd sizes.
    #[test]
    fn fused_gelu_matches_candle() -> Result<()> {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&(Tensor::randn(0f32, 3., (7, 5, 13), &dev)?))?;
        let r = Tensor::randn(0f32, 1., (7, 5, 13), &dev)?;
        let (ours, theirs) = (gelu_erf(&x)?, x.gelu_erf()?);
        assert!(max_diff(&ours, &theirs)? < 2e-6);
        let go = (&ours * &r)?.sum_all()?.backward()?;
        let gt = (&theirs * &r)?.sum_all()?.backward()?;
        let (a, b) = (go.get(&x).unwrap(), gt.get(&x).unwrap());
        assert!(max_diff(a, b)? < 1e-5, "gelu grad {}", max_diff(a, b)?);
        Ok(())
    }

    #[test]
    fn fused_linear_matches_matmul_and_bias() -> Result<()> {
        let dev = Device::Cpu;
        // More rows than one parallel block, so the row split is exercised.
        let x = Var::from_tensor(&Tensor::randn(0f32, 1., (203, 13), &dev)?)?;
        let w = Var::from_tensor(&Tensor::randn(0f32, 1., (7, 13), &dev)?)?;
        let b = Var::from_tensor(&Tensor::randn(0f32, 1., 7, &dev)?)?;
        let r = Tensor::randn(0f32, 1., (203, 7), &dev)?;
        for bias in [Some(b.as_tensor()), None] {
            let ours = linear(&x, &w, bias)?;
            let mut theirs = x.matmul(&w.t()?)?;
            if let Some(b) = bias {
                theirs = theirs.broadcast_add(b)?;
            }
            assert!(max_diff(&ours, &theirs)? < 1e-5);
            let go = (&ours * &r)?.sum_all()?.backward()?;
            let gt = (&theirs * &r)?.sum_all()?.backward()?;
            for v in [x.as_tensor(), w.as_tensor()].into_iter().chain(bias) {
                let (p, q) = (go.get(v).unwrap(), gt.get(v).unwrap());
                assert_eq!(p.dims(), v.dims());
                assert!(max_diff(p, q)? < 1e-4, "gradient of {:?}", v.shape());
            }
        }
        assert!(
            linear(&x, &r, None).is_err(),
            "a weight of the wrong width is an error"
        );
        Ok(())
    }

    #[test]
    fn fused_layer_norm_matches_the_composite() -> Result<()> {
        let dev = Device::Cpu;
        // 3 x 71 rows: more than one parallel block; D = 37 leaves a remainder after the lanes.
        let x = Var::from_tensor(&(Tensor::randn(0f32, 2., (3, 71, 37), &dev)? + 0.7)?)?;
        let g = Var::from_tensor(&Tensor::randn(1f32, 0.3, 37, &dev)?)?;
        let b = Var::from_tensor(&Tensor::randn(0f32, 0.3, 37, &dev)?)?;
        let r = Tensor::randn(0f32, 1., (3, 71, 37), &dev)?;
        let ours = layer_norm(&x, &g, &b, 1e-5)?;
        let theirs = crate::layers::normalize(&x, 1e-5)?
            .broadcast_mul(&g)?
            .broadcast_add(&b)?;
        assert!(
            max_diff(&ours, &theirs)? < 1e-5,
            "values {}",
            max_diff(&ours, &theirs)?
        );
        let go = (&ours * &r)?.sum_all()?.backward()?;
        let gt = (&theirs * &r)?.sum_all()?.backward()?;
        for v in [&x, &g, &b] {
            let (p, q) = (go.get(v).unwrap(), gt.get(v).unwrap());
            assert_eq!(p.dims(), v.dims());
            assert!(
                max_diff(p, q)? < 1e-4,
                "gradient of {:?}: {}",
                v.shape(),
                max_diff(p, q)?
            );
        }
        Ok(())
    }

    #[test]
    fn fused_cross_entropy_matches_candle() -> Result<()> {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 3., (11, 37), &dev)?)?;
        let targets: Vec<u32> = (0..11).map(|i| (i * 7 % 37) as u32).collect();
        let ours = cross_entropy(&x, &targets)?;
        let t = Tensor::from_slice(&targets, 11, &dev)?;
        let theirs = candle_nn::loss::cross_entropy(&x, &t)?;
        assert!(max_diff(&ours, &theirs)? < 1e-5);
        let (go, gt) = ((&ours * 3.0)?.backward()?, (&theirs * 3.0)?.backward()?);
        let (a, b) = (go.get(&x).unwrap(), gt.get(&x).unwrap());
        assert!(max_diff(a, b)? < 1e-6, "gradient {}", max_diff(a, b)?);
        assert!(
            cross_entropy(&x, &[40; 11]).is_err(),
            "a target outside the classes"
        );
        assert!(cross_entropy(&x, &[0; 3]).is_err(), "too few targets");
        Ok(())
    }

    #[test]
    fn fused_add_layer_norm_matches_add_then_norm() -> Result<()> {
        let dev = Device::Cpu;
        let a = Var::from_tensor(&Tensor::randn(0f32, 1., (2, 67, 37), &dev)?)?;
        let b = Var::from_tensor(&Tensor::randn(0.3f32, 2., (2, 67, 37), &dev)?)?;
        let g = Var::from_tensor(&Tensor::randn(1f32, 0.3, 37, &dev)?)?;
        let c = Var::from_tensor(&Tensor::randn(0f32, 0.3, 37, &dev)?)?;
        let r = Tensor::randn(0f32, 1., (2, 67, 37), &dev)?;
        let ours = add_layer_norm(&a, &b, &g, &c, 1e-5)?;
        let theirs = layer_norm(&(a.as_tensor() + b.as_tensor())?, &g, &c, 1e-5)?;
        assert!(max_diff(&ours, &theirs)? < 1e-5);
        let go = (&ours * &r)?.sum_all()?.backward()?;
        let gt = (&theirs * &r)?.sum_all()?.backward()?;
        for v in [&a, &b, &g, &c] {
            let (p, q) = (go.get(v).unwrap(), gt.get(v).unwrap());
            assert_eq!(p.dims(), v.dims());
            assert!(max_diff(p, q)? < 1e-4, "gradient of {:?}", v.shape());
        }
        assert!(add_layer_norm(&a, &r.narrow(1, 0, 3)?, &g, &c, 1e-5).is_err());
        Ok(())
    }

    /// The composed reference: split heads, scores, bias, softmax, dropout, weighted values.
    fn composite(
        qkv: &Tensor,
        h: usize,
        bias: Option<&[f32]>,
        keep: Option<&[f32]>,
    ) -> Result<Tensor> {
        let (b, t, w) = qkv.dims3()?;
        let d = w / 3;
        let hd = d / h;
        // (B, T, D) -> (B, T, H, hd) -> (B, H, T, hd)
        let split = |i: usize| -> Result<Tensor> {
            qkv.narrow(2, i * d, d)?
                .reshape((b, t, h, hd))?
                .transpose(1, 2)?
                .contiguous()
        };
        let (q, k, v) = (split(0)?, split(1)?, split(2)?);
        let mut s = (q.matmul(&k.t()?)? / (hd as f64).sqrt())?;
        if let Some(bias) = bias {
            let bias = Tensor::from_slice(bias, (b, 1, 1, t), qkv.device())?;
            s = s.broadcast_add(&bias)?;
        }
        let mut p = candle_nn::ops::softmax(&s, D::Minus1)?;
        if let Some(keep) = keep {
            p = (p * Tensor::from_slice(keep, (b, h, t, t), qkv.device())?)?;
        }
        // (B, H, T, hd) -> (B, T, H, hd) -> (B, T, D)
        p.matmul(&v)?.transpose(1, 2)?.reshape((b, t, d))
    }

    #[test]
    fn fused_attention_matches_the_composite_with_bias_and_dropout() -> Result<()> {
        let dev = Device::Cpu;
        let (b, t, h, hd) = (3, 7, 3, 5);
        let d = h * hd;
        let qkv = Var::from_tensor(&Tensor::randn(0f32, 1., (b, t, 3 * d), &dev)?)?;
        let r = Tensor::randn(0f32, 1., (b, t, d), &dev)?;
        // The last two keys of sequence 1 are padding.
        let mut bias = vec![0f32; b * t];
        bias[t + 5] = -1e9;
        bias[t + 6] = -1e9;
        let keep: Vec<f32> = (0..b * h * t * t)
            .map(|i| if (i * 7919) % 10 == 3 { 0.0 } else { 1.0 / 0.9 })
            .collect();
        for (bias, keep) in [
            (None, None),
            (Some(&bias), None),
            (Some(&bias), Some(&keep)),
        ] {
            let scale = 1.0 / (hd as f64).sqrt();
            let ours = attention(
                &qkv,
                h,
                scale,
                None,
                bias.map(|b| Arc::new(b.clone())),
                keep.map(|k| Arc::new(k.clone())),
            )?;
            let theirs = composite(
                &qkv,
                h,
                bias.map(|b| b.as_slice()),
                keep.map(|k| k.as_slice()),
            )?;
            assert_eq!(ours.dims(), &[b, t, d]);
            assert!(
                max_diff(&ours, &theirs)? < 1e-5,
                "values {}",
                max_diff(&ours, &theirs)?
            );
            let go = (&ours * &r)?.sum_all()?.backward()?;
            let gt = (&theirs * &r)?.sum_all()?.backward()?;
            let (a, c) = (go.get(&qkv).unwrap(), gt.get(&qkv).unwrap());
            assert!(max_diff(a, c)? < 1e-5, "gradients {}", max_diff(a, c)?);
        }
        Ok(())
    }

    /// Attention for the first Q queries is the first Q rows of the full attention, and so are
    /// the gradients through them.
    #[test]
    fn fewer_queries_give_the_first_rows() -> Result<()> {
        let dev = Device::Cpu;
        let (b, t, h, hd, q) = (2, 9, 3, 4, 4);
        let qkv = Var::from_tensor(&Tensor::randn(0f32, 1., (b, t, 3 * h * hd), &dev)?)?;
        let mut bias = vec![0f32; b * t];
        bias[t + 8] = -1e9;
        let bias = Some(Arc::new(bias));
        let r = Tensor::randn(0f32, 1., (b, q, h * hd), &dev)?;
        let part = attention(&qkv, h, 0.5, Some(q), bias.clone(), None)?;
        let full = attention(&qkv, h, 0.5, None, bias, None)?.narrow(1, 0, q)?;
        assert_eq!(part.dims(), &[b, q, h * hd]);
        assert!(max_diff(&part, &full)? < 1e-6);
        let gp = (&part * &r)?.sum_all()?.backward()?;
        let gf = (&full * &r)?.sum_all()?.backward()?;
        let (x, y) = (gp.get(&qkv).unwrap(), gf.get(&qkv).unwrap());
        assert!(max_diff(x, y)? < 1e-5, "gradients {}", max_diff(x, y)?);
        Ok(())
    }

    #[test]
    fn fused_attention_rejects_mismatched_shapes() -> Result<()> {
        let qkv = Tensor::zeros((2, 3, 12), DType::F32, &Device::Cpu)?;
        assert!(attention(&qkv, 5, 1.0, None, None, None).is_err());
        assert!(attention(&qkv, 2, 1.0, Some(4), None, None).is_err());
        assert!(attention(&qkv, 2, 1.0, None, Some(Arc::new(vec![0.0; 5])), None).is_err());
        assert!(attention(&qkv, 2, 1.0, None, None, Some(Arc::new(vec![1.0; 7]))).is_err());
        Ok(())
    }
}
