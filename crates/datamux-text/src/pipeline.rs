//! The text modality for the runner: `[model.text]`, sentence, sentence-pair and token
//! classification datasets, the retrieval warm-up (`warmup.rs`) then fine-tuning, and inference
//! timing at the fixed speed-protocol length.

use std::path::Path;

use anyhow::{Context as _, Result, bail, ensure};
use candle_core::Device;
use datamux_core::SeededVarMap;
use datamux_data::{Catalogue, Examples, Kind, ModelResolver, Split, Splits};
use datamux_pipeline::serve::{Card, InputKind, Output, Served};
use datamux_pipeline::{
    Context, Env, Modality, Record, RunConfig, SpeedPoint, Stage, section_json, stages,
};
use serde_json::value::RawValue;

use crate::config::{Config, Objective, SentenceReadout, Size};
use crate::embeddings;
use crate::pretrained::Pretrained;
use crate::task::{HeadKind, SentenceData, TextData, TextTask, TokenData};
use crate::tokenizer::TextTokenizer;
use crate::warmup;

/// The text modality (`modality = "text"`).
pub struct Text;

/// The text backbones: the core Transformer encoder, trained from scratch or loaded from a
/// pretrained BERT (`model.text.pretrained`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    Transformer,
}

const BACKBONES: [&str; 1] = ["transformer"];

/// A run's backbone, parsed once from `model.backbone`.
pub fn arch(run: &RunConfig) -> Result<Arch> {
    datamux_pipeline::parse_backbone(
        "text",
        &run.model.backbone,
        &BACKBONES,
        &[Arch::Transformer],
    )
}

/// The run's `[model.text]`.
pub fn settings(run: &RunConfig) -> Result<Config> {
    run.model.sections.get("text")
}

/// The settings the warm-up model is built with: the run's, with `warmup.dropout` (when set)
/// as every dropout probability, and the default sentence readout (the warm-up trains no task
/// head, so how it reads does not change the warm-up). Dropout has no parameters, so the
/// warm-up checkpoint still loads into the task model.
pub fn warmup_run(run: &RunConfig) -> Result<RunConfig> {
    let mut out = run.clone();
    let mut text = settings(run)?;
    text.sentence_readout = SentenceReadout::default();
    // The warm-up has no task loss, so neither the distillation term nor the objective changes
    // it: runs that differ only in those share one warm-up (built with the dataset's
    // classification head, [`class_head`], whatever the objective).
    text.embedding_weight = 0.0;
    text.objective = Objective::Classify;
    // A fine-tuning setting (docs/pretrained.md).
    text.fresh_lr_scale = 1.0;
    if let Some(p) = run.warmup.dropout {
        let mut enc = text.encoder();
        enc.hidden_dropout_prob = p;
        enc.attention_probs_dropout_prob = p;
        text.size = Size::Custom;
        text.encoder = enc;
        text.embedding_dropout = p;
        out.model.demux.dropout = p;
    }
    out.model.sections.set("text", &text)?;
    Ok(out)
}

/// The pretrained checkpoint of a run (`model.text.pretrained`), resolved from the models
/// folder, the hf-hub cache or the hub; `None` for a model trained from scratch.
pub fn pretrained(run: &RunConfig, env: &Env) -> Result<Option<Pretrained>> {
    let cfg = settings(run)?;
    let Some(repo) = &cfg.pretrained else {
        return Ok(None);
    };
    let resolver = ModelResolver {
        hub_attempts: env.hub_attempts.clone(),
        ..ModelResolver::from_env(env.models_dir.clone(), env.offline)?
    };
    Ok(Some(Pretrained::resolve(
        repo,
        cfg.revision.as_deref(),
        &resolver,
    )?))
}

