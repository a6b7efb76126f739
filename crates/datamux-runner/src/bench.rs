//! `datamux bench`: inference throughput of the sentence-classification MuxNet (index demux,
//! Gaussian keys) at the `small` and `base` sizes with L = 128, and of the MNIST ViT, for every N;
//! the same number of instances at every N; a per-stage breakdown (embedding, mux, encoder, demux,
//! head); and one training step (forward, backward, AdamW) at the `small` size. Rows go to
//! `<out>/bench/speed.parquet` in the schema of every other speed table.

use std::path::PathBuf;

use anyhow::Result;
use candle_core::Device;
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use datamux_core::demux::Positions;
use datamux_core::init::{randn_vec, rng_for};
use datamux_core::model::{self, Frontend};
use datamux_core::{Backbone, DemuxKind, MuxKind, SeededVarMap, Task};
use datamux_text::Size;
use datamux_text::task::{HeadKind, SentenceData, TextData, TextTask};
use datamux_vision::{Arch, ImageData, ImageSpec, ImageTask};
use rand::Rng;

use crate::config::SpeedConfig;
use crate::provenance::Provenance;
use crate::report::ideal_speedup;
use crate::results::{self, Identity, SpeedRow};
use crate::speed::{self, Timing, batch_slots};

#[derive(Debug, Clone)]
pub struct BenchConfig {
    pub sizes: Vec<Size>,
    pub ns: Vec<usize>,
    pub seq_len: usize,
    pub vocab: usize,
    pub timing: SpeedConfig,
    pub vit: bool,
    pub train_step: bool,
    pub out: PathBuf,
}

fn size_name(s: Size) -> &'static str {
    match s {
        Size::Tiny => "tiny",
        Size::Small => "small",
        Size::Base => "base",
        Size::Custom => "custom",
    }
}

fn identity(backbone: &str, size: &str, n: usize, demux: &str) -> Identity {
    Identity {
        experiment: "bench".into(),
        profile: "bench".into(),
        run_id: format!("bench-{backbone}-{size}-n{n}"),
        modality: if backbone == "vit" {
            "vision".into()
        } else {
            "text".into()
        },
        dataset: "synthetic".into(),
        data_source: "random ids / pixels".into(),
        backbone: backbone.into(),
        model_size: size.into(),
        mux: "gaussian_hadamard".into(),
        demux: demux.into(),
        n_instances: n as i64,
        seed: 0,
        ..Identity::default()
    }
    .with_provenance(&Provenance::current())
    .with_status("ok", "")
}

fn row(id: &Identity, mode: &str, seq_len: usize, t: &Timing) -> SpeedRow {
    let mut id = id.clone();
    id.run_id = format!("{}-{mode}", id.run_id);
    SpeedRow {
        id,
        mode: mode.into(),
        seq_len: seq_len as i64,
        batch_instances: t.instances as i64,
        warmup_iters: t.warmup_iters as i64,
        iters: t.latencies_ms.len() as i64,
        latency_ms_median: t.median(),
        latency_ms_mad: t.mad(),
        latency_ms_min: t.min(),
        latency_ms_max: t.max(),
        throughput_instances_per_s: t.throughput(),
    }
}

/// Random token sequences of exactly `len` ids (no padding), as the speed protocol pads to 128.
fn synthetic_text(count: usize, len: usize, vocab: usize) -> TextData {
    let mut rng = rng_for(0, "bench.tokens");
    let ids = (0..count)
        .map(|_| {
            (0..len)
                .map(|_| rng.random_range(5..vocab as u32))
                .collect()
        })
        .collect();
    TextData::Sentences(SentenceData {
        ids,
        labels: vec![0; count],
    })
}

