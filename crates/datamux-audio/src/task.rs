//! Clip classification as a core `Task`: a `MuxNet` of the frame frontend and the core encoder,
//! and a shared classification head on each instance's demultiplexed summary slot (or the mean
//! of its positions).
//!
//! The frame analogue of DataMUX's retrieval loss (method.md §5) can be added to the task loss:
//! from every demultiplexed position of instance i, a linear decoder reconstructs instance i's
//! own (normalised) frame at that position, `loss = α_task · CE + α_ret · MSE`. Recovering each
//! instance's frames from the mix is what the demultiplexer must learn; the class label alone
//! is a weak signal for it at high N.

use candle_core::{DType, Device, Result, Tensor};
use rand::Rng;
use rand_chacha::ChaCha8Rng;

use datamux_core::demux::Positions;
use datamux_core::encoder::Encoder;
use datamux_core::heads::{self, SequenceHead};
use datamux_core::layers::{self, Linear};
use datamux_core::model::{self, MuxNet};
use datamux_core::task::{self, Losses, Score, Task};
use datamux_core::{SeededVarMap, group};

use crate::config::{Augment, Config, Readout};
use crate::frames::FrameData;
use crate::frontend::{FrameFrontend, FrameInput};

/// A device-ready batch: frames `(B, N, L, F)`, padding `(B, N, L)`, labels and real flags
/// `(B·N)`.
pub struct AudioBatch {
    pub input: FrameInput,
    /// The frames masked for training (`augment`), when it is on; the loss reads these and
    /// reconstructs the clean ones.
    pub masked: Option<Tensor>,
    pub labels: Vec<u32>,
    pub real: Vec<bool>,
}

pub struct AudioTask {
    pub net: MuxNet<FrameFrontend, Encoder>,
    pub head: SequenceHead,
    /// `retrieval.decoder`: `D -> F`, each demultiplexed position to its instance's frame.
    decoder: Linear,
    /// `(α_task, α_ret)`.
    pub weights: (f64, f64),
    /// Pad every batch to this many frames (the speed protocol) instead of its longest clip.
    pub fixed_len: Option<usize>,
    readout: Readout,
    augment: Augment,
    dim: usize,
    n: usize,
    device: Device,
}

impl AudioTask {
    /// Parameters under `frontend.*`, `backbone.*`, `mux.*`, `demux.*`, `head.*` and
    /// `retrieval.*` of `map`; `dim` numbers a frame; `weights` = `(α_task, α_ret)`.
    pub fn new(
        cfg: &Config,
        mux: &model::Config,
        dim: usize,
        classes: usize,
        weights: (f64, f64),
        map: &SeededVarMap,
        device: &Device,
    ) -> Result<Self> {
        cfg.validate().map_err(candle_core::Error::Msg)?;
        let vb = map.var_builder(DType::F32, device);
        let enc = &cfg.encoder;
        let frontend = FrameFrontend::new(
            dim,
            cfg.max_frames,
            enc.hidden_size,
            cfg.embedding_norm,
            cfg.embedding_dropout,
            enc.layer_norm_eps,
            vb.pp("frontend"),
        )?;
        let backbone = Encoder::new(enc, vb.pp("backbone"))?;
        let net = MuxNet::new(mux, frontend, backbone, map.seed(), vb.clone())?;
        let head = SequenceHead::new(enc.hidden_size, classes, vb.pp("head"))?;
        let decoder = layers::linear(enc.hidden_size, dim, vb.pp("retrieval").pp("decoder"))?;
        Ok(Self {
            net,
            head,
            decoder,
            weights,
            fixed_len: None,
            readout: cfg.readout,
            augment: cfg.augment.clone(),
            dim,
            n: mux.n_instances,
            device: device.clone(),
        })
    }

    /// `(B·N, C)` logits, and the demultiplexed positions `(B, N, L, D)` when `positions` (or
    /// the mean readout) needs them.
    fn forward(
        &self,
        batch: &AudioBatch,
        positions: bool,
        train: bool,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let masked;
        let input = match (&batch.masked, train) {
            (Some(frames), true) => {
                masked = FrameInput {
                    frames: frames.clone(),
                    pad: batch.input.pad.clone(),
                };
                &masked
            }
            _ => &batch.input,
        };
        let enc = self.net.encode(input, train)?;
        let tokens = if positions || self.readout == Readout::Mean {
            Some(self.net.demux(&enc, Positions::Tokens, train)?)
        } else {
            None
        };
        let z = match (&self.readout, &tokens) {
            (Readout::Mean, Some(z)) => heads::masked_mean(z, &batch.input.pad)?, // (B, N, 1, D)
            _ => self.net.demux(&enc, Positions::Summary, train)?,
        };
        Ok((self.head.forward(&z)?, tokens))
    }

