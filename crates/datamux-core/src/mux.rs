//! Multiplexers: N per-instance representations become one, `(B, N, L, D) -> (B, L, D)`.
//!
//! DataMUX (arXiv 2202.09318), Eq. 1: `x = Φ(x¹..xᴺ) = 1/N Σᵢ φⁱ(xⁱ)`; method.md §3.1.
//! Reference: `princeton-nlp/DataMUX`, `models/multiplexing.py`, the `muxing_variant` branches of
//! `RobertaSequenceClassificationMuxed.forward`.
//!
//! Fixed keys are plain tensors, never optimizer variables, and are exposed through
//! [`Multiplexer::buffers`] so a checkpoint can save them and re-check them on load. With
//! `learn = true` the effective key is `key + delta`, where `delta` is a zero-initialised variable
//! (`mux.delta`): the gradient with respect to `delta` equals the gradient with respect to the
//! key, and the fixed starting point stays reproducible from the seed.

use candle_core::{Device, Result, Tensor};
use candle_nn::{Init, VarBuilder};
use serde::{Deserialize, Serialize};

use crate::cache::KeyedCache;
use crate::encoder::{self, Layer};
use crate::error::ConfigError;
use crate::init::rng_for;
use crate::keys;

/// Which per-instance transform φⁱ is applied before combining.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MuxKind {
    /// Plain mean over instances; with N = 1 the single-input baseline.
    Identity,
    /// `vᵢ ⊙ x`, `vᵢ` Gaussian with L2 norm exactly `norm`; mean over N.
    GaussianHadamard,
    /// `mᵢ ⊙ x`, `mᵢ` a 0/1 chunk mask of D (optionally overlapping); mean over N.
    BinaryHadamard,
    /// `Wᵢ x`, `Wᵢ` Haar-random orthogonal `D x D`; sum over N divided by √N.
    RandomOrtho,
    /// MUX-PLMs' contextual multiplexer (arXiv 2302.12441, §3): a Transformer layer over each
    /// instance's own tokens, the Gaussian key `vᵢ ⊙`, a Transformer layer across the N
    /// instances at each position, then the mean over N. Learned; not position-wise.
    Contextual,
    /// Holographic reduced representations (MIMONets, arXiv 2312.02829): at every position the
    /// circular convolution `kᵢ ⊛ x` of the instance's feature vector with its key, `kᵢ` unitary
    /// (every Fourier coefficient of magnitude 1, so binding is an orthogonal map that circular
    /// correlation inverts exactly); sum over N divided by √N, as `random_ortho`. On a feature
    /// map it binds per pixel over the channels, on a sequence per position over the width.
    Hrr,
}

impl MuxKind {
    pub const ALL: [MuxKind; 6] = [
        Self::Identity,
        Self::GaussianHadamard,
        Self::BinaryHadamard,
        Self::RandomOrtho,
        Self::Contextual,
        Self::Hrr,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::Identity => "identity",
            Self::GaussianHadamard => "gaussian_hadamard",
            Self::BinaryHadamard => "binary_hadamard",
            Self::RandomOrtho => "random_ortho",
            Self::Contextual => "contextual",
            Self::Hrr => "hrr",
        }
    }
}

/// Multiplexer settings, as written in experiment files (`mux = { kind = "...", ... }`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub kind: MuxKind,
    /// L2 norm of each Gaussian key; the reference warms up with 20 and fine-tunes from there.
    pub norm: f64,
    /// Added to every entry of the Gaussian keys (`gaussian_hadamard`, `contextual`): with 1 and
    /// a norm well under √D each key is `1 + small noise`, which keeps the sign of every feature,
    /// so a pretrained encoder's input stays in the distribution it was trained on (at N = 1 a
    /// zero-mean key flips half the features' signs; docs/pretrained.md). 0, the paper's keys,
    /// is left out of the serialised settings, so older runs keep their hashes.
    #[serde(skip_serializing_if = "is_zero")]
    pub offset: f64,
    /// Overlap of neighbouring binary chunks, in [0, 1).
    pub epsilon: f64,
    /// Train the keys (as `key + delta`); fixed keys are never optimizer variables.
    pub learn: bool,
    /// One set of weights for several widths (issue 20): each training step draws its N from
    /// this set and fills the first N slots of every row, the others staying empty (all
    /// padding, so they add nothing to the mix), so a row of any N of the set is valid at
    /// inference. Its largest member is `n_instances`, the slots the model has. Empty, a model
    /// of one N, is left out of the serialised settings, so older runs keep their hashes.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub serve_n: Vec<usize>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            kind: MuxKind::GaussianHadamard, // the paper's default variant
            norm: 20.0,                      // the reference's warm-up norm (method.md §3.1)
            offset: 0.0,                     // the paper's zero-mean keys
            epsilon: 0.0,                    // the reference's default: disjoint chunks
            learn: false,                    // the reference's default: fixed keys
            serve_n: Vec::new(),             // one N per model
        }
    }
}

