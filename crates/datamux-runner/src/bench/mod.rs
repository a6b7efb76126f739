//! `datamux bench`: inference throughput of the sentence-classification MuxNet (index demux,
//! Gaussian keys) at the `small` and `base` sizes with L = 128, and of the MNIST ViT, for every N;
//! the same number of instances at every N; a per-stage breakdown (embedding, mux, encoder, demux,
//! head); and one training step (forward, backward, AdamW) at the `small` size. Rows go to
//! `<out>/bench/speed.parquet` in the schema of every other speed table.

use std::path::PathBuf;

use anyhow::Result;
use candle_core::Device;
use candle_core::Tensor;
use candle_nn::{Optimizer, ParamsAdamW};
use datamux_core::demux::Positions;
use datamux_core::init::{randn_vec, rng_for};
use datamux_core::model::{self, Frontend, MuxNet};
use datamux_core::optim::AdamW;
use datamux_core::{Backbone, DemuxKind, MuxKind, SeededVarMap, Task};
use datamux_text::Size;
use datamux_text::task::{HeadKind, SentenceData, TextData, TextTask};

use rand::Rng;

use datamux_pipeline::SpeedConfig;
use datamux_pipeline::speed::{self, Timing, batch_slots};

mod images;
pub use images::ImageModel;

use crate::provenance::Provenance;
use crate::report::ideal_speedup;
use crate::results::{self, Identity, SpeedRow, Status};

#[derive(Debug, Clone)]
pub struct BenchConfig {
    pub sizes: Vec<Size>,
    pub ns: Vec<usize>,
    pub seq_len: usize,
    pub vocab: usize,
    /// Text: instances per pass and muxed rows per forward call.
    pub timing: SpeedConfig,
    /// The image models' pass: more rows per call, as their rows are short.
    pub vit_timing: SpeedConfig,
    /// Instances in the timed training step (one call).
    pub train_instances: usize,
    /// The MNIST models to time beside the text ones.
    pub images: Vec<ImageModel>,
    pub train_step: bool,
    pub out: PathBuf,
    /// The command line, for `env.txt`.
    pub command: String,
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
        modality: if backbone == "transformer" {
            "text".into()
        } else {
            "vision".into()
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
    .with_status(Status::Ok, "")
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
        targets: Vec::new(),
    })
}

/// One line of the printed table and the rows it stands for.
struct Point {
    label: String,
    n: usize,
    seq_len: usize,
    demux: DemuxKind,
    /// Whether the backbone keeps positions (and so takes a demux prefix).
    sequence: bool,
    throughput: f64,
    stages: Stages,
    /// Encoder floating-point operations of one pass (all its calls).
    encoder_flops: Option<f64>,
    train_ms: Option<f64>,
}

