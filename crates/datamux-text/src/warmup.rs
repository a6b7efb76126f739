//! The DataMUX retrieval warm-up of a text run (method.md §5): the model trained with loss
//! weights (0, 1) to recover every instance's tokens from the mix, then its weights copied into
//! the task model. A warm-up is named by its settings and kept under `runs/warmup/`, so every
//! run that shares one trains it once; `warmup.from_n` starts it from the finished warm-up at a
//! smaller N (a curriculum over N), trained first when missing.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result, ensure};
use candle_core::Var;
use datamux_core::{Score, SeededVarMap};
use datamux_data::Splits;
use datamux_pipeline::train::Outcome;
use datamux_pipeline::{Context, Record, RunConfig, Stage, checkpoint, stages};

use crate::pipeline::{text_lines, text_task, warmup_run};
use crate::pretrained::Pretrained;
use crate::task::{HeadKind, SentenceData, TextData, TextTask};
use crate::tokenizer::TextTokenizer;

/// What every warm-up of one text run shares (the curriculum's smaller warm-ups included).
pub struct Shared<'a> {
    pub splits: &'a Splits,
    pub tk: &'a TextTokenizer,
    /// The checkpoint every warm-up starts from, for a pretrained backbone.
    pub pretrained: Option<&'a Pretrained>,
    /// The dataset's classification head (`pipeline::class_head`), whatever the objective, so
    /// that runs of one dataset share a warm-up checkpoint.
    pub head: HeadKind,
    pub labels: &'a [String],
    pub valid: &'a TextData,
    pub order: Option<&'a [usize]>,
}

/// The settings a warm-up depends on, its source and tokenizer aside (serde_json's maps are
/// sorted, so the order of insertion does not change the hash).
fn key(run: &RunConfig) -> Result<serde_json::Value> {
    let warm = warmup_run(run)?;
    let text: crate::Config = warm.model.sections.get("text")?;
    Ok(serde_json::json!({
        "dataset": run.data.dataset, "corpus": run.warmup.corpus,
        "text": text, "mux": warm.model.mux, "demux": warm.model.demux,
        "n": run.model.n_instances, "warmup": run.warmup, "seed": run.seed,
        "eval_rows": run.train.eval_rows,
    }))
}

/// The retrieval warm-ups a run trains or loads before fine-tuning: its own, then the one it
/// starts from (`warmup.from_n`), recursively. Two runs that share a warm-up share a name.
pub fn names(run: &RunConfig) -> Vec<String> {
    let mut out = Vec::new();
    let mut next = run.warmup.enabled.then_some(run);
    while let Some(r) = next {
        match key(r) {
            Ok(k) => out.push(k.to_string()),
            Err(_) => break,
        }
        next = r.warmup_source.as_deref();
    }
    out
}

/// The warm-up checkpoint directory: one per (data, tokenizer, warm-up model, N, mux, demux,
/// warm-up settings, seed), reused by every run that shares them. The model settings are the
/// warm-up model's ([`warmup_run`]), so a fine-tuning dropout does not retrain it.
pub fn dir(run: &RunConfig, runs_dir: &std::path::Path, vocab: usize) -> Result<PathBuf> {
    let mut key = key(run)?;
    key["vocab"] = vocab.into();
    // Only when set, so the keys of warm-ups without a source stay as they were.
    if let Some(source) = &run.warmup_source {
        let from = dir(source, runs_dir, vocab)?;
        key["source"] = from.file_name().map(|f| f.to_string_lossy()).into();
    }
    let hash = datamux_core::init::name_seed(0, &key.to_string());
    Ok(runs_dir.join("warmup").join(format!(
        "n{}-{}-{hash:016x}",
        run.model.n_instances,
        run.model.mux.kind.name()
    )))
}

/// The warm-up corpus as unlabelled sentences.
fn corpus(run: &RunConfig, s: &Splits, tk: &TextTokenizer, ctx: &Context<'_>) -> Result<TextData> {
    let lines = if run.warmup.corpus == "task" {
        text_lines(&s.train)
    } else {
        let corpus = ctx.load(&run.warmup.corpus, "train")?;
        // Only as many lines as the warm-up can visit.
        let mut lines = text_lines(&corpus);
        lines.truncate(run.warmup.steps * run.warmup.batch_size);
        lines
    };
    Ok(TextData::Sentences(SentenceData::corpus(tk, &lines)?))
}

