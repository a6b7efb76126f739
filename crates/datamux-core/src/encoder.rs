//! The modality-agnostic Transformer encoder, `(B, T, D)` with a key-padding mask `(B, T)` ->
//! `(B, T, D)`. Shared by the text backbone and the ViT.
//!
//! Architecture of RoBERTa (post-LN by default; pre-LN on request), GELU, dropout on attention
//! probabilities and on each residual branch. Reference: `configs/roberta.json` of
//! `princeton-nlp/DataMUX` (method.md §6.1). Unlike the reference, muxed padding is masked: a
//! position is masked only where every instance is padding (method.md §13, difference 2).

use std::sync::Arc;

use candle_core::Module;
use candle_core::{DType, Result, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use crate::error::ConfigError;
use crate::fused;
use crate::layers::{self, LayerNorm, Linear};
use crate::model::Backbone;

/// Encoder sizes, in the Hugging Face vocabulary so ablations line up with `configs/*.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    #[serde(deserialize_with = "crate::range::at_least_one")]
    pub num_hidden_layers: usize,
    #[serde(deserialize_with = "crate::range::at_least_one")]
    pub hidden_size: usize,
    #[serde(deserialize_with = "crate::range::at_least_one")]
    pub num_attention_heads: usize,
    #[serde(deserialize_with = "crate::range::at_least_one")]
    pub intermediate_size: usize,
    #[serde(deserialize_with = "crate::range::probability")]
    pub hidden_dropout_prob: f64,
    #[serde(deserialize_with = "crate::range::probability")]
    pub attention_probs_dropout_prob: f64,
    #[serde(deserialize_with = "crate::range::positive")]
    pub layer_norm_eps: f64,
    /// LayerNorm before each sub-layer (plus a final one) instead of after the residual sum.
    pub pre_layer_norm: bool,
}

impl Default for Config {
    fn default() -> Self {
        Self::base()
    }
}

impl Config {
    /// RoBERTa-base, the paper's size (12 x 768, 12 heads, FFN 3072).
    pub fn base() -> Self {
        Self {
            num_hidden_layers: 12,
            hidden_size: 768,
            num_attention_heads: 12,
            intermediate_size: 3072,
            hidden_dropout_prob: 0.1,          // RoBERTa's
            attention_probs_dropout_prob: 0.1, // RoBERTa's
            layer_norm_eps: 1e-5,              // RoBERTa's
            pre_layer_norm: false,             // RoBERTa is post-LN
        }
    }

    /// A CPU-sized encoder: 4 x 256, 4 heads, FFN 1024.
    pub fn small() -> Self {
        Self {
            num_hidden_layers: 4,
            hidden_size: 256,
            num_attention_heads: 4,
            intermediate_size: 1024,
            ..Self::base()
        }
    }

    /// Test size, deliberately odd (transformers' tester convention): 2 x 32, 4 heads, FFN 37.
    pub fn tiny() -> Self {
        Self {
            num_hidden_layers: 2,
            hidden_size: 32,
            num_attention_heads: 4,
            intermediate_size: 37,
            hidden_dropout_prob: 0.0,
            attention_probs_dropout_prob: 0.0,
            ..Self::base()
        }
    }

    pub fn validate(&self) -> std::result::Result<(), ConfigError> {
        for (what, v) in [
            ("num_hidden_layers", self.num_hidden_layers),
            ("hidden_size", self.hidden_size),
            ("num_attention_heads", self.num_attention_heads),
            ("intermediate_size", self.intermediate_size),
        ] {
            if v == 0 {
                return Err(ConfigError::Zero { what });
            }
        }
        if self.hidden_size % self.num_attention_heads != 0 {
            return Err(ConfigError::HeadsDoNotDivideHidden {
                hidden_size: self.hidden_size,
                num_heads: self.num_attention_heads,
            });
        }
        for (what, value) in [
            ("hidden_dropout_prob", self.hidden_dropout_prob),
            (
                "attention_probs_dropout_prob",
                self.attention_probs_dropout_prob,
            ),
        ] {
            if !(0.0..1.0).contains(&value) {
                return Err(ConfigError::BadProbability { what, value });
            }
        }
        Ok(())
    }

