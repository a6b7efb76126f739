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

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Tensor};

mod attention;
mod gelu;
mod linear;
mod loss;
mod norm;

pub use attention::attention;
pub use gelu::gelu_erf;
pub use linear::linear;
pub use loss::cross_entropy;
pub use norm::{add_layer_norm, layer_norm};

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

/// `Σ_i f(a_i, b_i)` over the common length, in `LANES` partial sums (vectorises inside
/// [`vectorized`]): the tail past the last full lane group, then the lanes.
#[inline(always)]
pub fn lane_sum_zip(a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32) -> f32 {
    let mut lanes = [0f32; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(&x, &y)| f(x, y))
        .sum();
    for (x, y) in ca.zip(cb) {
        for ((s, &x), &y) in lanes.iter_mut().zip(x).zip(y) {
            *s += f(x, y);
        }
    }
    tail + lanes.iter().sum::<f32>()
}

/// `Σ row` ([`lane_sum_zip`]).
#[inline(always)]
pub fn lane_sum(row: &[f32]) -> f32 {
    lane_sum_zip(row, row, |x, _| x)
}

/// `Σ a ⊙ b` ([`lane_sum_zip`]).
#[inline(always)]
pub fn lane_dot(a: &[f32], b: &[f32]) -> f32 {
    lane_sum_zip(a, b, |x, y| x * y)
}

/// `max row` (`-inf` when empty), in `LANES` partial maxima.
#[inline(always)]
fn lane_max(row: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let mut chunks = row.chunks_exact(LANES);
    for c in &mut chunks {
        for (m, &x) in lanes.iter_mut().zip(c) {
            *m = if x > *m { x } else { *m };
        }
    }
    chunks
        .remainder()
        .iter()
        .chain(&lanes)
        .fold(f32::NEG_INFINITY, |m, &x| if x > m { x } else { m })
}

/// The backward pass of a one-input kernel as another kernel, `op(arg, grad)`, outside the
/// graph.
fn backward_by(arg: &Tensor, grad: &Tensor, op: &impl CustomOp2) -> Result<Option<Tensor>> {
    Ok(Some(
        arg.contiguous()?
            .apply_op2_no_bwd(&grad.contiguous()?, op)?,
    ))
}

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

/// Largest absolute difference of two tensors, for the kernels' tests.
#[cfg(test)]
pub(crate) fn max_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
