//! [`Modality`]: what a modality crate implements so that the runner can train, score and time
//! its models. The runner reads experiment files, loads the splits, schedules jobs and writes the
//! tables; it knows a modality only through this trait and one registration line
//! (`datamux-runner/src/registry.rs`).

use anyhow::Result;
use datamux_data::{Catalogue, Kind, Split, Splits};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::settings::RunConfig;
use crate::speed::Timing;

/// Where a job finds its inputs and keeps its artefacts.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Env {
    pub data_dir: Option<std::path::PathBuf>,
    /// Pretrained models, laid out `<owner>/<name>/` (`--models-dir`; else `DATAMUX_MODELS_DIR`).
    pub models_dir: Option<std::path::PathBuf>,
    pub offline: bool,
    /// Checkpoints and warm-up checkpoints (`runs/`, git-ignored).
    pub runs_dir: std::path::PathBuf,
    /// Trained tokenizers and other derived files (`.cache/`, git-ignored).
    pub cache_dir: std::path::PathBuf,
    pub profile: String,
    /// One run's folder of failed hub attempts, shared by its workers: a repository that could
    /// not be reached is tried once per run (`datamux_data::Resolver::hub_attempts`).
    #[serde(default)]
    pub hub_attempts: Option<std::path::PathBuf>,
}

/// What a running job is doing, for the progress bars and the scheduler.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Stage {
    /// A worker took the job; the message is its run id.
    Start,
    /// Loading the splits.
    Data,
    /// Turning examples into model inputs (decoding images, tokenising, normalising frames).
    Prepare,
    /// Training or loading a warm-up: the run's own, or (`Some(M)`) the one at M it starts from.
    Warmup(Option<usize>),
    /// Training the task; a job that sends this is past its warm-ups.
    Train,
    /// Scoring the selected checkpoint on a split.
    Eval(String),
    /// Timing inference.
    Speed,
}

impl std::fmt::Display for Stage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Start => f.write_str("start"),
            Self::Data => f.write_str("data"),
            Self::Prepare => f.write_str("prepare"),
            Self::Warmup(None) => f.write_str("warmup"),
            Self::Warmup(Some(m)) => write!(f, "warmup n{m}"),
            Self::Train => f.write_str("train"),
            Self::Eval(split) => write!(f, "eval {split}"),
            Self::Speed => f.write_str("speed"),
        }
    }
}

/// A progress report of a running job.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Tick {
    pub stage: Stage,
    pub pos: usize,
    pub len: usize,
    pub msg: String,
}

/// What the runner lends a modality while it runs a job.
pub struct Context<'a> {
    pub env: &'a Env,
    report: &'a mut dyn FnMut(Tick),
    load: &'a dyn Fn(&str, &str) -> Result<Split>,
}

impl<'a> Context<'a> {
    /// `load(dataset, split)` reads another dataset of the catalogue (a warm-up corpus).
    pub fn new(
        env: &'a Env,
        report: &'a mut dyn FnMut(Tick),
        load: &'a dyn Fn(&str, &str) -> Result<Split>,
    ) -> Self {
        Self { env, report, load }
    }

    pub fn tick(&mut self, stage: Stage, pos: usize, len: usize, msg: impl Into<String>) {
        (self.report)(Tick {
            stage,
            pos,
            len,
            msg: msg.into(),
        });
    }

    /// A split of another catalogue dataset, resolved as the run's own data is.
    pub fn load(&self, dataset: &str, split: &str) -> Result<Split> {
        (self.load)(dataset, split)
    }
}

/// One scored metric of a run on a split: a row of `accuracy.parquet` without its identity.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    pub split: String,
    pub metric: String,
    pub value: f64,
    /// Real examples scored; equals the split size.
    pub n_examples: u64,
    pub steps: usize,
    pub best_step: usize,
    pub train_seconds: f64,
    /// The width the record was scored at, for a model of several (`mux.serve_n`); `None`:
    /// the run's `n_instances`.
    pub n_instances: Option<usize>,
}

/// One timed model: positions per instance and the latencies.
#[derive(Debug, Clone)]
pub struct SpeedPoint {
    /// Positions per instance (tokens, patches, frames; pixels for a CNN, 1 for an MLP).
    pub seq_len: usize,
    pub timing: Timing,
}

