//! [`MuxNet`]: the one assembly frontend -> prefix -> mux -> mask -> backbone -> demux, used by
//! every task of every modality. Heads sit on top and are never copied per task.
//!
//! DataMUX (arXiv 2202.09318), Fig. 1 and method.md §2. Reference: `princeton-nlp/DataMUX`,
//! `models/multiplexing.py`, whose sentence and token models each repeat this pipeline; here it is
//! written once. Multiplexing happens at the end of the frontend and no embedding step runs again
//! after it (method.md §13, difference 1).

use std::collections::HashMap;

use candle_core::{DType, Result, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use crate::demux::{self, Demux, DemuxKind, Positions, Prefix};
use crate::error::ConfigError;
use crate::mux::{self, Multiplexer};

/// Per-instance embeddings from a frontend.
#[derive(Clone, Debug)]
pub struct Embedded {
    /// `(B, N, L, D)`. Padding positions should carry zeros, so that they add nothing to the mix.
    pub xs: Tensor,
    /// `(B, N, L)` u8, 1 where the position is padding; `None` when nothing is ever padded.
    pub pad: Option<Tensor>,
}

/// Raw input of one modality -> per-instance embeddings.
pub trait Frontend {
    type Input;
    /// `input` -> xs `(B, N, L, D)`, pad `(B, N, L)`.
    fn embed(&self, input: &Self::Input, train: bool) -> Result<Embedded>;
    /// `D` of the embeddings.
    fn hidden_size(&self) -> usize;
    /// Embed and multiplex in one pass at inference, for a mux that is per-slot scales
    /// (`scales` `(N, D)`, [`Multiplexer::slot_scales`]): xs `(B, L, D)` =
    /// `Σᵢ scales[i] ⊙ embed(input).xs[:, i]` and pad `(B, N, L)`, without materialising
    /// `(B, N, L, D)`. `None`, the default, where the frontend has no such path; [`MuxNet`]
    /// then embeds and muxes in two steps.
    fn embed_muxed(&self, _input: &Self::Input, _scales: &Tensor) -> Result<Option<Embedded>> {
        Ok(None)
    }
    /// The same for a mux that is one matrix (`maps()` `(N·D, D)`, [`Multiplexer::slot_maps`]):
    /// xs `(B, L, D)` = `[embed(input).xs[:, 1] … xs[:, N]] · maps` at each position. A linear
    /// frontend folds the maps into its weights (the shared convolutional stem); `maps` builds
    /// them on call, so a frontend that cannot fold never pays for `N·D²` values. `None`, the
    /// default, where it cannot.
    fn embed_mapped(
        &self,
        _input: &Self::Input,
        _maps: &dyn Fn() -> Result<Tensor>,
    ) -> Result<Option<Embedded>> {
        Ok(None)
    }
}

/// The shared trunk that runs once per muxed row.
pub trait Backbone {
    /// `(B, T, D)` with key-padding mask `(B, T)` (1 = padding) -> `(B, T', D')`.
    fn forward_t(&self, xs: &Tensor, pad: Option<&Tensor>, train: bool) -> Result<Tensor>;
    /// `D'` of the output.
    fn hidden_size(&self) -> usize;
    /// Whether output position j is input position j (a Transformer). A backbone that pools
    /// (CNN, MLP) returns false: it receives no prefix and its output is one position.
    fn is_sequence(&self) -> bool {
        true
    }
    /// A short name for errors and tables.
    fn name(&self) -> String {
        "backbone".into()
    }
    /// Floating-point operations of one forward pass over `rows` rows of `len` positions, where
    /// the backbone can count them (the bench's GFLOP/s).
    fn forward_flops(&self, _rows: usize, _len: usize) -> Option<f64> {
        None
    }
    /// Only the first `rows` output positions `(B, rows, D')`, for a head that reads nothing
    /// else; a backbone may skip the work no one reads. A sequence backbone only.
    fn forward_prefix(
        &self,
        xs: &Tensor,
        pad: Option<&Tensor>,
        train: bool,
        rows: usize,
    ) -> Result<Tensor> {
        self.forward_t(xs, pad, train)?.narrow(1, 0, rows)
    }
    /// [`Self::forward_flops`] of [`Self::forward_prefix`] keeping `keep` positions.
    fn prefix_flops(&self, rows: usize, len: usize, _keep: usize) -> Option<f64> {
        self.forward_flops(rows, len)
    }
}

/// The multiplexing settings of a model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub n_instances: usize,
    pub mux: mux::Config,
    pub demux: demux::Config,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            n_instances: 2, // the smallest N that multiplexes
            mux: mux::Config::default(),
            demux: demux::Config::default(),
        }
    }
}