    /// Floating-point operations (a multiply-add counts 2) of one forward pass over `rows` rows
    /// of `len` positions: per layer and position the Q, K, V and output projections (4·D²
    /// multiply-adds) and the FFN (2·D·F), plus the scores and the weighted values (2·len·D).
    /// Softmax, LayerNorm, GELU and the residual sums are left out, as in the usual count.
    pub fn forward_flops(&self, rows: usize, len: usize) -> f64 {
        // Every position kept in the last layer is the full count.
        self.prefix_flops(rows, len, len)
    }

    /// [`Self::forward_flops`] when the last layer queries only the first `keep` positions
    /// (`Encoder::forward_prefix`): there Q, K and V are projected for every position (one packed
    /// product), the scores and weighted values, the output projection and the FFN for `keep`.
    pub fn prefix_flops(&self, rows: usize, len: usize, keep: usize) -> f64 {
        let (d, f, t, k) = (
            self.hidden_size as f64,
            self.intermediate_size as f64,
            len as f64,
            keep.min(len) as f64,
        );
        let layers = self.num_hidden_layers as f64;
        let full = t * (8.0 * d * d + 4.0 * d * f) + 4.0 * t * t * d;
        let last = t * 6.0 * d * d + 4.0 * k * t * d + k * (2.0 * d * d + 4.0 * d * f);
        rows as f64 * ((layers - 1.0) * full + last)
    }
}

/// Multi-head self-attention with a key-padding bias.
#[derive(Clone, Debug)]
struct Attention {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    heads: usize,
    dropout: f64,
}

impl Attention {
    fn new(cfg: &Config, vb: VarBuilder<'_>) -> Result<Self> {
        let d = cfg.hidden_size;
        Ok(Self {
            q: layers::linear(d, d, vb.pp("q"))?,
            k: layers::linear(d, d, vb.pp("k"))?,
            v: layers::linear(d, d, vb.pp("v"))?,
            o: layers::linear(d, d, vb.pp("o"))?,
            heads: cfg.num_attention_heads,
            dropout: cfg.attention_probs_dropout_prob,
        })
    }

    /// `(B, T, D)`, bias `(B, 1, 1, T)` -> `(B, T, D)`: the fused kernel where it runs
    /// (`fused::supported`), the composed ops elsewhere.
    /// With `queries`, only the first that many positions attend: `(B, Q, D)`.
    fn forward_t(
        &self,
        xs: &Tensor,
        bias: Option<&Tensor>,
        train: bool,
        queries: Option<usize>,
    ) -> Result<Tensor> {
        if fused::supported(xs) {
            self.forward_fused(xs, bias, train, queries)
        } else {
            let out = self.forward_composed(xs, bias, train)?;
            match queries {
                Some(q) => out.narrow(1, 0, q),
                None => Ok(out),
            }
        }
    }

    /// One `(D, 3D)` projection for Q, K and V, then `fused::attention`. The dropout mask is
    /// drawn from the same stream, in the same order, as the composed path draws it.
    fn forward_fused(
        &self,
        xs: &Tensor,
        bias: Option<&Tensor>,
        train: bool,
        queries: Option<usize>,
    ) -> Result<Tensor> {
        let (b, t, d) = xs.dims3()?;
        let weights = [&self.q, &self.k, &self.v];
        let w = Tensor::cat(&weights.map(Linear::weight), 0)?; // (3D, D)
        let bias_qkv = match weights.map(Linear::bias) {
            [Some(q), Some(k), Some(v)] => Some(Tensor::cat(&[q, k, v], 0)?), // (3D)
            _ => None,
        };
        let qkv = xs.apply(&Linear::new(w, bias_qkv))?; // (B, T, 3D)
        let key_bias = bias
            .map(|t| t.flatten_all()?.to_vec1::<f32>().map(Arc::new))
            .transpose()?; // (B·T)
        let q = queries.unwrap_or(t);
        let keep = (train && self.dropout > 0.0)
            .then(|| Arc::new(layers::dropout_mask(b * self.heads * q * t, self.dropout)));
        let scale = 1.0 / ((d / self.heads) as f64).sqrt();
        fused::attention(&qkv, self.heads, scale, queries, key_bias, keep)?.apply(&self.o)
    }

