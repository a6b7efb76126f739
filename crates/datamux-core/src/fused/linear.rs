//! The linear layer with its bias in one pass.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};

use super::{f32_data, kernel_err};

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

impl CustomOp3 for FusedLinear {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fused::max_diff;
    use candle_core::{Device, Var};

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
}
