//! Multi-head attention over packed Q/K/V, one task per sequence, with its backward.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};
use datamux_kernels::{View, ViewMut};
use rayon::prelude::*;

use super::{backward_by, exp, f32_data, kernel_err, lane_dot, lane_max, lane_sum, vectorized};

/// `row <- softmax(row + bias)` in place.
#[inline(always)]
fn softmax_row(row: &mut [f32], bias: Option<&[f32]>) {
    if let Some(bias) = bias {
        row.iter_mut().zip(bias).for_each(|(s, b)| *s += b);
    }
    let max = lane_max(row);
    row.iter_mut().for_each(|s| *s = exp(*s - max));
    let inv = 1.0 / lane_sum(row);
    row.iter_mut().for_each(|s| *s *= inv);
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
        backward_by(arg, grad, &AttentionGrad(self.clone()))
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
    use crate::fused::max_diff;
    use candle_core::{D, DType};
    use candle_core::{Device, Var};

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
