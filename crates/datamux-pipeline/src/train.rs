//! The one training loop, shared by every task: AdamW, linear warm-up then linear decay to zero,
//! gradient clipping by global norm, validation every `eval_every` steps, and the best
//! validation checkpoint kept and restored at the end.

use std::collections::HashMap;
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::{Tensor, Var};
use candle_nn::{Optimizer, ParamsAdamW};
use datamux_core::group::{BucketedStream, TrainStream};
use datamux_core::init::rng_for;
use datamux_core::optim::AdamW;
use datamux_core::task::Soft;
use datamux_core::{SeededVarMap, Task};
use rand::Rng;

use crate::eval::evaluate_at;

/// Settings of one training stage.
#[derive(Debug, Clone)]
pub struct Schedule {
    pub steps: usize,
    pub batch_size: usize,
    pub lr: f64,
    pub lr_warmup_steps: usize,
    pub weight_decay: f64,
    pub max_grad_norm: f64,
    pub eval_every: usize,
    pub eval_rows: usize,
    /// The validation metric that selects the checkpoint (`accuracy`, `f1`,
    /// `retrieval_accuracy`).
    pub metric: &'static str,
    pub seed: u64,
    /// A name for the random streams of this stage (`train`, `warmup`).
    pub stage: &'static str,
    /// The widths one model serves (`mux.serve_n`): each step draws its N from them and fills
    /// that many slots of every row, and the checkpoint is selected on the mean of the
    /// validation metric over them. Empty: every slot of every row, every step.
    pub serve_n: Vec<usize>,
}

impl Schedule {
    /// Linear warm-up to `lr`, then linear decay to 0 at `steps` (the reference's schedule has
    /// no warm-up, method.md §10).
    pub fn lr_at(&self, step: usize) -> f64 {
        if step < self.lr_warmup_steps {
            return self.lr * (step + 1) as f64 / self.lr_warmup_steps as f64;
        }
        let rest = (self.steps - self.lr_warmup_steps).max(1) as f64;
        self.lr * (1.0 - (step - self.lr_warmup_steps) as f64 / rest).max(0.0)
    }
}

/// What a training stage reports.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub steps: usize,
    pub best_step: usize,
    pub best_metric: f64,
    pub seconds: f64,
    pub last_loss: f64,
}

/// Progress of a stage, for the bars.
pub struct Progress<'a> {
    pub pos: usize,
    pub len: usize,
    pub msg: &'a str,
}

/// Scale the gradients of `vars` so that their global L2 norm is at most `max_norm`.
fn clip(grads: &mut candle_core::backprop::GradStore, vars: &[Var], max_norm: f64) -> Result<f64> {
    let mut sq = 0f64;
    for v in vars {
        if let Some(g) = grads.get(v.as_tensor()) {
            sq += f64::from(g.sqr()?.sum_all()?.to_scalar::<f32>()?);
        }
    }
    let norm = sq.sqrt();
    if norm > max_norm {
        let scale = max_norm / (norm + 1e-6);
        for v in vars {
            if let Some(g) = grads.remove(v.as_tensor()) {
                grads.insert(v.as_tensor(), (g * scale)?);
            }
        }
    }
    Ok(norm)
}

fn snapshot(vars: &[(String, Var)]) -> Result<HashMap<String, Tensor>> {
    vars.iter()
        .map(|(k, v)| Ok((k.clone(), v.as_tensor().copy()?)))
        .collect()
}

fn restore(vars: &[(String, Var)], saved: &HashMap<String, Tensor>) -> Result<()> {
    for (k, v) in vars {
        if let Some(t) = saved.get(k) {
            v.set(t)?;
        }
    }
    Ok(())
}

/// A finished model at N = 1 whose outputs are soft targets (`train.distill`): it answers
/// every instance of the student's batch on its own, one forward more per step.
pub struct Teacher<'a, T> {
    pub task: &'a T,
    pub soft: Soft,
}

