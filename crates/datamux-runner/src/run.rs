//! One job of a sweep, executed in a worker process: load the data, build the task of the run's
//! modality, train (text: retrieval warm-up, then fine-tuning), evaluate on validation and test,
//! and return table rows. A job never fails as a whole: errors become rows with a status.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use candle_core::Device;
use datamux_core::init::rng_for;
use datamux_core::{Score, SeededVarMap, Task};
use datamux_data::read::{self, Examples, Split};
use datamux_data::{Catalogue, DataError, Resolver};
use datamux_text::TextTokenizer;
use datamux_text::task::{HeadKind, SentenceData, TextData, TextTask, TokenData};
use datamux_vision::{ImageData, ImageTask};
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};

use crate::config::{Modality, RunConfig};
use crate::eval::evaluate;
use crate::provenance::Provenance;
use crate::results::{AccuracyRow, Identity, SpeedRow};
use crate::speed;
use crate::train::{self, Schedule};

/// Where a job finds its inputs and keeps its artefacts.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunEnv {
    pub data_dir: Option<PathBuf>,
    pub offline: bool,
    /// Checkpoints and warm-up checkpoints (`runs/`, git-ignored).
    pub runs_dir: PathBuf,
    /// Trained tokenizers (`.cache/`, git-ignored).
    pub cache_dir: PathBuf,
    pub profile: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Job {
    /// Train, select on validation, score validation and test.
    Train(RunConfig),
    /// Time inference of the run's model (fresh weights: speed does not depend on them).
    Speed(RunConfig),
}

impl Job {
    pub fn run(&self) -> &RunConfig {
        match self {
            Self::Train(r) | Self::Speed(r) => r,
        }
    }

    /// The retrieval warm-ups this job trains or loads before anything else: its own, then the
    /// one it starts from (`warmup.from_n`), recursively. Each is named by its settings (the
    /// tokenizer aside, which the same data and text settings determine), so two jobs that
    /// share a warm-up share a name; the scheduler uses them to keep a worker from waiting on a
    /// warm-up another worker is training.
    pub fn warmups(&self) -> Vec<String> {
        let mut out = Vec::new();
        let mut next = match self {
            Self::Train(r) if r.modality == Modality::Text && r.warmup.enabled => Some(r),
            _ => None,
        };
        while let Some(r) = next {
            out.push(warmup_key(r).to_string());
            next = r.warmup_source.as_deref();
        }
        out
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct JobResult {
    pub accuracy: Vec<AccuracyRow>,
    pub speed: Vec<SpeedRow>,
}

/// A progress report of a running job.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Tick {
    pub stage: String,
    pub pos: usize,
    pub len: usize,
    pub msg: String,
}

pub type Report<'a> = &'a mut dyn FnMut(Tick);

/// The identity columns of a run.
pub fn identity(run: &RunConfig, profile: &str, source: &str) -> Identity {
    let m = &run.model;
    Identity {
        experiment: run.experiment.clone(),
        profile: profile.to_string(),
        run_id: run.run_id(),
        modality: run.modality.name().into(),
        dataset: run.data.dataset.clone(),
        data_source: source.to_string(),
        backbone: m.backbone.clone(),
        model_size: run.model_size(),
        mux: m.mux.kind.name().into(),
        demux: m.demux.kind.name().into(),
        n_instances: m.n_instances as i64,
        seed: run.seed as i64,
        warmup: run.modality == Modality::Text && run.warmup.enabled,
        config_hash: run.config_hash(),
        ..Identity::default()
    }
    .with_provenance(&Provenance::current())
}

/// `unavailable` when the data cannot be had, `error` for anything else.
pub fn status_of(err: &anyhow::Error) -> &'static str {
    let unavailable = err.chain().any(|e| {
        matches!(
            e.downcast_ref::<DataError>(),
            Some(
                DataError::NotFound { .. }
                    | DataError::NoDataDir { .. }
                    | DataError::UnknownSplit { .. }
                    | DataError::Download { .. }
            )
        )
    });
    if unavailable { "unavailable" } else { "error" }
}