    fn forward_composed(&self, xs: &Tensor, bias: Option<&Tensor>, train: bool) -> Result<Tensor> {
        let (b, t, d) = xs.dims3()?;
        let (h, hd) = (self.heads, d / self.heads);
        // (B, T, D) -> (B, T, H, hd) -> (B, H, T, hd)
        let split = |x: Tensor| x.reshape((b, t, h, hd))?.transpose(1, 2)?.contiguous();
        let q = split(xs.apply(&self.q)?)?;
        let k = split(xs.apply(&self.k)?)?;
        let v = split(xs.apply(&self.v)?)?;
        let scores = (q.matmul(&k.t()?)? / (hd as f64).sqrt())?; // (B, H, T, T)
        let scores = match bias {
            Some(bias) => scores.broadcast_add(bias)?,
            None => scores,
        };
        let probs = layers::dropout(&layers::softmax_last(&scores, train)?, self.dropout, train)?;
        let ctx = probs.matmul(&v)?; // (B, H, T, hd)
        // (B, H, T, hd) -> (B, T, H, hd) -> (B, T, D)
        ctx.transpose(1, 2)?.reshape((b, t, d))?.apply(&self.o)
    }
}

/// ref: `RobertaLayer` (attention, intermediate, output). Also the two layers of the
/// contextual multiplexer (`mux.rs`).
#[derive(Clone, Debug)]
pub(crate) struct Layer {
    attn: Attention,
    attn_norm: LayerNorm,
    ffn_in: Linear,
    ffn_out: Linear,
    ffn_norm: LayerNorm,
    dropout: f64,
    pre_ln: bool,
}

impl Layer {
    pub(crate) fn new(cfg: &Config, vb: VarBuilder<'_>) -> Result<Self> {
        let d = cfg.hidden_size;
        Ok(Self {
            attn: Attention::new(cfg, vb.pp("attn"))?,
            attn_norm: LayerNorm::new(d, cfg.layer_norm_eps, vb.pp("attn_norm"))?,
            ffn_in: layers::linear(d, cfg.intermediate_size, vb.pp("ffn_in"))?,
            ffn_out: layers::linear(cfg.intermediate_size, d, vb.pp("ffn_out"))?,
            ffn_norm: LayerNorm::new(d, cfg.layer_norm_eps, vb.pp("ffn_norm"))?,
            dropout: cfg.hidden_dropout_prob,
            pre_ln: cfg.pre_layer_norm,
        })
    }

    fn ffn(&self, xs: &Tensor) -> Result<Tensor> {
        fused::gelu_erf(&xs.apply(&self.ffn_in)?)?.apply(&self.ffn_out)
    }

    /// `(B, T, D) -> (B, T, D)`, or `(B, Q, D)` for the first `Q = rows` positions only: every
    /// position is still a key and value, but only those rows are queried and go on through the
    /// FFN (the last layer under a demux that reads only the prefix).
    pub(crate) fn forward_t(
        &self,
        xs: &Tensor,
        bias: Option<&Tensor>,
        train: bool,
        rows: Option<usize>,
    ) -> Result<Tensor> {
        let drop = |x: Tensor| layers::dropout(&x, self.dropout, train);
        let residual = match rows {
            Some(q) => xs.narrow(1, 0, q)?, // (B, Q, D)
            None => xs.clone(),
        };
        if self.pre_ln {
            let a =
                self.attn
                    .forward_t(&self.attn_norm.forward_t(xs, train)?, bias, train, rows)?;
            let xs = (residual + drop(a)?)?;
            let f = self.ffn(&self.ffn_norm.forward_t(&xs, train)?)?;
            xs + drop(f)?
        } else {
            let a = self.attn.forward_t(xs, bias, train, rows)?;
            let xs = self.attn_norm.forward_add(&residual, &drop(a)?, train)?;
            let f = self.ffn(&xs)?;
            self.ffn_norm.forward_add(&xs, &drop(f)?, train)
        }
    }
}

