//! A served sentence model: text tokenised by the run's own tokenizer (the folder's
//! `tokenizer.json`, truncated at the run's `max_length` as in training), answered as classes
//! or, for an embedding model, as vectors.

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context as _, Result, bail};
use datamux_core::SeededVarMap;
use datamux_pipeline::checkpoint;
use datamux_pipeline::serve::{self, Answer, Card, Input, Output, Prepare, Prepared, Served};

use crate::data::SentenceData;
use crate::pipeline::{pretrained, settings, text_task};
use crate::task::{HeadKind, TextData, TextTask};
use crate::tokenizer::{TextError, TextTokenizer};

/// The tokenizer's file in a served model's folder.
pub const TOKENIZER: &str = "tokenizer.json";

struct Texts {
    tk: TextTokenizer,
}

impl Prepare for Texts {
    fn prepare(&self, input: Input<'_>) -> std::result::Result<Prepared, String> {
        let Input::Text(text) = input else {
            return Err("this model reads text (strings)".into());
        };
        match self.tk.encode(text, None, 0) {
            Ok(enc) => Ok(Prepared::Tokens(enc.ids)),
            Err(TextError::Empty { .. }) => Err("empty text".into()),
            Err(e) => Err(e.to_string()),
        }
    }
}

/// A sentence model loaded from its checkpoint folder.
pub struct ServedText {
    card: Card,
    task: TextTask,
    texts: Arc<Texts>,
}

impl ServedText {
    /// A pretrained backbone's architecture is read from its repository (the models folder or
    /// the hf-hub cache, never downloaded here); its weights, like every other, from `dir`.
    pub fn load(dir: &Path, card: &Card) -> Result<Self> {
        let run = &card.run;
        let cfg = settings(run)?;
        let path = dir.join(TOKENIZER);
        let tk = TextTokenizer::from_file(&path, cfg.max_length)
            .with_context(|| format!("{}: the model's tokenizer", dir.display()))?;
        let head = match card.output {
            Output::Classify => HeadKind::Sentence,
            Output::Embed => HeadKind::Embedding,
        };
        let env = datamux_pipeline::Env {
            data_dir: None,
            models_dir: std::env::var_os("DATAMUX_MODELS_DIR").map(Into::into),
            offline: true,
            runs_dir: dir.to_path_buf(),
            cache_dir: dir.to_path_buf(),
            profile: String::new(),
            hub_attempts: None,
        };
        let pre = pretrained(run, &env)?;
        let map = SeededVarMap::new(run.seed);
        let task = text_task(run, head, &card.labels, &tk, (1.0, 0.0), &map, pre.as_ref())?;
        let saved = checkpoint::load(dir, &map)?;
        task.net.check_buffers(&saved)?;
        Ok(Self {
            card: card.clone(),
            task,
            texts: Arc::new(Texts { tk }),
        })
    }
}

impl Served for ServedText {
    fn card(&self) -> &Card {
        &self.card
    }

    fn preparer(&self) -> Arc<dyn Prepare> {
        self.texts.clone()
    }

    fn answer(&self, inputs: &[Prepared], n: usize) -> Result<Vec<Answer>> {
        let mut ids = Vec::with_capacity(inputs.len());
        for p in inputs {
            let Prepared::Tokens(t) = p else {
                bail!("an input that is not text");
            };
            ids.push(t.clone());
        }
        let sentences = SentenceData {
            labels: vec![0; ids.len()],
            ids,
            targets: Vec::new(),
        };
        let data = match self.card.output {
            Output::Classify => TextData::Sentences(sentences),
            Output::Embed => TextData::Embeddings(sentences),
        };
        let out = serve::infer(&self.task, &data, inputs.len(), n, usize::MAX)?;
        match self.card.output {
            Output::Classify => serve::classes(out),
            Output::Embed => Ok(out.into_iter().map(Answer::Embedding).collect()),
        }
    }
}
