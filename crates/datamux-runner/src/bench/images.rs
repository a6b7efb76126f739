//! The bench's MNIST models: the settings of `experiments/mnist.toml` at every N, timed whole and
//! stage by stage as the text model is, so the breakdown shows where an image model's time goes
//! (per-instance stems and embeddings, the demux, the trunk).

use anyhow::Result;
use candle_core::Device;
use datamux_core::init::{randn_vec, rng_for};
use datamux_core::model;
use datamux_core::{DemuxKind, MuxKind, SeededVarMap};
use datamux_pipeline::speed;
use datamux_vision::{Arch, ImageData, ImageSpec, ImageTask};

use super::{BenchConfig, Point, identity, row, time_stages};
use crate::results::SpeedRow;

/// An MNIST model of the bench, with the settings of `experiments/mnist.toml` or
/// `experiments/mnist-hrr.toml` (random pixels stand in for images; speed does not depend on them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ImageModel {
    /// The ViT, 4 x 64, patches of 7, Gaussian keys and the index demux.
    Vit,
    /// The MLP, 2 x 256, Gaussian keys and the per-slot MLP demux.
    Mlp,
    /// LeNet on the 20 x 20 crop with per-slot tanh stems, mean mux, per-slot MLP demux.
    Lenet,
    /// LeNet 32-64 (linear output, 512) on the 20 x 20 crop with one shared stem of 32 channels, HRR
    /// binding and unbinding: experiments/mnist-hrr.toml's model (docs/images.md).
    LenetHrr,
}

impl ImageModel {
    pub fn name(self) -> &'static str {
        match self {
            Self::Vit => "vit",
            Self::Mlp => "mlp",
            Self::Lenet => "lenet",
            Self::LenetHrr => "lenet-hrr",
        }
    }

    /// Architecture, settings, multiplexing and image spec at `n`.
    fn build(self, n: usize) -> (Arch, datamux_vision::Config, model::Config, ImageSpec) {
        let mut vision = datamux_vision::Config::default();
        let mut spec = ImageSpec::mnist();
        let (arch, mux, demux) = match self {
            Self::Vit => (Arch::Vit, MuxKind::GaussianHadamard, DemuxKind::Index),
            Self::Mlp => (Arch::Mlp, MuxKind::GaussianHadamard, DemuxKind::Mlp),
            Self::Lenet => (Arch::Lenet, MuxKind::Identity, DemuxKind::Mlp),
            Self::LenetHrr => (Arch::Lenet, MuxKind::Hrr, DemuxKind::Hrr),
        };
        if arch != Arch::Vit && arch != Arch::Mlp {
            spec.size = 20;
            vision.cnn.channels = vec![16, 32];
            vision.cnn.hidden_size = 128;
            vision.cnn.stem_activation = datamux_vision::cnn::StemActivation::Tanh;
        }
        if self == Self::LenetHrr {
            vision.cnn.stem = datamux_vision::cnn::StemKind::Shared;
            vision.cnn.stem_channels = 32;
            vision.cnn.channels = vec![32, 64];
            vision.cnn.hidden_size = 512; // experiments/mnist-hrr.toml's
            vision.cnn.out_relu = false;
        }
        let mut cfg = model::Config::new(n, mux, demux);
        cfg.mux.norm = if arch == Arch::Vit { 8.0 } else { 16.0 };
        (arch, vision, cfg, spec)
    }

    fn size(self, arch: Arch, v: &datamux_vision::Config) -> String {
        match arch {
            Arch::Vit => format!(
                "{}x{}p{}",
                v.vit.encoder.num_hidden_layers, v.vit.encoder.hidden_size, v.vit.patch_size
            ),
            Arch::Mlp => format!("{}x{}", v.mlp.num_layers, v.mlp.hidden_size),
            Arch::Lenet | Arch::Resnet => {
                let c: Vec<String> = v.cnn.channels.iter().map(|c| c.to_string()).collect();
                format!("{}-{}", c.join("-"), v.cnn.hidden_size)
            }
        }
    }
}

pub(super) fn image_point(
    image: ImageModel,
    n: usize,
    cfg: &BenchConfig,
    rows: &mut Vec<SpeedRow>,
) -> Result<Point> {
    let (arch, vision, mux, spec) = image.build(n);
    let map = SeededVarMap::new(0);
    let task = ImageTask::new(arch, &vision, &mux, &spec, 10, &map, &Device::Cpu)?;
    // Random pixels stand in for images: speed does not depend on them.
    let t = &cfg.vit_timing;
    let count = t.batch_instances.max(n);
    let px: Vec<u8> = randn_vec(&mut rng_for(0, "bench.pixels"), count * spec.pixels())
        .into_iter()
        .map(|v| (v.abs() * 64.0).min(255.0) as u8)
        .collect();
    let data = ImageData {
        pixels: px,
        labels: vec![0; count],
        spec: spec.clone(),
    };
    let (batches, instances) = speed::pass_batches(&task, &data, t)?;
    let full = speed::time_batches(&task, &batches, instances, t, |_, _| {})?;
    // Positions per row: patches for the ViT, pixels for a CNN, one for the MLP.
    let seq = match arch {
        Arch::Vit => (spec.size / vision.vit.patch_size).pow(2),
        Arch::Mlp => 1,
        Arch::Lenet | Arch::Resnet => spec.size.pow(2),
    };
    let demux = mux.demux.kind;
    let mut id = identity(arch.name(), &image.size(arch, &vision), n, demux.name());
    id.mux = mux.mux.kind.name().into();
    if image == ImageModel::LenetHrr {
        id.model_size = format!("s{}-{}", vision.cnn.stem_channels, id.model_size);
    }
    rows.push(row(&id, "inference", seq, &full));
    let inputs: Vec<_> = batches.iter().map(|b| &b.input).collect();
    let (stages, encoder_flops) = time_stages(
        &task.net,
        &inputs,
        |z| task.head.forward(z),
        t,
        full.instances,
        |name, timing| rows.push(row(&id, &format!("stage:{name}"), seq, timing)),
    )?;
    Ok(Point {
        label: format!("mnist {}", image.name()),
        n,
        seq_len: seq,
        sequence: arch.is_sequence(),
        demux,
        throughput: full.throughput(),
        stages,
        encoder_flops,
        train_ms: None,
    })
}