/// The tokenizer of a run: the pretrained checkpoint's `tokenizer.json`, or loaded from
/// `model.text.tokenizer`, or trained on the training text and cached under
/// `<cache>/tokenizers/` (a cached file is reused, never retrained). Truncation is always the
/// run's `max_length`, whatever the file says.
pub fn tokenizer(
    run: &RunConfig,
    cache_dir: &Path,
    train: &Split,
    pretrained: Option<&Pretrained>,
) -> Result<TextTokenizer> {
    let cfg = settings(run)?;
    if let Some(p) = pretrained {
        return Ok(TextTokenizer::from_file(&p.tokenizer_file, cfg.max_length)?);
    }
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
    let path = cache_dir.join("tokenizers").join(name);
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
    datamux_data::atomic::write_path(&path, |tmp| tk.save(tmp))?;
    Ok(tk)
}

/// (layers, width, FFN, heads, vocabulary) of a pretrained model from its local `config.json`.
fn pretrained_sizes(
    repo: &str,
    revision: Option<&str>,
    env: &datamux_pipeline::Env,
) -> Option<(u64, u64, u64, u64, u64)> {
    let resolver = ModelResolver::from_env(env.models_dir.clone(), true).ok()?;
    let found = resolver.resolve(repo, revision, &["config.json"]).ok()?;
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(found.files.first()?).ok()?).ok()?;
    let get = |k: &str| cfg.get(k).and_then(serde_json::Value::as_u64);
    Some((
        get("num_hidden_layers")?,
        get("hidden_size")?,
        get("intermediate_size")?,
        get("num_attention_heads")?,
        get("vocab_size")?,
    ))
}

/// The raw text of a split, one string per sentence (pairs as two) or per word sequence.
pub fn text_lines(split: &Split) -> Vec<String> {
    match &split.examples {
        Examples::Text { texts, pairs, .. } => texts
            .iter()
            .chain(pairs.iter().flatten())
            .cloned()
            .collect(),
        Examples::Tokens { tokens, .. } => tokens.iter().map(|w| w.join(" ")).collect(),
        Examples::Corpus { texts } => texts.clone(),
        Examples::Images { .. } | Examples::Frames { .. } => Vec::new(),
    }
}

/// A split as token ids and labels, and the head it needs.
pub fn text_data(split: &Split, tk: &TextTokenizer) -> Result<(TextData, HeadKind)> {
    // An input error names the file and its own row (`Split::error_at`).
    let place = |e: crate::tokenizer::TextError| match e.row() {
        Some(row) => anyhow::anyhow!("{}", split.error_at(row, &e.to_string())),
        None => anyhow::anyhow!("dataset `{}` split `{}`: {e}", split.dataset, split.split),
    };
    let classes = split.label_names.len();
    Ok(match &split.examples {
        Examples::Text {
            texts,
            pairs,
            labels,
        } => (
            TextData::Sentences(
                SentenceData::encode(tk, texts, pairs.as_deref(), labels, classes)
                    .map_err(place)?,
            ),
            HeadKind::Sentence,
        ),
        Examples::Tokens { tokens, tags } => (
            TextData::Tokens(TokenData::encode(tk, tokens, tags, classes).map_err(place)?),
            HeadKind::Token,
        ),
        _ => bail!("dataset `{}` is not a text task", split.dataset),
    })
}

/// The head a dataset's labels call for: its warm-up is built with it under every objective.
pub fn class_head(split: &Split) -> HeadKind {
    match split.examples {
        Examples::Tokens { .. } => HeadKind::Token,
        _ => HeadKind::Sentence,
    }
}

/// A split as the run's objective reads it, without embedding targets: [`text_data`] to
/// classify; to embed, its text (every sentence, or each word sequence joined). What inference
/// needs (the speed points).
pub fn objective_data(
    run: &RunConfig,
    split: &Split,
    tk: &TextTokenizer,
) -> Result<(TextData, HeadKind)> {
    if settings(run)?.objective == Objective::Classify {
        return text_data(split, tk);
    }
    let s = SentenceData::corpus(tk, &text_lines(split))
        .with_context(|| format!("dataset `{}` split `{}`", split.dataset, split.split))?;
    Ok((TextData::Embeddings(s), HeadKind::Embedding))
}