impl Config {
    pub fn with_kind(kind: MuxKind) -> Self {
        Self {
            kind,
            ..Self::default()
        }
    }

    /// The widths a model of `n` slots serves: `serve_n`, or `[n]` for a model of one N.
    pub fn served(&self, n: usize) -> Vec<usize> {
        if self.serve_n.is_empty() {
            vec![n]
        } else {
            self.serve_n.clone()
        }
    }

    /// `serve_n` against the model's `n` slots: empty, or rising strictly from at least 1 to `n`.
    pub fn check_serve_n(&self, n: usize) -> std::result::Result<(), ConfigError> {
        let s = &self.serve_n;
        let rising = s.windows(2).all(|w| w[0] < w[1]);
        if s.is_empty() || (rising && s[0] >= 1 && s.last() == Some(&n)) {
            return Ok(());
        }
        Err(ConfigError::Other(format!(
            "mux.serve_n must rise strictly from at least 1 to n_instances {n}, got {s:?}"
        )))
    }

    /// Cross-field checks for `n` instances of width `d`.
    pub fn validate(&self, n: usize, d: usize) -> std::result::Result<(), ConfigError> {
        if n == 0 {
            return Err(ConfigError::NoInstances { n_instances: n });
        }
        self.check_serve_n(n)?;
        match self.kind {
            MuxKind::GaussianHadamard | MuxKind::Contextual
                if !(self.norm.is_finite() && self.norm > 0.0) =>
            {
                Err(ConfigError::BadNorm { norm: self.norm })
            }
            MuxKind::BinaryHadamard => keys::binary(n, d, self.epsilon).map(|_| ()),
            _ if !self.offset.is_finite() => Err(ConfigError::BadOffset {
                offset: self.offset,
            }),
            _ => Ok(()),
        }
    }
}

fn is_zero(v: &f64) -> bool {
    *v == 0.0
}

/// The fixed keys of a multiplexer, regenerated from the run seed.
pub fn fixed_keys(
    cfg: &Config,
    n: usize,
    d: usize,
    seed: u64,
    dev: &Device,
) -> Result<Option<Tensor>> {
    let mut rng = rng_for(seed, "mux.keys");
    let keys = match cfg.kind {
        MuxKind::Identity => return Ok(None),
        MuxKind::GaussianHadamard | MuxKind::Contextual => {
            let keys = keys::gaussian(n, d, cfg.norm, &mut rng);
            let keys = keys.into_iter().map(|k| k + cfg.offset as f32).collect();
            Tensor::from_vec(keys, (n, d), dev)?
        }
        MuxKind::BinaryHadamard => {
            let k = keys::binary(n, d, cfg.epsilon).map_err(candle_core::Error::wrap)?;
            Tensor::from_vec(k, (n, d), dev)?
        }
        MuxKind::RandomOrtho => Tensor::from_vec(keys::orthogonal(n, d, &mut rng), (n, d, d), dev)?,
        MuxKind::Hrr => Tensor::from_vec(keys::unitary(n, d, &mut rng), (n, d), dev)?,
    };
    Ok(Some(keys))
}

/// ref: `RobertaSequenceClassificationMuxed` (the muxing half of its forward).
#[derive(Clone, Debug)]
pub struct Multiplexer {
    kind: MuxKind,
    n: usize,
    d: usize,
    /// `(N, D)` for the Hadamard variants and `hrr`, `(N, D, D)` for `random_ortho`; `None` for
    /// identity.
    keys: Option<Tensor>,
    /// The learned offset of the keys when `learn = true`.
    delta: Option<Tensor>,
    /// Fixed orthogonal (or circulant) maps pre-arranged as `[W₁ᵀ; …; W_Nᵀ]`, `(N·D, D)`, so
    /// inference does not rebuild `N·D²` values on every call.
    stacked: Option<Tensor>,
    /// The same for learned keys, rebuilt at inference only when their values change.
    learned_stack: KeyedCache,
    /// The contextual multiplexer's layers: within each instance, then across instances.
    context: Option<Box<[Layer; 2]>>,
    dev: Device,
}