/// Run a job; failures become one row with the status and the first line of the error.
pub fn execute(job: &Job, env: &RunEnv, report: Report<'_>) -> JobResult {
    let out = match job {
        Job::Train(run) => train_job(run, env, report).map(|accuracy| JobResult {
            accuracy,
            speed: vec![],
        }),
        Job::Speed(run) => speed_job(run, env, report).map(|speed| JobResult {
            accuracy: vec![],
            speed,
        }),
    };
    out.unwrap_or_else(|e| failed_result(job, env, &e))
}

/// The rows of a job that failed: one row with the status and the first line of the error.
pub fn failed_result(job: &Job, env: &RunEnv, e: &anyhow::Error) -> JobResult {
    let run = job.run();
    let msg = format!("{e:#}");
    let id = identity(run, &env.profile, "").with_status(status_of(e), &msg);
    {
        match job {
            Job::Train(_) => JobResult {
                accuracy: vec![AccuracyRow {
                    id,
                    split: String::new(),
                    metric: String::new(),
                    value: f64::NAN,
                    n_examples: 0,
                    steps: 0,
                    best_step: 0,
                    train_seconds: f64::NAN,
                }],
                speed: vec![],
            },
            Job::Speed(_) => JobResult {
                accuracy: vec![],
                speed: vec![SpeedRow {
                    id,
                    mode: "inference".into(),
                    seq_len: 0,
                    batch_instances: 0,
                    warmup_iters: 0,
                    iters: 0,
                    latency_ms_median: f64::NAN,
                    latency_ms_mad: f64::NAN,
                    latency_ms_min: f64::NAN,
                    latency_ms_max: f64::NAN,
                    throughput_instances_per_s: f64::NAN,
                }],
            },
        }
    }
}

/// Train, validation and test splits of a run. Without a test split the validation split is
/// reported (as the paper does for GLUE) and model selection uses a holdout of train instead,
/// so no figure is selected on the split it reports.
pub struct Splits {
    pub train: Split,
    pub valid: Split,
    pub test: Split,
}

fn holdout(split: &Split, count: usize, limit: usize) -> (Split, Split) {
    let mut order: Vec<usize> = (0..split.len()).collect();
    // Seed 0 whatever the run seed: every run of an experiment sees the same data split.
    order.shuffle(&mut rng_for(0, "data.holdout"));
    let count = count.min(split.len() / 5);
    let (held, rest) = order.split_at(count);
    let rest = if limit > 0 {
        &rest[..limit.min(rest.len())]
    } else {
        rest
    };
    let mut sorted_held = held.to_vec();
    sorted_held.sort_unstable();
    let mut a = split.clone();
    a.examples = split.examples.select(rest);
    let mut b = split.clone();
    b.split = "validation".into();
    b.examples = split.examples.select(&sorted_held);
    (a, b)
}

fn limit(split: Split, limit: usize) -> Split {
    if limit == 0 || limit >= split.len() {
        return split;
    }
    let mut order: Vec<usize> = (0..split.len()).collect();
    order.shuffle(&mut rng_for(0, "data.limit"));
    let mut out = split.clone();
    out.examples = split.examples.select(&order[..limit]);
    out
}

pub fn load_splits(run: &RunConfig, env: &RunEnv) -> Result<Splits> {
    let catalogue = Catalogue::builtin()?;
    let resolver = Resolver::from_env(env.data_dir.clone(), env.offline)?;
    let entry = catalogue.get(&run.data.dataset)?;
    let load = |s: &str| read::load(&catalogue, &resolver, &run.data.dataset, s);
    let train = load("train")?;
    let (has_valid, has_test) = (entry.has_split("validation"), entry.has_split("test"));
    let d = &run.data;
    Ok(if has_test && has_valid {
        Splits {
            train: limit(train, d.train_limit),
            valid: load("validation")?,
            test: load("test")?,
        }
    } else if has_test || has_valid {
        let test = load(if has_test { "test" } else { "validation" })?;
        let (train, valid) = holdout(&train, d.validation_holdout, d.train_limit);
        Splits { train, valid, test }
    } else {
        bail!(
            "dataset `{}` has neither a validation nor a test split",
            run.data.dataset
        );
    })
}