/// Median ms per pass of each stage, by name.
type Stages = Vec<(&'static str, f64)>;

/// Time the stages of one pass, each alone on inputs computed outside the clock, looping over
/// the pass's forward calls as the full pass does: `frontend` (embedding and mux as the model
/// runs them, fused at inference where it can), then the two-step path's `embedding` and `mux`
/// for comparison, `encoder`, `demux` (the summary slot) and `head`.
fn time_stages<F: Frontend, B: Backbone>(
    net: &MuxNet<F, B>,
    inputs: &[&F::Input],
    head: impl Fn(&Tensor) -> candle_core::Result<Tensor>,
    cfg: &SpeedConfig,
    instances: usize,
    mut record: impl FnMut(&'static str, &Timing),
) -> Result<(Stages, Option<f64>)> {
    let cfg = SpeedConfig {
        warmup_iters: 1,
        ..cfg.clone()
    };
    let mut stages = Vec::new();
    let mut stage = |name: &'static str, f: &mut dyn FnMut() -> candle_core::Result<()>| {
        let t = speed::time(&cfg, instances, || Ok(f()?), |_, _| {})?;
        record(name, &t);
        stages.push((name, t.median()));
        anyhow::Ok(())
    };
    stage("frontend", &mut || {
        for x in inputs {
            net.embed_and_mux(x, false)?;
        }
        Ok(())
    })?;
    stage("embedding", &mut || {
        for x in inputs {
            net.frontend.embed(x, false)?;
        }
        Ok(())
    })?;
    let embedded = inputs
        .iter()
        .map(|x| net.frontend.embed(x, false))
        .collect::<candle_core::Result<Vec<_>>>()?;
    stage("mux", &mut || {
        for e in &embedded {
            net.mux_input(e.clone())?;
        }
        Ok(())
    })?;
    drop(embedded);
    let muxed = inputs
        .iter()
        .map(|x| net.embed_and_mux(x, false))
        .collect::<candle_core::Result<Vec<_>>>()?;
    // Every call's (B, T, D) as the encoder receives it, prefix included; as the model runs at
    // inference, the last layer only for the prefix the summary demux reads.
    let keep = net.summary_rows();
    let encoder_flops = muxed
        .iter()
        .map(|(xs, _)| {
            let (b, t, _) = xs.dims3()?;
            Ok(match keep {
                Some(k) => net.backbone.prefix_flops(b, t, k),
                None => net.backbone.forward_flops(b, t),
            })
        })
        .collect::<candle_core::Result<Option<Vec<f64>>>>()?
        .map(|v| v.iter().sum());
    stage("encoder", &mut || {
        for (xs, pad) in &muxed {
            match keep {
                Some(k) => net.backbone.forward_prefix(xs, pad.as_ref(), false, k)?,
                None => net.backbone.forward_t(xs, pad.as_ref(), false)?,
            };
        }
        Ok(())
    })?;
    drop(muxed);
    let encoded = inputs
        .iter()
        .map(|x| net.encode_prefix(x, false))
        .collect::<candle_core::Result<Vec<_>>>()?;
    stage("demux", &mut || {
        for enc in &encoded {
            net.demux(enc, Positions::Summary, false)?;
        }
        Ok(())
    })?;
    let zs = encoded
        .iter()
        .map(|enc| net.demux(enc, Positions::Summary, false))
        .collect::<candle_core::Result<Vec<_>>>()?;
    stage("head", &mut || {
        for z in &zs {
            head(z)?;
        }
        Ok(())
    })?;
    Ok((stages, encoder_flops))
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
        None,
    )?;
    task.fixed_len = Some(cfg.seq_len);
    let t = &cfg.timing;
    let count = t.batch_instances.max(n).max(cfg.train_instances);
    let data = synthetic_text(count, cfg.seq_len, cfg.vocab);
    let id = identity("transformer", size_name(size), n, "index");
    let (batches, instances) = speed::pass_batches(&task, &data, t)?;
    let full = speed::time_batches(&task, &batches, instances, t, |_, _| {})?;
    rows.push(row(&id, "inference", cfg.seq_len, &full));
    let inputs: Vec<_> = batches.iter().map(|b| &b.input).collect();
    let (stages, encoder_flops) = time_stages(
        &task.net,
        &inputs,
        |z| task.head_logits(z),
        t,
        full.instances,
        |name, timing| rows.push(row(&id, &format!("stage:{name}"), cfg.seq_len, timing)),
    )?;
    drop(batches);
    let train_ms = if cfg.train_step && size == Size::Small {
        // One optimizer step with the fine-tuning losses (0.9, 0.1): forward, backward, AdamW,
        // on `train_instances` instances (one call: B = train_instances / N rows).
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
            None,
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
        let slots = batch_slots(data.len(), n, cfg.train_instances);
        let batch = train.batch(&data, &slots, &mut rng_for(0, "speed"))?;
        let step_cfg = SpeedConfig {
            warmup_iters: 1,
            ..t.clone()
        };
        let timing = speed::time(
            &step_cfg,
            slots.len(),
            || Ok(opt.backward_step(&train.loss(&batch, true)?.total)?),
            |_, _| {},
        )?;
        rows.push(row(&id, "train_step", cfg.seq_len, &timing));
        Some(timing.median())
    } else {
        None
    };
    Ok(Point {
        label: format!("text {}", size_name(size)),
        n,
        seq_len: cfg.seq_len,
        sequence: true,
        demux: DemuxKind::Index,
        throughput: full.throughput(),
        stages,
        encoder_flops,
        train_ms,
    })
}