/// Train `task` on `train`, select on `valid` (the examples `valid_order`, all when `None`).
pub fn train<T: Task>(
    task: &T,
    map: &SeededVarMap,
    train: &T::Data,
    valid: &T::Data,
    valid_order: Option<&[usize]>,
    s: &Schedule,
    progress: impl FnMut(Progress<'_>),
) -> Result<Outcome> {
    train_with(task, None, map, train, valid, valid_order, s, progress)
}

/// [`train`], distilling from `teacher` where there is one.
#[allow(clippy::too_many_arguments)]
pub fn train_with<T: Task>(
    task: &T,
    teacher: Option<&Teacher<'_, T>>,
    map: &SeededVarMap,
    train: &T::Data,
    valid: &T::Data,
    valid_order: Option<&[usize]>,
    s: &Schedule,
    mut progress: impl FnMut(Progress<'_>),
) -> Result<Outcome> {
    let named = map.sorted_vars()?;
    let vars: Vec<Var> = named.iter().map(|(_, v)| v.clone()).collect();
    let params = ParamsAdamW {
        lr: s.lr,
        weight_decay: s.weight_decay,
        ..ParamsAdamW::default()
    };
    let mut opt = AdamW::new(vars.clone(), params)?;
    let scales: HashMap<_, f64> = named
        .iter()
        .map(|(n, v)| (v.as_tensor().id(), task.lr_scale(n)))
        .collect();
    opt.scale_lr(|v| scales.get(&v.as_tensor().id()).copied().unwrap_or(1.0));
    let shuffle = TrainStream::new(
        task.len(train),
        rng_for(s.seed, &format!("{}.shuffle", s.stage)),
    );
    // Pools of 50 batches sorted by length: text steps pad to the longest in a batch.
    let mut stream = BucketedStream::new(
        shuffle,
        50,
        rng_for(s.seed, &format!("{}.buckets", s.stage)),
    );
    let mut rng = rng_for(s.seed, &format!("{}.batch", s.stage));
    let mut widths = rng_for(s.seed, &format!("{}.serve_n", s.stage));
    // The teacher's own stream, so a distilled run draws the student's batches as without it.
    let mut teacher_rng = rng_for(s.seed, &format!("{}.teacher", s.stage));
    let slots_per_row = task.n_instances();
    datamux_core::layers::seed_dropout(s.seed, &format!("{}.dropout", s.stage));
    let start = Instant::now();
    let mut best: Option<(f64, usize, HashMap<String, Tensor>)> = None;
    let mut last_loss = f64::NAN;
    let mut smooth = None::<f64>;
    for step in 0..s.steps {
        opt.set_learning_rate(s.lr_at(step));
        let slots = if s.serve_n.is_empty() {
            stream.next_batch(s.batch_size, |i| task.example_len(train, i))
        } else {
            // The same rows per step at every width, `n` of each row's slots real.
            let n = s.serve_n[widths.random_range(0..s.serve_n.len())];
            let rows = s.batch_size / slots_per_row;
            let real = stream.next_batch(rows * n, |i| task.example_len(train, i));
            datamux_core::group::Groups::partial(&real, slots_per_row, n).slots
        };
        let batch = task.batch(train, &slots, &mut rng)?;
        let losses = match teacher {
            // The teacher at N = 1 takes the same slot list: one row per slot, in the order
            // of the student's logits (a dummy slot is a dummy row, left out of both terms).
            Some(t) => {
                let logits = t
                    .task
                    .predict(&t.task.batch(train, &slots, &mut teacher_rng)?)?;
                task.loss_distilled(&batch, &logits, t.soft, true)?
            }
            None => task.loss(&batch, true)?,
        };
        let loss = f64::from(losses.total.to_scalar::<f32>()?);
        anyhow::ensure!(
            loss.is_finite(),
            "the loss became {loss} at step {step} (lr {:.2e})",
            s.lr_at(step)
        );
        let mut grads = losses.total.backward()?;
        clip(&mut grads, &vars, s.max_grad_norm)?;
        opt.step(&grads)?;
        last_loss = loss;
        let avg = smooth.map_or(loss, |m| 0.95 * m + 0.05 * loss);
        smooth = Some(avg);
        let done = step + 1;
        if done % 10 == 0 || done == s.steps {
            progress(Progress {
                pos: done,
                len: s.steps,
                msg: &format!("loss {avg:.4}"),
            });
        }
        if done % s.eval_every == 0 || done == s.steps {
            let metric = validation_metric(task, valid, valid_order, s)?;
            tracing::info!(
                step = done,
                loss = avg,
                metric = s.metric,
                value = metric,
                "validation"
            );
            progress(Progress {
                pos: done,
                len: s.steps,
                msg: &format!("loss {avg:.4} val {} {metric:.4}", s.metric),
            });
            // Ties keep the earlier checkpoint.
            if best.as_ref().is_none_or(|(b, _, _)| metric > *b) {
                best = Some((metric, done, snapshot(&named)?));
            }
        }
    }
    let (best_metric, best_step, weights) = best.context("no validation was run")?;
    restore(&named, &weights)?;
    Ok(Outcome {
        steps: s.steps,
        best_step,
        best_metric,
        seconds: start.elapsed().as_secs_f64(),
        last_loss,
    })
}

/// The selection metric on `valid`: at every slot, or the mean over the served widths.
fn validation_metric<T: Task>(
    task: &T,
    valid: &T::Data,
    order: Option<&[usize]>,
    s: &Schedule,
) -> Result<f64> {
    let widths = if s.serve_n.is_empty() {
        vec![task.n_instances()]
    } else {
        s.serve_n.clone()
    };
    let mut sum = 0.0;
    for n in &widths {
        let score = evaluate_at(task, valid, order, s.eval_rows, s.seed, *n, |_, _| {})?;
        sum += score
            .metric(s.metric)
            .with_context(|| format!("validation gave no `{}`", s.metric))?;
    }
    Ok(sum / widths.len() as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_warms_up_then_decays_to_zero() {
        let s = Schedule {
            steps: 10,
            batch_size: 1,
            lr: 1.0,
            lr_warmup_steps: 2,
            weight_decay: 0.0,
            max_grad_norm: 1.0,
            eval_every: 5,
            eval_rows: 1,
            metric: "accuracy",
            seed: 0,
            stage: "train",
            serve_n: Vec::new(),
        };
        assert_eq!(s.lr_at(0), 0.5);
        assert_eq!(s.lr_at(1), 1.0);
        assert_eq!(s.lr_at(2), 1.0);
        assert!((s.lr_at(6) - 0.5).abs() < 1e-12);
        assert!(s.lr_at(9) > 0.0 && s.lr_at(9) < 0.2);
    }
}
