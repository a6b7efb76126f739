//! The index prefix and the demultiplexers: one encoded sequence back to N per-instance
//! representations, `(B, P+L, D) -> (B, N, L', D)`.
//!
//! DataMUX (arXiv 2202.09318), Eq. 2, `hⁱ = ϑⁱ(h¹ᐟᴺ)`; MUX-PLMs (arXiv 2302.12441) for `rsa`.
//! Reference: `princeton-nlp/DataMUX`, `models/multiplexing.py`
//! (`RobertaIndexDemultiplexerSequenceClassification`, `RobertaMLPDemultiplexerSequenceClassification`
//! and their token twins); `princeton-nlp/datamux-pretraining`, `IndexPosDemuxModule`.
//! method.md §4 gives the equations; §13 lists where this file departs from the reference.
//!
//! Prefix lengths: `index` prepends `P = N + 1` slots (N markers and a summary); `mlp` and `rsa`
//! prepend one shared summary slot on sequence backbones (`P = 1`) and none on backbones without
//! positions, such as a CNN (`P = 0`, the pooled output is position 0). The reference overwrites
//! the first token with a borrowed vocabulary id instead; a learned slot needs no reserved ids.
//!
//! Every demultiplexer is computed without materialising `[h_prefix ; h_j]` or looping over
//! instances: the `2D -> D` layer is split into a prefix half and a position half whose outputs
//! are broadcast-added, and the N per-slot MLPs are one `(D, N·D)` matmul.

use candle_core::{Result, Tensor};
use candle_nn::{Init, VarBuilder};
use serde::{Deserialize, Serialize};

use crate::cache::KeyedCache;
use crate::layers::{self, INIT_RANGE, LayerNorm, Linear};

/// How the N representations are separated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DemuxKind {
    /// N + 1 learned prefix slots; `LN(GELU(A [h_prefix_i ; h_j]))`.
    Index,
    /// One MLP per instance slot on the shared output.
    Mlp,
    /// N learned keys concatenated with the shared output, one shared 2-layer MLP (MUX-PLMs'
    /// RSA-inspired demultiplexer, `index_pos` in its code).
    #[serde(alias = "index_pos")]
    Rsa,
    /// HRR unbinding (MIMONets, arXiv 2312.02829): slot i's output is `uᵢ ⋆ h`, the circular
    /// correlation with a learned key of its own (a trunk sits between it and the mux's keys);
    /// D parameters per slot, no nonlinearity (docs/images.md).
    Hrr,
}

impl DemuxKind {
    pub const ALL: [DemuxKind; 4] = [Self::Index, Self::Mlp, Self::Rsa, Self::Hrr];

    pub fn name(self) -> &'static str {
        match self {
            Self::Index => "index",
            Self::Mlp => "mlp",
            Self::Rsa => "rsa",
            Self::Hrr => "hrr",
        }
    }

    /// Prefix slots prepended to every instance: `N + 1` for `index`; one shared summary slot for
    /// `mlp`/`rsa`/`hrr` on sequence backbones; none on backbones without positions.
    pub fn prefix_len(self, n: usize, sequence_backbone: bool) -> usize {
        match (self, sequence_backbone) {
            (Self::Index, _) => n + 1,
            (_, true) => 1,
            (_, false) => 0,
        }
    }
}

/// Demultiplexer settings (`demux = { kind = "index" }` in experiment files).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub kind: DemuxKind,
    /// Dropout before the per-slot MLPs of `mlp` (the reference's 0.1).
    #[serde(deserialize_with = "crate::range::probability")]
    pub dropout: f64,
    #[serde(deserialize_with = "crate::range::positive")]
    pub layer_norm_eps: f64,
    /// `index` and `rsa`: add the encoder's hidden state to the slot's output before the
    /// LayerNorm, `LN(h + f(slot, h))`, so that the demultiplexer starts near the identity: a
    /// pretrained encoder's features reach the head as they are at N = 1, and what is learned
    /// is each slot's correction (docs/pretrained.md). Off (the reference) by default, and
    /// then left out of the settings.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub residual: bool,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            kind: DemuxKind::Index, // the paper's main choice
            dropout: 0.1,           // the reference's `mlp` demux dropout
            layer_norm_eps: 1e-5,   // RoBERTa's
            residual: false,
        }
    }
}

impl Config {
    pub fn with_kind(kind: DemuxKind) -> Self {
        Self {
            kind,
            ..Self::default()
        }
    }
}

