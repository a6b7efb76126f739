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
}

impl MuxKind {
    pub const ALL: [MuxKind; 4] = [
        Self::Identity,
        Self::GaussianHadamard,
        Self::BinaryHadamard,
        Self::RandomOrtho,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::Identity => "identity",
            Self::GaussianHadamard => "gaussian_hadamard",
            Self::BinaryHadamard => "binary_hadamard",
            Self::RandomOrtho => "random_ortho",
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
    /// Overlap of neighbouring binary chunks, in [0, 1).
    pub epsilon: f64,
    /// Train the keys (as `key + delta`); fixed keys are never optimizer variables.
    pub learn: bool,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            kind: MuxKind::GaussianHadamard, // the paper's default variant
            norm: 20.0,                      // the reference's warm-up norm (method.md §3.1)
            epsilon: 0.0,                    // the reference's default: disjoint chunks
            learn: false,                    // the reference's default: fixed keys
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

    /// Cross-field checks for `n` instances of width `d`.
    pub fn validate(&self, n: usize, d: usize) -> std::result::Result<(), ConfigError> {
        if n == 0 {
            return Err(ConfigError::NoInstances { n_instances: n });
        }
        match self.kind {
            MuxKind::GaussianHadamard if !(self.norm.is_finite() && self.norm > 0.0) => {
                Err(ConfigError::BadNorm { norm: self.norm })
            }
            MuxKind::BinaryHadamard => keys::binary(n, d, self.epsilon).map(|_| ()),
            _ => Ok(()),
        }
    }
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
        MuxKind::GaussianHadamard => {
            Tensor::from_vec(keys::gaussian(n, d, cfg.norm, &mut rng), (n, d), dev)?
        }
        MuxKind::BinaryHadamard => {
            let k = keys::binary(n, d, cfg.epsilon).map_err(candle_core::Error::wrap)?;
            Tensor::from_vec(k, (n, d), dev)?
        }
        MuxKind::RandomOrtho => Tensor::from_vec(keys::orthogonal(n, d, &mut rng), (n, d, d), dev)?,
    };
    Ok(Some(keys))
}

/// ref: `RobertaSequenceClassificationMuxed` (the muxing half of its forward).
#[derive(Clone, Debug)]
pub struct Multiplexer {
    kind: MuxKind,
    n: usize,
    d: usize,
    /// `(N, D)` for the Hadamard variants, `(N, D, D)` for `random_ortho`; `None` for identity.
    keys: Option<Tensor>,
    /// The learned offset of the keys when `learn = true`.
    delta: Option<Tensor>,
    /// Fixed orthogonal keys pre-arranged as `[W₁ᵀ; …; W_Nᵀ]`, `(N·D, D)`, so inference does not
    /// transpose `N·D²` values on every call.
    stacked: Option<Tensor>,
    dev: Device,
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
            _ => None,
        };
        Ok(Self {
            kind: cfg.kind,
            n,
            d,
            keys,
            delta,
            stacked,
            dev: vb.device().clone(),
        })
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
            (MuxKind::RandomOrtho, _) => Ok(None),
            (_, Some(k)) => Ok(Some((k * inv_n)?)),
            (_, None) => Ok(Some(
                (Tensor::ones((self.n, self.d), candle_core::DType::F32, &self.dev)? * inv_n)?,
            )),
        }
    }

    /// `(B, N, L, D) -> (B, L, D)`.
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
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
        match (self.kind, keys) {
            (MuxKind::Identity, _) | (_, None) => slot_mean(xs),
            (MuxKind::GaussianHadamard | MuxKind::BinaryHadamard, Some(k)) => {
                // keys (N, D) -> (1, N, 1, D), broadcast over rows and positions.
                slot_mean(&xs.broadcast_mul(&k.reshape((1, n, 1, d))?)?)
            }
            (MuxKind::RandomOrtho, Some(w)) => {
                // Σᵢ Wᵢ xᵢ as one matmul: [x₁ … x_N] (B·L, N·D) times [W₁ᵀ; …; W_Nᵀ] (N·D, D).
                let xs = xs.transpose(1, 2)?.contiguous()?.reshape((b * l, n * d))?; // (B·L, N·D)
                let stacked = match &self.stacked {
                    Some(s) => s.clone(),
                    None => stack_transposed(&w)?,
                };
                // Sum / √N rather than the mean: each Wᵢxᵢ keeps the norm of xᵢ, and for
                // independent instances the sum grows like √N (reference behaviour, method.md §3.1).
                let ys = (xs.matmul(&stacked)? / (n as f64).sqrt())?; // (B·L, D)
                ys.reshape((b, l, d))
            }
        }
    }
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

/// `(N, D, D) -> (N·D, D)`: row block `i` is `Wᵢᵀ`.
fn stack_transposed(w: &Tensor) -> Result<Tensor> {
    let (n, d, _) = w.dims3()?;
    w.transpose(1, 2)?.contiguous()?.reshape((n * d, d))
}
