//! Small building blocks shared by every model file: a LayerNorm that trains, BERT-style linear
//! and embedding initialisation, dropout through a `train` flag.
//!
//! Why not `candle_nn::LayerNorm`: in candle-nn 0.11.1 its forward on a contiguous input goes to
//! the fused `ops::layer_norm`, a custom op without a backward pass, so gradients silently vanish
//! (house-style §2.14). [`LayerNorm::forward_t`] runs `fused::layer_norm`, which has one, on the
//! CPU; elsewhere it composes the norm from primitives when training and uses candle-nn's kernel
//! only at inference.
//!
//! Why [`expand_dim`] and [`Linear`]: candle-core 0.11.1 takes the gradient of a broadcast
//! operand with a sum over the broadcast dimensions, and a sum over any dimension but the last
//! runs a scalar loop with two integer divisions per element (`ReduceSum`, its slow path). Every
//! bias, LayerNorm scale and position table broadcast over the rows of a batch went through it:
//! 18 % of a text training step in a profile (docs/performance.md). Expanding with a matmul by a
//! column of ones makes that gradient a matmul too.

use std::cell::RefCell;

use candle_core::{D, Module, Result, Tensor};
use candle_nn::{Init, VarBuilder};
use rand::Rng;
use rand_chacha::ChaCha8Rng;

use crate::init::rng_for;
use crate::model::Embedded;

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

    /// `norm(xs + residual)`: one fused pass on the CPU in f32 (`fused::add_layer_norm`).
    pub fn forward_add(&self, xs: &Tensor, residual: &Tensor, train: bool) -> Result<Tensor> {
        if crate::fused::supported(xs) && crate::fused::supported(residual) {
            crate::fused::add_layer_norm(xs, residual, &self.weight, &self.bias, self.eps)
        } else {
            self.forward_t(&(xs + residual)?, train)
        }
    }

    /// Scale `(D)`, shift `(D)` and epsilon, for kernels that fuse the norm with other work.
    pub fn params(&self) -> (&Tensor, &Tensor, f64) {
        (&self.weight, &self.bias, self.eps)
    }

    /// `(.., D) -> (.., D)`: `fused::layer_norm` (with a backward) on the CPU in f32; elsewhere
    /// the composed norm when training and candle-nn's kernel at inference.
    pub fn forward_t(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        if crate::fused::supported(xs) {
            crate::fused::layer_norm(xs, &self.weight, &self.bias, self.eps)
        } else if train {
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
    add_trailing(&mul_trailing(&normalize(xs, eps)?, gamma)?, beta)
}

/// `(x - mean) / sqrt(var + eps)` over the last dimension, without scale and shift.
pub fn normalize(xs: &Tensor, eps: f64) -> Result<Tensor> {
    let mean = xs.mean_keepdim(D::Minus1)?;
    let centered = xs.broadcast_sub(&mean)?;
    let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
    centered.broadcast_div(&(var + eps)?.sqrt()?)
}

/// `xs` with its size-1 dimension `dim` repeated `size` times, as `broadcast_as` would give,
/// computed as a matmul by a column of ones so that the gradient of `xs` is a matmul (a
/// reduction over that dimension in candle would take its slow path; module docs).
pub fn expand_dim(xs: &Tensor, dim: usize, size: usize) -> Result<Tensor> {
    let dims = xs.dims();
    if dims.get(dim) != Some(&1) {
        candle_core::bail!("expand_dim: dimension {dim} of {:?} is not 1", xs.shape());
    }
    let pre: usize = dims[..dim].iter().product();
    let post: usize = dims[dim + 1..].iter().product();
    let ones = Tensor::ones((pre, size, 1), xs.dtype(), xs.device())?;
    // (pre, size, 1) x (pre, 1, post) -> (pre, size, post)
    let ys = ones.matmul(&xs.contiguous()?.reshape((pre, 1, post))?)?;
    let mut out = dims.to_vec();
    out[dim] = size;
    ys.reshape(out)
}

/// `b` of shape `S` repeated over the leading dimensions of `shape = (.., S)`.
fn expand_trailing(b: &Tensor, shape: &[usize]) -> Result<Tensor> {
    if !shape.ends_with(b.dims()) {
        candle_core::bail!("cannot expand {:?} to {shape:?}", b.shape());
    }
    let m = b.elem_count();
    let total: usize = shape.iter().product();
    let rows = total.checked_div(m).unwrap_or(0);
    // (M) -> (1, M) -> (R, M) -> shape
    expand_dim(&b.reshape((1, m))?, 0, rows)?.reshape(shape)
}

/// `xs + b` where `b` has the trailing shape of `xs` (a bias, a shift, a position table); the
/// same values as `broadcast_add`, with the gradient of `b` as a matmul.
pub fn add_trailing(xs: &Tensor, b: &Tensor) -> Result<Tensor> {
    xs + expand_trailing(b, xs.dims())?
}

/// `xs ⊙ g` where `g` has the trailing shape of `xs`; see [`add_trailing`].
pub fn mul_trailing(xs: &Tensor, g: &Tensor) -> Result<Tensor> {
    xs * expand_trailing(g, xs.dims())?
}

/// A linear layer `(.., in) -> (.., out)`: on the CPU in f32 `fused::linear` (bias and product
/// in one pass, its own backward); elsewhere one 2-D matmul over every row, then the bias
/// through [`add_trailing`]. candle-nn's `Linear` adds the bias by broadcasting, and falls back to a
/// batched matmul with a broadcast weight (whose gradient is the slow reduction over the batch)
/// for inputs that are not contiguous.
#[derive(Clone, Debug)]
pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    /// `weight` is `(out, in)`, `bias` `(out)`.
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self { weight, bias }
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }
}

