//! Image classification as a core `Task`: a `MuxNet` over one vision architecture and a shared
//! classification head on the demultiplexed summary vectors.

use candle_core::{DType, Device, Result, Tensor};
use rand_chacha::ChaCha8Rng;

use datamux_core::SeededVarMap;
use datamux_core::heads::SequenceHead;
use datamux_core::model::{self, MuxNet};
use datamux_core::task::{self, Losses, Score, Task};

use crate::image::{ImageData, ImageSpec};
use crate::model::{Arch, Config, ImageInput, VisionBackbone, VisionFrontend};

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
            n,
            device: device.clone(),
        })
    }

    fn logits(&self, batch: &ImageBatch, train: bool) -> Result<Tensor> {
        // Only the summary is read: the ViT's last layer runs for the prefix alone.
        let (_, z) = self.net.forward_summary(&batch.input, train)?; // (B, N, 1, D)
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