/// Validation examples scored during training (`eval_limit`); the final figures use them all.
fn eval_order(len: usize, limit: usize) -> Option<Vec<usize>> {
    (limit > 0 && limit < len).then(|| (0..limit).collect())
}

fn schedule(run: &RunConfig, metric: &'static str) -> Schedule {
    let t = &run.train;
    Schedule {
        steps: t.steps,
        batch_size: t.batch_size,
        lr: t.lr,
        lr_warmup_steps: t.lr_warmup_steps,
        weight_decay: t.weight_decay,
        max_grad_norm: t.max_grad_norm,
        eval_every: t.eval_every,
        eval_rows: t.eval_rows,
        metric,
        seed: run.seed,
        stage: "train",
    }
}

/// Rows for every metric of a score.
fn score_rows(
    id: &Identity,
    split: &str,
    score: &Score,
    steps: usize,
    best: usize,
    seconds: f64,
    prefix: &str,
) -> Vec<AccuracyRow> {
    score
        .metrics()
        .into_iter()
        .map(|(metric, value)| AccuracyRow {
            id: id.clone().with_status("ok", ""),
            split: split.to_string(),
            metric: format!("{prefix}{metric}"),
            value,
            n_examples: score.examples as i64,
            steps: steps as i64,
            best_step: best as i64,
            train_seconds: seconds,
        })
        .collect()
}

/// Score the selected checkpoint on every example of the validation and test splits.
fn final_rows<T: Task>(
    task: &T,
    run: &RunConfig,
    id: &Identity,
    splits: [(&str, &T::Data); 2],
    out: &train::Outcome,
    report: Report<'_>,
) -> Result<Vec<AccuracyRow>> {
    let mut rows = Vec::new();
    for (name, data) in splits {
        let score = evaluate(
            task,
            data,
            None,
            run.train.eval_rows,
            run.seed,
            |pos, len| {
                report(Tick {
                    stage: format!("eval {name}"),
                    pos,
                    len,
                    msg: String::new(),
                })
            },
        )?;
        rows.extend(score_rows(
            id,
            name,
            &score,
            out.steps,
            out.best_step,
            out.seconds,
            "",
        ));
    }
    Ok(rows)
}

fn checkpoint_dir(env: &RunEnv, run: &RunConfig) -> PathBuf {
    env.runs_dir.join(&run.experiment).join(run.run_id())
}

/// Save weights and fixed buffers; the resolved config goes beside them.
fn save_checkpoint(
    dir: &Path,
    map: &SeededVarMap,
    buffers: &std::collections::HashMap<String, candle_core::Tensor>,
    run: &RunConfig,
) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    map.varmap().save(dir.join("model.safetensors"))?;
    if !buffers.is_empty() {
        candle_core::safetensors::save(buffers, dir.join("buffers.safetensors"))?;
    }
    std::fs::write(dir.join("resolved.toml"), toml::to_string(run)?)?;
    Ok(())
}

fn train_job(run: &RunConfig, env: &RunEnv, report: Report<'_>) -> Result<Vec<AccuracyRow>> {
    report(Tick {
        stage: "data".into(),
        pos: 0,
        len: 1,
        msg: format!("loading {}", run.data.dataset),
    });
    let splits = load_splits(run, env)?;
    let id = identity(run, &env.profile, &splits.train.source.describe());
    match run.modality {
        Modality::Vision => vision_train(run, env, &splits, &id, report),
        Modality::Text => text_train(run, env, &splits, &id, report),
    }
}

fn image_data(split: &Split, run: &RunConfig) -> Result<ImageData> {
    let Examples::Images { images, labels } = &split.examples else {
        bail!("dataset `{}` is not an image dataset", split.dataset);
    };
    ImageData::decode(images, labels, &run.model.image)
        .with_context(|| format!("dataset `{}` split `{}`", split.dataset, split.split))
}