/// One line of the printed table and the rows it stands for.
struct Point {
    label: String,
    n: usize,
    seq_len: usize,
    demux: &'static str,
    backbone: &'static str,
    throughput: f64,
    stages: Vec<(&'static str, f64)>,
    train_ms: Option<f64>,
}

fn text_point(size: Size, n: usize, cfg: &BenchConfig, rows: &mut Vec<SpeedRow>) -> Result<Point> {
    let mut text = datamux_text::Config {
        size,
        max_length: cfg.seq_len,
        embedding_dropout: 0.0,
        // As in the text experiments: a quarter of the retrieval targets (used by the training
        // step only). With every target the (B·L, vocab) logits and their gradients took 24 GiB
        // at 120 instances and vocab 30 522.
        retrieval_fraction: 0.25,
        ..Default::default()
    };
    text.encoder = datamux_text::Config::preset(size);
    let mux = model::Config::new(n, MuxKind::GaussianHadamard, DemuxKind::Index);
    let map = SeededVarMap::new(0);
    let labels = vec!["a".to_string(), "b".to_string()];
    let mut task = TextTask::new(
        &text,
        &mux,
        HeadKind::Sentence,
        &labels,
        cfg.vocab,
        0,
        (1.0, 0.0),
        &map,
        &Device::Cpu,
    )?;
    task.fixed_len = Some(cfg.seq_len);
    let data = synthetic_text(cfg.timing.batch_instances.max(n), cfg.seq_len, cfg.vocab);
    let id = identity("transformer", size_name(size), n, "index");
    let full = speed::time_inference(&task, &data, &cfg.timing, |_, _| {})?;
    rows.push(row(&id, "inference", cfg.seq_len, &full));
    // Stages, each timed alone on inputs computed outside the clock.
    let slots = batch_slots(data.len(), n, cfg.timing.batch_instances);
    let batch = task.batch(&data, &slots, &mut rng_for(0, "speed"))?;
    let net = &task.net;
    let stage_cfg = SpeedConfig {
        warmup_iters: 1,
        ..cfg.timing.clone()
    };
    let mut stages = Vec::new();
    let t = speed::time(
        &stage_cfg,
        slots.len(),
        || Ok(net.frontend.embed(&batch.input, false).map(|_| ())?),
        |_, _| {},
    )?;
    stages.push(("embedding", t.median()));
    rows.push(row(&id, "stage:embedding", cfg.seq_len, &t));
    let emb = net.frontend.embed(&batch.input, false)?;
    let t = speed::time(
        &stage_cfg,
        slots.len(),
        || Ok(net.mux_input(emb.clone()).map(|_| ())?),
        |_, _| {},
    )?;
    stages.push(("mux", t.median()));
    rows.push(row(&id, "stage:mux", cfg.seq_len, &t));
    let (muxed, pad) = net.mux_input(emb)?;
    let t = speed::time(
        &stage_cfg,
        slots.len(),
        || {
            Ok(net
                .backbone
                .forward_t(&muxed, pad.as_ref(), false)
                .map(|_| ())?)
        },
        |_, _| {},
    )?;
    stages.push(("encoder", t.median()));
    rows.push(row(&id, "stage:encoder", cfg.seq_len, &t));
    let enc = net.encode(&batch.input, false)?;
    let t = speed::time(
        &stage_cfg,
        slots.len(),
        || Ok(net.demux(&enc, Positions::Summary, false).map(|_| ())?),
        |_, _| {},
    )?;
    stages.push(("demux", t.median()));
    rows.push(row(&id, "stage:demux", cfg.seq_len, &t));
    let z = net.demux(&enc, Positions::Summary, false)?;
    let t = speed::time(
        &stage_cfg,
        slots.len(),
        || Ok(task.head_logits(&z).map(|_| ())?),
        |_, _| {},
    )?;
    stages.push(("head", t.median()));
    rows.push(row(&id, "stage:head", cfg.seq_len, &t));
    let train_ms = if cfg.train_step && size == Size::Small {
        // One optimizer step with the fine-tuning losses (0.9, 0.1): forward, backward, AdamW.
        let map = SeededVarMap::new(0);
        let mut train = TextTask::new(
            &text,
            &mux,
            HeadKind::Sentence,
            &labels,
            cfg.vocab,
            0,
            (0.9, 0.1),
            &map,
            &Device::Cpu,
        )?;
        train.fixed_len = Some(cfg.seq_len);
        let vars = map.sorted_vars()?.into_iter().map(|(_, v)| v).collect();
        let mut opt = AdamW::new(
            vars,
            ParamsAdamW {
                lr: 1e-4,
                ..Default::default()
            },
        )?;
        let batch = train.batch(&data, &slots, &mut rng_for(0, "speed"))?;
        let t = speed::time(
            &stage_cfg,
            slots.len(),
            || Ok(opt.backward_step(&train.loss(&batch, true)?.total)?),
            |_, _| {},
        )?;
        rows.push(row(&id, "train_step", cfg.seq_len, &t));
        Some(t.median())
    } else {
        None
    };
    Ok(Point {
        label: format!("text {}", size_name(size)),
        n,
        seq_len: cfg.seq_len,
        demux: "index",
        backbone: "transformer",
        throughput: full.throughput(),
        stages,
        train_ms,
    })
}

fn vit_point(n: usize, cfg: &BenchConfig, rows: &mut Vec<SpeedRow>) -> Result<Point> {
    let spec = ImageSpec::mnist();
    let vision = datamux_vision::Config::default();
    let mut mux = model::Config::new(n, MuxKind::GaussianHadamard, DemuxKind::Index);
    mux.mux.norm = 8.0;
    let map = SeededVarMap::new(0);
    let task = ImageTask::new(Arch::Vit, &vision, &mux, &spec, 10, &map, &Device::Cpu)?;
    // Random pixels stand in for images: speed does not depend on them.
    let count = cfg.timing.batch_instances.max(n);
    let px: Vec<u8> = randn_vec(&mut rng_for(0, "bench.pixels"), count * spec.pixels())
        .into_iter()
        .map(|v| (v.abs() * 64.0).min(255.0) as u8)
        .collect();
    let data = ImageData {
        pixels: px,
        labels: vec![0; count],
        spec: spec.clone(),
    };
    let t = speed::time_inference(&task, &data, &cfg.timing, |_, _| {})?;
    let seq = (spec.size / vision.vit.patch_size).pow(2);
    let size = format!(
        "{}x{}p{}",
        vision.vit.encoder.num_hidden_layers, vision.vit.encoder.hidden_size, vision.vit.patch_size
    );
    rows.push(row(
        &identity("vit", &size, n, "index"),
        "inference",
        seq,
        &t,
    ));
    Ok(Point {
        label: "mnist vit".into(),
        n,
        seq_len: seq,
        demux: "index",
        backbone: "vit",
        throughput: t.throughput(),
        stages: vec![],
        train_ms: None,
    })
}

/// Run the bench, print the table and write `<out>/bench/speed.parquet`.
pub fn run(cfg: &BenchConfig) -> Result<Vec<SpeedRow>> {
    let mut rows = Vec::new();
    let mut points = Vec::new();
    for &size in &cfg.sizes {
        for &n in &cfg.ns {
            eprintln!("timing text {} at N = {n} ...", size_name(size));
            points.push(text_point(size, n, cfg, &mut rows)?);
        }
    }
    if cfg.vit {
        for &n in &cfg.ns {
            eprintln!("timing the MNIST ViT at N = {n} ...");
            points.push(vit_point(n, cfg, &mut rows)?);
        }
    }
    println!("{}", table(&points, cfg.timing.batch_instances));
    let dir = cfg.out.join("bench");
    std::fs::create_dir_all(&dir)?;
    results::write_table(&dir.join("speed.parquet"), &rows)?;
    std::fs::write(
        dir.join("env.txt"),
        crate::provenance::env_txt("datamux bench"),
    )?;
    Ok(rows)
}

fn table(points: &[Point], batch: usize) -> String {
    let threads = candle_core::utils::get_num_threads();
    let mut s = format!(
        "inference, {batch} instances per pass, {threads} thread(s), stages are medians in ms\n{:<12} {:>3} {:>4} {:>12} {:>8} {:>7} {:>7} {:>9} {:>9} {:>9} {:>9} {:>9} {:>10}\n",
        "model",
        "N",
        "L",
        "inst/s",
        "speedup",
        "ideal",
        "ratio",
        "embed",
        "mux",
        "encoder",
        "demux",
        "head",
        "train step"
    );
    for p in points {
        let base = points.iter().find(|b| b.label == p.label && b.n == 1);
        let speedup = base.map(|b| p.throughput / b.throughput);
        let ideal = ideal_speedup(p.n as i64, p.seq_len as i64, p.demux, p.backbone);
        let stage = |name: &str| {
            p.stages
                .iter()
                .find(|(k, _)| *k == name)
                .map_or("–".into(), |(_, v)| format!("{v:.2}"))
        };
        s += &format!(
            "{:<12} {:>3} {:>4} {:>12.1} {:>8} {:>7.2} {:>7} {:>9} {:>9} {:>9} {:>9} {:>9} {:>10}\n",
            p.label,
            p.n,
            p.seq_len,
            p.throughput,
            speedup.map_or("–".into(), |v| format!("{v:.2}")),
            ideal,
            speedup.map_or("–".into(), |v| format!("{:.2}", v / ideal)),
            stage("embedding"),
            stage("mux"),
            stage("encoder"),
            stage("demux"),
            stage("head"),
            p.train_ms.map_or("–".into(), |v| format!("{v:.1} ms")),
        );
    }
    s
}