/// The contextual multiplexer's layers: post-LN Transformer layers of width `d` with an FFN of
/// `4 d` and heads of at least 16 features (12 at d = 384, as MiniLM; 4 at 128), dropout 0.1.
fn context_config(d: usize) -> encoder::Config {
    let heads = [12, 8, 6, 4, 2]
        .into_iter()
        .find(|h| d % h == 0 && d / h >= 16)
        .unwrap_or(1);
    encoder::Config {
        num_hidden_layers: 1,
        hidden_size: d,
        num_attention_heads: heads,
        intermediate_size: 4 * d,
        ..encoder::Config::base()
    }
}

impl Multiplexer {
    pub fn new(cfg: &Config, n: usize, d: usize, seed: u64, vb: VarBuilder<'_>) -> Result<Self> {
        cfg.validate(n, d).map_err(candle_core::Error::wrap)?;
        let keys = fixed_keys(cfg, n, d, seed, vb.device())?;
        let delta = match (&keys, cfg.learn) {
            (Some(k), true) => Some(vb.get_with_hints(k.shape(), "delta", Init::Const(0.0))?),
            _ => None,
        };
        let stacked = match (&keys, &delta, cfg.kind) {
            (Some(w), None, MuxKind::RandomOrtho) => Some(stack_transposed(w)?),
            (Some(k), None, MuxKind::Hrr) => Some(stack_transposed(&circulant(k)?)?),
            _ => None,
        };
        let context = match cfg.kind {
            MuxKind::Contextual => {
                let c = context_config(d);
                Some(Box::new([
                    Layer::new(&c, vb.pp("within"))?,
                    Layer::new(&c, vb.pp("across"))?,
                ]))
            }
            _ => None,
        };
        Ok(Self {
            kind: cfg.kind,
            n,
            d,
            keys,
            delta,
            stacked,
            learned_stack: KeyedCache::default(),
            context,
            dev: vb.device().clone(),
        })
    }

    /// Whether output position j depends on input position j alone (every kind but
    /// `contextual`), so that muxing `[prefix ; xs]` is `[mux(prefix) ; mux(xs)]`.
    pub fn is_position_wise(&self) -> bool {
        self.context.is_none()
    }

    pub fn kind(&self) -> MuxKind {
        self.kind
    }

    pub fn n_instances(&self) -> usize {
        self.n
    }

    /// The fixed tensors to save beside the weights, by parameter path.
    pub fn buffers(&self) -> Vec<(&'static str, Tensor)> {
        self.keys.iter().map(|k| ("mux.keys", k.clone())).collect()
    }

    /// The keys in use: the fixed keys, plus the learned offset when keys are learned.
    pub fn effective_keys(&self) -> Result<Option<Tensor>> {
        match (&self.keys, &self.delta) {
            (Some(k), Some(dk)) => Ok(Some((k + dk)?)),
            (Some(k), None) => Ok(Some(k.clone())),
            _ => Ok(None),
        }
    }

    /// The mux as per-slot scales `(N, D)` where it is one, `forward(xs) = Σᵢ sᵢ ⊙ xs[:, i]`: the
    /// keys divided by N for the Hadamard kinds, 1/N for identity; `None` for `random_ortho`,
    /// which mixes features. A frontend can then embed and mux in one pass
    /// ([`crate::model::Frontend::embed_muxed`]).
    pub fn slot_scales(&self) -> Result<Option<Tensor>> {
        let inv_n = 1.0 / self.n as f64;
        match (self.kind, self.effective_keys()?) {
            (MuxKind::RandomOrtho | MuxKind::Contextual | MuxKind::Hrr, _) => Ok(None),
            (_, Some(k)) => Ok(Some((k * inv_n)?)),
            (_, None) => Ok(Some(
                (Tensor::ones((self.n, self.d), candle_core::DType::F32, &self.dev)? * inv_n)?,
            )),
        }
    }

