//! The exact (erf) GELU of BERT and RoBERTa, forward and backward.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::{backward_by, exp, f32_data, supported, vectorized};

/// Elements per parallel chunk of the elementwise kernels: large enough that the task overhead
/// is small, small enough that 2+ threads share a `(1040, 1024)` activation evenly.
const CHUNK: usize = 1 << 14;

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
        backward_by(arg, grad, &GeluErfGrad)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fused::max_diff;
    use candle_core::{Device, Var};

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
}
