//! A tiny multiplexed ViT on synthetic images, N = 2: each 12 x 12 image has one bright 6 x 6
//! quadrant, and the class is which one. Two images share every forward pass. Runs in seconds:
//!
//!     cargo run --release -p datamux-vision --example tiny_vit

use candle_core::{Device, Result};
use candle_nn::{Optimizer, ParamsAdamW};
use datamux_core::group::TrainStream;
use datamux_core::init::rng_for;
use datamux_core::model;
use datamux_core::optim::AdamW;
use datamux_core::{DemuxKind, Groups, MuxKind, Score, SeededVarMap, Task};
use datamux_vision::{Arch, ImageData, ImageSpec, ImageTask};
use rand::Rng;

fn quadrants(count: usize, seed: u64) -> ImageData {
    let mut rng = rng_for(seed, "example.images");
    let spec = ImageSpec {
        size: 12,
        mean: vec![0.5],
        std: vec![0.5],
        channels: 1,
    };
    let mut pixels = Vec::with_capacity(count * 144);
    let mut labels = Vec::with_capacity(count);
    for _ in 0..count {
        let q: u32 = rng.random_range(0..4);
        for y in 0..12 {
            for x in 0..12 {
                let inside = (y / 6) * 2 + x / 6 == q as usize;
                let noise: u8 = rng.random_range(0..60);
                pixels.push(if inside { 195 + noise } else { noise });
            }
        }
        labels.push(q);
    }
    ImageData {
        pixels,
        labels,
        spec,
    }
}

fn main() -> Result<()> {
    let (train, test) = (quadrants(2000, 0), quadrants(400, 1));
    let mut cfg = datamux_vision::Config::default();
    cfg.vit.patch_size = 6;
    cfg.vit.encoder = datamux_core::encoder::Config {
        hidden_size: 32,
        intermediate_size: 37,
        pre_layer_norm: std::env::var("PRE").is_ok(),
        ..datamux_core::encoder::Config::tiny()
    };
    let n = std::env::var("N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2);
    let mut mux = model::Config::new(n, MuxKind::GaussianHadamard, DemuxKind::Index);
    mux.mux.norm = std::env::var("NORM")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1.0);
    let map = SeededVarMap::new(0);
    let task = ImageTask::new(Arch::Vit, &cfg, &mux, &train.spec, 4, &map, &Device::Cpu)?;
    let vars = map.sorted_vars()?.into_iter().map(|(_, v)| v).collect();
    let lr = std::env::var("LR")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1e-3);
    let mut opt = AdamW::new(
        vars,
        ParamsAdamW {
            lr,
            ..Default::default()
        },
    )?;
    let mut stream = TrainStream::new(train.len(), rng_for(0, "example.shuffle"));
    let mut rng = rng_for(0, "example.batch");
    for step in 1..=300 {
        let batch = task.batch(&train, &stream.next_batch(32), &mut rng)?;
        let loss = task.loss(&batch, true)?.total;
        opt.backward_step(&loss)?;
        if step % 100 == 0 {
            println!("step {step}: loss {:.4}", loss.to_scalar::<f32>()?);
        }
    }
    let mut score = Score::default();
    let groups = Groups::consecutive(&(0..test.len()).collect::<Vec<_>>(), n);
    for slots in groups.batches(64) {
        score.merge(&task.score(&task.batch(&test, slots, &mut rng)?)?);
    }
    for (k, v) in score.metrics() {
        println!("test {k}: {v:.3}");
    }
    Ok(())
}