    /// Mean squared error of each instance's frames reconstructed from its demultiplexed
    /// positions `z` `(B, N, L, D)`, over real frames of real instances (padding and dummy slots
    /// are masked out).
    fn reconstruction(&self, z: &Tensor, batch: &AudioBatch) -> Result<Tensor> {
        let (b, n, l, d) = z.dims4()?;
        let f = self.dim;
        // (B·N·L, D) -> (B·N·L, F) -> (B, N, L, F)
        let pred = z
            .reshape((b * n * l, d))?
            .apply(&self.decoder)?
            .reshape((b, n, l, f))?;
        let keep = (1.0 - batch.input.pad.to_dtype(DType::F32)?)?; // (B, N, L)
        let frames = keep.sum_all()?.to_scalar::<f32>()?.max(1.0);
        let err = (pred - &batch.input.frames)?.sqr()?.sum(3)?; // (B, N, L)
        (err * keep)?.sum_all()? / (f64::from(frames) * f as f64)
    }
}

impl Task for AudioTask {
    type Data = FrameData;
    type Batch = AudioBatch;

    fn n_instances(&self) -> usize {
        self.n
    }

    fn len(&self, data: &FrameData) -> usize {
        data.len()
    }

    fn example_len(&self, data: &FrameData, i: usize) -> usize {
        data.frames(i)
    }

    /// A batch is padded to its longest clip (or `fixed_len`); dummy slots are all padding and
    /// carry label 0, which neither loss nor metrics see.
    fn batch(
        &self,
        data: &FrameData,
        slots: &[Option<usize>],
        rng: &mut ChaCha8Rng,
    ) -> Result<AudioBatch> {
        if data.dim != self.dim {
            candle_core::bail!(
                "frames of {} values, the model was built for {}",
                data.dim,
                self.dim
            );
        }
        let (n, f) = (self.n, self.dim);
        let b = slots.len() / n;
        let longest = slots.iter().flatten().map(|i| data.frames(*i)).max();
        let l = self.fixed_len.or(longest).unwrap_or(1).max(1);
        let mut frames = Vec::with_capacity(slots.len() * l * f);
        let mut pad = Vec::with_capacity(slots.len() * l);
        let mut labels = Vec::with_capacity(slots.len());
        for slot in slots {
            let clip: &[f32] = slot.map(|i| data.clips[i].as_slice()).unwrap_or_default();
            let kept = (clip.len() / f).min(l);
            frames.extend_from_slice(&clip[..kept * f]);
            frames.extend(std::iter::repeat_n(0.0, (l - kept) * f));
            pad.extend((0..l).map(|j| u8::from(j >= kept)));
            labels.push(slot.map_or(0, |i| data.labels[i]));
        }
        // Masks are drawn for every batch, so the stream does not depend on which batches train.
        let masked = if self.augment.is_off() {
            None
        } else {
            let mut out = frames.clone();
            for (s, slot) in slots.iter().enumerate() {
                let kept = slot.map_or(0, |i| data.frames(i).min(l));
                mask_instance(
                    &mut out[s * l * f..(s + 1) * l * f],
                    kept,
                    f,
                    &self.augment,
                    rng,
                );
            }
            Some(Tensor::from_vec(out, (b, n, l, f), &self.device)?)
        };
        Ok(AudioBatch {
            input: FrameInput {
                frames: Tensor::from_vec(frames, (b, n, l, f), &self.device)?,
                pad: Tensor::from_vec(pad, (b, n, l), &self.device)?,
            },
            masked,
            labels,
            real: group::real_mask(slots),
        })
    }

    fn loss(&self, batch: &AudioBatch, train: bool) -> Result<Losses> {
        let (a_task, a_ret) = self.weights;
        let (logits, tokens) = self.forward(batch, a_ret > 0.0, train)?;
        let task = task::real_cross_entropy(&logits, &batch.labels, &batch.real)?;
        let retrieval = match &tokens {
            Some(z) if a_ret > 0.0 => Some(self.reconstruction(z, batch)?),
            _ => None,
        };
        let mut total = (&task * a_task)?;
        if let Some(r) = &retrieval {
            total = (total + (r * a_ret)?)?;
        }
        Ok(Losses {
            total,
            task: Some(task),
            retrieval,
        })
    }

    fn score(&self, batch: &AudioBatch) -> Result<Score> {
        let (logits, _) = self.forward(batch, false, false)?;
        task::slot_counts(&logits, &batch.labels, &batch.real, self.n)
    }

    fn predict(&self, batch: &AudioBatch) -> Result<Tensor> {
        Ok(self.forward(batch, false, false)?.0)
    }
}

/// Zero spans of frames and of coefficients of one instance's `(L, F)` frames, of which the
/// first `frames` are real.
fn mask_instance(clip: &mut [f32], frames: usize, f: usize, a: &Augment, rng: &mut ChaCha8Rng) {
    if frames == 0 {
        return;
    }
    for _ in 0..a.time_masks {
        let width = rng.random_range(0..=a.time_width.min(frames));
        let start = rng.random_range(0..=frames - width);
        clip[start * f..(start + width) * f].fill(0.0);
    }
    for _ in 0..a.coefficient_masks {
        let width = rng.random_range(0..=a.coefficient_width.min(f));
        let start = rng.random_range(0..=f - width);
        for frame in clip[..frames * f].chunks_mut(f) {
            frame[start..start + width].fill(0.0);
        }
    }
}
