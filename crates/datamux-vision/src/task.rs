//! Image classification as a core `Task`: a `MuxNet` over one vision architecture and a shared
//! classification head on the demultiplexed summary vectors.

use candle_core::{DType, Device, Result, Tensor};
use rand_chacha::ChaCha8Rng;

use datamux_core::SeededVarMap;
use datamux_core::demux::Positions;
use datamux_core::heads::SequenceHead;
use datamux_core::model::{self, MuxNet};
use datamux_core::task::{self, Losses, Score, Task};

use crate::image::{ImageData, ImageSpec};
use crate::model::{Arch, Config, ImageInput, VisionBackbone, VisionFrontend};
use crate::vit::Readout;

/// A device-ready batch: pixels `(B, N, C, H, W)`, labels and real flags `(B·N)`.
pub struct ImageBatch {
    pub input: ImageInput,
    pub labels: Vec<u32>,
    pub real: Vec<bool>,
}

pub struct ImageTask {
    pub net: MuxNet<VisionFrontend, VisionBackbone>,
    pub head: SequenceHead,
    pub spec: ImageSpec,
    /// The ViT's readout; the pooling trunks have one position, the summary.
    readout: Readout,
    n: usize,
    device: Device,
}

impl ImageTask {
    /// Parameters under `frontend.*`, `backbone.*`, `mux.*`, `demux.*` and `head.*` of `map`.
    pub fn new(
        arch: Arch,
        cfg: &Config,
        mux: &model::Config,
        spec: &ImageSpec,
        classes: usize,
        map: &SeededVarMap,
        device: &Device,
    ) -> Result<Self> {
        cfg.validate(arch, spec).map_err(candle_core::Error::Msg)?;
        let vb = map.var_builder(DType::F32, device);
        let n = mux.n_instances;
        let frontend = VisionFrontend::new(arch, cfg, spec, n, vb.pp("frontend"))?;
        let backbone = VisionBackbone::new(arch, cfg, spec, vb.pp("backbone"))?;
        let net = MuxNet::new(mux, frontend, backbone, map.seed(), vb.clone())?;
        let head = SequenceHead::new(cfg.widths(arch).1, classes, vb.pp("head"))?;
        Ok(Self {
            net,
            head,
            spec: spec.clone(),
            readout: match arch {
                Arch::Vit => cfg.vit.readout,
                _ => Readout::Summary,
            },
            n,
            device: device.clone(),
        })
    }

    fn logits(&self, batch: &ImageBatch, train: bool) -> Result<Tensor> {
        let z = match self.readout {
            // Only the summary is read: the ViT's last layer runs for the prefix alone.
            Readout::Summary => self.net.forward_summary(&batch.input, train)?.1, // (B, N, 1, D)
            Readout::Mean => {
                let (_, z) = self.net.forward_t(&batch.input, Positions::Tokens, train)?;
                let (b, n, l) = (z.dim(0)?, z.dim(1)?, z.dim(2)?);
                // Images have no padding: (B, N, L, D) -> (B, N, 1, D)
                let none = Tensor::zeros((b, n, l), DType::U8, z.device())?;
                datamux_core::heads::masked_mean(&z, &none)?
            }
        };
        self.head.forward(&z) // (B·N, C)
    }
}

impl Task for ImageTask {
    type Data = ImageData;
    type Batch = ImageBatch;

    fn n_instances(&self) -> usize {
        self.n
    }

    fn len(&self, data: &ImageData) -> usize {
        data.len()
    }

    /// Dummy slots get an all-zero image (zero after normalisation) and label 0; both are
    /// excluded from the loss and the metrics.
    fn batch(
        &self,
        data: &ImageData,
        slots: &[Option<usize>],
        _rng: &mut ChaCha8Rng,
    ) -> Result<ImageBatch> {
        let px = self.spec.pixels();
        let mut pixels = Vec::with_capacity(slots.len() * px);
        let mut labels = Vec::with_capacity(slots.len());
        for slot in slots {
            match slot {
                Some(i) => {
                    data.push_normalised(*i, &mut pixels);
                    labels.push(data.labels[*i]);
                }
                None => {
                    pixels.extend(std::iter::repeat_n(0.0, px));
                    labels.push(0);
                }
            }
        }
        let b = slots.len() / self.n;
        let s = &self.spec;
        let pixels = Tensor::from_vec(
            pixels,
            (b, self.n, s.channels, s.size, s.size),
            &self.device,
        )?;
        Ok(ImageBatch {
            input: ImageInput { pixels },
            labels,
            real: datamux_core::group::real_mask(slots),
        })
    }

