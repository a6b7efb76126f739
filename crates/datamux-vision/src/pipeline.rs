//! The vision modality for the runner: `[model.image]`, `[model.mlp]`, `[model.cnn]` and
//! `[model.vit]`, image-classification datasets, one training stage, and inference timing.

use anyhow::{Result, bail};
use candle_core::Device;
use datamux_core::SeededVarMap;
use datamux_data::{Catalogue, Examples, Kind, Split, Splits};
use datamux_pipeline::{
    Context, Modality, Record, RunConfig, SpeedPoint, Stage, section_json, stages,
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

fn task(run: &RunConfig, classes: usize, map: &SeededVarMap) -> Result<ImageTask> {
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

    fn model_size(&self, run: &RunConfig) -> Result<String> {
        let (_, cfg) = settings(run)?;
        Ok(match arch(run)? {
            Arch::Mlp => format!("{}x{}", cfg.mlp.num_layers, cfg.mlp.hidden_size),
            Arch::Lenet | Arch::Resnet => {
                let c: Vec<String> = cfg.cnn.channels.iter().map(|c| c.to_string()).collect();
                format!("{}-{}", c.join("-"), cfg.cnn.hidden_size)
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
        let map = SeededVarMap::new(run.seed);
        let task = task(run, s.train.label_names.len(), &map)?;
        let data = stages::Data {
            train: &train,
            valid: &valid,
            test: (s.test.split.as_str(), &test),
        };
        stages::train_task(&task, &map, &task.net.buffers(), run, data, ctx)
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
}
