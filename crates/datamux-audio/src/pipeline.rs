//! The audio modality for the runner: `[model.audio]`, frame-classification datasets (clips of
//! feature frames with a label), one training stage, and inference timing at `max_frames`.

use anyhow::{Result, bail};
use candle_core::Device;
use datamux_core::SeededVarMap;
use datamux_data::{Catalogue, Examples, Kind, Split, Splits};
use datamux_pipeline::{
    Context, Modality, Record, RunConfig, SpeedPoint, Stage, section_json, stages,
};
use serde_json::value::RawValue;

use crate::config::Config;
use crate::frames::FrameData;
use crate::task::AudioTask;

/// The audio modality (`modality = "audio"`).
pub struct Audio;

/// The audio backbones: the core Transformer encoder over projected frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    Transformer,
}

const BACKBONES: [&str; 1] = ["transformer"];

/// A run's backbone, parsed once from `model.backbone`.
pub fn arch(backbone: &str) -> Result<Arch> {
    datamux_pipeline::parse_backbone("audio", backbone, &BACKBONES, &[Arch::Transformer])
}

/// The run's `[model.audio]`.
pub fn settings(run: &RunConfig) -> Result<Config> {
    run.model.sections.get("audio")
}

/// A split's clips, truncated and normalised as the run says; a bad clip names its file row.
fn frame_data(split: &Split, cfg: &Config) -> Result<FrameData> {
    let Examples::Frames { frames, labels } = &split.examples else {
        bail!("dataset `{}` is not a frame dataset", split.dataset);
    };
    FrameData::new(
        frames,
        labels,
        split.label_names.len(),
        cfg.max_frames,
        cfg.normalise,
    )
    .map_err(|e| match &e {
        crate::AudioError::Ragged { row, .. }
        | crate::AudioError::Empty { row }
        | crate::AudioError::Label { row, .. } => {
            anyhow::anyhow!("{}", split.error_at(*row, &e.to_string()))
        }
        _ => anyhow::anyhow!("dataset `{}` split `{}`: {e}", split.dataset, split.split),
    })
}

/// The task model with the run's loss weights `(train.task_weight, train.retrieval_weight)`.
fn task(
    run: &RunConfig,
    data: &FrameData,
    classes: usize,
    map: &SeededVarMap,
) -> Result<AudioTask> {
    Ok(AudioTask::new(
        &settings(run)?,
        &run.mux_config(),
        data.dim,
        classes,
        (run.train.task_weight, run.train.retrieval_weight),
        map,
        &Device::Cpu,
    )?)
}

impl Modality for Audio {
    fn name(&self) -> &'static str {
        "audio"
    }

    fn sections(&self) -> &'static [&'static str] {
        &["audio"]
    }

    fn section(&self, name: &str, value: &toml::Value) -> Result<Box<RawValue>> {
        match name {
            "audio" => section_json::<Config>(value),
            other => bail!("the audio modality has no `model.{other}` settings"),
        }
    }

    fn backbones(&self) -> &'static [&'static str] {
        &BACKBONES
    }

    fn data_kinds(&self) -> &'static [Kind] {
        &[Kind::FrameClassification]
    }

    fn validate(&self, run: &RunConfig, _catalogue: &Catalogue) -> Result<()> {
        arch(&run.model.backbone)?;
        let cfg = settings(run)?;
        cfg.validate().map_err(anyhow::Error::msg)?;
        run.mux_config()
            .validate(cfg.encoder.hidden_size, true, "the audio encoder")?;
        Ok(())
    }

    fn memory_shape(
        &self,
        run: &RunConfig,
        _env: &datamux_pipeline::Env,
    ) -> Result<Option<datamux_pipeline::memory::Shape>> {
        let cfg = settings(run)?;
        let e = &cfg.encoder;
        let n = run.model.n_instances as u64;
        let (d, ffn, layers) = (
            e.hidden_size as u64,
            e.intermediate_size as u64,
            e.num_hidden_layers as u64,
        );
        let seq = cfg.max_frames as u64 + n + 1;
        Ok(Some(datamux_pipeline::memory::Shape {
            params: seq * d
                + layers * (4 * d * d + 2 * d * ffn)
                + datamux_pipeline::memory::mux_demux_params(
                    n,
                    d,
                    run.model.mux.kind,
                    run.model.demux.kind,
                ),
            rows: (run.train.batch_size as u64).div_ceil(n),
            seq,
            width: d,
            ffn,
            heads: e.num_attention_heads as u64,
            layers,
            outputs: 16,
        }))
    }

    fn model_size(&self, run: &RunConfig) -> Result<String> {
        let e = settings(run)?.encoder;
        Ok(format!("{}x{}", e.num_hidden_layers, e.hidden_size))
    }

    fn is_sequence(&self, backbone: &str) -> Result<bool> {
        arch(backbone)?;
        Ok(true)
    }

    fn train(&self, run: &RunConfig, s: &Splits, ctx: &mut Context<'_>) -> Result<Vec<Record>> {
        ctx.tick(Stage::Prepare, 0, 1, "normalising frames");
        let cfg = settings(run)?;
        let (train, valid, test) = (
            frame_data(&s.train, &cfg)?,
            frame_data(&s.valid, &cfg)?,
            frame_data(&s.test, &cfg)?,
        );
        let map = SeededVarMap::new(run.seed);
        let task = task(run, &train, s.train.label_names.len(), &map)?;
        let data = stages::Data {
            train: &train,
            valid: &valid,
            test: (s.test.split.as_str(), &test),
        };
        stages::train_task(&task, &map, &task.net.buffers(), run, data, &[], ctx)
    }

    fn speed(&self, run: &RunConfig, s: &Splits, ctx: &mut Context<'_>) -> Result<SpeedPoint> {
        let cfg = settings(run)?;
        let data = frame_data(&s.test, &cfg)?;
        let map = SeededVarMap::new(run.seed);
        let mut task = task(run, &data, s.test.label_names.len(), &map)?;
        // Every instance padded to the same length, as text's speed protocol (method.md §9.2).
        task.fixed_len = Some(cfg.max_frames);
        stages::time(&task, &data, run, cfg.max_frames, ctx)
    }
}