fn image_task(run: &RunConfig, classes: usize, map: &SeededVarMap) -> Result<ImageTask> {
    let arch = crate::config::vision_arch(&run.model.backbone)?;
    Ok(ImageTask::new(
        arch,
        &run.vision_config(),
        &run.mux_config(),
        &run.model.image,
        classes,
        map,
        &Device::Cpu,
    )?)
}

fn vision_train(
    run: &RunConfig,
    env: &RunEnv,
    s: &Splits,
    id: &Identity,
    report: Report<'_>,
) -> Result<Vec<AccuracyRow>> {
    report(Tick {
        stage: "decode".into(),
        pos: 0,
        len: 1,
        msg: "decoding images".into(),
    });
    let (train, valid, test) = (
        image_data(&s.train, run)?,
        image_data(&s.valid, run)?,
        image_data(&s.test, run)?,
    );
    let map = SeededVarMap::new(run.seed);
    let task = image_task(run, s.train.label_names.len(), &map)?;
    let order = eval_order(valid.len(), run.data.eval_limit);
    let sched = schedule(run, "accuracy");
    let out = train::train(&task, &map, &train, &valid, order.as_deref(), &sched, |p| {
        report(Tick {
            stage: "train".into(),
            pos: p.pos,
            len: p.len,
            msg: p.msg.to_string(),
        })
    })?;
    save_checkpoint(&checkpoint_dir(env, run), &map, &task.net.buffers(), run)?;
    final_rows(
        &task,
        run,
        id,
        [("validation", &valid), (s.test.split.as_str(), &test)],
        &out,
        report,
    )
}

/// The tokenizer of a run: loaded from `model.text.tokenizer`, or trained on the training text
/// and cached under `.cache/tokenizers/` (a cached file is reused, never retrained).
pub fn tokenizer(run: &RunConfig, env: &RunEnv, train: &Split) -> Result<TextTokenizer> {
    let cfg = &run.model.text;
    if let Some(path) = &cfg.tokenizer {
        return Ok(TextTokenizer::from_file(Path::new(path), cfg.max_length)?);
    }
    let texts = text_lines(train);
    let fingerprint = datamux_core::init::name_seed(texts.len() as u64, &texts.join("\n"));
    let name = format!(
        "{}-bpe{}-{}-{fingerprint:016x}.json",
        train.dataset,
        cfg.vocab_size,
        if cfg.lowercase { "lc" } else { "cased" }
    );
    let path = env.cache_dir.join("tokenizers").join(name);
    if path.is_file() {
        return Ok(TextTokenizer::from_file(&path, cfg.max_length)?);
    }
    let tk = TextTokenizer::train(
        texts.iter().map(String::as_str),
        cfg.vocab_size,
        cfg.lowercase,
        cfg.max_length,
    )?;
    std::fs::create_dir_all(path.parent().unwrap_or(Path::new(".")))?;
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    tk.save(&tmp)?;
    std::fs::rename(&tmp, &path)?;
    Ok(tk)
}

/// The raw text of a split, one string per sentence (pairs as two) or per word sequence.
fn text_lines(split: &Split) -> Vec<String> {
    match &split.examples {
        Examples::Text { texts, pairs, .. } => texts
            .iter()
            .chain(pairs.iter().flatten())
            .cloned()
            .collect(),
        Examples::Tokens { tokens, .. } => tokens.iter().map(|w| w.join(" ")).collect(),
        Examples::Corpus { texts } => texts.clone(),
        Examples::Images { .. } => Vec::new(),
    }
}

fn text_data(split: &Split, tk: &TextTokenizer) -> Result<(TextData, HeadKind)> {
    let ctx = || format!("dataset `{}` split `{}`", split.dataset, split.split);
    let classes = split.label_names.len();
    Ok(match &split.examples {
        Examples::Text {
            texts,
            pairs,
            labels,
        } => (
            TextData::Sentences(
                SentenceData::encode(tk, texts, pairs.as_deref(), labels, classes)
                    .with_context(ctx)?,
            ),
            HeadKind::Sentence,
        ),
        Examples::Tokens { tokens, tags } => (
            TextData::Tokens(TokenData::encode(tk, tokens, tags, classes).with_context(ctx)?),
            HeadKind::Token,
        ),
        _ => bail!("dataset `{}` is not a text task", split.dataset),
    })
}