    fn loss(&self, batch: &ImageBatch, train: bool) -> Result<Losses> {
        let logits = self.logits(batch, train)?;
        let loss = task::real_cross_entropy(&logits, &batch.labels, &batch.real)?;
        Ok(Losses {
            total: loss.clone(),
            task: Some(loss),
            retrieval: None,
        })
    }

    fn loss_distilled(
        &self,
        batch: &ImageBatch,
        teacher: &Tensor,
        soft: task::Soft,
        train: bool,
    ) -> Result<Losses> {
        let logits = self.logits(batch, train)?; // (B·N, C)
        let hard = task::real_cross_entropy(&logits, &batch.labels, &batch.real)?;
        let total = task::distilled(&hard, &logits, teacher, &batch.real, soft)?;
        Ok(Losses {
            total,
            task: Some(hard),
            retrieval: None,
        })
    }

    fn score(&self, batch: &ImageBatch) -> Result<Score> {
        task::slot_counts(
            &self.logits(batch, false)?,
            &batch.labels,
            &batch.real,
            self.n,
        )
    }

    fn predict(&self, batch: &ImageBatch) -> Result<Tensor> {
        self.logits(batch, false)
    }
}

#[cfg(test)]
mod tests {
    use datamux_core::{DemuxKind, MuxKind};

    use super::*;

    /// `vit.readout = "mean"`: slot i's logits are the head on the mean of its demultiplexed patch
    /// positions, not on the summary. Tiny ViT, 12 x 12 images in 4 patches, N = 3.
    #[test]
    fn the_vit_mean_readout_averages_every_patch_position() -> Result<()> {
        let dev = Device::Cpu;
        let spec = ImageSpec {
            size: 12,
            mean: vec![0.5],
            std: vec![0.5],
            channels: 1,
        };
        let mut cfg = Config::default();
        cfg.vit.patch_size = 6;
        cfg.vit.encoder = datamux_core::encoder::Config {
            hidden_size: 10,
            intermediate_size: 7,
            num_attention_heads: 2,
            ..datamux_core::encoder::Config::tiny()
        };
        let (n, classes) = (3, 5);
        let mux = model::Config::new(n, MuxKind::Hrr, DemuxKind::Hrr);
        let mut task_for = |readout| {
            cfg.vit.readout = readout;
            ImageTask::new(
                Arch::Vit,
                &cfg,
                &mux,
                &spec,
                classes,
                &SeededVarMap::new(4),
                &dev,
            )
        };
        let (summary, mean) = (task_for(Readout::Summary)?, task_for(Readout::Mean)?);
        let pixels = Tensor::randn(0f32, 1.0, (2, n, 1, 12, 12), &dev)?;
        let batch = ImageBatch {
            input: ImageInput { pixels },
            labels: vec![0; 2 * n],
            real: vec![true; 2 * n],
        };
        let (_, z) = mean.net.forward_t(&batch.input, Positions::Tokens, false)?;
        assert_eq!(z.dims(), [2, n, 4, 10]); // (B, N, L, D): every patch position
        let want = mean.head.forward(&z.mean_keepdim(2)?)?; // (B·N, C)
        let got = mean.predict(&batch)?;
        assert_eq!(got.dims(), [2 * n, classes]);
        let diff = (&got - want)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-5, "{diff}");
        // Same weights (one seed), another readout: other logits.
        let other = (summary.predict(&batch)? - got)?.abs()?.max_all()?;
        assert!(other.to_scalar::<f32>()? > 1e-4);
        Ok(())
    }
}
