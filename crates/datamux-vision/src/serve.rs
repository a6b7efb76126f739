//! A served image classifier: PNG / JPEG bytes decoded and cropped exactly as the training
//! split was (`image::decode`), then normalised by the batch as in training.

use std::path::Path;
use std::sync::Arc;

use anyhow::Result;
use datamux_core::SeededVarMap;
use datamux_pipeline::checkpoint;
use datamux_pipeline::serve::{self, Answer, Card, Input, Prepare, Prepared, Served};

use crate::image::{ImageData, ImageSpec, VisionError, decode};
use crate::task::ImageTask;

struct Images {
    spec: ImageSpec,
}

impl Prepare for Images {
    fn prepare(&self, input: Input<'_>) -> std::result::Result<Prepared, String> {
        let Input::Image(bytes) = input else {
            return Err("this model reads images (base64 PNG or JPEG strings)".into());
        };
        decode(bytes, &self.spec, 0)
            .map(Prepared::Pixels)
            .map_err(|e| match e {
                VisionError::Decode { message, .. } => format!("cannot decode image: {message}"),
                VisionError::TooSmall {
                    found_w,
                    found_h,
                    size,
                    ..
                } => format!("image is {found_w}x{found_h}, smaller than the {size}x{size} crop"),
                other => other.to_string(),
            })
    }
}

/// An image model loaded from its checkpoint folder.
pub struct ServedVision {
    card: Card,
    task: ImageTask,
    images: Arc<Images>,
}

impl ServedVision {
    pub fn load(dir: &Path, card: &Card) -> Result<Self> {
        let run = &card.run;
        let map = SeededVarMap::new(run.seed);
        let task = crate::pipeline::task(run, card.labels.len(), &map)?;
        let saved = checkpoint::load(dir, &map)?;
        task.net.check_buffers(&saved)?;
        Ok(Self {
            card: card.clone(),
            images: Arc::new(Images {
                spec: task.spec.clone(),
            }),
            task,
        })
    }
}

impl Served for ServedVision {
    fn card(&self) -> &Card {
        &self.card
    }

    fn preparer(&self) -> Arc<dyn Prepare> {
        self.images.clone()
    }

    fn answer(&self, inputs: &[Prepared], n: usize) -> Result<Vec<Answer>> {
        let mut pixels = Vec::with_capacity(inputs.len() * self.task.spec.pixels());
        for p in inputs {
            match p {
                Prepared::Pixels(px) if px.len() == self.task.spec.pixels() => {
                    pixels.extend_from_slice(px)
                }
                _ => anyhow::bail!("an input that is not this model's image"),
            }
        }
        let data = ImageData {
            pixels,
            labels: vec![0; inputs.len()],
            spec: self.task.spec.clone(),
        };
        serve::classes(serve::infer(
            &self.task,
            &data,
            inputs.len(),
            n,
            usize::MAX,
        )?)
    }
}
