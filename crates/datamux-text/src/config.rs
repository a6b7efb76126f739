//! Text model settings and presets.

use datamux_core::{DemuxKind, encoder};
use serde::{Deserialize, Serialize};

/// Encoder presets: `tiny` for tests, `small` for CPU runs, `base` the paper's size (for a GPU).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Size {
    Tiny,
    Small,
    Base,
    /// The sizes given in `encoder`.
    Custom,
}

/// What the sentence head reads for instance i.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SentenceReadout {
    /// The demultiplexed summary position (the reference; method.md §4.1).
    #[default]
    Summary,
    /// The mean over instance i's own (non-padding) tokens of the demultiplexed positions, with
    /// the task demultiplexer starting from the warm-up's retrieval demultiplexer. Retrieval
    /// teaches the demultiplexer to read instance i at every position, but never asks the
    /// encoder to gather instance i into its prefix slot, which the summary readout needs.
    Mean,
}

impl SentenceReadout {
    pub fn is_summary(&self) -> bool {
        *self == Self::Summary
    }
}

/// What a text run is trained for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Objective {
    /// The dataset's labels: sentence (pair) or token classification.
    #[default]
    Classify,
    /// Multiplexed sentence embeddings: each instance's demultiplexed embedding against the
    /// pretrained model's own mean-pooled N = 1 embedding of it (cosine loss; `embeddings.rs`).
    /// The dataset's labels are not read, only its text. Needs `pretrained`.
    Embed,
}

impl Objective {
    pub fn is_classify(&self) -> bool {
        *self == Self::Classify
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub size: Size,
    /// Used when `size = "custom"`.
    pub encoder: encoder::Config,
    /// Tokens per instance after truncation, specials included (`L`).
    #[serde(deserialize_with = "datamux_core::range::at_least_one")]
    pub max_length: usize,
    /// BPE vocabulary trained on the training split (ignored with `tokenizer`).
    pub vocab_size: usize,
    pub lowercase: bool,
    /// A `tokenizer.json` to load instead of training one.
    pub tokenizer: Option<String>,
    /// Dropout on the embeddings.
    #[serde(deserialize_with = "datamux_core::range::probability")]
    pub embedding_dropout: f64,
    /// LayerNorm on the summed token and position embeddings, before muxing (RoBERTa's
    /// embedding LayerNorm, method.md §2).
    pub embedding_norm: bool,
    /// LayerNorm on the muxed sequence before the encoder. The reference re-runs the embedding
    /// block after muxing, whose LayerNorm removes the scale the keys give the mix (method.md §13,
    /// open point); this makes that a setting.
    pub mux_norm: bool,
    /// Share of positions whose retrieval target is kept in a training batch (the reference's
    /// `retrieval_percentage`). The `V`-way softmax over every position dominates a small model's
    /// step; a fraction trades gradient signal for speed.
    pub retrieval_fraction: f64,
    /// Left out of the serialised settings at its default, so older runs keep their hashes.
    #[serde(skip_serializing_if = "SentenceReadout::is_summary")]
    pub sentence_readout: SentenceReadout,
    /// A pretrained BERT checkpoint by hub id (`owner/name`), e.g.
    /// `sentence-transformers/all-MiniLM-L6-v2` (`crate::pretrained`). Its `config.json` then
    /// gives the encoder's sizes and LayerNorm epsilon, the vocabulary and the embedding
    /// LayerNorm, and its `tokenizer.json` the tokenizer (so `size`, `encoder`'s sizes,
    /// `vocab_size`, `lowercase`, `embedding_norm` and `tokenizer` are not read); the dropout
    /// probabilities, `max_length` and `mux_norm` stay settings.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pretrained: Option<String>,
    /// The hub revision (branch, tag or commit) of `pretrained`; the default branch when unset.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,
    /// Left out of the serialised settings at its default, so older runs keep their hashes.
    #[serde(skip_serializing_if = "Objective::is_classify")]
    pub objective: Objective,
    /// Sentence classification with `pretrained`: the weight of a distillation term added to
    /// the task loss, 1 - cosine between each instance's readout (through a linear map,
    /// `head.distill.*`) and the pretrained model's own N = 1 embedding of it
    /// (`crate::embeddings`), so that the mix keeps what the plain model knows of every
    /// instance. 0 (the default, left out of the settings) turns it off.
    #[serde(skip_serializing_if = "is_zero")]
    pub embedding_weight: f64,
    /// With `pretrained`, in fine-tuning: the learning rate of every parameter the checkpoint
    /// does not provide (mux, demux and prefix, heads, retrieval) over the stage's `lr`; the
    /// loaded encoder keeps `lr`. 1 (the default, left out of the settings) is one rate for all.
    #[serde(skip_serializing_if = "is_one")]
    pub fresh_lr_scale: f64,
}

fn is_zero(x: &f64) -> bool {
    *x == 0.0
}

fn is_one(x: &f64) -> bool {
    *x == 1.0
}

impl Default for Config {
    fn default() -> Self {
        Self {
            size: Size::Custom,
            encoder: Self::preset(Size::Small),
            max_length: 64, // rt-snippets sentences are short (99 % under 64 WordPieces)
            vocab_size: 8000, // enough for 10k sentences without many [UNK]s
            lowercase: true,
            tokenizer: None,
            embedding_dropout: 0.1, // RoBERTa's hidden dropout
            embedding_norm: true,
            mux_norm: false,
            retrieval_fraction: 1.0, // the reference keeps every target
            sentence_readout: SentenceReadout::Summary,
            pretrained: None,
            revision: None,
            objective: Objective::Classify,
            embedding_weight: 0.0,
            fresh_lr_scale: 1.0,
        }
    }
}

impl Config {
    pub fn preset(size: Size) -> encoder::Config {
        match size {
            Size::Tiny => encoder::Config::tiny(),
            Size::Small => encoder::Config::small(),
            Size::Base | Size::Custom => encoder::Config::base(),
        }
    }

