//! LayerNorm over the last dimension, alone or after a residual sum, with its backward.

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::{f32_data, lane_sum, lane_sum_zip, vectorized};

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

impl CustomOp3 for AddNorm {
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
                        self.0.normalize_row(y, &x, g, beta);
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
        let var = lane_sum_zip(x, x, |v, _| (v - mean) * (v - mean)) / n;
        (mean, 1.0 / (var + self.eps).sqrt())
    }

    /// `y = (x - μ) / σ ⊙ gamma + beta` for one row.
    #[inline(always)]
    fn normalize_row(&self, y: &mut [f32], x: &[f32], gamma: &[f32], beta: &[f32]) {
        let (mean, inv) = self.stats(x);
        for (((y, &x), &g), &b) in y.iter_mut().zip(x).zip(gamma).zip(beta) {
            *y = (x - mean) * inv * g + b;
        }
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

impl CustomOp3 for LayerNormOp {
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
                        self.normalize_row(y, x, g, b);
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

impl CustomOp3 for LayerNormGrad {
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
                        let mean_hx = lane_sum_zip(&h, x, |h, x| h * (x - mean)) * inv / n;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fused::max_diff;
    use candle_core::{Device, Var};

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
}