/// The retrieval warm-up of `run`: loaded from its checkpoint directory when finished, trained
/// otherwise (first the warm-up it starts from, `warmup.from_n`, recursively).
pub fn warm_up(
    run: &RunConfig,
    shared: &Shared<'_>,
    stage: Stage,
    ctx: &mut Context<'_>,
) -> Result<(TextTask, SeededVarMap, Outcome)> {
    let dir = dir(run, &ctx.env.runs_dir, shared.tk.vocab_size())?;
    let _lock = checkpoint::lock(&dir, || {
        ctx.tick(
            stage.clone(),
            0,
            1,
            "waiting for another process training this warm-up",
        );
    })?;
    let warm_map = SeededVarMap::new(run.seed);
    let warm = text_task(
        &warmup_run(run)?,
        shared.head,
        shared.labels,
        shared.tk,
        (0.0, 1.0),
        &warm_map,
        shared.pretrained,
    )?;
    if dir.exists() {
        match reuse(&dir, &warm, &warm_map) {
            Ok(out) => {
                ctx.tick(stage.clone(), 1, 1, "reusing checkpoint");
                return Ok((warm, warm_map, out));
            }
            // A folder that a kill or a full disk broke (before checkpoints were written
            // whole, or by hand): trained again, not an error for every later run.
            Err(e) => {
                ctx.tick(
                    stage.clone(),
                    0,
                    1,
                    format!("retraining a broken checkpoint: {e:#}"),
                );
                std::fs::remove_dir_all(&dir)
                    .with_context(|| format!("cannot remove {}", dir.display()))?;
            }
        }
    }
    if let Some(source) = &run.warmup_source {
        // Locks are taken from larger N to smaller, so two workers cannot wait on each other.
        let stage = Stage::Warmup(Some(source.model.n_instances));
        let (_, source_map, _) = warm_up(source, shared, stage, ctx)?;
        checkpoint::grow_from(&warm_map.sorted_vars()?, &checkpoint::tensors(&source_map)?)?;
    }
    let data = corpus(run, shared.splits, shared.tk, ctx)?;
    let sched = stages::warmup_schedule(run, "retrieval_accuracy");
    let out = stages::fit(
        &warm,
        &warm_map,
        &data,
        shared.valid,
        shared.order,
        &sched,
        stage,
        ctx,
    )?;
    let meta =
        serde_json::json!({"steps": out.steps, "best_step": out.best_step, "seconds": out.seconds});
    checkpoint::save(
        &dir,
        &warm_map,
        &warm.net.buffers(),
        run,
        &[("outcome.json", meta.to_string())],
    )?;
    Ok((warm, warm_map, out))
}

/// A finished warm-up from its folder: the weights into `map`, the buffers checked, the
/// outcome read; any failure says the folder is broken.
fn reuse(dir: &Path, warm: &TextTask, map: &SeededVarMap) -> Result<Outcome> {
    let saved = checkpoint::load(dir, map)?;
    warm.net.check_buffers(&saved)?;
    let path = dir.join("outcome.json");
    let meta: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {}", path.display()))?,
    )
    .with_context(|| format!("{} is not JSON", path.display()))?;
    let get = |k: &str| {
        meta.get(k)
            .and_then(serde_json::Value::as_f64)
            .unwrap_or(f64::NAN)
    };
    Ok(Outcome {
        steps: get("steps") as usize,
        best_step: get("best_step") as usize,
        best_metric: f64::NAN,
        seconds: get("seconds"),
        last_loss: f64::NAN,
    })
}

/// The warm-up's retrieval accuracy on every example of each split, as `warmup_*` records.
pub fn records(
    warm: &TextTask,
    run: &RunConfig,
    splits: [(&str, &TextData); 2],
    out: &Outcome,
) -> Result<Vec<Record>> {
    let mut rows = Vec::new();
    for (name, data) in splits {
        let score = datamux_pipeline::eval::evaluate(
            warm,
            data,
            None,
            run.train.eval_rows,
            run.seed,
            |_, _| {},
        )?;
        let only_retrieval = Score {
            retrieval_correct: score.retrieval_correct,
            retrieval_total: score.retrieval_total,
            examples: score.examples,
            ..Score::default()
        };
        rows.extend(stages::records(name, &only_retrieval, out, "warmup_"));
    }
    Ok(rows)
}

