//! Experiment files: TOML in `experiments/`, checked at parse time, expanded into runs.
//!
//! A file states only what differs from the defaults. Sections: `[data]`, `[model]`, `[train]`,
//! `[warmup]` (text), `[sweep]` (lists whose product gives the runs), `[speed]`, `[[expect]]`,
//! `[[variant]]` (settings applied to the runs a `when` table matches) and `[profile.<name>]`
//! (settings merged over the file for `--profile <name>`; `quick`, `standard`, `paper`, `smoke`).
//!
//! Every key is checked against the typed sections when the file is read, so a misspelt key
//! anywhere (also inside profiles and variants) fails with the file, line and column. Profiles,
//! overrides and variants are merged into the raw TOML before typed parsing (house-style §2.6).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail, ensure};
use datamux_core::{DemuxKind, MuxKind, demux, mux};
use serde::{Deserialize, Serialize};

/// Which modality crate runs an experiment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Modality {
    Vision,
    Text,
}

impl Modality {
    pub fn name(self) -> &'static str {
        match self {
            Self::Vision => "vision",
            Self::Text => "text",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    /// A catalogue name (`datamux-data/catalogue.toml`).
    pub dataset: String,
    /// Examples held out of `train` (a seeded choice) when the dataset has no validation split.
    pub validation_holdout: usize,
    /// Use at most this many training examples (0 = all); a seeded subset.
    pub train_limit: usize,
    /// Score at most this many validation examples during training (0 = all); the final
    /// validation and test figures always use the whole split.
    pub eval_limit: usize,
}

impl Default for DataConfig {
    fn default() -> Self {
        Self {
            dataset: String::new(),
            validation_holdout: 5000, // MNIST's usual 55k / 5k split
            train_limit: 0,
            eval_limit: 0,
        }
    }
}

/// The model of one run; fields of other modalities and backbones are ignored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    /// vision: `mlp`, `lenet`, `resnet`, `vit`; text: `transformer`.
    pub backbone: String,
    pub n_instances: usize,
    pub mux: mux::Config,
    pub demux: demux::Config,
    pub image: datamux_vision::ImageSpec,
    pub mlp: datamux_vision::mlp::Config,
    pub cnn: datamux_vision::cnn::Config,
    pub vit: datamux_vision::vit::Config,
    pub text: datamux_text::Config,
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            backbone: String::new(),
            n_instances: 1,
            mux: mux::Config::default(),
            demux: demux::Config::default(),
            image: datamux_vision::ImageSpec::default(),
            mlp: Default::default(),
            cnn: Default::default(),
            vit: Default::default(),
            text: Default::default(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    /// Optimizer steps (the budget is counted in steps, never in seconds).
    pub steps: usize,
    /// Instances per step; the backbone sees `batch_size / N` rows.
    pub batch_size: usize,
    pub lr: f64,
    pub weight_decay: f64,
    /// Linear warm-up of the learning rate, then linear decay to 0 at `steps`.
    pub lr_warmup_steps: usize,
    pub max_grad_norm: f64,
    /// Validate every this many steps (and at the end); the best validation checkpoint is kept.
    pub eval_every: usize,
    /// Muxed rows per evaluation batch.
    pub eval_rows: usize,
    /// `(α_task, α_ret)` of the loss; the retrieval term applies to text only.
    pub task_weight: f64,
    pub retrieval_weight: f64,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            steps: 1000,
            batch_size: 64,
            lr: 1e-3,
            weight_decay: 0.0,  // the reference's AdamW default (method.md §10)
            lr_warmup_steps: 0, // the reference decays linearly without warm-up
            max_grad_norm: 1.0, // the reference's clipping
            eval_every: 500,
            eval_rows: 64,
            task_weight: 0.9,      // the DataMUX fine-tuning weights
            retrieval_weight: 0.1, // (method.md §5)
        }
    }
}