impl Config {
    pub fn new(n_instances: usize, mux: mux::MuxKind, demux: DemuxKind) -> Self {
        Self {
            n_instances,
            mux: mux::Config::with_kind(mux),
            demux: demux::Config::with_kind(demux),
        }
    }

    /// Checks against the frontend width and the kind of backbone.
    pub fn validate(
        &self,
        frontend_width: usize,
        sequence_backbone: bool,
        backbone: &str,
    ) -> std::result::Result<(), ConfigError> {
        self.mux.validate(self.n_instances, frontend_width)?;
        if self.demux.kind == DemuxKind::Index && !sequence_backbone {
            return Err(ConfigError::IndexNeedsSequence {
                backbone: backbone.to_string(),
            });
        }
        Ok(())
    }
}

/// The encoder output of a batch, before demultiplexing.
#[derive(Clone, Debug)]
pub struct Encoded {
    /// `(B, P+L, D)` for sequence backbones (`(B, P, D)` from `MuxNet::encode_prefix`), `(B, 1, D)`
    /// for pooling ones.
    pub hidden: Tensor,
    /// `P`, the prefix slots in front of every instance's sequence.
    pub prefix_len: usize,
    /// `(B, P+L)` key-padding mask after muxing, as given to the backbone.
    pub pad: Option<Tensor>,
}

/// Frontend, prefix, multiplexer, backbone and demultiplexer. Parameter paths: `mux.*`,
/// `demux.*` (prefix tables included); the frontend and backbone choose theirs.
pub struct MuxNet<F, B> {
    pub frontend: F,
    pub backbone: B,
    prefix: Option<Prefix>,
    mux: Multiplexer,
    demux: Demux,
    n: usize,
}

impl<F: Frontend, B: Backbone> MuxNet<F, B> {
    pub fn new(
        cfg: &Config,
        frontend: F,
        backbone: B,
        seed: u64,
        vb: VarBuilder<'_>,
    ) -> Result<Self> {
        let (df, db, seq) = (
            frontend.hidden_size(),
            backbone.hidden_size(),
            backbone.is_sequence(),
        );
        cfg.validate(df, seq, &backbone.name())
            .map_err(candle_core::Error::wrap)?;
        let n = cfg.n_instances;
        if seq && df != db {
            candle_core::bail!(
                "a sequence backbone must keep the width: frontend {df}, backbone {db}"
            );
        }
        let prefix = Demux::prefix(cfg.demux.kind, n, df, seq, vb.pp("demux"))?;
        let mux = Multiplexer::new(&cfg.mux, n, df, seed, vb.pp("mux"))?;
        let demux = Demux::new(&cfg.demux, n, db, vb.pp("demux"))?;
        Ok(Self {
            frontend,
            backbone,
            prefix,
            mux,
            demux,
            n,
        })
    }

    pub fn n_instances(&self) -> usize {
        self.n
    }

    pub fn prefix_len(&self) -> usize {
        self.prefix.as_ref().map_or(0, Prefix::len)
    }

    pub fn prefix(&self) -> Option<&Prefix> {
        self.prefix.as_ref()
    }

    pub fn multiplexer(&self) -> &Multiplexer {
        &self.mux
    }

    /// Embed, prefix, mux, mask and run the backbone.
    pub fn encode(&self, input: &F::Input, train: bool) -> Result<Encoded> {
        let (muxed, pad) = self.embed_and_mux(input, train)?;
        let hidden = self.backbone.forward_t(&muxed, pad.as_ref(), train)?;
        Ok(Encoded {
            hidden,
            prefix_len: self.prefix_len(),
            pad,
        })
    }