fn text_task(
    run: &RunConfig,
    head: HeadKind,
    labels: &[String],
    tk: &TextTokenizer,
    weights: (f64, f64),
    map: &SeededVarMap,
) -> Result<TextTask> {
    Ok(TextTask::new(
        &run.model.text,
        &run.mux_config(),
        head,
        labels,
        tk.vocab_size(),
        tk.pad_id,
        weights,
        map,
        &Device::Cpu,
    )?)
}

/// The warm-up corpus as unlabelled sentences.
fn warmup_corpus(
    run: &RunConfig,
    env: &RunEnv,
    s: &Splits,
    tk: &TextTokenizer,
) -> Result<TextData> {
    let lines = if run.warmup.corpus == "task" {
        text_lines(&s.train)
    } else {
        let catalogue = Catalogue::builtin()?;
        let resolver = Resolver::from_env(env.data_dir.clone(), env.offline)?;
        let corpus = read::load(&catalogue, &resolver, &run.warmup.corpus, "train")?;
        // Only as many lines as the warm-up can visit.
        let mut lines = text_lines(&corpus);
        lines.truncate(run.warmup.steps * run.warmup.batch_size);
        lines
    };
    Ok(TextData::Sentences(SentenceData::corpus(tk, &lines)?))
}

/// The warm-up checkpoint directory: one per (data, tokenizer, warm-up model, N, mux, demux,
/// warm-up settings, seed), reused by every run that shares them. The model settings are the
/// warm-up model's (`RunConfig::warmup_run`), so a fine-tuning dropout does not retrain it.
fn warmup_dir(run: &RunConfig, env: &RunEnv, tk: &TextTokenizer) -> PathBuf {
    let mut key = warmup_key(run);
    key["vocab"] = tk.vocab_size().into();
    // Only when set, so the keys of warm-ups without a source stay as they were.
    if let Some(source) = &run.warmup_source {
        let from = warmup_dir(source, env, tk);
        key["source"] = from.file_name().map(|f| f.to_string_lossy()).into();
    }
    let hash = datamux_core::init::name_seed(0, &key.to_string());
    env.runs_dir.join("warmup").join(format!(
        "n{}-{}-{hash:016x}",
        run.model.n_instances,
        run.model.mux.kind.name()
    ))
}

/// The settings a warm-up depends on, its source and tokenizer aside (serde_json's maps are
/// sorted, so the order of insertion does not change the hash).
fn warmup_key(run: &RunConfig) -> serde_json::Value {
    let warm = run.warmup_run();
    serde_json::json!({
        "dataset": run.data.dataset, "corpus": run.warmup.corpus,
        "text": warm.model.text, "mux": warm.model.mux, "demux": warm.model.demux,
        "n": run.model.n_instances, "warmup": run.warmup, "seed": run.seed,
        "eval_rows": run.train.eval_rows,
    })
}

/// An exclusive lock on a directory, so two workers never train the same warm-up at once. A
/// lock left by a process that no longer exists is taken over.
struct Lock(PathBuf);