/// candle-nn's constructors (`candle_nn::linear`, its default initialisation) build the weights.
impl From<candle_nn::Linear> for Linear {
    fn from(l: candle_nn::Linear) -> Self {
        Self::new(l.weight().clone(), l.bias().cloned())
    }
}

impl Module for Linear {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let (out, din) = self.weight.dims2()?;
        let mut dims = xs.dims().to_vec();
        // (.., in) -> (R, in) -> (R, out) -> (.., out)
        let flat = xs.contiguous()?.reshape(((), din))?;
        let ys = if crate::fused::supported(&flat) && crate::fused::supported(&self.weight) {
            crate::fused::linear(&flat, &self.weight, self.bias.as_ref())?
        } else {
            let ys = flat.matmul(&self.weight.t()?)?;
            match &self.bias {
                Some(b) => add_trailing(&ys, b)?,
                None => ys,
            }
        };
        if let Some(last) = dims.last_mut() {
            *last = out;
        }
        ys.reshape(dims)
    }
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

/// The end of an embedding block for sequence instances (text tokens, audio frames): a learned
/// position embedding, an optional LayerNorm, dropout, and padding zeroed so that it adds
/// nothing to the mix. Parameter paths: `positions.weight`, `norm.*`. Positions count from 0 per
/// instance; prefix slots take none (method.md §2).
#[derive(Clone, Debug)]
pub struct PositionEmbedding {
    /// `(max_len, D)`.
    pub positions: Tensor,
    pub norm: Option<LayerNorm>,
    pub dropout: f64,
}

impl PositionEmbedding {
    pub fn new(
        max_len: usize,
        d: usize,
        norm: bool,
        dropout: f64,
        eps: f64,
        vb: VarBuilder<'_>,
    ) -> Result<Self> {
        Ok(Self {
            positions: embedding_table(max_len, d, vb.pp("positions"))?,
            norm: if norm {
                Some(LayerNorm::new(d, eps, vb.pp("norm"))?)
            } else {
                None
            },
            dropout,
        })
    }

    /// The longest instance it has positions for; a longer one is an error naming both.
    pub fn check_len(&self, l: usize) -> Result<()> {
        let max = self.positions.dim(0)?;
        if l > max {
            candle_core::bail!("sequence length {l} exceeds the {max} position embeddings");
        }
        Ok(())
    }

    /// Per-position embeddings `(B, N, L, D)` and padding flags `(B, N, L)` (1 = padding) ->
    /// the instances' embeddings, padding zeroed, with the mask.
    pub fn forward_t(&self, xs: &Tensor, pad: &Tensor, train: bool) -> Result<Embedded> {
        let (_b, _n, l, _d) = xs.dims4()?;
        self.check_len(l)?;
        let xs = add_trailing(xs, &self.positions.narrow(0, 0, l)?)?; // + (L, D)
        let xs = match &self.norm {
            Some(norm) => norm.forward_t(&xs, train)?,
            None => xs,
        };
        let xs = dropout(&xs, self.dropout, train)?;
        // Zero the padding: (B, N, L) -> (B, N, L, 1) keep-mask.
        let keep = (1.0 - pad.to_dtype(candle_core::DType::F32)?)?.unsqueeze(3)?;
        Ok(Embedded {
            xs: xs.broadcast_mul(&keep)?,
            pad: Some(pad.clone()),
        })
    }
}

thread_local! {
    /// The dropout mask stream of this thread; [`seed_dropout`] resets it at the start of a run.
    static DROPOUT_RNG: RefCell<ChaCha8Rng> = RefCell::new(rng_for(0, "dropout"));
}

/// Reset this thread's dropout stream to the one named by (seed, `name`), so a training run draws
/// the same masks whatever ran before it on the thread. The training loop calls it per stage.
pub fn seed_dropout(seed: u64, name: &str) {
    DROPOUT_RNG.with(|r| *r.borrow_mut() = rng_for(seed, name));
}

