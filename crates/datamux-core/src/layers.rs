//! Small building blocks shared by every model file: a LayerNorm that trains, BERT-style linear
//! and embedding initialisation, dropout through a `train` flag.
//!
//! Why not `candle_nn::LayerNorm`: in candle-nn 0.11.1 its forward on a contiguous input goes to
//! the fused `ops::layer_norm`, a custom op without a backward pass, so gradients silently vanish
//! (house-style §2.14). [`LayerNorm::forward_t`] composes the layer norm from primitives when
//! training and uses the fused kernel only at inference.

use candle_core::{D, Result, Tensor};
use candle_nn::{Init, Linear, VarBuilder};

/// Standard deviation of the normal initialisation of BERT/RoBERTa (`initializer_range`).
pub const INIT_RANGE: f64 = 0.02;

/// LayerNorm over the last dimension with a learned scale and shift.
#[derive(Clone, Debug)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    pub fn new(size: usize, eps: f64, vb: VarBuilder<'_>) -> Result<Self> {
        let weight = vb.get_with_hints(size, "weight", Init::Const(1.0))?;
        let bias = vb.get_with_hints(size, "bias", Init::Const(0.0))?;
        Ok(Self { weight, bias, eps })
    }

    /// `(.., D) -> (.., D)`.
    pub fn forward_t(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        if train {
            layer_norm_trainable(xs, &self.weight, &self.bias, self.eps)
        } else {
            candle_nn::ops::layer_norm(&xs.contiguous()?, &self.weight, &self.bias, self.eps as f32)
        }
    }
}

/// LayerNorm from differentiable primitives; `gamma` and `beta` broadcast against `xs`.
pub fn layer_norm_trainable(
    xs: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f64,
) -> Result<Tensor> {
    normalize(xs, eps)?
        .broadcast_mul(gamma)?
        .broadcast_add(beta)
}

/// `(x - mean) / sqrt(var + eps)` over the last dimension, without scale and shift.
pub fn normalize(xs: &Tensor, eps: f64) -> Result<Tensor> {
    let mean = xs.mean_keepdim(D::Minus1)?;
    let centered = xs.broadcast_sub(&mean)?;
    let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
    centered.broadcast_div(&(var + eps)?.sqrt()?)
}

/// A linear layer with BERT's initialisation: weights normal(0, 0.02), bias zero.
pub fn linear(in_dim: usize, out_dim: usize, vb: VarBuilder<'_>) -> Result<Linear> {
    let w = vb.get_with_hints(
        (out_dim, in_dim),
        "weight",
        Init::Randn {
            mean: 0.0,
            stdev: INIT_RANGE,
        },
    )?;
    let b = vb.get_with_hints(out_dim, "bias", Init::Const(0.0))?;
    Ok(Linear::new(w, Some(b)))
}

/// An embedding table `(rows, D)` with BERT's initialisation, normal(0, 0.02).
pub fn embedding_table(rows: usize, d: usize, vb: VarBuilder<'_>) -> Result<Tensor> {
    vb.get_with_hints(
        (rows, d),
        "weight",
        Init::Randn {
            mean: 0.0,
            stdev: INIT_RANGE,
        },
    )
}

/// Inverted dropout when training with `p > 0`, the identity otherwise. Uses candle's (unseeded)
/// RNG, which is why determinism tests run with dropout 0 (house-style §2.9).
pub fn dropout(xs: &Tensor, p: f64, train: bool) -> Result<Tensor> {
    if train && p > 0.0 {
        candle_nn::ops::dropout(xs, p as f32)
    } else {
        Ok(xs.clone())
    }
}

/// Softmax over the last dimension: the fused kernel at inference, the differentiable composite
/// when training (the fused one has no backward pass in candle-nn 0.11.1).
pub fn softmax_last(xs: &Tensor, train: bool) -> Result<Tensor> {
    if train {
        candle_nn::ops::softmax(xs, D::Minus1)
    } else {
        candle_nn::ops::softmax_last_dim(&xs.contiguous()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    #[test]
    fn trainable_and_fused_layer_norm_agree() -> Result<()> {
        let dev = Device::Cpu;
        let map = crate::init::SeededVarMap::new(0);
        let vb = map.var_builder(DType::F32, &dev);
        let ln = LayerNorm::new(7, 1e-5, vb.pp("ln"))?;
        let xs = Tensor::arange(0f32, 21., &dev)?.reshape((3, 7))?.sqr()?;
        let a = ln.forward_t(&xs, true)?;
        let b = ln.forward_t(&xs, false)?;
        let diff = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-4, "diff {diff}");
        Ok(())
    }
}