impl Lock {
    fn acquire(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join("lock");
        loop {
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
            {
                Ok(mut f) => {
                    use std::io::Write;
                    write!(f, "{}", std::process::id())?;
                    return Ok(Self(path));
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    let owner = std::fs::read_to_string(&path).unwrap_or_default();
                    let alive = owner
                        .trim()
                        .parse::<u32>()
                        .is_ok_and(|pid| Path::new(&format!("/proc/{pid}")).exists());
                    if !alive {
                        std::fs::remove_file(&path).ok();
                    } else {
                        std::thread::sleep(std::time::Duration::from_secs(2));
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
}

impl Drop for Lock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Start `vars` (a model at N instances) from `saved`, the variables of the same model trained at
/// M <= N: every variable of the same shape is copied, the `index` prefix table is grown
/// (`demux::grow_index_table`). A variable missing from `saved`, or of another shape, is an error.
fn grow_from(
    vars: &[(String, candle_core::Var)],
    saved: &std::collections::HashMap<String, candle_core::Tensor>,
) -> Result<()> {
    for (name, var) in vars {
        let old = saved
            .get(name)
            .with_context(|| format!("the smaller warm-up has no variable `{name}`"))?;
        let value = if old.shape() == var.shape() {
            old.clone()
        } else if name.ends_with("index_embed.weight") {
            datamux_core::demux::grow_index_table(old, var.as_tensor())?
        } else {
            bail!(
                "cannot start `{name}` {:?} from the smaller warm-up's {:?}",
                var.shape(),
                old.shape()
            );
        };
        var.set(&value)?;
    }
    Ok(())
}

/// What every warm-up of one text run shares (the curriculum's smaller warm-ups included).
struct WarmContext<'a> {
    env: &'a RunEnv,
    splits: &'a Splits,
    tk: &'a TextTokenizer,
    head: HeadKind,
    labels: &'a [String],
    valid: &'a TextData,
    order: Option<&'a [usize]>,
}

/// Steps, best step and seconds of a finished warm-up.
struct Outcome {
    steps: usize,
    best: usize,
    seconds: f64,
}

/// The retrieval warm-up of `run`: loaded from its checkpoint directory when finished, trained
/// otherwise (first the warm-up it starts from, `warmup.from_n`, recursively).
fn warm_up(
    run: &RunConfig,
    ctx: &WarmContext<'_>,
    stage: &str,
    report: Report<'_>,
) -> Result<(TextTask, SeededVarMap, Outcome)> {
    let dir = warmup_dir(run, ctx.env, ctx.tk);
    let _lock = Lock::acquire(&dir)?;
    let warm_map = SeededVarMap::new(run.seed);
    let warm = text_task(
        &run.warmup_run(),
        ctx.head,
        ctx.labels,
        ctx.tk,
        (0.0, 1.0),
        &warm_map,
    )?;
    let ckpt = dir.join("model.safetensors");
    if ckpt.is_file() {
        report(Tick {
            stage: stage.into(),
            pos: 1,
            len: 1,
            msg: "reusing checkpoint".into(),
        });
        let mut vm = warm_map.varmap().clone();
        vm.load(&ckpt)
            .with_context(|| format!("cannot load warm-up checkpoint {}", ckpt.display()))?;
        let saved = candle_core::safetensors::load(dir.join("buffers.safetensors"), &Device::Cpu)?;
        warm.net.check_buffers(&saved)?;
        let meta: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("outcome.json"))?)?;
        let get = |k: &str| {
            meta.get(k)
                .and_then(serde_json::Value::as_f64)
                .unwrap_or(f64::NAN)
        };
        let out = Outcome {
            steps: get("steps") as usize,
            best: get("best_step") as usize,
            seconds: get("seconds"),
        };
        return Ok((warm, warm_map, out));
    }
    if let Some(source) = &run.warmup_source {
        // Locks are taken from larger N to smaller, so two workers cannot wait on each other.
        let stage = format!("warmup n{}", source.model.n_instances);
        let (_, source_map, _) = warm_up(source, ctx, &stage, report)?;
        let saved: std::collections::HashMap<String, candle_core::Tensor> = source_map
            .sorted_vars()?
            .into_iter()
            .map(|(name, var)| (name, var.as_tensor().clone()))
            .collect();
        grow_from(&warm_map.sorted_vars()?, &saved)?;
    }
    let corpus = warmup_corpus(run, ctx.env, ctx.splits, ctx.tk)?;
    let w = &run.warmup;
    let sched = Schedule {
        steps: w.steps,
        batch_size: w.batch_size,
        lr: w.lr,
        lr_warmup_steps: w.lr_warmup_steps,
        stage: "warmup",
        metric: "retrieval_accuracy",
        ..schedule(run, "retrieval_accuracy")
    };
    let out = train::train(
        &warm,
        &warm_map,
        &corpus,
        ctx.valid,
        ctx.order,
        &sched,
        |p| {
            report(Tick {
                stage: stage.into(),
                pos: p.pos,
                len: p.len,
                msg: p.msg.to_string(),
            })
        },
    )?;
    save_checkpoint(&dir, &warm_map, &warm.net.buffers(), run)?;
    let meta =
        serde_json::json!({"steps": out.steps, "best_step": out.best_step, "seconds": out.seconds});
    std::fs::write(dir.join("outcome.json"), meta.to_string())?;
    let out = Outcome {
        steps: out.steps,
        best: out.best_step,
        seconds: out.seconds,
    };
    Ok((warm, warm_map, out))
}

fn text_train(
    run: &RunConfig,
    env: &RunEnv,
    s: &Splits,
    id: &Identity,
    report: Report<'_>,
) -> Result<Vec<AccuracyRow>> {
    report(Tick {
        stage: "tokenize".into(),
        pos: 0,
        len: 1,
        msg: "tokenizer".into(),
    });
    let tk = tokenizer(run, env, &s.train)?;
    let (train, head) = text_data(&s.train, &tk)?;
    let (valid, _) = text_data(&s.valid, &tk)?;
    let (test, _) = text_data(&s.test, &tk)?;
    let labels = &s.train.label_names;
    let order = eval_order(valid.len(), run.data.eval_limit);
    let mut rows = Vec::new();
    let map = SeededVarMap::new(run.seed);
    let weights = (run.train.task_weight, run.train.retrieval_weight);
    let task = text_task(run, head, labels, &tk, weights, &map)?;
    if run.warmup.enabled {
        let ctx = WarmContext {
            env,
            splits: s,
            tk: &tk,
            head,
            labels,
            valid: &valid,
            order: order.as_deref(),
        };
        let (
            warm,
            warm_map,
            Outcome {
                steps,
                best,
                seconds,
            },
        ) = warm_up(run, &ctx, "warmup", report)?;
        for (name, data) in [("validation", &valid), (s.test.split.as_str(), &test)] {
            let score = evaluate(&warm, data, None, run.train.eval_rows, run.seed, |_, _| {})?;
            let only_retrieval = Score {
                retrieval_correct: score.retrieval_correct,
                retrieval_total: score.retrieval_total,
                examples: score.examples,
                ..Score::default()
            };
            rows.extend(score_rows(
                id,
                name,
                &only_retrieval,
                steps,
                best,
                seconds,
                "warmup_",
            ));
        }
        // Fine-tuning starts from the warm-up: everything but the task head, which is fresh
        // (the warm-up's head was never trained; method.md §12).
        let warm_vars = warm_map.sorted_vars()?;
        let fresh = map.sorted_vars()?;
        // The mean readout reads the same (prefix slot, position) pairs as retrieval, so its
        // demultiplexer starts from the retrieval one, which learned to address each instance
        // (the task's own was never trained either). The prefix table is shared already.
        let from_retrieval = head == HeadKind::Sentence
            && run.model.text.sentence_readout == datamux_text::SentenceReadout::Mean;
        let warm_by_name: std::collections::HashMap<&str, &candle_core::Var> =
            warm_vars.iter().map(|(n, v)| (n.as_str(), v)).collect();
        for ((name, var), (wname, wvar)) in fresh.iter().zip(&warm_vars) {
            anyhow::ensure!(
                name == wname,
                "warm-up and task variables differ: {name} vs {wname}"
            );
            if name.starts_with("head.") {
                continue;
            }
            let retrieval = from_retrieval
                .then(|| warm_by_name.get(format!("retrieval.{name}").as_str()))
                .flatten()
                .copied()
                .filter(|r| r.shape() == wvar.shape());
            var.set(retrieval.unwrap_or(wvar).as_tensor())?;
        }
    }
    let metric = task.selection_metric();
    let out = train::train(
        &task,
        &map,
        &train,
        &valid,
        order.as_deref(),
        &schedule(run, metric),
        |p| {
            report(Tick {
                stage: "train".into(),
                pos: p.pos,
                len: p.len,
                msg: p.msg.to_string(),
            })
        },
    )?;
    save_checkpoint(&checkpoint_dir(env, run), &map, &task.net.buffers(), run)?;
    rows.extend(final_rows(
        &task,
        run,
        id,
        [("validation", &valid), (s.test.split.as_str(), &test)],
        &out,
        report,
    )?);
    Ok(rows)
}

fn speed_job(run: &RunConfig, env: &RunEnv, report: Report<'_>) -> Result<Vec<SpeedRow>> {
    let splits = load_splits(run, env)?;
    let id = identity(run, &env.profile, &splits.test.source.describe());
    let map = SeededVarMap::new(run.seed);
    let cfg = &run.speed;
    let tick = |pos, len| Tick {
        stage: "speed".into(),
        pos,
        len,
        msg: String::new(),
    };
    let (timing, seq_len) = match run.modality {
        Modality::Vision => {
            let data = image_data(&splits.test, run)?;
            let task = image_task(run, splits.test.label_names.len(), &map)?;
            let seq_len = match run.model.backbone.as_str() {
                "vit" => (run.model.image.size / run.model.vit.patch_size).pow(2),
                "mlp" => 1,
                _ => run.model.image.size.pow(2),
            };
            (
                speed::time_inference(&task, &data, cfg, |p, l| report(tick(p, l)))?,
                seq_len,
            )
        }
        Modality::Text => {
            let tk = tokenizer(run, env, &splits.train)?;
            let (data, head) = text_data(&splits.test, &tk)?;
            let mut task = text_task(run, head, &splits.test.label_names, &tk, (1.0, 0.0), &map)?;
            // The speed protocol pads every instance to the same length (method.md §9.2).
            task.fixed_len = Some(run.model.text.max_length);
            (
                speed::time_inference(&task, &data, cfg, |p, l| report(tick(p, l)))?,
                run.model.text.max_length,
            )
        }
    };
    if timing.latencies_ms.is_empty() {
        return Err(anyhow!("no timed iteration completed"));
    }
    Ok(vec![SpeedRow {
        id: id.with_status("ok", ""),
        mode: "inference".into(),
        seq_len: seq_len as i64,
        batch_instances: timing.instances as i64,
        warmup_iters: timing.warmup_iters as i64,
        iters: timing.latencies_ms.len() as i64,
        latency_ms_median: timing.median(),
        latency_ms_mad: timing.mad(),
        latency_ms_min: timing.min(),
        latency_ms_max: timing.max(),
        throughput_instances_per_s: timing.throughput(),
    }])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_with(overrides: &[&str]) -> RunConfig {
        let path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../experiments/text-sentence.toml");
        let set: Vec<_> = overrides
            .iter()
            .map(|s| crate::config::parse_override(s).unwrap())
            .collect();
        crate::config::load(&path, "smoke", &set).unwrap().runs[0].clone()
    }

    #[test]
    fn the_warm_up_checkpoint_depends_on_the_warm_up_model_only() {
        let tk =
            TextTokenizer::train(["a quiet film", "a dull film"].into_iter(), 40, true, 8).unwrap();
        let env = RunEnv {
            data_dir: None,
            offline: true,
            runs_dir: PathBuf::from("runs"),
            cache_dir: PathBuf::from(".cache"),
            profile: "smoke".into(),
        };
        let dir = |o: &[&str]| warmup_dir(&run_with(o), &env, &tk);
        let no_drop = ["warmup.dropout=0.0"];
        let no_drop_ft = [
            "warmup.dropout=0.0",
            "model.text.embedding_dropout=0.3",
            "model.demux.dropout=0.3",
        ];
        // With the warm-up's own dropout, the fine-tuning dropout does not retrain it ...
        assert_eq!(dir(&no_drop), dir(&no_drop_ft));
        // ... without it, the model's dropout is the warm-up's too.
        assert_ne!(dir(&[]), dir(&["model.text.embedding_dropout=0.3"]));
        assert_ne!(dir(&[]), dir(&no_drop));
        assert_ne!(
            dir(&no_drop),
            dir(&["warmup.dropout=0.0", "warmup.lr=0.01"])
        );
        // The warm-up trains no task head, so the sentence readout does not retrain it either.
        assert_eq!(dir(&[]), dir(&["model.text.sentence_readout=mean"]));
    }
}
