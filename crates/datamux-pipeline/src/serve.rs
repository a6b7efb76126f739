//! Served models (`datamux predict`, `datamux serve`): the card that makes a checkpoint folder
//! self-describing, the two halves a modality gives a server (a [`Prepare`] that turns a
//! request's input into model input on the HTTP threads, and a [`Served`] model that answers
//! muxed rows on the inference thread), and [`infer`], the one inference pass over rows of `n`
//! real instances that every modality's [`Served`] runs.

use std::path::Path;

use anyhow::{Context as _, Result, bail};
use candle_core::{D, Tensor};
use datamux_core::init::rng_for;
use datamux_core::{Groups, Task};
use serde::{Deserialize, Serialize};

use crate::settings::RunConfig;

/// The card's file in a checkpoint folder.
pub const CARD: &str = "datamux.json";
/// The card's `kind`: what a folder of anything else does not say.
pub const KIND: &str = "datamux-model";
/// The version of the folder layout a server of this build reads. A change to what a folder
/// holds, or to how it is read, is a new version; an older or newer folder is refused.
pub const FORMAT: u32 = 1;

/// What a served model answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Output {
    /// A label and the class probabilities per input (`POST /v1/classify`).
    Classify,
    /// One vector per input (`POST /v1/embed`).
    Embed,
}

/// What a served model reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InputKind {
    /// A string per input.
    Text,
    /// PNG or JPEG bytes per input (base64 over HTTP).
    Image,
}

/// `datamux.json`: what a checkpoint folder holds and how to serve it. The weights
/// (`model.safetensors`), the fixed keys (`buffers.safetensors`) and any modality files (a
/// tokenizer) lie beside it; `run` is the whole resolved configuration the model was built with.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Card {
    pub format: u32,
    pub kind: String,
    pub modality: String,
    pub output: Output,
    pub input: InputKind,
    /// Class names in label order (empty for an embedding model).
    pub labels: Vec<String>,
    /// The slots of a muxed row (N_max).
    pub n_instances: usize,
    /// The widths the model was trained to serve: `mux.serve_n`, or `[n_instances]`.
    pub serve_n: Vec<usize>,
    pub run_id: String,
    pub run: RunConfig,
}

impl Card {
    pub fn new(run: &RunConfig, output: Output, input: InputKind, labels: &[String]) -> Self {
        Self {
            format: FORMAT,
            kind: KIND.to_string(),
            modality: run.modality.clone(),
            output,
            input,
            labels: labels.to_vec(),
            n_instances: run.model.n_instances,
            serve_n: run.model.mux.served(run.model.n_instances),
            run_id: run.run_id(),
            run: run.clone(),
        }
    }

    /// The card as the file's text, for [`crate::checkpoint::save`]'s extra files.
    pub fn file(&self) -> Result<(&'static str, String)> {
        Ok((CARD, serde_json::to_string_pretty(self)?))
    }

    /// The card of the checkpoint folder `dir`; a folder that is not one of this version is a
    /// one-line error naming it.
    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join(CARD);
        if !dir.is_dir() {
            bail!("{} is not a folder", dir.display());
        }
        let Some(text) = datamux_data::atomic::read_optional(&path)? else {
            bail!(
                "{} has no {CARD}: not a datamux model folder (a finished run's folder under \
                 runs/<experiment>/<run id>/ is one)",
                dir.display()
            );
        };
        let value: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not JSON", path.display()))?;
        let kind = value.get("kind").and_then(|v| v.as_str()).unwrap_or("");
        if kind != KIND {
            bail!(
                "{} is of kind `{kind}`, not a `{KIND}` folder",
                path.display()
            );
        }
        let format = value.get("format").and_then(|v| v.as_u64());
        if format != Some(u64::from(FORMAT)) {
            bail!(
                "{} is format {}, and this datamux reads format {FORMAT}: retrain it, or serve \
                 it with the datamux that wrote it",
                path.display(),
                format.map_or("(none)".to_string(), |f| f.to_string())
            );
        }
        let card: Self = serde_json::from_value(value)
            .with_context(|| format!("{} is not a model card", path.display()))?;
        crate::checkpoint::verify(dir)?;
        Ok(card)
    }
}