/// The encoder stack. Parameter paths: `layers.{i}.attn.{q,k,v,o}`, `layers.{i}.ffn_{in,out}`,
/// `layers.{i}.{attn,ffn}_norm`, and `final_norm` with pre-LN.
#[derive(Clone, Debug)]
pub struct Encoder {
    layers: Vec<Layer>,
    final_norm: Option<LayerNorm>,
    cfg: Config,
}

impl Encoder {
    pub fn new(cfg: &Config, vb: VarBuilder<'_>) -> Result<Self> {
        cfg.validate().map_err(candle_core::Error::wrap)?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| Layer::new(cfg, vb.pp("layers").pp(i)))
            .collect::<Result<Vec<_>>>()?;
        let final_norm = if cfg.pre_layer_norm {
            Some(LayerNorm::new(
                cfg.hidden_size,
                cfg.layer_norm_eps,
                vb.pp("final_norm"),
            )?)
        } else {
            None
        };
        Ok(Self {
            layers,
            final_norm,
            cfg: cfg.clone(),
        })
    }

    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }
}

/// `(B, T)` padding flags (1 = padding) -> additive attention bias `(B, 1, 1, T)`.
pub fn padding_bias(pad: &Tensor, dtype: DType) -> Result<Tensor> {
    let (b, t) = pad.dims2()?;
    // A large finite negative rather than -inf: a row with every key masked then gives a uniform
    // distribution instead of NaN. Prefix slots are never masked, so this does not arise with
    // the index demultiplexer.
    (pad.to_dtype(dtype)? * -1e9)?.reshape((b, 1, 1, t))
}

impl Backbone for Encoder {
    /// `(B, T, D)`, pad `(B, T)` -> `(B, T, D)`.
    fn forward_t(&self, xs: &Tensor, pad: Option<&Tensor>, train: bool) -> Result<Tensor> {
        self.forward_rows(xs, pad, train, None)
    }

    /// The last layer queries only the first `rows` positions: every earlier layer is needed
    /// in full for its keys and values, the last one only for what is read.
    fn forward_prefix(
        &self,
        xs: &Tensor,
        pad: Option<&Tensor>,
        train: bool,
        rows: usize,
    ) -> Result<Tensor> {
        self.forward_rows(xs, pad, train, Some(rows))
    }

    fn hidden_size(&self) -> usize {
        self.cfg.hidden_size
    }

    fn forward_flops(&self, rows: usize, len: usize) -> Option<f64> {
        Some(self.cfg.forward_flops(rows, len))
    }

    fn prefix_flops(&self, rows: usize, len: usize, keep: usize) -> Option<f64> {
        Some(self.cfg.prefix_flops(rows, len, keep))
    }
}

impl Encoder {
    /// `(B, T, D)` -> `(B, T, D)`, or `(B, rows, D)` with the last layer cut to those rows.
    fn forward_rows(
        &self,
        xs: &Tensor,
        pad: Option<&Tensor>,
        train: bool,
        rows: Option<usize>,
    ) -> Result<Tensor> {
        let (_b, t, d) = xs.dims3()?;
        if rows.is_some_and(|r| r > t) {
            candle_core::bail!("encoder: {rows:?} output rows of {t} positions");
        }
        if d != self.cfg.hidden_size {
            candle_core::bail!(
                "encoder expects width {}, got {:?}",
                self.cfg.hidden_size,
                xs.shape()
            );
        }
        let bias = pad.map(|p| padding_bias(p, xs.dtype())).transpose()?;
        let mut xs = xs.clone();
        let last = self.layers.len().saturating_sub(1);
        for (i, layer) in self.layers.iter().enumerate() {
            let keep = if i == last { rows } else { None };
            xs = layer.forward_t(&xs, bias.as_ref(), train, keep)?;
            if !train {
                // The fused kernels record their inputs for a backward pass; at inference each
                // layer's output is cut from that graph, so an encoding that is kept (a batch of
                // predictions, the bench's stage inputs) does not keep every layer's
                // activations alive (candle-nn's fused inference kernels had no graph either).
                xs = xs.detach();
            }
        }
        match &self.final_norm {
            Some(norm) => norm.forward_t(&xs, train),
            None => Ok(xs),
        }
    }

