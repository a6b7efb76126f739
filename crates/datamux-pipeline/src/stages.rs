//! The pieces every modality's `train` and `speed` are made of: the schedules of `[train]` and
//! `[warmup]`, a training stage with progress, scoring the selected checkpoint into records,
//! and timing with progress.

use std::collections::HashMap;

use anyhow::Result;
use candle_core::Tensor;
use datamux_core::task::Score;
use datamux_core::{SeededVarMap, Task};

use crate::checkpoint;
use crate::eval::evaluate_at;
use crate::modality::{Context, Record, SpeedPoint, Stage};
use crate::settings::RunConfig;
use crate::speed;
use crate::train::{self, Outcome, Schedule, Teacher};

/// The task stage's schedule, from `[train]`, selecting on `metric`.
pub fn schedule(run: &RunConfig, metric: &'static str) -> Schedule {
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
        serve_n: run.model.mux.serve_n.clone(),
    }
}

/// The warm-up stage's schedule: `[warmup]`'s steps, batch and learning rate, the rest as
/// `[train]`.
pub fn warmup_schedule(run: &RunConfig, metric: &'static str) -> Schedule {
    let w = &run.warmup;
    Schedule {
        steps: w.steps,
        batch_size: w.batch_size,
        lr: w.lr,
        lr_warmup_steps: w.lr_warmup_steps,
        stage: "warmup",
        ..schedule(run, metric)
    }
}

/// Validation examples scored during training (`data.eval_limit`); the final figures use them
/// all.
pub fn eval_order(run: &RunConfig, len: usize) -> Option<Vec<usize>> {
    let limit = run.data.eval_limit;
    (limit > 0 && limit < len).then(|| (0..limit).collect())
}

/// One training stage, reporting progress as `stage`.
pub fn fit<T: Task>(
    task: &T,
    map: &SeededVarMap,
    train: &T::Data,
    valid: &T::Data,
    order: Option<&[usize]>,
    sched: &Schedule,
    stage: Stage,
    ctx: &mut Context<'_>,
) -> Result<Outcome> {
    train::train(task, map, train, valid, order, sched, |p| {
        ctx.tick(stage.clone(), p.pos, p.len, p.msg)
    })
}

/// A record for every metric of `score` (`prefix` + name: `warmup_retrieval_accuracy`).
pub fn records(split: &str, score: &Score, out: &Outcome, prefix: &str) -> Vec<Record> {
    score
        .metrics()
        .into_iter()
        .map(|(metric, value)| Record {
            split: split.to_string(),
            metric: format!("{prefix}{metric}"),
            value,
            n_examples: score.examples,
            steps: out.steps,
            best_step: out.best_step,
            train_seconds: out.seconds,
            n_instances: None,
        })
        .collect()
}

/// Score the selected checkpoint on every example of each split; a model of several widths
/// (`mux.serve_n`) at each of them, its records marked with the width.
pub fn final_records<T: Task>(
    task: &T,
    run: &RunConfig,
    splits: [(&str, &T::Data); 2],
    out: &Outcome,
    ctx: &mut Context<'_>,
) -> Result<Vec<Record>> {
    let several = !run.model.mux.serve_n.is_empty();
    let mut rows = Vec::new();
    for n in run.model.mux.served(run.model.n_instances) {
        for (name, data) in splits {
            let stage = Stage::Eval(if several {
                format!("{name} n{n}")
            } else {
                name.to_string()
            });
            let score = evaluate_at(
                task,
                data,
                None,
                run.train.eval_rows,
                run.seed,
                n,
                |pos, len| ctx.tick(stage.clone(), pos, len, ""),
            )?;
            rows.extend(records(name, &score, out, "").into_iter().map(|r| Record {
                n_instances: several.then_some(n),
                ..r
            }));
        }
    }
    Ok(rows)
}

/// A task's data: train, validation, and the reported split with its name (`test`, or
/// `validation` for a dataset without a test split).
pub struct Data<'a, D> {
    pub train: &'a D,
    pub valid: &'a D,
    pub test: (&'a str, &'a D),
}

/// The task stage of a run: train on `[train]`, selecting on the task's own metric, save the
/// selected checkpoint (with `buffers`, the model's fixed tensors) under `runs/`, and score it on
/// every example of validation and the reported split. A modality without a warm-up trains
/// with this alone; one with a warm-up calls it after starting the task from it. `extra`
/// files (name, text) are saved in the checkpoint folder: a servable model's card and
/// tokenizer (`serve`).
pub fn train_task<T: Task>(
    task: &T,
    map: &SeededVarMap,
    buffers: &HashMap<String, Tensor>,
    run: &RunConfig,
    data: Data<'_, T::Data>,
    extra: &[(&str, String)],
    ctx: &mut Context<'_>,
) -> Result<Vec<Record>> {
    train_task_with(task, None, map, buffers, run, data, extra, ctx)
}

/// [`train_task`], distilling from `teacher` where there is one (`train.distill`).
#[allow(clippy::too_many_arguments)]
pub fn train_task_with<T: Task>(
    task: &T,
    teacher: Option<&Teacher<'_, T>>,
    map: &SeededVarMap,
    buffers: &HashMap<String, Tensor>,
    run: &RunConfig,
    data: Data<'_, T::Data>,
    extra: &[(&str, String)],
    ctx: &mut Context<'_>,
) -> Result<Vec<Record>> {
    let order = eval_order(run, task.len(data.valid));
    let sched = schedule(run, task.selection_metric());
    let out = train::train_with(
        task,
        teacher,
        map,
        data.train,
        data.valid,
        order.as_deref(),
        &sched,
        |p| ctx.tick(Stage::Train, p.pos, p.len, p.msg),
    )?;
    checkpoint::save(&checkpoint::run_dir(ctx.env, run), map, buffers, run, extra)?;
    final_records(
        task,
        run,
        [("validation", data.valid), data.test],
        &out,
        ctx,
    )
}

/// Time inference of `task` over `data` under `[speed]`; `seq_len` positions per instance.
pub fn time<T: Task>(
    task: &T,
    data: &T::Data,
    run: &RunConfig,
    seq_len: usize,
    ctx: &mut Context<'_>,
) -> Result<SpeedPoint> {
    let timing = speed::time_inference(task, data, &run.speed, |pos, len| {
        ctx.tick(Stage::Speed, pos, len, "")
    })?;
    anyhow::ensure!(
        !timing.latencies_ms.is_empty(),
        "no timed iteration completed"
    );
    Ok(SpeedPoint { seq_len, timing })
}
