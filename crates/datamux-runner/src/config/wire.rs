//! The typed shape of an experiment file, checked key by key when the file is read: the
//! sections every experiment shares, `[sweep]`, `[[expect]]`, `[[variant]]` and profiles.
//! `[model]` is a table whose fixed keys and modality sections are checked against the
//! experiment's modality (`validate::check_model`).

use std::collections::BTreeMap;

use datamux_core::{DemuxKind, MuxKind};
use datamux_pipeline::{DataConfig, SpeedConfig, TrainConfig, WarmupConfig};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SweepConfig {
    /// Catalogue names; a dataset that cannot be had gives `unavailable` rows.
    pub dataset: Vec<String>,
    pub n_instances: Vec<usize>,
    pub backbone: Vec<String>,
    pub mux: Vec<MuxKind>,
    pub demux: Vec<DemuxKind>,
    pub seeds: Vec<u64>,
    /// Modalities with a warm-up stage: sweep it on and off (B1 vs B2 at N = 1).
    pub warmup: Vec<bool>,
}

impl Default for SweepConfig {
    fn default() -> Self {
        Self {
            dataset: vec![],
            n_instances: vec![],
            backbone: vec![],
            mux: vec![],
            demux: vec![],
            seeds: vec![0],
            warmup: vec![],
        }
    }
}

/// A stated outcome, checked by `run` and `verify`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Expect {
    pub n_instances: Option<usize>,
    pub backbone: Option<String>,
    pub mux: Option<MuxKind>,
    pub demux: Option<DemuxKind>,
    /// Only runs with (true: B2 and every N > 1) or without (false: B1) the warm-up stage.
    pub warmup: Option<bool>,
    pub split: String,
    pub metric: String,
    pub min: f64,
}

impl Default for Expect {
    fn default() -> Self {
        Self {
            n_instances: None,
            backbone: None,
            mux: None,
            demux: None,
            warmup: None,
            split: "test".into(),
            metric: "accuracy".into(),
            min: 0.0,
        }
    }
}

/// Which runs a variant applies to; every given key must match.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct When {
    pub dataset: Vec<String>,
    pub n_instances: Vec<usize>,
    pub backbone: Vec<String>,
    pub mux: Vec<MuxKind>,
    pub demux: Vec<DemuxKind>,
    pub warmup: Vec<bool>,
}

/// Sections a profile may override (checked like the file's own).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)] // parsed for the key and type check; the merge uses the raw TOML
pub struct WireSections {
    pub data: Option<DataConfig>,
    pub model: Option<toml::Table>,
    pub train: Option<TrainConfig>,
    pub warmup: Option<WarmupConfig>,
    pub sweep: Option<SweepConfig>,
    pub speed: Option<SpeedConfig>,
    pub expect: Option<Vec<Expect>>,
    pub variant: Option<Vec<WireVariant>>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)] // parsed for the key and type check; the merge uses the raw TOML
pub struct WireVariant {
    pub when: When,
    /// Leave the matching runs out of the sweep.
    #[serde(default)]
    pub skip: bool,
    pub data: Option<DataConfig>,
    pub model: Option<toml::Table>,
    pub train: Option<TrainConfig>,
    pub warmup: Option<WarmupConfig>,
    pub speed: Option<SpeedConfig>,
}

/// The whole file, for the key and type check with line and column.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)] // parsed for the key and type check; the merge uses the raw TOML
pub struct WireExperiment {
    pub name: String,
    pub modality: String,
    pub analysis: Option<String>,
    /// Other experiments whose curves on the same datasets the report draws beside this one's
    /// (from the same results folder and profile): pretrained against from scratch.
    #[serde(default)]
    pub compare: Vec<String>,
    #[serde(default)]
    pub data: DataConfig,
    #[serde(default)]
    pub model: toml::Table,
    #[serde(default)]
    pub train: TrainConfig,
    #[serde(default)]
    pub warmup: WarmupConfig,
    #[serde(default)]
    pub sweep: SweepConfig,
    #[serde(default)]
    pub speed: SpeedConfig,
    #[serde(default)]
    pub expect: Vec<Expect>,
    #[serde(default)]
    pub variant: Vec<WireVariant>,
    #[serde(default)]
    pub profile: BTreeMap<String, WireSections>,
}

/// One run's merged table, `[model]` aside (the runner builds the model settings itself).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WireRun {
    pub experiment: String,
    pub modality: String,
    pub seed: u64,
    #[serde(default)]
    pub data: DataConfig,
    #[serde(default)]
    pub train: TrainConfig,
    #[serde(default)]
    pub warmup: WarmupConfig,
    #[serde(default)]
    pub speed: SpeedConfig,
}

/// The fixed keys of `[model]`; every other key is a section of the modality.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WireModelKeys {
    pub backbone: String,
    pub n_instances: Option<usize>,
    pub mux: datamux_core::mux::Config,
    pub demux: datamux_core::demux::Config,
}

pub const MODEL_KEYS: [&str; 4] = ["backbone", "n_instances", "mux", "demux"];