/// The retrieval warm-up stage of text runs (method.md §5).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WarmupConfig {
    /// Run the warm-up before fine-tuning (B2 and every muxed run); false gives B1 at N = 1.
    pub enabled: bool,
    /// `task` (the task's own training text) or a catalogue corpus such as `wikitext-103`.
    pub corpus: String,
    pub steps: usize,
    pub batch_size: usize,
    pub lr: f64,
    pub lr_warmup_steps: usize,
    /// Every dropout of the warm-up model (embeddings, encoder, demultiplexer); unset keeps the
    /// model's. Retrieval has a target at every position, so it needs less regularising than
    /// the task: at N = 5 no dropout gave 57.7 % retrieval after 1000 steps against 54.3 %
    /// (docs/text-recipe.md). Left out of the serialised settings when unset, so the hashes of
    /// runs that do not use it stay as they were.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dropout: Option<f64>,
    /// Start the warm-up from the finished warm-up of the same run at this smaller N (a
    /// curriculum over N; the `index` demultiplexer only): every parameter is copied, the prefix
    /// table grown (`datamux_core::demux::grow_index_table`). Gaussian keys of the first M slots
    /// are the same at M and N (one seeded stream), so slots 0..M start already addressable. At
    /// N = 10, from N = 5, retrieval on validation was 43.4 % after 600 steps against 19.0 % from
    /// scratch (docs/text-recipe.md). Left out of the serialised settings when unset.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub from_n: Option<usize>,
}

impl Default for WarmupConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            corpus: "task".into(), // the default: the task's own training text
            steps: 1000,
            batch_size: 64,
            lr: 1e-3,
            lr_warmup_steps: 0,
            dropout: None,
            from_n: None,
        }
    }
}

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
    /// Text: sweep the warm-up on and off (B1 vs B2 at N = 1).
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

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SpeedConfig {
    pub enabled: bool,
    /// Instances per timed pass; the same at every N (rounded up to a multiple of N).
    pub batch_instances: usize,
    /// Muxed rows per forward call: a pass is `batch_instances / (rows_per_call · N)` calls of
    /// the same shape at every N, as the reference times a fixed batch of muxed rows
    /// (method.md §9.2). Unset: the whole pass in one call.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rows_per_call: Option<usize>,
    pub warmup_iters: usize,
    pub iters: usize,
    /// Stop measuring after this long even if `iters` is not reached.
    pub max_seconds: f64,
}

impl Default for SpeedConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            batch_instances: 160,
            rows_per_call: None, // one call per pass, as the committed tables were timed
            warmup_iters: 2,
            iters: 10,
            max_seconds: 30.0,
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
    /// Only runs with (true: B2 and every N > 1) or without (false: B1) the retrieval warm-up.
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

/// Sections a profile or variant may override (checked like the file's own).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct WireSections {
    data: Option<DataConfig>,
    model: Option<ModelConfig>,
    train: Option<TrainConfig>,
    warmup: Option<WarmupConfig>,
    sweep: Option<SweepConfig>,
    speed: Option<SpeedConfig>,
    expect: Option<Vec<Expect>>,
    variant: Option<Vec<WireVariant>>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct WireVariant {
    when: When,
    /// Leave the matching runs out of the sweep.
    #[serde(default)]
    skip: bool,
    data: Option<DataConfig>,
    model: Option<ModelConfig>,
    train: Option<TrainConfig>,
    warmup: Option<WarmupConfig>,
    speed: Option<SpeedConfig>,
}

/// The whole file, for the key and type check with line and column.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct WireExperiment {
    name: String,
    modality: Modality,
    analysis: Option<String>,
    #[serde(default)]
    data: DataConfig,
    #[serde(default)]
    model: ModelConfig,
    #[serde(default)]
    train: TrainConfig,
    #[serde(default)]
    warmup: WarmupConfig,
    #[serde(default)]
    sweep: SweepConfig,
    #[serde(default)]
    speed: SpeedConfig,
    #[serde(default)]
    expect: Vec<Expect>,
    #[serde(default)]
    variant: Vec<WireVariant>,
    #[serde(default)]
    profile: BTreeMap<String, WireSections>,
}