/// Inverted dropout when training with `p > 0`, the identity otherwise. The mask comes from this
/// thread's ChaCha stream ([`seed_dropout`]), not from candle's CPU RNG, which cannot be seeded:
/// same seed, same masks, same run.
pub fn dropout(xs: &Tensor, p: f64, train: bool) -> Result<Tensor> {
    if !(train && p > 0.0) {
        return Ok(xs.clone());
    }
    let mask = dropout_mask(xs.elem_count(), p);
    let mask = Tensor::from_vec(mask, xs.shape(), xs.device())?.to_dtype(xs.dtype())?;
    xs * mask
}

/// The next `len` inverted-dropout factors of this thread's stream: 0 with probability `p`,
/// `1 / (1 - p)` otherwise; what [`dropout`] multiplies a tensor of `len` elements by.
pub fn dropout_mask(len: usize, p: f64) -> Vec<f32> {
    let (p, scale) = (p as f32, (1.0 / (1.0 - p)) as f32);
    DROPOUT_RNG.with(|r| {
        let mut rng = r.borrow_mut();
        (0..len)
            .map(|_| if rng.random::<f32>() < p { 0.0 } else { scale })
            .collect()
    })
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
    fn dropout_masks_follow_the_seed() -> Result<()> {
        let xs = Tensor::ones((5, 37), DType::F32, &Device::Cpu)?;
        let draw = |seed| -> Result<Vec<f32>> {
            seed_dropout(seed, "t");
            dropout(&xs, 0.3, true)?.flatten_all()?.to_vec1()
        };
        let (a, b, c) = (draw(1)?, draw(1)?, draw(2)?);
        assert_eq!(a, b);
        assert_ne!(a, c);
        // Inverted dropout: kept entries are scaled by 1 / (1 - p), about 30 % are zero.
        assert!(a.iter().all(|v| *v == 0.0 || (v - 1.0 / 0.7).abs() < 1e-6));
        let zeros = a.iter().filter(|v| **v == 0.0).count();
        assert!((30..=80).contains(&zeros), "{zeros} of 185 dropped");
        assert_eq!(
            dropout(&xs, 0.3, false)?.sum_all()?.to_scalar::<f32>()?,
            185.0
        );
        Ok(())
    }

    /// The matmul expansions give `broadcast_*`'s values and gradients, at odd sizes.
    #[test]
    fn matmul_expansions_match_broadcasts() -> Result<()> {
        let dev = Device::Cpu;
        let x = candle_core::Var::from_tensor(&Tensor::randn(0f32, 1., (3, 5, 7), &dev)?)?;
        let b = candle_core::Var::from_tensor(&Tensor::randn(0f32, 1., (5, 7), &dev)?)?;
        let c = candle_core::Var::from_tensor(&Tensor::randn(0f32, 1., (3, 1, 7), &dev)?)?;
        let r = Tensor::randn(0f32, 1., (3, 5, 7), &dev)?;
        let ours = (add_trailing(&x, &b)? + mul_trailing(&x, &b)? + expand_dim(&c, 1, 5)?)?;
        let theirs = (x.broadcast_add(&b)? + x.broadcast_mul(&b)? + c.broadcast_as((3, 5, 7))?)?;
        let (go, gt) = (
            (&ours * &r)?.sum_all()?.backward()?,
            (&theirs * &r)?.sum_all()?.backward()?,
        );
        let max_diff = |p: &Tensor, q: &Tensor| -> Result<f32> {
            (p - q)?.abs()?.max_all()?.to_scalar::<f32>()
        };
        assert!(max_diff(&ours, &theirs)? < 1e-5);
        for v in [&x, &b, &c] {
            let (p, q) = (go.get(v).unwrap(), gt.get(v).unwrap());
            assert_eq!(p.dims(), v.dims());
            assert!(max_diff(p, q)? < 1e-4, "gradient of {:?}", v.shape());
        }
        // A trailing shape that does not match is an error, not a silent broadcast.
        assert!(add_trailing(&x, &c).is_err());
        assert!(expand_dim(&x, 1, 4).is_err());
        Ok(())
    }

    #[test]
    fn trainable_and_fused_layer_norm_agree() -> Result<()> {
        let dev = Device::Cpu;
        let map = crate::init::SeededVarMap::new(0);
        let vb = map.var_builder(DType::F32, &dev);
        let ln = LayerNorm::new(7, 1e-5, vb.pp("ln"))?;
        let xs = Tensor::arange(0f32, 21., &dev)?.reshape((3, 7))?.sqr()?;
        // The three paths: ours (fused on the CPU), the composed one, candle-nn's kernel.
        let (w, b, eps) = ln.params();
        let a = ln.forward_t(&xs, true)?;
        let c = layer_norm_trainable(&xs, w, b, eps)?;
        let k = candle_nn::ops::layer_norm(&xs, w, b, eps as f32)?;
        for other in [&c, &k] {
            let diff = (&a - other)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(diff < 1e-4, "diff {diff}");
        }
        Ok(())
    }
}
