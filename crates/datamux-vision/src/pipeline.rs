//! The vision modality for the runner: `[model.image]`, `[model.mlp]`, `[model.cnn]` and
//! `[model.vit]`, image-classification datasets, one training stage, and inference timing.

use anyhow::{Result, bail};
use candle_core::Device;
use datamux_core::SeededVarMap;
use datamux_data::{Catalogue, Examples, Kind, Split, Splits};
use datamux_pipeline::serve::{Card, InputKind, Output, Served};
use datamux_pipeline::train::Teacher;
use datamux_pipeline::{
    Context, Modality, Record, RunConfig, SpeedPoint, Stage, checkpoint, section_json, stages,
};
use serde_json::value::RawValue;

use crate::image::{ImageData, ImageSpec, VisionError};
use crate::model::{Arch, Config};
use crate::task::ImageTask;
use crate::{cnn, mlp, vit};

/// The vision modality (`modality = "vision"`).
pub struct Vision;

const BACKBONES: [&str; 4] = ["mlp", "lenet", "resnet", "vit"];
const ARCHS: [Arch; 4] = [Arch::Mlp, Arch::Lenet, Arch::Resnet, Arch::Vit];

/// A run's architecture, parsed once from `model.backbone`.
pub fn arch(run: &RunConfig) -> Result<Arch> {
    datamux_pipeline::parse_backbone("vision", &run.model.backbone, &BACKBONES, &ARCHS)
}

/// The run's image spec and architecture sizes.
pub fn settings(run: &RunConfig) -> Result<(ImageSpec, Config)> {
    let s = &run.model.sections;
    Ok((
        s.get("image")?,
        Config {
            mlp: s.get("mlp")?,
            cnn: s.get("cnn")?,
            vit: s.get("vit")?,
        },
    ))
}

/// The images of a split, decoded; a bad image names its file and row.
fn image_data(split: &Split, spec: &ImageSpec) -> Result<ImageData> {
    let Examples::Images { images, labels } = &split.examples else {
        bail!("dataset `{}` is not an image dataset", split.dataset);
    };
    ImageData::decode(images, labels, spec).map_err(|e| {
        let row = match &e {
            VisionError::Decode { row, .. }
            | VisionError::TooSmall { row, .. }
            | VisionError::Count { row, .. } => *row,
        };
        anyhow::anyhow!("{}", split.error_at(row, &e.to_string()))
    })
}

/// The servable model's card of a run.
fn card(run: &RunConfig, s: &Splits) -> Result<(&'static str, String)> {
    Card::new(
        run,
        Output::Classify,
        InputKind::Image,
        &s.train.label_names,
    )
    .file()
}

/// The finished N = 1 run `t` as a teacher, loaded from its checkpoint, or trained first (as
/// that run would train, saved where it would save) when no finished checkpoint is there.
fn teacher_task(
    t: &RunConfig,
    s: &Splits,
    data: &stages::Data<'_, ImageData>,
    ctx: &mut Context<'_>,
) -> Result<(ImageTask, SeededVarMap)> {
    // Held while a missing teacher trains here, so no other student trains it too.
    let (dir, _lock) = datamux_pipeline::teacher::lock(t, ctx)?;
    let map = SeededVarMap::new(t.seed);
    let task = task(t, s.train.label_names.len(), &map)?;
    let loaded = checkpoint::verify(&dir).and_then(|()| checkpoint::load(&dir, &map));
    match loaded {
        Ok(saved) => {
            task.net.check_buffers(&saved)?;
            ctx.tick(Stage::Train, 0, 1, "loaded the teacher");
        }
        Err(_) => {
            let extra = [card(t, s)?];
            let data = stages::Data { ..*data };
            stages::train_task(&task, &map, &task.net.buffers(), t, data, &extra, ctx)?;
        }
    }
    Ok((task, map))
}

/// The task model of a run with `classes` labels.
pub fn task(run: &RunConfig, classes: usize, map: &SeededVarMap) -> Result<ImageTask> {
    let (spec, cfg) = settings(run)?;
    Ok(ImageTask::new(
        arch(run)?,
        &cfg,
        &run.mux_config(),
        &spec,
        classes,
        map,
        &Device::Cpu,
    )?)
}