    /// The backbone output rows the summary demux reads, the prefix, where the backbone keeps
    /// positions and there is a prefix; `None` where the whole output is read.
    pub fn summary_rows(&self) -> Option<usize> {
        (self.backbone.is_sequence() && self.prefix_len() > 0).then_some(self.prefix_len())
    }

    /// [`Self::encode`] with only the prefix `(B, P, D)` kept, for a demux that reads nothing
    /// else ([`Positions::Summary`]); the backbone may skip the rest of its last layer. A
    /// backbone that pools has one output position and is encoded whole.
    pub fn encode_prefix(&self, input: &F::Input, train: bool) -> Result<Encoded> {
        let Some(rows) = self.summary_rows() else {
            return self.encode(input, train);
        };
        let (muxed, pad) = self.embed_and_mux(input, train)?;
        let hidden = self
            .backbone
            .forward_prefix(&muxed, pad.as_ref(), train, rows)?;
        Ok(Encoded {
            hidden,
            prefix_len: self.prefix_len(),
            pad,
        })
    }

    /// The backbone's input: `(B, P+L, D)` and the `(B, P+L)` key-padding mask. At inference,
    /// where the mux is per-slot scales or one matrix and the frontend can, in one pass that
    /// never holds `(B, N, L, D)` ([`Frontend::embed_muxed`], [`Frontend::embed_mapped`]);
    /// otherwise [`Frontend::embed`], then
    /// [`Self::mux_input`]. Training always takes the two-step path, whose ops carry gradients.
    pub fn embed_and_mux(&self, input: &F::Input, train: bool) -> Result<(Tensor, Option<Tensor>)> {
        if !train {
            let fused = match self.mux.slot_scales()? {
                Some(scales) => self.frontend.embed_muxed(input, &scales)?,
                None if self.mux.is_matrix() => {
                    let maps = || {
                        self.mux.slot_maps()?.ok_or_else(|| {
                            candle_core::Error::Msg("a matrix mux without its maps".into())
                        })
                    };
                    self.frontend.embed_mapped(input, &maps)?
                }
                None => None,
            };
            if let Some(Embedded { xs, pad }) = fused {
                let n = pad.as_ref().map_or(Ok(self.n), |p| p.dim(1))?;
                if n != self.n {
                    candle_core::bail!(
                        "frontend gave N = {n}, the model multiplexes N = {}",
                        self.n
                    );
                }
                return self.add_prefix(xs, pad);
            }
        }
        self.mux_input_t(self.frontend.embed(input, train)?, train)
    }

    /// Prefix, mux and mask: `(B, N, L, D)` embeddings -> `(B, P+L, D)` and the `(B, P+L)`
    /// key-padding mask, at inference. Public so that the stages can be timed one by one.
    pub fn mux_input(&self, embedded: Embedded) -> Result<(Tensor, Option<Tensor>)> {
        self.mux_input_t(embedded, false)
    }

    /// [`Self::mux_input`], in training where `train` (a learned mux's dropout).
    pub fn mux_input_t(&self, embedded: Embedded, train: bool) -> Result<(Tensor, Option<Tensor>)> {
        let Embedded { xs, pad } = embedded;
        let (_b, n, _l, _d) = xs.dims4()?;
        if n != self.n {
            candle_core::bail!(
                "frontend gave N = {n}, the model multiplexes N = {}",
                self.n
            );
        }
        let muxed = self.mux.forward_t(&xs, pad.as_ref(), train)?; // (B, L, D)
        self.add_prefix_t(muxed, pad, train)
    }

    /// Muxed `(B, L, D)` and per-instance pad `(B, N, L)` -> `(B, P+L, D)` and `(B, P+L)`.
    fn add_prefix(&self, muxed: Tensor, pad: Option<Tensor>) -> Result<(Tensor, Option<Tensor>)> {
        self.add_prefix_t(muxed, pad, false)
    }