/// Fine-tuning starts from the warm-up: everything but the task heads, which are fresh (the
/// warm-up's head was never trained; method.md §12). With `from_retrieval` (the mean sentence
/// readout) the task's demultiplexer starts from the retrieval one, which learned to address
/// each instance at every position (the task's own was never trained either); the prefix table
/// is shared already.
pub fn start_task_from(
    map: &SeededVarMap,
    warm_map: &SeededVarMap,
    from_retrieval: bool,
) -> Result<()> {
    // Heads differ between the two (a distillation head exists only in the task), and stay
    // fresh anyway.
    let body = |vars: Vec<(String, Var)>| -> Vec<(String, Var)> {
        vars.into_iter()
            .filter(|(n, _)| !n.starts_with("head."))
            .collect()
    };
    let warm_vars = body(warm_map.sorted_vars()?);
    let fresh = body(map.sorted_vars()?);
    let warm_by_name: HashMap<&str, &Var> =
        warm_vars.iter().map(|(n, v)| (n.as_str(), v)).collect();
    ensure!(
        fresh.len() == warm_vars.len(),
        "warm-up and task have {} and {} variables",
        warm_vars.len(),
        fresh.len()
    );
    for ((name, var), (wname, wvar)) in fresh.iter().zip(&warm_vars) {
        ensure!(
            name == wname,
            "warm-up and task variables differ: {name} vs {wname}"
        );
        let retrieval = from_retrieval
            .then(|| warm_by_name.get(format!("retrieval.{name}").as_str()))
            .flatten()
            .copied()
            .filter(|r| r.shape() == wvar.shape());
        var.set(retrieval.unwrap_or(wvar).as_tensor())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use datamux_pipeline::Modality;

    use super::*;
    use crate::pipeline::Text;

    /// A resolved text run from `[model.text]` and `[warmup]` tables, as the runner builds it.
    fn run(text: toml::Value, warmup: &str, demux_dropout: f64) -> RunConfig {
        let mut r = RunConfig {
            experiment: "t".into(),
            modality: "text".into(),
            seed: 0,
            data: Default::default(),
            model: Default::default(),
            train: Default::default(),
            warmup: toml::from_str(warmup).unwrap_or_else(|e| panic!("{e}")),
            speed: Default::default(),
            warmup_source: None,
            teacher: None,
        };
        r.data.dataset = "rt-snippets".into();
        r.model.backbone = "transformer".into();
        r.model.demux.dropout = demux_dropout;
        let raw = Text
            .section("text", &text)
            .unwrap_or_else(|e| panic!("{e}"));
        r.model.sections = serde_json::from_str::<datamux_pipeline::ModelConfig>(&format!(
            r#"{{"text":{}}}"#,
            raw.get()
        ))
        .unwrap_or_else(|e| panic!("{e}"))
        .sections;
        r
    }

    #[test]
    fn the_warm_up_checkpoint_depends_on_the_warm_up_model_only() {
        let t = |s: &str| toml::from_str::<toml::Value>(s).unwrap_or_else(|e| panic!("{e}"));
        let runs = std::path::Path::new("runs");
        let d = |r: RunConfig| dir(&r, runs, 40).unwrap_or_else(|e| panic!("{e}"));
        let plain = t("");
        let no_drop = "dropout = 0.0";
        // With the warm-up's own dropout, the fine-tuning dropout does not retrain it ...
        assert_eq!(
            d(run(plain.clone(), no_drop, 0.1)),
            d(run(t("embedding_dropout = 0.3"), no_drop, 0.3))
        );
        // ... without it, the model's dropout is the warm-up's too.
        assert_ne!(
            d(run(plain.clone(), "", 0.1)),
            d(run(t("embedding_dropout = 0.3"), "", 0.1))
        );
        assert_ne!(
            d(run(plain.clone(), "", 0.1)),
            d(run(plain.clone(), no_drop, 0.1))
        );
        assert_ne!(
            d(run(plain.clone(), no_drop, 0.1)),
            d(run(plain.clone(), "dropout = 0.0\nlr = 0.01", 0.1))
        );
        // The warm-up trains no task head, so the sentence readout does not retrain it either.
        assert_eq!(
            d(run(plain.clone(), "", 0.1)),
            d(run(t("sentence_readout = \"mean\""), "", 0.1))
        );
        // A run that skips the warm-up has none to wait for.
        let mut b1 = run(plain, "", 0.1);
        assert_eq!(names(&b1).len(), 1);
        b1.warmup.enabled = false;
        assert!(names(&b1).is_empty());
    }
}