/// Which positions a head needs demultiplexed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Positions {
    /// One summary vector per instance (`L' = 1`): sentence and image classification.
    Summary,
    /// Every position of the instance's own sequence (`L' = L`): token classification.
    Tokens,
}

/// The learned prefix slots, `(N, P, D)` once gathered.
#[derive(Clone, Debug)]
pub struct Prefix {
    /// `index`: `(N + 2, D)`, rows `0..N` the instance markers, `N` the filler, `N + 1` the
    /// summary. `mlp`/`rsa`: `(1, D)`, the shared summary.
    table: Tensor,
    /// `(N, P)` row ids into `table`.
    ids: Tensor,
}

impl Prefix {
    fn new(kind: DemuxKind, n: usize, d: usize, vb: VarBuilder<'_>) -> Result<Self> {
        let (table, ids) = match kind {
            DemuxKind::Index => {
                // Instance i: marker i at slot i, the filler (row N) elsewhere, the summary (row
                // N + 1) last. After the mean over instances slot i carries marker i mixed with
                // fillers, which is what lets the demultiplexer address instance i.
                let ids: Vec<u32> = (0..n)
                    .flat_map(|i| {
                        (0..n)
                            .map(move |k| if k == i { k as u32 } else { n as u32 })
                            .chain(std::iter::once(n as u32 + 1))
                    })
                    .collect();
                let table = prefix_table(n + 2, d, vb.pp("index_embed"))?;
                (table, Tensor::from_vec(ids, (n, n + 1), vb.device())?)
            }
            DemuxKind::Mlp | DemuxKind::Rsa | DemuxKind::Hrr => {
                let table = prefix_table(1, d, vb.pp("summary"))?;
                (
                    table,
                    Tensor::zeros((n, 1), candle_core::DType::U32, vb.device())?,
                )
            }
        };
        Ok(Self { table, ids })
    }

    /// `(N, P, D)`: the prefix of every instance slot.
    pub fn tensor(&self) -> Result<Tensor> {
        let (n, p) = self.ids.dims2()?;
        let d = self.table.dim(1)?;
        self.table
            .index_select(&self.ids.flatten_all()?, 0)?
            .reshape((n, p, d))
    }