/// The resolved settings of one run: everything that determines its result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    pub experiment: String,
    pub modality: Modality,
    pub seed: u64,
    #[serde(default)]
    pub data: DataConfig,
    #[serde(default)]
    pub model: ModelConfig,
    #[serde(default)]
    pub train: TrainConfig,
    #[serde(default)]
    pub warmup: WarmupConfig,
    #[serde(default)]
    pub speed: SpeedConfig,
    /// The resolved run at `warmup.from_n` whose warm-up this one starts from (set by `load`,
    /// never written in an experiment file). Part of the hash: a changed source is a new run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warmup_source: Option<Box<RunConfig>>,
}

impl RunConfig {
    /// A stable hash of the resolved settings (FNV-1a over canonical JSON), so a changed setting
    /// is a new run and an unchanged one is never recomputed.
    pub fn config_hash(&self) -> String {
        let json = serde_json::to_string(self).unwrap_or_default();
        format!("{:016x}", datamux_core::init::name_seed(0, &json))
    }

    pub fn run_id(&self) -> String {
        let m = &self.model;
        let warm = if self.modality == Modality::Text && !self.warmup.enabled {
            "-nowarm"
        } else {
            ""
        };
        format!(
            "{}-{}-{}-{}-n{}-s{}{}-{}",
            self.data.dataset,
            m.backbone,
            m.mux.kind.name(),
            m.demux.kind.name(),
            m.n_instances,
            self.seed,
            warm,
            &self.config_hash()[..8]
        )
    }

    /// The size label of the backbone for the tables (`vit-4x64`, `transformer-2x128`, ...).
    pub fn model_size(&self) -> String {
        let m = &self.model;
        match m.backbone.as_str() {
            "mlp" => format!("{}x{}", m.mlp.num_layers, m.mlp.hidden_size),
            "lenet" | "resnet" => {
                let c: Vec<String> = m.cnn.channels.iter().map(|c| c.to_string()).collect();
                format!("{}-{}", c.join("-"), m.cnn.hidden_size)
            }
            "vit" => format!(
                "{}x{}p{}",
                m.vit.encoder.num_hidden_layers, m.vit.encoder.hidden_size, m.vit.patch_size
            ),
            _ => {
                let e = m.text.encoder();
                format!("{}x{}", e.num_hidden_layers, e.hidden_size)
            }
        }
    }