/// A modality: its settings, what it needs from the data, how it trains, scores and times a run.
///
/// The runner checks what every run shares (the dataset's kind against [`Self::data_kinds`],
/// step counts, batch sizes that N divides, the warm-up's settings); the rest is the modality's.
pub trait Modality: Sync {
    /// `modality = "<name>"` in experiment files and the `modality` column.
    fn name(&self) -> &'static str;

    /// The `[model.<section>]` tables it reads, in the order its runs' settings list them.
    fn sections(&self) -> &'static [&'static str];

    /// Section `name` from its merged TOML table, as typed settings with every default filled in
    /// ([`crate::settings::section_json`]); an unknown key is an error.
    fn section(&self, name: &str, value: &toml::Value) -> Result<Box<RawValue>>;

    /// The backbone names it builds (`model.backbone`, `sweep.backbone`).
    fn backbones(&self) -> &'static [&'static str];

    /// The dataset kinds it trains on.
    fn data_kinds(&self) -> &'static [Kind];

    /// Whether it has a warm-up stage (`[warmup]`, and `sweep.warmup` for B1 / B2 at N = 1).
    fn has_warmup(&self) -> bool {
        false
    }

    /// Checks of a resolved run beyond the shared ones: its backbone, its sections, the mux
    /// against its widths. Each error names the values.
    fn validate(&self, run: &RunConfig, catalogue: &Catalogue) -> Result<()>;

    /// A size label for the tables (`4x64p7`, `16-32-128`, ...).
    fn model_size(&self, run: &RunConfig) -> Result<String>;

    /// The shape of the run's model and batch, for the memory estimate that refuses a run
    /// that cannot fit (`memory::bytes`); `None` where the modality gives none. `env` says
    /// where a pretrained model's config is (read locally, never downloaded).
    fn memory_shape(&self, _run: &RunConfig, _env: &Env) -> Result<Option<crate::memory::Shape>> {
        Ok(None)
    }

    /// Whether `backbone` keeps positions (so takes a demux prefix; the report's ideal speedup).
    fn is_sequence(&self, backbone: &str) -> Result<bool>;

    /// The settings its warm-up model is built with: the run's own unless the warm-up changes
    /// something (text: `warmup.dropout`). Runs that start from a smaller N's warm-up must agree
    /// with it on these.
    fn warmup_run(&self, run: &RunConfig) -> Result<RunConfig> {
        Ok(run.clone())
    }

    /// Names of the warm-ups a run trains or loads before its task, its own first; two runs
    /// that share a warm-up share a name. The scheduler keeps a worker from waiting on a
    /// warm-up that another worker is training.
    fn warmups(&self, _run: &RunConfig) -> Vec<String> {
        Vec::new()
    }

    /// Whether its tasks take soft targets from an N = 1 teacher (`train.distill`).
    fn distills(&self) -> bool {
        false
    }

    /// Train `run` (its stages, selecting on validation), save the selected checkpoint, and
    /// score it on every example of the validation and test splits.
    fn train(&self, run: &RunConfig, splits: &Splits, ctx: &mut Context<'_>)
    -> Result<Vec<Record>>;

    /// Time inference of the run's model (fresh weights: speed does not depend on them) on the
    /// test split.
    fn speed(&self, run: &RunConfig, splits: &Splits, ctx: &mut Context<'_>) -> Result<SpeedPoint>;

    /// The model of the checkpoint folder `dir`, whose card is `card`, loaded for serving
    /// from that folder alone. A modality whose checkpoints carry no card cannot be served.
    fn load_served(
        &self,
        _dir: &std::path::Path,
        _card: &crate::serve::Card,
    ) -> Result<Box<dyn crate::serve::Served>> {
        anyhow::bail!("the {} modality has no served models", self.name())
    }
}

/// The backbone name of a run as a modality's own type: one of `names`, whose index picks from
/// `values`. The error names the modality and the names it has.
pub fn parse_backbone<T: Copy>(
    modality: &str,
    name: &str,
    names: &[&str],
    values: &[T],
) -> Result<T> {
    names
        .iter()
        .position(|n| *n == name)
        .and_then(|i| values.get(i).copied())
        .ok_or_else(|| {
            anyhow::anyhow!(
                "unknown {modality} backbone `{name}`; expected {}",
                names.join(", ")
            )
        })
}