    pub fn len(&self) -> usize {
        self.ids.dim(1).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[derive(Clone, Debug)]
enum Inner {
    /// ref: `IndexDemultiplexer` heads of `models/multiplexing.py`.
    Index { dense: Linear, norm: LayerNorm },
    /// ref: the per-instance `dense_{i}` + `layer_norm_{i}` banks of the MLP demultiplexer.
    Mlp {
        /// `(D, N·D)`: columns `i·D..(i+1)·D` are slot i's `D -> D` map.
        weight: Tensor,
        bias: Tensor,        // (N·D)
        norm_weight: Tensor, // (N, D)
        norm_bias: Tensor,   // (N, D)
        dropout: f64,
        eps: f64,
    },
    /// ref: `IndexPosDemuxModule` (MUX-PLMs).
    Rsa {
        keys: Tensor,
        dense1: Linear,
        dense2: Linear,
        norm: LayerNorm,
    },
    /// `(N, D)` learned unbinding keys; their circulants `(D, N·D)` kept at inference.
    Hrr { keys: Tensor, unbind: KeyedCache },
}

/// One demultiplexer (task or retrieval; each has its own parameters).
#[derive(Clone, Debug)]
pub struct Demux {
    kind: DemuxKind,
    n: usize,
    d: usize,
    residual: bool,
    inner: Inner,
}

/// Flat row indices into the `(B·T, D)` view of an encoded batch, one per demultiplexed pair.
#[derive(Clone, Debug)]
pub struct Pairs {
    /// `(K)`: `b·T + position` of the hidden state to demultiplex.
    pub rows: Tensor,
    /// `(K)`: the instance slot to extract.
    pub slots: Tensor,
    /// `(K)`: `b·T + slot`, the row of the slot's prefix marker (used by `index`).
    pub slot_rows: Tensor,
}

impl Demux {
    pub fn new(cfg: &Config, n: usize, d: usize, vb: VarBuilder<'_>) -> Result<Self> {
        let eps = cfg.layer_norm_eps;
        let inner = match cfg.kind {
            DemuxKind::Index => Inner::Index {
                dense: layers::linear(2 * d, d, vb.pp("dense"))?,
                norm: LayerNorm::new(d, eps, vb.pp("layer_norm"))?,
            },
            DemuxKind::Mlp => {
                let vb = vb.pp("mlp");
                Inner::Mlp {
                    weight: vb.get_with_hints(
                        (d, n * d),
                        "weight",
                        Init::Randn {
                            mean: 0.0,
                            stdev: INIT_RANGE,
                        },
                    )?,
                    bias: vb.get_with_hints(n * d, "bias", Init::Const(0.0))?,
                    norm_weight: vb.get_with_hints(
                        (n, d),
                        "layer_norm.weight",
                        Init::Const(1.0),
                    )?,
                    norm_bias: vb.get_with_hints((n, d), "layer_norm.bias", Init::Const(0.0))?,
                    dropout: cfg.dropout,
                    eps,
                }
            }
            DemuxKind::Rsa => Inner::Rsa {
                // Standard normal, as in MUX-PLMs' `IndexPosDemuxModule`.
                keys: vb.get_with_hints(
                    (n, d),
                    "keys",
                    Init::Randn {
                        mean: 0.0,
                        stdev: 1.0,
                    },
                )?,
                dense1: layers::linear(2 * d, d, vb.pp("dense1"))?,
                dense2: layers::linear(d, d, vb.pp("dense2"))?,
                norm: LayerNorm::new(d, eps, vb.pp("layer_norm"))?,
            },
            DemuxKind::Hrr => Inner::Hrr {
                // Entries of variance 1/D: keys of expected norm 1, near-unitary.
                keys: vb.get_with_hints(
                    (n, d),
                    "hrr.keys",
                    Init::Randn {
                        mean: 0.0,
                        stdev: 1.0 / (d as f64).sqrt(),
                    },
                )?,
                unbind: KeyedCache::default(),
            },
        };
        if cfg.residual && matches!(cfg.kind, DemuxKind::Mlp | DemuxKind::Hrr) {
            let kind = cfg.kind.name();
            candle_core::bail!("demux residual is for index and rsa, not {kind}");
        }
        Ok(Self {
            kind: cfg.kind,
            n,
            d,
            residual: cfg.residual,
            inner,
        })
    }

    /// The prefix this demultiplexer needs, built under the same `vb` path.
    pub fn prefix(
        kind: DemuxKind,
        n: usize,
        d: usize,
        sequence_backbone: bool,
        vb: VarBuilder<'_>,
    ) -> Result<Option<Prefix>> {
        if kind.prefix_len(n, sequence_backbone) == 0 {
            return Ok(None);
        }
        Prefix::new(kind, n, d, vb).map(Some)
    }

    pub fn kind(&self) -> DemuxKind {
        self.kind
    }

    /// `(B, P+L, D) -> (B, N, L', D)`, with `L' = 1` for [`Positions::Summary`] and `L' = L` for
    /// [`Positions::Tokens`]. `prefix_len` is the `P` the sequence was built with.
    pub fn forward_t(
        &self,
        encoded: &Tensor,
        prefix_len: usize,
        positions: Positions,
        train: bool,
    ) -> Result<Tensor> {
        let (b, t, d) = encoded.dims3()?;
        let n = self.n;
        if d != self.d {
            candle_core::bail!("demux expects width {}, got {:?}", self.d, encoded.shape());
        }
        // The positions read by the head: the summary slot (index: slot N; otherwise position 0,
        // the summary prefix or a pooled output), or every position after the prefix.
        let hs = match positions {
            Positions::Summary if self.kind == DemuxKind::Index => encoded.narrow(1, n, 1)?,
            Positions::Summary => encoded.narrow(1, 0, 1)?,
            Positions::Tokens => encoded.narrow(1, prefix_len, t - prefix_len)?,
        }; // (B, L', D)
        let l = hs.dim(1)?;
        match &self.inner {
            Inner::Index { dense, norm } => {
                let (w_prefix, w_pos) = split_halves(dense.weight(), d)?;
                let p = encoded.narrow(1, 0, n)?; // (B, N, D): prefix slot i after the encoder
                let a = rows_matmul(&p, &w_prefix)?; // (B, N, D)
                let c = rows_matmul(&hs, &w_pos)?; // (B, L', D)
                let c = broadcast_bias(&c, dense.bias())?;
                // (B, N, 1, D) + (B, 1, L', D) -> (B, N, L', D)
                let z = (layers::expand_dim(&a.unsqueeze(2)?, 2, l)?
                    + layers::expand_dim(&c.unsqueeze(1)?, 1, n)?)?
                .gelu_erf()?;
                norm.forward_t(&self.plus_input(z, &hs, n)?, train)
            }
            Inner::Mlp {
                weight,
                bias,
                norm_weight,
                norm_bias,
                dropout,
                eps,
            } => {
                let hs = layers::dropout(&hs, *dropout, train)?;
                let y = hs.reshape((b * l, d))?.matmul(weight)?; // (B·L', N·D)
                let y = layers::add_trailing(&y, bias)?;
                // (B·L', N·D) -> (B, L', N, D); slot i's scale and shift are row i of (N, D)
                let y = layers::normalize(&y.reshape((b, l, n, d))?.gelu_erf()?, *eps)?;
                let y = layers::mul_trailing(&y, norm_weight)?;
                // (B, L', N, D) -> (B, N, L', D)
                layers::add_trailing(&y, norm_bias)?.transpose(1, 2)
            }
            Inner::Rsa {
                keys,
                dense1,
                dense2,
                norm,
            } => {
                let (w_key, w_pos) = split_halves(dense1.weight(), d)?;
                let a = keys.matmul(&w_key.t()?)?.reshape((n, 1, d))?; // (N, 1, D)
                let c = broadcast_bias(&rows_matmul(&hs, &w_pos)?, dense1.bias())?; // (B, L', D)
                // (N, 1, D) + (B, 1, L', D) -> (B, N, L', D)
                let a = layers::expand_dim(&a, 1, l)?; // (N, L', D)
                let z = layers::add_trailing(&layers::expand_dim(&c.unsqueeze(1)?, 1, n)?, &a)?
                    .gelu_erf()?;
                let z = z.apply(dense2)?;
                norm.forward_t(&self.plus_input(z, &hs, n)?, train)
            }
            Inner::Hrr { keys, unbind } => {
                // (uᵢ ⋆ h)[a] = Σ_c h[c] uᵢ[(c - a) mod D] = (hᵀ C(uᵢ))[a], every slot in one
                // matmul with [C(u₁) | … | C(u_N)] (D, N·D), the mux's stacked [C(uᵢ)ᵀ] transposed.
                let m = unbind.get(keys, train, crate::mux::correlation_maps)?;
                let z = hs.reshape((b * l, d))?.matmul(&m)?; // (B·L', N·D)
                // (B·L', N·D) -> (B, L', N, D) -> (B, N, L', D)
                z.reshape((b, l, n, d))?.transpose(1, 2)
            }
        }
    }

    /// `z + h` for the residual demultiplexer: `(B, N, L', D)` slot outputs and the `(B, L', D)`
    /// hidden states they were read from; `z` unchanged otherwise.
    fn plus_input(&self, z: Tensor, hs: &Tensor, n: usize) -> Result<Tensor> {
        if !self.residual {
            return Ok(z);
        }
        z + layers::expand_dim(&hs.unsqueeze(1)?, 1, n)? // (B, 1, L', D) -> (B, N, L', D)
    }

    /// Demultiplex chosen (position, slot) pairs only: `(B, T, D)` and K pairs -> `(K, D)`.
    /// Used by the retrieval head, which needs one sampled slot per position.
    pub fn forward_pairs(&self, encoded: &Tensor, pairs: &Pairs, train: bool) -> Result<Tensor> {
        let (b, t, d) = encoded.dims3()?;
        let flat = encoded.reshape((b * t, d))?; // (B·T, D)
        let hs = flat.index_select(&pairs.rows, 0)?; // (K, D)
        let k = hs.dim(0)?;
        match &self.inner {
            Inner::Index { dense, norm } => {
                let (w_prefix, w_pos) = split_halves(dense.weight(), d)?;
                let p = flat.index_select(&pairs.slot_rows, 0)?; // (K, D)
                let z = (p.matmul(&w_prefix.t()?)? + hs.matmul(&w_pos.t()?)?)?;
                let z = broadcast_bias(&z, dense.bias())?.gelu_erf()?;
                norm.forward_t(&if self.residual { (z + &hs)? } else { z }, train)
            }
            Inner::Mlp {
                weight,
                bias,
                norm_weight,
                norm_bias,
                dropout,
                eps,
            } => {
                let n = self.n;
                let hs = layers::dropout(&hs, *dropout, train)?;
                let y = layers::add_trailing(&hs.matmul(weight)?, bias)?.reshape((k, n, d))?; // (K, N, D)
                let idx = pairs
                    .slots
                    .reshape((k, 1, 1))?
                    .broadcast_as((k, 1, d))?
                    .contiguous()?;
                let y = y.gather(&idx, 1)?.squeeze(1)?.gelu_erf()?; // (K, D)
                let y = layers::normalize(&y, *eps)?;
                y.mul(&norm_weight.index_select(&pairs.slots, 0)?)?
                    .add(&norm_bias.index_select(&pairs.slots, 0)?)
            }
            Inner::Rsa {
                keys,
                dense1,
                dense2,
                norm,
            } => {
                let (w_key, w_pos) = split_halves(dense1.weight(), d)?;
                let kv = keys.index_select(&pairs.slots, 0)?; // (K, D)
                let z = (kv.matmul(&w_key.t()?)? + hs.matmul(&w_pos.t()?)?)?;
                let z = broadcast_bias(&z, dense1.bias())?
                    .gelu_erf()?
                    .apply(dense2)?;
                norm.forward_t(&if self.residual { (z + &hs)? } else { z }, train)
            }
            Inner::Hrr { keys, .. } => {
                // Each pair's own key: (K, D) -> circulants (K, D, D); (K, 1, D)·(K, D, D).
                let c = crate::mux::circulant(&keys.index_select(&pairs.slots, 0)?)?;
                hs.unsqueeze(1)?.matmul(&c)?.squeeze(1) // (K, D)
            }
        }
    }
}

/// The `index` prefix table of a model trained at M instances, grown to N ≥ M: markers `0..M`
/// and the filler and summary rows (`M`, `M + 1`) are kept, markers `M..N` are taken from
/// `fresh`, the new model's own initial table. `old` is `(M + 2, D)`, `fresh` `(N + 2, D)`;
/// the result is `(N + 2, D)`. Used to start a warm-up at N from one at a smaller M (a
/// curriculum over N): slot i keeps its marker, so what the smaller model learned about
/// addressing instance i still applies.
pub fn grow_index_table(old: &Tensor, fresh: &Tensor) -> Result<Tensor> {
    let (m2, d) = old.dims2()?;
    let (n2, d2) = fresh.dims2()?;
    if m2 < 2 || n2 < m2 || d != d2 {
        candle_core::bail!(
            "cannot grow an index table of shape {:?} into {:?}",
            old.shape(),
            fresh.shape()
        );
    }
    let (m, n) = (m2 - 2, n2 - 2);
    Tensor::cat(
        &[
            old.narrow(0, 0, m)?,       // (M, D) the kept markers
            fresh.narrow(0, m, n - m)?, // (N - M, D) the new ones
            old.narrow(0, m, 2)?,       // (2, D) filler, summary
        ],
        0,
    )
}

/// Prefix rows start at unit scale (normal, std 1): they are muxed next to frontend outputs of
/// about unit RMS (text embeddings leave a LayerNorm), and in the reference the prefix ids pass
/// through the same embedding LayerNorm as the tokens. With BERT's 0.02 the markers start ~50x
/// smaller than the tokens they are averaged with, and the demultiplexer cannot find them.
fn prefix_table(rows: usize, d: usize, vb: VarBuilder<'_>) -> Result<Tensor> {
    vb.get_with_hints(
        (rows, d),
        "weight",
        Init::Randn {
            mean: 0.0,
            stdev: 1.0,
        },
    )
}

/// `(B, K, Din) x (Dout, Din)ᵀ -> (B, K, Dout)` as one 2-D matmul over the B·K rows.
/// `broadcast_matmul` would copy the weight B times and run B small products: at the base size
/// with 120 rows that made the index demux ~0.5 s of a pass (docs/performance.md).
fn rows_matmul(xs: &Tensor, w: &Tensor) -> Result<Tensor> {
    let (b, k, din) = xs.dims3()?;
    let ys = xs.contiguous()?.reshape((b * k, din))?.matmul(&w.t()?)?; // (B·K, Dout)
    ys.reshape((b, k, ())) // (B, K, Dout)
}

/// A `(D, 2D)` weight of a layer on `[a ; b]` split into the halves acting on `a` and on `b`.
fn split_halves(w: &Tensor, d: usize) -> Result<(Tensor, Tensor)> {
    Ok((w.narrow(1, 0, d)?, w.narrow(1, d, d)?))
}

fn broadcast_bias(xs: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let bias = bias.ok_or_else(|| candle_core::Error::Msg("demux layer without a bias".into()))?;
    layers::add_trailing(xs, bias)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    #[test]
    fn growing_the_index_table_keeps_markers_filler_and_summary() -> Result<()> {
        let dev = Device::Cpu;
        // M = 2 -> N = 5, D = 3: row r of `old` is all r, of `fresh` all 10 + r.
        let rows = |k: usize, base: f32| {
            let v: Vec<f32> = (0..k).flat_map(|r| [base + r as f32; 3]).collect();
            Tensor::from_vec(v, (k, 3), &dev)
        };
        let grown = grow_index_table(&rows(4, 0.0)?, &rows(7, 10.0)?)?;
        let firsts: Vec<f32> = grown.narrow(1, 0, 1)?.flatten_all()?.to_vec1()?;
        // markers 0, 1 kept; markers 2..5 fresh; filler (old row 2) and summary (old row 3) last.
        assert_eq!(firsts, [0.0, 1.0, 12.0, 13.0, 14.0, 2.0, 3.0]);
        assert!(grow_index_table(&rows(7, 0.0)?, &rows(4, 0.0)?).is_err());
        Ok(())
    }

    #[test]
    fn rows_matmul_agrees_with_broadcast_matmul() -> Result<()> {
        let dev = Device::Cpu;
        // A narrowed (non-contiguous) input and a narrowed weight, as in the index demux.
        let enc = Tensor::randn(0f32, 1.0, (3, 7, 5), &dev)?;
        let xs = enc.narrow(1, 1, 4)?; // (3, 4, 5)
        let w = Tensor::randn(0f32, 1.0, (6, 10), &dev)?.narrow(1, 5, 5)?; // (6, 5)
        let want = xs.broadcast_matmul(&w.t()?)?;
        let got = rows_matmul(&xs, &w)?;
        assert_eq!(got.dims(), &[3, 4, 6]);
        let diff = (got - want)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-5, "{diff}");
        Ok(())
    }

    /// The residual demultiplexer: every (slot, position) of `forward_t` equals `forward_pairs`
    /// on that pair (index and rsa), and at initialisation the output stays close to the
    /// normalised hidden state, where the plain one does not.
    #[test]
    fn residual_demux_starts_near_the_identity_and_pairs_agree() -> Result<()> {
        let dev = Device::Cpu;
        let (b, n, l, d) = (2, 3, 5, 24);
        let p = n + 1; // the index prefix: N markers and the summary slot
        let encoded = Tensor::randn(0f32, 1.0, (b, p + l, d), &dev)?;
        let cos = |x: &Tensor, y: &Tensor| -> Result<f32> {
            let dot = (x * y)?.sum_all()?.to_scalar::<f32>()?;
            let nx = x.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()?;
            let ny = y.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()?;
            Ok(dot / (nx * ny))
        };
        let h = layers::normalize(&encoded.narrow(1, p, l)?, 1e-5)?; // (B, L, D)
        for kind in [DemuxKind::Index, DemuxKind::Rsa] {
            let mut near = Vec::new();
            for residual in [false, true] {
                let map = crate::SeededVarMap::new(3);
                let cfg = Config {
                    residual,
                    ..Config::with_kind(kind)
                };
                let demux = Demux::new(&cfg, n, d, map.var_builder(DType::F32, &dev))?;
                let z = demux.forward_t(&encoded, p, Positions::Tokens, false)?; // (B, N, L, D)
                near.push(cos(&z.narrow(1, 1, 1)?.squeeze(1)?, &h)?);
                // Pair (b = 1, position 2, slot 2).
                let row = (p + 2) as u32;
                let pairs = Pairs {
                    rows: Tensor::new(&[(p + l) as u32 + row], &dev)?,
                    slots: Tensor::new(&[2u32], &dev)?,
                    slot_rows: Tensor::new(&[(p + l) as u32 + 2], &dev)?,
                };
                let one = demux.forward_pairs(&encoded, &pairs, false)?; // (1, D)
                let want = z.get(1)?.get(2)?.get(2)?.unsqueeze(0)?;
                let diff = (one - want)?.abs()?.max_all()?.to_scalar::<f32>()?;
                assert!(
                    diff < 1e-5,
                    "{kind:?} residual {residual}: pairs differ by {diff}"
                );
            }
            assert!(
                near[1] > 0.8 && near[1] > near[0] + 0.2,
                "{kind:?}: {near:?}"
            );
        }
        Ok(())
    }
}