    /// The mux as one matrix `(N·D, D)` where it is one, `forward(xs) = [x₁ … x_N] · maps` per
    /// position: `[W₁ᵀ; …; W_Nᵀ] / √N` for `random_ortho` and `hrr` (learned maps from the
    /// inference cache); `None` for the other kinds. A linear frontend can then fold the maps
    /// into its own weights ([`crate::model::Frontend::embed_mapped`]).
    pub fn slot_maps(&self) -> Result<Option<Tensor>> {
        match self.effective_keys()? {
            Some(w) if self.is_matrix() => Ok(Some(
                (self.stacked_maps(&w, false)? / (self.n as f64).sqrt())?,
            )),
            _ => Ok(None),
        }
    }

    /// Whether the mux is one matrix ([`Self::slot_maps`] gives it), known without building it.
    pub fn is_matrix(&self) -> bool {
        self.keys.is_some() && matches!(self.kind, MuxKind::RandomOrtho | MuxKind::Hrr)
    }

    /// `[W₁ᵀ; …; W_Nᵀ]` `(N·D, D)` of the effective keys `w` (`hrr`: `(N, D)`, their circulants;
    /// `random_ortho`: the maps `(N, D, D)`): fixed ones built once at construction, learned
    /// ones rebuilt in training and cached at inference.
    fn stacked_maps(&self, w: &Tensor, train: bool) -> Result<Tensor> {
        if let Some(s) = &self.stacked {
            return Ok(s.clone());
        }
        self.learned_stack.get(w, train, |w| match self.kind {
            MuxKind::Hrr => stack_transposed(&circulant(w)?),
            _ => stack_transposed(w),
        })
    }

    /// `(B, N, L, D) -> (B, L, D)` at inference, nothing padded.
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.forward_t(xs, None, false)
    }

    /// `(B, N, L, D)` with padding flags `pad` `(B, N, L)` (1 = padding) -> `(B, L, D)`. Only the
    /// contextual kind reads `pad`; `train` is its dropout, and with learned maps whether they
    /// are rebuilt (training) or may come from the cache (inference).
    pub fn forward_t(&self, xs: &Tensor, pad: Option<&Tensor>, train: bool) -> Result<Tensor> {
        let (b, n, l, d) = xs.dims4()?;
        if n != self.n || d != self.d {
            candle_core::bail!(
                "multiplexer expects (B, {}, L, {}), got {:?}",
                self.n,
                self.d,
                xs.shape()
            );
        }
        let keys = self.effective_keys()?;
        if let (Some(layers), Some(k)) = (&self.context, &keys) {
            return contextual(layers, k, xs, pad, train);
        }
        match (self.kind, keys) {
            (MuxKind::Identity, _) | (_, None) => slot_mean(xs),
            (MuxKind::GaussianHadamard | MuxKind::BinaryHadamard, Some(k)) => {
                // keys (N, D) -> (1, N, 1, D), broadcast over rows and positions.
                slot_mean(&xs.broadcast_mul(&k.reshape((1, n, 1, d))?)?)
            }
            (MuxKind::RandomOrtho | MuxKind::Hrr, Some(w)) => {
                // Σᵢ Wᵢ xᵢ as one matmul: [x₁ … x_N] (B·L, N·D) times [W₁ᵀ; …; W_Nᵀ] (N·D, D);
                // for `hrr` Wᵢ is the circulant matrix of key i, Wᵢ x = kᵢ ⊛ x.
                let xs = xs.transpose(1, 2)?.contiguous()?.reshape((b * l, n * d))?; // (B·L, N·D)
                let stacked = self.stacked_maps(&w, train)?;
                // Sum / √N rather than the mean: each Wᵢxᵢ keeps the norm of xᵢ, and for
                // independent instances the sum grows like √N (reference behaviour, method.md §3.1).
                let ys = (xs.matmul(&stacked)? / (n as f64).sqrt())?; // (B·L, D)
                ys.reshape((b, l, d))
            }
            (MuxKind::Contextual, Some(_)) => candle_core::bail!("contextual mux without layers"),
        }
    }
}