impl Modality for Vision {
    fn name(&self) -> &'static str {
        "vision"
    }

    fn sections(&self) -> &'static [&'static str] {
        &["image", "mlp", "cnn", "vit"]
    }

    fn section(&self, name: &str, value: &toml::Value) -> Result<Box<RawValue>> {
        match name {
            "image" => section_json::<ImageSpec>(value),
            "mlp" => section_json::<mlp::Config>(value),
            "cnn" => section_json::<cnn::Config>(value),
            "vit" => section_json::<vit::Config>(value),
            other => bail!("the vision modality has no `model.{other}` settings"),
        }
    }

    fn backbones(&self) -> &'static [&'static str] {
        &BACKBONES
    }

    fn data_kinds(&self) -> &'static [Kind] {
        &[Kind::ImageClassification]
    }

    fn validate(&self, run: &RunConfig, _catalogue: &Catalogue) -> Result<()> {
        let arch = arch(run)?;
        let (spec, cfg) = settings(run)?;
        cfg.validate(arch, &spec).map_err(anyhow::Error::msg)?;
        let (width, _) = cfg.widths(arch);
        run.mux_config()
            .validate(width, arch.is_sequence(), arch.name())?;
        Ok(())
    }

    fn memory_shape(
        &self,
        run: &RunConfig,
        _env: &datamux_pipeline::Env,
    ) -> Result<Option<datamux_pipeline::memory::Shape>> {
        use datamux_pipeline::memory::{Shape, mux_demux_params};
        let (spec, cfg) = settings(run)?;
        let n = run.model.n_instances as u64;
        let batch = run.train.batch_size as u64;
        let pixels = (spec.size * spec.size * spec.channels) as u64;
        let (width, _) = cfg.widths(arch(run)?);
        let mux = mux_demux_params(n, width as u64, run.model.mux.kind, run.model.demux.kind);
        Ok(Some(match arch(run)? {
            // Per-instance stems: every instance is its own row until the mux.
            Arch::Mlp => {
                let h = cfg.mlp.hidden_size as u64;
                Shape {
                    params: pixels * h + cfg.mlp.num_layers as u64 * h * h + mux,
                    rows: batch,
                    seq: 1,
                    width: h,
                    ffn: h,
                    heads: 0,
                    layers: cfg.mlp.num_layers as u64 + 1,
                    outputs: 10,
                }
            }
            // A feature map per instance at full resolution: its pixels are the positions.
            Arch::Lenet | Arch::Resnet => {
                let c = cfg.cnn.channels.iter().copied().max().unwrap_or(1) as u64;
                let h = cfg.cnn.hidden_size as u64;
                Shape {
                    params: cfg.cnn.channels.len() as u64 * 9 * c * c + pixels * h / 16 + mux,
                    rows: batch,
                    seq: (spec.size * spec.size) as u64,
                    width: c.max(cfg.cnn.stem_channels as u64),
                    ffn: 0,
                    heads: 0,
                    layers: cfg.cnn.channels.len() as u64 + 1,
                    outputs: 10,
                }
            }
            Arch::Vit => {
                let e = &cfg.vit.encoder;
                let (d, ffn, layers) = (
                    e.hidden_size as u64,
                    e.intermediate_size as u64,
                    e.num_hidden_layers as u64,
                );
                let patches = (spec.size / cfg.vit.patch_size.max(1)).pow(2) as u64;
                let seq = patches + n + 1;
                Shape {
                    params: pixels * d + seq * d + layers * (4 * d * d + 2 * d * ffn) + mux,
                    rows: batch.div_ceil(n),
                    seq,
                    width: d,
                    ffn,
                    heads: e.num_attention_heads as u64,
                    layers,
                    outputs: 10,
                }
            }
        }))
    }

    fn model_size(&self, run: &RunConfig) -> Result<String> {
        let (_, cfg) = settings(run)?;
        Ok(match arch(run)? {
            Arch::Mlp => format!("{}x{}", cfg.mlp.num_layers, cfg.mlp.hidden_size),
            Arch::Lenet | Arch::Resnet => {
                let c: Vec<String> = cfg.cnn.channels.iter().map(|c| c.to_string()).collect();
                // A shared stem is named by its width, `s64-...`; per-slot stems as before.
                let stem = match cfg.cnn.stem {
                    crate::cnn::StemKind::Shared => format!("s{}-", cfg.cnn.stem_channels),
                    crate::cnn::StemKind::PerSlot => String::new(),
                };
                format!("{stem}{}-{}", c.join("-"), cfg.cnn.hidden_size)
            }
            Arch::Vit => format!(
                "{}x{}p{}",
                cfg.vit.encoder.num_hidden_layers, cfg.vit.encoder.hidden_size, cfg.vit.patch_size
            ),
        })
    }

    fn is_sequence(&self, backbone: &str) -> Result<bool> {
        let arch = datamux_pipeline::parse_backbone("vision", backbone, &BACKBONES, &ARCHS)?;
        Ok(arch.is_sequence())
    }

    fn train(&self, run: &RunConfig, s: &Splits, ctx: &mut Context<'_>) -> Result<Vec<Record>> {
        ctx.tick(Stage::Prepare, 0, 1, "decoding images");
        let (spec, _) = settings(run)?;
        let (train, valid, test) = (
            image_data(&s.train, &spec)?,
            image_data(&s.valid, &spec)?,
            image_data(&s.test, &spec)?,
        );
        let data = stages::Data {
            train: &train,
            valid: &valid,
            test: (s.test.split.as_str(), &test),
        };
        let classes = s.train.label_names.len();
        let teacher = match &run.teacher {
            Some(t) => {
                let (teacher_spec, _) = settings(t)?;
                anyhow::ensure!(
                    teacher_spec == spec,
                    "train.distill: the teacher {} sees images as {teacher_spec:?}, this run as \
                     {spec:?}; the two must agree",
                    t.run_id()
                );
                Some(teacher_task(t, s, &data, ctx)?)
            }
            None => None,
        };
        // An N = 1 run may be another run's teacher: held while it trains.
        let _lock = datamux_pipeline::teacher::own_lock(run, ctx)?;
        let map = SeededVarMap::new(run.seed);
        let task = task(run, classes, &map)?;
        if let (true, Some((_, teacher_map))) = (run.train.distill.init, &teacher) {
            datamux_pipeline::teacher::start_from(&map, teacher_map)?;
        }
        let extra = [card(run, s)?];
        let soft = run.train.distill.soft();
        let teacher = teacher
            .as_ref()
            .filter(|_| run.train.distill.enabled())
            .map(|(t, _)| Teacher { task: t, soft });
        let buffers = task.net.buffers();
        stages::train_task_with(
            &task,
            teacher.as_ref(),
            &map,
            &buffers,
            run,
            data,
            &extra,
            ctx,
        )
    }

    fn warmups(&self, run: &RunConfig) -> Vec<String> {
        datamux_pipeline::teacher::names(run)
    }

    fn distills(&self) -> bool {
        true
    }

    fn speed(&self, run: &RunConfig, s: &Splits, ctx: &mut Context<'_>) -> Result<SpeedPoint> {
        let (spec, cfg) = settings(run)?;
        let data = image_data(&s.test, &spec)?;
        let map = SeededVarMap::new(run.seed);
        let task = task(run, s.test.label_names.len(), &map)?;
        let seq_len = match arch(run)? {
            Arch::Vit => (spec.size / cfg.vit.patch_size).pow(2),
            Arch::Mlp => 1,
            Arch::Lenet | Arch::Resnet => spec.size.pow(2),
        };
        stages::time(&task, &data, run, seq_len, ctx)
    }

    fn load_served(&self, dir: &std::path::Path, card: &Card) -> Result<Box<dyn Served>> {
        Ok(Box::new(crate::serve::ServedVision::load(dir, card)?))
    }
}

#[cfg(test)]
mod tests {
    use datamux_data::Source;

    use super::*;

    /// An image that does not decode is named by its file and the file's own row.
    #[test]
    fn a_bad_image_names_the_file_row() {
        let split = Split {
            dataset: "mnist".into(),
            split: "validation".into(),
            source: Source::Local {
                folder: "/m/mnist".into(),
            },
            files: vec!["/m/mnist/train.parquet".into()],
            label_names: (0..10).map(|d| d.to_string()).collect(),
            // Held out of train and reordered: the bad image is file row 5, split position 0.
            rows: vec![(0, 5)],
            examples: Examples::Images {
                images: vec![b"not an image".to_vec()],
                labels: vec![3],
            },
        };
        let err = image_data(&split, &ImageSpec::mnist())
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with(
                "dataset `mnist` split `validation`, /m/mnist/train.parquet row 5: cannot decode"
            ),
            "{err}"
        );
        assert!(!err.contains("row 0"), "{err}");
    }
}