    /// One layer alone, for the per-stage micro-benchmark: `(B, T, D) -> (B, T, D)`.
    pub fn forward_layer(
        &self,
        i: usize,
        xs: &Tensor,
        pad: Option<&Tensor>,
        train: bool,
    ) -> Result<Tensor> {
        let bias = pad.map(|p| padding_bias(p, xs.dtype())).transpose()?;
        match self.layers.get(i) {
            Some(layer) => layer.forward_t(xs, bias.as_ref(), train, None),
            None => candle_core::bail!("layer {i} out of range 0..{}", self.layers.len()),
        }
    }
}

impl Module for Encoder {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        Backbone::forward_t(self, xs, None, false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fused attention gives the composed path's values and gradients, dropout included
    /// (same seed, same mask), with padding, at odd sizes.
    #[test]
    fn fused_and_composed_attention_agree() -> Result<()> {
        let dev = candle_core::Device::Cpu;
        let cfg = Config {
            attention_probs_dropout_prob: 0.3,
            ..Config::tiny()
        };
        let map = crate::init::SeededVarMap::new(3);
        let attn = Attention::new(&cfg, map.var_builder(DType::F32, &dev).pp("attn"))?;
        let xs = candle_core::Var::from_tensor(&Tensor::randn(0f32, 1., (3, 7, 32), &dev)?)?;
        let pad = Tensor::from_slice(&[0u8, 0, 0, 0, 0, 1, 1], (1, 7), &dev)?.repeat((3, 1))?;
        let bias = padding_bias(&pad, DType::F32)?;
        let r = Tensor::randn(0f32, 1., (3, 7, 32), &dev)?;
        for train in [false, true] {
            layers::seed_dropout(5, "t");
            let a = attn.forward_fused(&xs, Some(&bias), train, None)?;
            layers::seed_dropout(5, "t");
            let b = attn.forward_composed(&xs, Some(&bias), train)?;
            let diff = (&a - &b)?
                .abs()?
                .flatten_all()?
                .max(0)?
                .to_scalar::<f32>()?;
            assert!(diff < 1e-5, "train {train}: values differ by {diff}");
            if !train {
                // The composed inference path uses candle's fused softmax, which has no backward.
                continue;
            }
            let (ga, gb) = (
                (&a * &r)?.sum_all()?.backward()?,
                (&b * &r)?.sum_all()?.backward()?,
            );
            let vars = map.sorted_vars()?;
            let named = vars.iter().map(|(n, v)| (n.as_str(), v.as_tensor()));
            for (name, var) in named.chain([("xs", xs.as_tensor())]) {
                // The key bias shifts each query's scores by a constant: its gradient is zero,
                // and candle's backward may leave it out.
                let zeros = var.zeros_like()?;
                let (p, q) = (ga.get(var).unwrap_or(&zeros), gb.get(var).unwrap_or(&zeros));
                let diff = (p - q)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
                assert!(diff < 1e-5, "gradient of {name} differs by {diff}");
            }
        }
        Ok(())
    }

    /// Cutting the last layer to the first rows gives those rows of the full output, post-LN
    /// and pre-LN, with padding; and the count of its work is between none and the full one.
    #[test]
    fn prefix_rows_match_the_full_output() -> Result<()> {
        let dev = candle_core::Device::Cpu;
        for pre_layer_norm in [false, true] {
            let cfg = Config {
                pre_layer_norm,
                ..Config::tiny()
            };
            let map = crate::init::SeededVarMap::new(4);
            let enc = Encoder::new(&cfg, map.var_builder(DType::F32, &dev))?;
            let xs = Tensor::randn(0f32, 1., (3, 9, 32), &dev)?;
            let pad =
                Tensor::from_slice(&[0u8, 0, 0, 0, 0, 0, 0, 1, 1], (1, 9), &dev)?.repeat((3, 1))?;
            let full = enc.forward_t(&xs, Some(&pad), false)?.narrow(1, 0, 4)?;
            let part = enc.forward_prefix(&xs, Some(&pad), false, 4)?;
            assert_eq!(part.dims(), &[3, 4, 32]);
            let diff = (full - part)?
                .abs()?
                .flatten_all()?
                .max(0)?
                .to_scalar::<f32>()?;
            assert!(diff < 1e-5, "pre-LN {pre_layer_norm}: {diff}");
            assert!(enc.forward_prefix(&xs, Some(&pad), false, 10).is_err());
        }
        let cfg = Config::tiny();
        let (all, cut) = (cfg.forward_flops(3, 9), cfg.prefix_flops(3, 9, 4));
        assert!(cut < all && cut > all / 2.0, "{cut} of {all}");
        // The cut last layer, listed by shape: packed Q/K/V for all 9 positions, scores and
        // weighted values for 4 queries, the output projection and the FFN for 4 rows.
        let (rows, t, k, d, f, h) = (3, 9, 4, 32, 37, 4);
        let mm = |m: usize, n: usize, p: usize| 2 * m * n * p;
        let last = mm(rows * t, d, 3 * d)
            + rows * h * (mm(k, d / h, t) + mm(k, t, d / h))
            + mm(rows * k, d, d)
            + mm(rows * k, d, f)
            + mm(rows * k, f, d);
        let per_layer = all / cfg.num_hidden_layers as f64;
        assert_eq!(
            cut,
            per_layer * (cfg.num_hidden_layers - 1) as f64 + last as f64
        );
        Ok(())
    }

    /// At inference the output is cut from the op graph (backward from it reaches no weight),
    /// so kept encodings do not hold every layer's activations; in training it is not.
    #[test]
    fn inference_output_holds_no_graph() -> Result<()> {
        let dev = candle_core::Device::Cpu;
        let map = crate::init::SeededVarMap::new(1);
        let enc = Encoder::new(&Config::tiny(), map.var_builder(DType::F32, &dev))?;
        let xs = Tensor::randn(0f32, 1., (2, 5, 32), &dev)?;
        let vars = map.varmap().all_vars();
        // In training every weight but the key biases (a per-query constant the softmax
        // ignores, whose gradient candle may leave out) is reached.
        let layers = Config::tiny().num_hidden_layers;
        for (train, reached) in [(false, 0), (true, vars.len() - layers)] {
            let grads = enc.forward_t(&xs, None, train)?.sum_all()?.backward()?;
            let got = vars
                .iter()
                .filter(|v| grads.get(v.as_tensor()).is_some())
                .count();
            assert!(
                if train { got >= reached } else { got == 0 },
                "train {train}: {got} of {} weights reached",
                vars.len()
            );
        }
        Ok(())
    }

    /// The count is the sum of 2·m·k·n over the matmuls one layer runs, listed by shape.
    #[test]
    fn forward_flops_sums_the_matmuls_of_every_layer() {
        let cfg = Config::tiny(); // 2 x 32, 4 heads, FFN 37
        let (rows, t) = (3, 5);
        let (d, f, h) = (32, 37, 4);
        let hd = d / h;
        let mm = |m: usize, k: usize, n: usize| 2 * m * k * n;
        let per_layer = 4 * mm(rows * t, d, d) // q, k, v, o
            + mm(rows * t, d, f) + mm(rows * t, f, d) // FFN in, out
            + rows * h * (mm(t, hd, t) + mm(t, t, hd)); // scores, weighted values
        let expected = (cfg.num_hidden_layers * per_layer) as f64;
        assert_eq!(cfg.forward_flops(rows, t), expected);
    }
}