/// The contextual mux: `(B, N, L, D)`, keys `(N, D)`, pad `(B, N, L)` -> `(B, L, D)`. Padding
/// positions are masked as keys in both layers and zeroed after each, so they add nothing to
/// the mix, as in the other kinds.
fn contextual(
    layers: &[Layer; 2],
    keys: &Tensor,
    xs: &Tensor,
    pad: Option<&Tensor>,
    train: bool,
) -> Result<Tensor> {
    let (b, n, l, d) = xs.dims4()?;
    // (B, N, L) -> (B, N, L, 1), 1 where a position is real.
    let keep = pad
        .map(|p| (1.0 - p.to_dtype(xs.dtype())?)?.unsqueeze(3))
        .transpose()?;
    let zero_padding = |x: Tensor| match &keep {
        Some(k) => x.broadcast_mul(k),
        None => Ok(x),
    };
    // Within each instance: (B, N, L, D) -> (B·N, L, D), keys masked by the instance's padding.
    let within = pad
        .map(|p| encoder::padding_bias(&p.reshape((b * n, l))?, xs.dtype()))
        .transpose()?; // (B·N, 1, 1, L)
    let h = layers[0].forward_t(&xs.reshape((b * n, l, d))?, within.as_ref(), train, None)?;
    let h = zero_padding(h.reshape((b, n, l, d))?)?;
    // The instance's key: (N, D) -> (1, N, 1, D).
    let h = h.broadcast_mul(&keys.reshape((1, n, 1, d))?)?;
    // Across instances at each position: (B, N, L, D) -> (B, L, N, D) -> (B·L, N, D), an instance
    // that is padding at the position masked.
    let across = pad
        .map(|p| {
            encoder::padding_bias(
                &p.transpose(1, 2)?.contiguous()?.reshape((b * l, n))?,
                xs.dtype(),
            )
        })
        .transpose()?; // (B·L, 1, 1, N)
    let h = h.transpose(1, 2)?.contiguous()?.reshape((b * l, n, d))?;
    let h = layers[1].forward_t(&h, across.as_ref(), train, None)?;
    // (B·L, N, D) -> (B, L, N, D) -> (B, N, L, D)
    let h = h.reshape((b, l, n, d))?.transpose(1, 2)?.contiguous()?;
    slot_mean(&zero_padding(h)?)
}

/// Mean over the slot axis, `(B, N, L, D) -> (B, L, D)`, as one batched matmul with a row of 1/N:
/// candle's reduction over a non-last axis took ~22 ms where this takes ~2 ms (B·N = 120, L = 128,
/// D = 256, 2 threads), and at high N the mux is a large share of a pass (docs/performance.md).
pub fn slot_mean(xs: &Tensor) -> Result<Tensor> {
    let (b, n, l, d) = xs.dims4()?;
    if n == 1 {
        return xs.reshape((b, l, d));
    }
    let w = (Tensor::ones((b, 1, n), xs.dtype(), xs.device())? / n as f64)?; // (B, 1, N)
    let flat = xs.contiguous()?.reshape((b, n, l * d))?; // (B, N, L·D)
    w.matmul(&flat)?.reshape((b, l, d)) // (B, 1, L·D) -> (B, L, D)
}

/// Keys `(N, D)` -> their circulant matrices `(N, D, D)`, `C(kᵢ)[a][b] = kᵢ[(a - b) mod D]`, so
/// `C(kᵢ) x = kᵢ ⊛ x`. A gather, so the keys get gradients (learned `hrr` keys, the `hrr`
/// demux).
pub fn circulant(keys: &Tensor) -> Result<Tensor> {
    let (n, d) = keys.dims2()?;
    let idx = Tensor::from_vec(keys::circulant_index(d), d * d, keys.device())?;
    keys.index_select(&idx, 1)?.reshape((n, d, d)) // (N, D·D) -> (N, D, D)
}

/// Keys `(N, D)` -> `[C(u₁) | … | C(u_N)]` `(D, N·D)`: `h · C(uᵢ)` is the circular correlation
/// `uᵢ ⋆ h`, so the `hrr` demux unbinds every slot in one matmul.
pub fn correlation_maps(keys: &Tensor) -> Result<Tensor> {
    stack_transposed(&circulant(keys)?)?.t()?.contiguous()
}

/// `(N, D, D) -> (N·D, D)`: row block `i` is `Wᵢᵀ`.
pub(crate) fn stack_transposed(w: &Tensor) -> Result<Tensor> {
    let (n, d, _) = w.dims3()?;
    w.transpose(1, 2)?.contiguous()?.reshape((n * d, d))
}