/// A request's input before it is prepared.
#[derive(Debug, Clone, Copy)]
pub enum Input<'a> {
    Text(&'a str),
    Image(&'a [u8]),
}

/// An input as the model reads it: token ids (truncated to the model's length, as in
/// training) or decoded, cropped pixels.
#[derive(Debug, Clone, PartialEq)]
pub enum Prepared {
    Tokens(Vec<u32>),
    Pixels(Vec<u8>),
}

/// What the model says about one input.
#[derive(Debug, Clone, PartialEq)]
pub enum Answer {
    Class {
        label: usize,
        probabilities: Vec<f32>,
    },
    Embedding(Vec<f32>),
}

/// The request-side half of a served model: cheap, shared by every HTTP thread.
pub trait Prepare: Send + Sync {
    /// The input as the model reads it; a message for the client when it cannot be.
    fn prepare(&self, input: Input<'_>) -> std::result::Result<Prepared, String>;
}

/// A loaded model, owned by the one thread that runs it.
pub trait Served {
    fn card(&self) -> &Card;
    /// The request-side half, shared with the HTTP threads.
    fn preparer(&self) -> std::sync::Arc<dyn Prepare>;
    /// Answers for `inputs`, `n` of them per muxed row (the last row padded with empty slots).
    fn answer(&self, inputs: &[Prepared], n: usize) -> Result<Vec<Answer>>;
}

/// One inference pass of `task` over the `count` examples of `data`, in rows of `n` real
/// instances (the first `n` slots; the rest empty, as the model of several widths was trained)
/// and at most `rows` rows per forward: the output row of each example, in order.
pub fn infer<T: Task>(
    task: &T,
    data: &T::Data,
    count: usize,
    n: usize,
    rows: usize,
) -> Result<Vec<Vec<f32>>> {
    let slots = task.n_instances();
    if n == 0 || n > slots {
        bail!("cannot serve {n} inputs per row with a model of {slots} slots");
    }
    let order: Vec<Option<usize>> = (0..count).map(Some).collect();
    let groups = Groups::partial(&order, slots, n);
    // Nothing random is drawn at inference; the stream is only the batch's signature.
    let mut rng = rng_for(0, "serve");
    let mut out = vec![Vec::new(); count];
    for chunk in groups.batches(rows.max(1)) {
        let batch = task.batch(data, chunk, &mut rng)?;
        let logits = task.predict(&batch)?; // (B·N, C)
        for (row, values) in logits.to_vec2::<f32>()?.into_iter().enumerate() {
            if let Some(Some(i)) = chunk.get(row) {
                out[*i] = values;
            }
        }
    }
    Ok(out)
}

/// Classes from logits rows: the argmax and the softmax probabilities of each.
pub fn classes(logits: Vec<Vec<f32>>) -> Result<Vec<Answer>> {
    if logits.is_empty() {
        return Ok(Vec::new());
    }
    let (m, c) = (logits.len(), logits[0].len());
    let t = Tensor::from_vec(logits.concat(), (m, c), &candle_core::Device::Cpu)?;
    let max = t.max_keepdim(D::Minus1)?;
    let e = t.broadcast_sub(&max)?.exp()?;
    let p = e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?; // (M, C)
    Ok(p.to_vec2::<f32>()?
        .into_iter()
        .map(|probabilities| {
            let label = probabilities
                .iter()
                .enumerate()
                .fold(
                    (0, f32::NEG_INFINITY),
                    |b, (i, v)| if *v > b.1 { (i, *v) } else { b },
                )
                .0;
            Answer::Class {
                label,
                probabilities,
            }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probabilities_sum_to_one_and_the_label_is_the_largest() -> Result<()> {
        let out = classes(vec![vec![1.0, 3.0, 2.0], vec![0.0, 0.0, 5.0]])?;
        let Answer::Class {
            label,
            probabilities,
        } = &out[0]
        else {
            bail!("not a class")
        };
        assert_eq!(*label, 1);
        assert!((probabilities.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!(matches!(out[1], Answer::Class { label: 2, .. }));
        Ok(())
    }

    #[test]
    fn a_folder_without_a_card_or_of_another_format_is_refused() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let e = Card::read(dir.path())
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("has no datamux.json"), "{e}");
        std::fs::write(
            dir.path().join(CARD),
            r#"{"kind":"datamux-model","format":99}"#,
        )?;
        let e = Card::read(dir.path())
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            e.contains("is format 99, and this datamux reads format 1"),
            "{e}"
        );
        std::fs::write(dir.path().join(CARD), r#"{"kind":"other"}"#)?;
        let e = Card::read(dir.path())
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("of kind `other`"), "{e}");
        Ok(())
    }
}