    /// Cross-field checks; each error names the values.
    pub fn validate(&self) -> Result<()> {
        let (m, t) = (&self.model, &self.train);
        let n = m.n_instances;
        ensure!(n >= 1, "n_instances must be at least 1, got {n}");
        ensure!(!self.data.dataset.is_empty(), "[data] dataset is not set");
        let entry = datamux_data::Catalogue::builtin()?
            .get(&self.data.dataset)?
            .clone();
        let fits = match self.modality {
            Modality::Vision => entry.kind == datamux_data::Kind::ImageClassification,
            Modality::Text => matches!(
                entry.kind,
                datamux_data::Kind::TextClassification | datamux_data::Kind::TokenClassification
            ),
        };
        ensure!(
            fits,
            "dataset `{}` is {}, which a {} experiment cannot train on",
            entry.name,
            entry.kind.name(),
            self.modality.name()
        );
        if self.modality == Modality::Text && self.warmup.enabled && self.warmup.corpus != "task" {
            let corpus = datamux_data::Catalogue::builtin()?
                .get(&self.warmup.corpus)?
                .clone();
            ensure!(
                corpus.kind != datamux_data::Kind::ImageClassification,
                "warm-up corpus `{}` is not text",
                corpus.name
            );
        }
        ensure!(t.steps >= 1, "train.steps must be at least 1");
        ensure!(
            t.eval_every >= 1 && t.eval_rows >= 1,
            "train.eval_every and train.eval_rows must be at least 1"
        );
        ensure!(
            t.lr > 0.0 && t.lr.is_finite(),
            "train.lr must be positive, got {}",
            t.lr
        );
        ensure!(
            t.batch_size >= n && t.batch_size % n == 0,
            "train.batch_size {} (instances) is not divisible by n_instances {n}",
            t.batch_size
        );
        ensure!(
            t.max_grad_norm > 0.0,
            "train.max_grad_norm must be positive"
        );
        ensure!(
            self.speed.rows_per_call != Some(0),
            "speed.rows_per_call must be at least 1"
        );
        match self.modality {
            Modality::Vision => {
                let arch = vision_arch(&m.backbone)?;
                let cfg = self.vision_config();
                cfg.validate(arch, &m.image).map_err(anyhow::Error::msg)?;
                let (width, _) = cfg.widths(arch);
                datamux_core::model::Config {
                    n_instances: n,
                    mux: m.mux.clone(),
                    demux: m.demux.clone(),
                }
                .validate(width, arch.is_sequence(), arch.name())?;
            }
            Modality::Text => {
                ensure!(
                    m.backbone == "transformer",
                    "text backbone must be `transformer`, got `{}`",
                    m.backbone
                );
                m.text
                    .validate(n, m.demux.kind)
                    .map_err(anyhow::Error::msg)?;
                let w = &self.warmup;
                if w.enabled {
                    ensure!(
                        w.batch_size >= n && w.batch_size % n == 0,
                        "warmup.batch_size {} (instances) is not divisible by n_instances {n}",
                        w.batch_size
                    );
                    ensure!(
                        w.steps >= 1 && w.lr > 0.0,
                        "warmup.steps and warmup.lr must be positive"
                    );
                    if let Some(p) = w.dropout {
                        ensure!(
                            (0.0..1.0).contains(&p),
                            "warmup.dropout must be in [0, 1), got {p}"
                        );
                    }
                    if let Some(from) = w.from_n {
                        ensure!(
                            from >= 1 && from < n,
                            "warmup.from_n must be in 1..{n} (a smaller N), got {from}"
                        );
                        ensure!(
                            m.demux.kind == DemuxKind::Index,
                            "warmup.from_n needs the index demultiplexer (the {} one has \
                             parameters per instance slot)",
                            m.demux.kind.name()
                        );
                    }
                }
                m.mux.validate(n, m.text.encoder().hidden_size)?;
            }
        }
        Ok(())
    }

    pub fn vision_config(&self) -> datamux_vision::Config {
        datamux_vision::Config {
            mlp: self.model.mlp.clone(),
            cnn: self.model.cnn.clone(),
            vit: self.model.vit.clone(),
        }
    }

    /// The settings the warm-up model is built with: these, with `warmup.dropout` (when set) as
    /// every dropout probability. Dropout has no parameters, so the warm-up checkpoint still
    /// loads into the task model.
    pub fn warmup_run(&self) -> RunConfig {
        let mut run = self.clone();
        // The warm-up trains no task head, so how the head reads does not change it.
        run.model.text.sentence_readout = datamux_text::SentenceReadout::default();
        if let Some(p) = self.warmup.dropout {
            let text = &mut run.model.text;
            let mut enc = text.encoder();
            enc.hidden_dropout_prob = p;
            enc.attention_probs_dropout_prob = p;
            text.size = datamux_text::Size::Custom;
            text.encoder = enc;
            text.embedding_dropout = p;
            run.model.demux.dropout = p;
        }
        run
    }

    pub fn mux_config(&self) -> datamux_core::model::Config {
        datamux_core::model::Config {
            n_instances: self.model.n_instances,
            mux: self.model.mux.clone(),
            demux: self.model.demux.clone(),
        }
    }
}

pub fn vision_arch(name: &str) -> Result<datamux_vision::Arch> {
    Ok(match name {
        "mlp" => datamux_vision::Arch::Mlp,
        "lenet" => datamux_vision::Arch::Lenet,
        "resnet" => datamux_vision::Arch::Resnet,
        "vit" => datamux_vision::Arch::Vit,
        other => bail!("unknown vision backbone `{other}`; expected mlp, lenet, resnet or vit"),
    })
}

