//! Cross-entropy over a vocabulary, one pass forward and one backward.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::{backward_by, exp, f32_data, lane_max, lane_sum_zip, supported, vectorized};

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
        let max = lane_max(row);
        max + lane_sum_zip(row, row, |x, _| exp(x - max)).ln()
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
        backward_by(arg, grad, &CrossEntropyGrad(self.clone()))
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fused::max_diff;
    use candle_core::{Device, Var};

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
}