/// The machine's f32 matmul rate in GFLOP/s with the current threads, as candle runs it: the
/// median of 5 products (4096 x 1024) · (1024 x 1024) after one warm-up. The encoder's GFLOP/s
/// is read as a share of this.
pub fn matmul_rate() -> Result<f64> {
    let (m, k, n) = (4096, 1024, 1024);
    let mut rng = rng_for(0, "bench.matmul");
    let a = Tensor::from_vec(randn_vec(&mut rng, m * k), (m, k), &Device::Cpu)?;
    let b = Tensor::from_vec(randn_vec(&mut rng, k * n), (k, n), &Device::Cpu)?;
    a.matmul(&b)?;
    let secs: Vec<f64> = (0..5)
        .map(|_| {
            let start = std::time::Instant::now();
            a.matmul(&b)?;
            Ok(start.elapsed().as_secs_f64())
        })
        .collect::<Result<_>>()?;
    Ok(2.0 * (m * k * n) as f64 / speed::median(&secs) / 1e9)
}

/// The timing of one pass: `instances` (default: `rows` x the largest N) in calls of `rows` muxed
/// rows, the same at every N of `ns`; `iters` timed passes after one warm-up.
pub fn pass_timing(
    ns: &[usize],
    rows: usize,
    instances: Option<usize>,
    iters: usize,
) -> Result<SpeedConfig> {
    let max_n = ns.iter().copied().max().unwrap_or(1);
    let instances = instances.unwrap_or(rows * max_n);
    // Every N must run whole calls of `rows` rows, or N's calls would differ in shape.
    if let Some(bad) = ns.iter().find(|&&k| instances % (rows * k) != 0) {
        anyhow::bail!(
            "{instances} instances per pass do not split into calls of {rows} rows at N = {bad}: \
             use a multiple of {rows} x every N (e.g. {})",
            rows * max_n
        );
    }
    Ok(SpeedConfig {
        batch_instances: instances,
        rows_per_call: Some(rows),
        warmup_iters: 1,
        iters,
        max_seconds: 300.0,
        enabled: true,
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
    for &image in &cfg.images {
        for &n in &cfg.ns {
            eprintln!("timing the MNIST {} at N = {n} ...", image.name());
            points.push(images::image_point(image, n, cfg, &mut rows)?);
        }
    }
    let matmul = matmul_rate()?;
    crate::out::line(table(&points, cfg, matmul));
    let dir = cfg.out.join("bench");
    std::fs::create_dir_all(&dir)?;
    results::write_table(&dir.join("speed.parquet"), &rows)?;
    std::fs::write(
        dir.join("env.txt"),
        crate::provenance::env_txt(&cfg.command),
    )?;
    Ok(rows)
}

fn table(points: &[Point], cfg: &BenchConfig, matmul_gflops: f64) -> String {
    let threads = candle_core::utils::get_num_threads();
    let calls = |t: &SpeedConfig| {
        t.rows_per_call
            .map_or("one call".into(), |r| format!("calls of {r} muxed rows"))
    };
    let mut s = format!(
        "inference, {threads} thread(s); text: {} instances per pass in {}; images: {} in {}; \
         stages are medians in ms per pass (frontend = embedding + mux as the model runs them, \
         embed / mux = the two-step path); train step: {} instances; encoder GFLOP/s and its \
         share of this machine's f32 matmul, {matmul_gflops:.1} GFLOP/s ((4096 x 1024) · \
         (1024 x 1024), same threads)\n\
         {:<12} {:>3} {:>4} {:>10} {:>8} {:>7} {:>6} {:>9} {:>8} {:>8} {:>9} {:>8} {:>6} {:>7} {:>7} {:>11}\n",
        cfg.timing.batch_instances,
        calls(&cfg.timing),
        cfg.vit_timing.batch_instances,
        calls(&cfg.vit_timing),
        cfg.train_instances,
        "model",
        "N",
        "L",
        "inst/s",
        "speedup",
        "ideal",
        "ratio",
        "frontend",
        "embed",
        "mux",
        "encoder",
        "GFLOP/s",
        "of mm",
        "demux",
        "head",
        "train step"
    );
    for p in points {
        let base = points.iter().find(|b| b.label == p.label && b.n == 1);
        let speedup = base.map(|b| p.throughput / b.throughput);
        let ideal = ideal_speedup(p.n, p.seq_len, p.demux, p.sequence);
        let ms = |name: &str| p.stages.iter().find(|(k, _)| *k == name).map(|(_, v)| *v);
        let stage = |name: &str| ms(name).map_or("–".into(), |v| format!("{v:.2}"));
        // flops per pass over the encoder stage's median ms per pass
        let gflops = p
            .encoder_flops
            .zip(ms("encoder"))
            .map(|(flops, ms)| flops / (ms / 1e3) / 1e9);
        s += &format!(
            "{:<12} {:>3} {:>4} {:>10.1} {:>8} {:>7.2} {:>6} {:>9} {:>8} {:>8} {:>9} {:>8} {:>6} {:>7} {:>7} {:>11}\n",
            p.label,
            p.n,
            p.seq_len,
            p.throughput,
            speedup.map_or("–".into(), |v| format!("{v:.2}")),
            ideal,
            speedup.map_or("–".into(), |v| format!("{:.2}", v / ideal)),
            stage("frontend"),
            stage("embedding"),
            stage("mux"),
            stage("encoder"),
            gflops.map_or("–".into(), |v| format!("{v:.1}")),
            gflops.map_or("–".into(), |v| format!(
                "{:.0} %",
                100.0 * v / matmul_gflops
            )),
            stage("demux"),
            stage("head"),
            p.train_ms.map_or("–".into(), |v| format!("{v:.1} ms")),
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The whole bench at the tiny size: a row per point and stage, calls of the same rows at
    /// every N, and the table on disk.
    #[test]
    fn bench_writes_every_point_and_stage() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let timing = SpeedConfig {
            batch_instances: 6,
            rows_per_call: Some(3),
            warmup_iters: 1,
            iters: 1,
            max_seconds: 60.0,
            enabled: true,
        };
        let cfg = BenchConfig {
            sizes: vec![Size::Tiny],
            ns: vec![1, 2],
            seq_len: 9,
            vocab: 57,
            vit_timing: SpeedConfig {
                rows_per_call: Some(1),
                ..timing.clone()
            },
            timing,
            train_instances: 2,
            images: vec![ImageModel::Vit, ImageModel::Lenet, ImageModel::LenetHrr],
            train_step: true,
            out: dir.path().to_path_buf(),
            command: "test".into(),
        };
        let rows = run(&cfg)?;
        for model in ["transformer", "vit", "lenet"] {
            for n in [1, 2] {
                let modes: Vec<&str> = rows
                    .iter()
                    .filter(|r| r.id.backbone == model && r.id.n_instances == n)
                    .map(|r| r.mode.as_str())
                    .collect();
                for mode in [
                    "inference",
                    "stage:frontend",
                    "stage:embedding",
                    "stage:mux",
                    "stage:encoder",
                    "stage:demux",
                    "stage:head",
                ] {
                    assert!(
                        modes.contains(&mode),
                        "{model} N = {n}: no {mode} in {modes:?}"
                    );
                }
            }
        }
        assert!(
            rows.iter()
                .all(|r| r.batch_instances == 6 && r.latency_ms_median > 0.0)
        );
        let table: Vec<SpeedRow> = results::read_table(&dir.path().join("bench/speed.parquet"))?;
        assert_eq!(table.len(), rows.len());
        Ok(())
    }
}