/// [`objective_data`] with the pretrained model's N = 1 embedding of every example where the
/// run trains on them (the embedding objective, or `embedding_weight` beside a sentence task),
/// computed once and cached under `<cache>/embeddings/`.
pub fn task_data(
    run: &RunConfig,
    split: &Split,
    tk: &TextTokenizer,
    pretrained: Option<&Pretrained>,
    ctx: &mut Context<'_>,
) -> Result<(TextData, HeadKind)> {
    let (mut data, head) = objective_data(run, split, tk)?;
    let cfg = settings(run)?;
    if cfg.objective == Objective::Classify && cfg.embedding_weight == 0.0 {
        return Ok((data, head));
    }
    let Some(pre) = pretrained else {
        bail!("the N = 1 embedding targets need model.text.pretrained");
    };
    let sentences = match &mut data {
        TextData::Sentences(s) | TextData::Embeddings(s) => s,
        TextData::Tokens(_) => bail!(
            "embedding_weight needs a sentence task; dataset `{}` split `{}` is token classification",
            split.dataset,
            split.split
        ),
    };
    let path = embeddings::cache_path(
        &ctx.env.cache_dir,
        pre,
        &split.dataset,
        &split.split,
        &sentences.ids,
    );
    let what = format!("{} embeddings at N = 1", split.split);
    sentences.targets = embeddings::targets(pre, &sentences.ids, tk.pad_id, &path, |pos, len| {
        ctx.tick(Stage::Prepare, pos, len, what.as_str())
    })?;
    Ok((data, head))
}

/// The task model of a run with loss weights `(α_task, α_ret)`.
pub fn text_task(
    run: &RunConfig,
    head: HeadKind,
    labels: &[String],
    tk: &TextTokenizer,
    weights: (f64, f64),
    map: &SeededVarMap,
    pretrained: Option<&Pretrained>,
) -> Result<TextTask> {
    Ok(TextTask::new(
        &settings(run)?,
        &run.mux_config(),
        head,
        labels,
        tk.vocab_size(),
        tk.pad_id,
        weights,
        map,
        &Device::Cpu,
        pretrained,
    )?)
}