    /// The encoder in use: the preset, or `encoder` when custom.
    pub fn encoder(&self) -> encoder::Config {
        match self.size {
            Size::Custom => self.encoder.clone(),
            s => Self::preset(s),
        }
    }

    pub fn tiny() -> Self {
        Self {
            size: Size::Tiny,
            max_length: 16,
            vocab_size: 200,
            embedding_dropout: 0.0,
            ..Self::default()
        }
    }

    pub fn validate(&self, n: usize, demux: DemuxKind) -> Result<(), String> {
        self.encoder().validate().map_err(|e| e.to_string())?;
        if self.max_length < 3 {
            return Err(format!(
                "max_length must be at least 3 ([CLS] x [SEP]), got {}",
                self.max_length
            ));
        }
        if self.vocab_size < 10 && self.tokenizer.is_none() {
            return Err(format!(
                "vocab_size must be at least 10, got {}",
                self.vocab_size
            ));
        }
        if !(0.0..1.0).contains(&self.embedding_dropout) {
            return Err(format!(
                "embedding_dropout must be in [0, 1), got {}",
                self.embedding_dropout
            ));
        }
        if !(self.retrieval_fraction > 0.0 && self.retrieval_fraction <= 1.0) {
            return Err(format!(
                "retrieval_fraction must be in (0, 1], got {}",
                self.retrieval_fraction
            ));
        }
        let _ = (n, demux); // the prefix takes no position embeddings, so it adds no limit
        match (&self.pretrained, &self.tokenizer, &self.revision) {
            (Some(repo), Some(tk), _) => Err(format!(
                "pretrained `{repo}` brings its own tokenizer.json; drop tokenizer = \"{tk}\""
            )),
            (None, _, Some(rev)) => Err(format!("revision \"{rev}\" is set without pretrained")),
            _ if !(self.embedding_weight >= 0.0 && self.embedding_weight.is_finite()) => Err(
                format!("embedding_weight must be >= 0, got {}", self.embedding_weight),
            ),
            _ if !(self.fresh_lr_scale > 0.0 && self.fresh_lr_scale.is_finite()) => Err(format!(
                "fresh_lr_scale must be > 0, got {}",
                self.fresh_lr_scale
            )),
            (None, _, _) if self.fresh_lr_scale != 1.0 => Err(
                "fresh_lr_scale needs pretrained: without a checkpoint every parameter is fresh".into(),
            ),
            (None, _, _) if self.embedding_weight > 0.0 => Err(
                "embedding_weight needs pretrained: its targets are the pretrained model's own embeddings"
                    .into(),
            ),
            (None, _, _) if self.objective == Objective::Embed => Err(
                "objective = \"embed\" needs pretrained: its targets are the pretrained model's own embeddings"
                    .into(),
            ),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedding_objective_needs_a_pretrained_model() {
        let embed = Config {
            objective: Objective::Embed,
            ..Config::tiny()
        };
        let e = embed.validate(2, DemuxKind::Index).unwrap_err();
        assert!(e.contains("needs pretrained"), "{e}");
        let with = Config {
            pretrained: Some("owner/name".into()),
            ..embed
        };
        assert_eq!(with.validate(2, DemuxKind::Index), Ok(()));
        // The default objective is left out of the settings, so older run ids stay.
        let json = serde_json::to_string(&Config::tiny()).unwrap_or_default();
        assert!(!json.contains("objective"), "{json}");
    }
}