/// One experiment file, its profile applied and its sweep expanded.
#[derive(Debug, Clone)]
pub struct Experiment {
    pub name: String,
    pub path: PathBuf,
    pub profile: String,
    pub analysis: String,
    pub modality: Modality,
    pub runs: Vec<RunConfig>,
    pub expect: Vec<Expect>,
}

/// Deep merge: tables merge key by key, anything else is replaced.
pub fn merge(base: &mut toml::Value, over: &toml::Value) {
    match (base, over) {
        (toml::Value::Table(b), toml::Value::Table(o)) => {
            for (k, v) in o {
                match b.get_mut(k) {
                    Some(slot) => merge(slot, v),
                    None => {
                        b.insert(k.clone(), v.clone());
                    }
                }
            }
        }
        (b, o) => *b = o.clone(),
    }
}

/// A variant matching every run, carrying the run settings of `table` (its sweep and expectations
/// apply to the experiment as a whole, not to runs).
fn catch_all(table: &toml::Value) -> toml::Value {
    let mut t = table.as_table().cloned().unwrap_or_default();
    for k in ["sweep", "expect", "variant", "name", "analysis", "modality"] {
        t.remove(k);
    }
    t.insert("when".into(), toml::Value::Table(toml::Table::new()));
    toml::Value::Table(t)
}