impl Modality for Text {
    fn name(&self) -> &'static str {
        "text"
    }

    fn sections(&self) -> &'static [&'static str] {
        &["text"]
    }

    fn section(&self, name: &str, value: &toml::Value) -> Result<Box<RawValue>> {
        match name {
            "text" => section_json::<Config>(value),
            other => bail!("the text modality has no `model.{other}` settings"),
        }
    }

    fn backbones(&self) -> &'static [&'static str] {
        &BACKBONES
    }

    fn data_kinds(&self) -> &'static [Kind] {
        &[Kind::TextClassification, Kind::TokenClassification]
    }

    fn has_warmup(&self) -> bool {
        true
    }

    fn validate(&self, run: &RunConfig, catalogue: &Catalogue) -> Result<()> {
        arch(run)?;
        let text = settings(run)?;
        let n = run.model.n_instances;
        text.validate(n, run.model.demux.kind)
            .map_err(anyhow::Error::msg)?;
        if run.warmup.enabled && run.warmup.corpus != "task" {
            let corpus = catalogue.get(&run.warmup.corpus)?;
            ensure!(
                matches!(
                    corpus.kind,
                    Kind::TextCorpus | Kind::TextClassification | Kind::TokenClassification
                ),
                "warm-up corpus `{}` is {}, not text",
                corpus.name,
                corpus.kind.name()
            );
        }
        // A pretrained width is known once its config.json is read; the model checks it then.
        if text.pretrained.is_none() {
            run.model.mux.validate(n, text.encoder().hidden_size)?;
        }
        Ok(())
    }

    /// A pretrained backbone's sizes come from its `config.json` where the models folder or the
    /// hf-hub cache has it (never downloaded for this); else BERT-base's (12 x 768, FFN 3072,
    /// 12 heads, a 30 522-token vocabulary), erring on the large side.
    fn memory_shape(
        &self,
        run: &RunConfig,
        env: &datamux_pipeline::Env,
    ) -> Result<Option<datamux_pipeline::memory::Shape>> {
        let text = settings(run)?;
        let n = run.model.n_instances as u64;
        let (layers, d, ffn, heads, vocab) = if let Some(repo) = &text.pretrained {
            pretrained_sizes(repo, text.revision.as_deref(), env)
                .unwrap_or((12, 768, 3072, 12, 30_522))
        } else {
            let e = text.encoder();
            let (l, d, f, h) = (
                e.num_hidden_layers,
                e.hidden_size,
                e.intermediate_size,
                e.num_attention_heads,
            );
            (
                l as u64,
                d as u64,
                f as u64,
                h as u64,
                text.vocab_size as u64,
            )
        };
        let batch = if run.warmup.enabled {
            run.train.batch_size.max(run.warmup.batch_size)
        } else {
            run.train.batch_size
        } as u64;
        let prefix = if run.model.demux.kind == datamux_core::DemuxKind::Index {
            n + 1
        } else {
            0
        };
        let max_len = text.max_length as u64;
        Ok(Some(datamux_pipeline::memory::Shape {
            params: vocab * d
                + (max_len + prefix) * d
                + layers * (4 * d * d + 2 * d * ffn)
                + datamux_pipeline::memory::mux_demux_params(
                    n,
                    d,
                    run.model.mux.kind,
                    run.model.demux.kind,
                ),
            rows: batch.div_ceil(n),
            seq: max_len + prefix,
            width: d,
            ffn,
            heads,
            layers,
            // The retrieval head scores the vocabulary at every position.
            outputs: vocab,
        }))
    }

    /// `LxD` from scratch; the repository's name for a pretrained backbone.
    fn model_size(&self, run: &RunConfig) -> Result<String> {
        let text = settings(run)?;
        if let Some(repo) = &text.pretrained {
            return Ok(repo.rsplit('/').next().unwrap_or(repo).to_string());
        }
        let e = text.encoder();
        Ok(format!("{}x{}", e.num_hidden_layers, e.hidden_size))
    }

    fn is_sequence(&self, backbone: &str) -> Result<bool> {
        datamux_pipeline::parse_backbone("text", backbone, &BACKBONES, &[Arch::Transformer])?;
        Ok(true)
    }

    fn warmup_run(&self, run: &RunConfig) -> Result<RunConfig> {
        warmup_run(run)
    }

    fn warmups(&self, run: &RunConfig) -> Vec<String> {
        let mut names = warmup::names(run);
        names.extend(datamux_pipeline::teacher::names(run));
        names
    }

    fn distills(&self) -> bool {
        true
    }

    fn train(&self, run: &RunConfig, s: &Splits, ctx: &mut Context<'_>) -> Result<Vec<Record>> {
        ctx.tick(Stage::Prepare, 0, 1, "tokenizer");
        let pre = pretrained(run, ctx.env)?;
        let tk = tokenizer(run, &ctx.env.cache_dir, &s.train, pre.as_ref())?;
        let (train, head) = task_data(run, &s.train, &tk, pre.as_ref(), ctx)?;
        let (valid, _) = task_data(run, &s.valid, &tk, pre.as_ref(), ctx)?;
        let (test, _) = task_data(run, &s.test, &tk, pre.as_ref(), ctx)?;
        let labels = &s.train.label_names;
        let order = stages::eval_order(run, valid.len());
        let teacher = match &run.teacher {
            Some(t) => {
                ensure!(
                    head == HeadKind::Sentence,
                    "train.distill: a teacher (soft targets, init) is for sentence classification only"
                );
                Some(self.teacher(t, s, &tk, ctx)?)
            }
            None => None,
        };
        // An N = 1 run may be another run's teacher: held while it trains.
        let _lock = datamux_pipeline::teacher::own_lock(run, ctx)?;
        let mut rows = Vec::new();
        let map = SeededVarMap::new(run.seed);
        let weights = (run.train.task_weight, run.train.retrieval_weight);
        let task = text_task(run, head, labels, &tk, weights, &map, pre.as_ref())?;
        // Never after a warm-up (config validation refuses the two together).
        if let (true, Some((_, teacher_map))) = (run.train.distill.init, &teacher) {
            datamux_pipeline::teacher::start_from(&map, teacher_map)?;
        }
        if run.warmup.enabled {
            let shared = warmup::Shared {
                splits: s,
                tk: &tk,
                pretrained: pre.as_ref(),
                head: class_head(&s.train),
                labels,
                valid: &valid,
                order: order.as_deref(),
            };
            let (warm, warm_map, out) = warmup::warm_up(run, &shared, Stage::Warmup(None), ctx)?;
            rows.extend(warmup::records(
                &warm,
                run,
                [("validation", &valid), (s.test.split.as_str(), &test)],
                &out,
            )?);
            // The mean readout reads the same (prefix slot, position) pairs as retrieval, so its
            // demultiplexer starts from the retrieval one (method.md §12).
            let from_retrieval =
                head.is_sequence() && settings(run)?.sentence_readout == SentenceReadout::Mean;
            warmup::start_task_from(&map, &warm_map, from_retrieval)?;
        }
        let data = stages::Data {
            train: &train,
            valid: &valid,
            test: (s.test.split.as_str(), &test),
        };
        // Sentence and embedding models are servable: their folder carries a card and the
        // tokenizer (`datamux serve`); token models are not served.
        let output = match head {
            HeadKind::Sentence => Some(Output::Classify),
            HeadKind::Embedding => Some(Output::Embed),
            HeadKind::Token => None,
        };
        let mut extra = Vec::new();
        if let Some(output) = output {
            extra.push(Card::new(run, output, InputKind::Text, labels).file()?);
            extra.push((crate::serve::TOKENIZER, tk.to_json()?));
        }
        let soft = run.train.distill.soft();
        let teacher = teacher
            .as_ref()
            .filter(|_| run.train.distill.enabled())
            .map(|(t, _)| datamux_pipeline::train::Teacher { task: t, soft });
        rows.extend(stages::train_task_with(
            &task,
            teacher.as_ref(),
            &map,
            &task.net.buffers(),
            run,
            data,
            &extra,
            ctx,
        )?);
        Ok(rows)
    }

    fn speed(&self, run: &RunConfig, s: &Splits, ctx: &mut Context<'_>) -> Result<SpeedPoint> {
        let pre = pretrained(run, ctx.env)?;
        let tk = tokenizer(run, &ctx.env.cache_dir, &s.train, pre.as_ref())?;
        // Inference reads no targets, so none are computed for the speed points.
        let (data, head) = objective_data(run, &s.test, &tk)?;
        let map = SeededVarMap::new(run.seed);
        let labels = &s.test.label_names;
        let mut task = text_task(run, head, labels, &tk, (1.0, 0.0), &map, pre.as_ref())?;
        // The speed protocol pads every instance to the same length (method.md §9.2).
        let len = settings(run)?.max_length;
        task.fixed_len = Some(len);
        stages::time(&task, &data, run, len, ctx)
    }

    fn load_served(&self, dir: &Path, card: &Card) -> Result<Box<dyn Served>> {
        Ok(Box::new(crate::serve::ServedText::load(dir, card)?))
    }
}

#[cfg(test)]
mod tests {
    use datamux_data::Source;

    use super::*;

    /// A bad example is named by its file and the file's own row, not by its position after a
    /// holdout reordered the split.
    #[test]
    fn an_empty_text_names_the_file_row() {
        let texts: Vec<String> = ["a good one", "", "another good one"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let split = Split {
            dataset: "d".into(),
            split: "validation".into(),
            source: Source::Local {
                folder: "/m/d".into(),
            },
            files: vec!["/m/d/train.parquet".into()],
            label_names: vec!["no".into(), "yes".into()],
            // Held out of train: file rows 4, 1 and 9.
            rows: vec![(0, 4), (0, 1), (0, 9)],
            examples: Examples::Text {
                texts: texts.clone(),
                pairs: None,
                labels: vec![0, 1, 0],
            },
        };
        let tk = TextTokenizer::train(["a good one another"].into_iter(), 50, true, 8).unwrap();
        let err = text_data(&split, &tk).unwrap_err().to_string();
        assert_eq!(
            err,
            "dataset `d` split `validation`, /m/d/train.parquet row 1: empty text"
        );
    }
}