    fn add_prefix_t(
        &self,
        muxed: Tensor,
        pad: Option<Tensor>,
        train: bool,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let (b, _l, d) = muxed.dims3()?;
        let p = self.prefix_len();
        let muxed = match &self.prefix {
            Some(prefix) => {
                // A position-wise mux gives mux([prefix ; xs]) = [mux(prefix) ; mux(xs)], and the
                // prefix is the same for every row: mux it once, (1, N, P, D) -> (1, P, D), and
                // broadcast, instead of materialising (B, N, P+L, D). The contextual mux is not
                // position-wise; it contextualises the prefix on its own, apart from the tokens
                // (the prefix slots are markers, not text), which is the same computation.
                let pre = self
                    .mux
                    .forward_t(&prefix.tensor()?.unsqueeze(0)?, None, train)?; // (1, P, D)
                let pre = pre.broadcast_as((b, p, d))?;
                Tensor::cat(&[&pre, &muxed], 1)? // (B, P+L, D)
            }
            None => muxed,
        };
        let pad = match pad {
            Some(pad) => {
                // A muxed position is padding only if it is padding in every instance: the min
                // over N of the 0/1 flags, (B, N, L) -> (B, L).
                let pad = pad.min(1)?;
                // Prefix slots are never masked: they carry the instance markers that the
                // demultiplexer reads. (B, P) zeros ++ (B, L) -> (B, P+L).
                Some(if p > 0 {
                    Tensor::cat(&[&Tensor::zeros((b, p), DType::U8, pad.device())?, &pad], 1)?
                } else {
                    pad
                })
            }
            None => None,
        };
        Ok((muxed, pad))
    }

    /// `(B, P+L, D) -> (B, N, L', D)` for the positions the head needs.
    pub fn demux(&self, enc: &Encoded, positions: Positions, train: bool) -> Result<Tensor> {
        if positions == Positions::Tokens && !self.backbone.is_sequence() {
            candle_core::bail!(
                "{} has no positions to demultiplex per token",
                self.backbone.name()
            );
        }
        self.demux
            .forward_t(&enc.hidden, enc.prefix_len, positions, train)
    }

    /// `encode_prefix` then `demux` of the summary: `(B, N, 1, D)`, for a head that needs
    /// nothing else (the encoding holds only the prefix).
    pub fn forward_summary(&self, input: &F::Input, train: bool) -> Result<(Encoded, Tensor)> {
        let enc = self.encode_prefix(input, train)?;
        let z = self.demux(&enc, Positions::Summary, train)?;
        Ok((enc, z))
    }

    /// `encode` then `demux`.
    pub fn forward_t(
        &self,
        input: &F::Input,
        positions: Positions,
        train: bool,
    ) -> Result<(Encoded, Tensor)> {
        let enc = self.encode(input, train)?;
        let z = self.demux(&enc, positions, train)?;
        Ok((enc, z))
    }

    /// Fixed tensors that belong in a checkpoint beside the trainable weights.
    pub fn buffers(&self) -> HashMap<String, Tensor> {
        self.mux
            .buffers()
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect()
    }

    /// Compare saved buffers with the ones regenerated from the seed, bit for bit.
    pub fn check_buffers(&self, saved: &HashMap<String, Tensor>) -> Result<()> {
        for (name, ours) in self.buffers() {
            let Some(theirs) = saved.get(&name) else {
                candle_core::bail!("checkpoint lacks buffer {name}");
            };
            if theirs.shape() != ours.shape() {
                candle_core::bail!(
                    "buffer {name}: checkpoint has shape {:?}, this model {:?}",
                    theirs.shape(),
                    ours.shape()
                );
            }
            let a = ours.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
            let b = theirs
                .flatten_all()?
                .to_dtype(DType::F32)?
                .to_vec1::<f32>()?;
            if a.iter().zip(&b).any(|(x, y)| x.to_bits() != y.to_bits()) {
                candle_core::bail!(
                    "buffer {name} differs from the keys regenerated from the seed: the checkpoint \
                     was made with another seed or another key generator"
                );
            }
        }
        Ok(())
    }
}