/// Set a dotted key (`train.steps`) in a table, creating intermediate tables.
fn set_dotted(root: &mut toml::Value, key: &str, value: toml::Value) -> Result<()> {
    let mut cur = root;
    let parts: Vec<&str> = key.split('.').collect();
    for (i, part) in parts.iter().enumerate() {
        let table = cur
            .as_table_mut()
            .with_context(|| format!("`{key}`: `{part}` is not a table"))?;
        if i + 1 == parts.len() {
            table.insert(part.to_string(), value);
            return Ok(());
        }
        cur = table
            .entry(part.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
    }
    Ok(())
}

/// `--set key=value` overrides: the value is parsed as TOML, or taken as a string.
pub fn parse_override(s: &str) -> Result<(String, toml::Value)> {
    let (k, v) = s
        .split_once('=')
        .with_context(|| format!("override `{s}` is not key=value"))?;
    let value = toml::from_str::<toml::Table>(&format!("v = {v}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(v.to_string()));
    Ok((k.trim().to_string(), value))
}

fn matches(when: &When, run: &RunPoint) -> bool {
    (when.dataset.is_empty() || when.dataset.contains(&run.dataset))
        && (when.n_instances.is_empty() || when.n_instances.contains(&run.n))
        && (when.backbone.is_empty() || when.backbone.contains(&run.backbone))
        && (when.mux.is_empty() || when.mux.contains(&run.mux))
        && (when.demux.is_empty() || when.demux.contains(&run.demux))
        && (when.warmup.is_empty() || when.warmup.contains(&run.warmup))
}

#[derive(Debug, Clone)]
struct RunPoint {
    dataset: String,
    n: usize,
    backbone: String,
    mux: MuxKind,
    demux: DemuxKind,
    seed: u64,
    warmup: bool,
}

/// Read, check and expand one experiment file under a profile, with `--set` overrides.
pub fn load(path: &Path, profile: &str, overrides: &[(String, toml::Value)]) -> Result<Experiment> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let shown = path.display();
    // The typed check of the whole file: unknown keys and wrong types with line and column.
    let wire: WireExperiment = toml::from_str(&text).map_err(|e| {
        let msg = e
            .to_string()
            .lines()
            .filter(|l| !l.trim().is_empty())
            .collect::<Vec<_>>()
            .join(" | ");
        anyhow::anyhow!("{shown}: {msg}")
    })?;
    let stem = path
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or_default();
    ensure!(
        wire.name == stem,
        "{shown}: name `{}` must equal the file stem `{stem}`",
        wire.name
    );
    let mut raw: toml::Value =
        toml::from_str(&text).with_context(|| format!("{shown}: not TOML"))?;
    let profiles = raw.as_table_mut().and_then(|t| t.remove("profile"));
    // Precedence, lowest first: the file, its [[variant]]s, the profile, the profile's own
    // [[variant]]s, the --set overrides. The profile and the overrides become catch-all variants
    // after the file's, and are also merged over the file so that they can change the sweep.
    let mut late: Vec<toml::Value> = Vec::new();
    if let Some(p) = profiles.as_ref().and_then(|p| p.get(profile)) {
        let mut p = p.clone();
        let extra = p.as_table_mut().and_then(|t| t.remove("variant"));
        merge(&mut raw, &p);
        late.push(catch_all(&p));
        if let Some(toml::Value::Array(extra)) = extra {
            late.extend(extra);
        }
    } else if !["default", "quick", "standard", "paper", "smoke"].contains(&profile) {
        // The standard profiles may be absent (the file's own settings apply); any other
        // name must exist, so a misspelt --profile fails.
        let known: Vec<String> = profiles
            .as_ref()
            .and_then(|p| p.as_table())
            .map(|t| t.keys().cloned().collect())
            .unwrap_or_default();
        bail!(
            "{shown}: no profile `{profile}`; it has: {}",
            known.join(", ")
        );
    }
    let mut set = toml::Value::Table(toml::Table::new());
    for (k, v) in overrides {
        set_dotted(&mut raw, k, v.clone())?;
        set_dotted(&mut set, k, v.clone())?;
    }
    late.push(catch_all(&set));
    if let Some(t) = raw.as_table_mut() {
        match t
            .entry("variant")
            .or_insert_with(|| toml::Value::Array(Vec::new()))
        {
            toml::Value::Array(a) => a.extend(late),
            other => bail!("{shown}: `variant` must be an array of tables, not {other}"),
        }
    }
    // Re-check after merging, so overrides are held to the same schema.
    let merged_text = toml::to_string(&raw)?;
    let wire: WireExperiment = toml::from_str(&merged_text)
        .map_err(|e| anyhow::anyhow!("{shown} (profile {profile}, overrides): {e}"))?;
    let table = raw.as_table_mut().context("experiment is not a table")?;
    let variants: Vec<toml::Value> = match table.remove("variant") {
        Some(toml::Value::Array(a)) => a,
        _ => Vec::new(),
    };
    for k in ["sweep", "expect", "name", "analysis", "modality"] {
        table.remove(k);
    }
    let sweep = &wire.sweep;
    let model = &wire.model;
    let ns = if sweep.n_instances.is_empty() {
        vec![model.n_instances]
    } else {
        sweep.n_instances.clone()
    };
    let backbones = if sweep.backbone.is_empty() {
        vec![model.backbone.clone()]
    } else {
        sweep.backbone.clone()
    };
    let muxes = if sweep.mux.is_empty() {
        vec![model.mux.kind]
    } else {
        sweep.mux.clone()
    };
    let demuxes = if sweep.demux.is_empty() {
        vec![model.demux.kind]
    } else {
        sweep.demux.clone()
    };
    let warmups = if sweep.warmup.is_empty() {
        vec![wire.warmup.enabled]
    } else {
        sweep.warmup.clone()
    };
    let datasets = if sweep.dataset.is_empty() {
        vec![wire.data.dataset.clone()]
    } else {
        sweep.dataset.clone()
    };
    let mut runs = Vec::new();
    for dataset in &datasets {
        for backbone in &backbones {
            for &mux in &muxes {
                for &demux in &demuxes {
                    for &n in &ns {
                        for &warmup in &warmups {
                            for &seed in &sweep.seeds {
                                let point = RunPoint {
                                    dataset: dataset.clone(),
                                    n,
                                    backbone: backbone.clone(),
                                    mux,
                                    demux,
                                    seed,
                                    warmup,
                                };
                                // B1 / B2 are N = 1 baselines; muxed text always warms up.
                                if wire.modality == Modality::Text && !warmup && n > 1 {
                                    continue;
                                }
                                runs.extend(resolve_run(
                                    &raw,
                                    &variants,
                                    &wire,
                                    &point,
                                    &shown.to_string(),
                                )?);
                            }
                        }
                    }
                }
            }
        }
    }
    let mut ids = std::collections::BTreeSet::new();
    for r in &runs {
        ensure!(
            ids.insert(r.run_id()),
            "{shown}: two runs resolve to the same settings ({})",
            r.run_id()
        );
    }
    Ok(Experiment {
        name: wire.name,
        path: path.to_path_buf(),
        profile: profile.to_string(),
        analysis: wire.analysis.unwrap_or_default(),
        modality: wire.modality,
        runs,
        expect: wire.expect,
    })
}

fn resolve_run(
    raw: &toml::Value,
    variants: &[toml::Value],
    wire: &WireExperiment,
    p: &RunPoint,
    shown: &str,
) -> Result<Option<RunConfig>> {
    let mut v = raw.clone();
    set_dotted(
        &mut v,
        "data.dataset",
        toml::Value::String(p.dataset.clone()),
    )?;
    set_dotted(
        &mut v,
        "model.n_instances",
        toml::Value::Integer(p.n as i64),
    )?;
    set_dotted(
        &mut v,
        "model.backbone",
        toml::Value::String(p.backbone.clone()),
    )?;
    set_dotted(
        &mut v,
        "model.mux.kind",
        toml::Value::String(p.mux.name().into()),
    )?;
    set_dotted(
        &mut v,
        "model.demux.kind",
        toml::Value::String(p.demux.name().into()),
    )?;
    set_dotted(&mut v, "warmup.enabled", toml::Value::Boolean(p.warmup))?;
    // Variants apply in file order; a later one overrides an earlier one.
    for (typed, raw_variant) in wire.variant.iter().zip(variants) {
        if matches(&typed.when, p) {
            if typed.skip {
                return Ok(None);
            }
            merge(&mut v, &variant_table(raw_variant)?);
        }
    }
    let t = v.as_table_mut().context("not a table")?;
    t.insert("experiment".into(), toml::Value::String(wire.name.clone()));
    t.insert(
        "modality".into(),
        toml::Value::String(wire.modality.name().into()),
    );
    t.insert("seed".into(), toml::Value::Integer(p.seed as i64));
    t.remove("profile");
    let mut run: RunConfig = v
        .try_into()
        .with_context(|| format!("{shown}: run {} n={}", p.backbone, p.n))?;
    run.validate()
        .with_context(|| format!("{shown}: run {}", run.run_id()))?;
    if let (true, Some(from)) = (run.warmup.enabled, run.warmup.from_n) {
        let at = RunPoint {
            n: from,
            warmup: true,
            ..p.clone()
        };
        let source = resolve_run(raw, variants, wire, &at, shown)?.with_context(|| {
            format!(
                "{shown}: run {}: warmup.from_n = {from}, but the run at N = {from} is skipped",
                run.run_id()
            )
        })?;
        // The grown checkpoint must load: same vocabulary, encoder and mux settings.
        ensure!(
            source.warmup_run().model.text == run.warmup_run().model.text
                && source.data == run.data
                && source.model.mux == run.model.mux,
            "{shown}: run {}: warmup.from_n = {from}, but the run at N = {from} has other data, \
             text model or mux settings",
            run.run_id()
        );
        run.warmup_source = Some(Box::new(source));
    }
    Ok(Some(run))
}

fn variant_table(v: &toml::Value) -> Result<toml::Value> {
    let mut t = v
        .as_table()
        .cloned()
        .context("a [[variant]] must be a table")?;
    t.remove("when");
    t.remove("skip");
    Ok(toml::Value::Table(t))
}
