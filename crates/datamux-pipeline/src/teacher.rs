//! What every modality's distillation (`train.distill`) shares: the lock an N = 1 run holds while
//! it trains (it may be a student's teacher), the names the scheduler keeps for it, and loading a
//! teacher's finished checkpoint.

use std::path::PathBuf;

use anyhow::Result;
use datamux_core::task::Soft;

use crate::checkpoint;
use crate::modality::{Context, Stage};
use crate::settings::{DistillConfig, RunConfig};

impl DistillConfig {
    /// The core's weight and temperature.
    pub fn soft(&self) -> Soft {
        Soft {
            weight: self.weight,
            temperature: self.temperature,
        }
    }
}

/// The lock an N = 1 run holds while it trains, so a student cannot train it at the same time;
/// `None` at N > 1.
pub fn own_lock(
    run: &RunConfig,
    ctx: &mut Context<'_>,
) -> Result<Option<datamux_data::lock::Lock>> {
    if run.model.n_instances != 1 {
        return Ok(None);
    }
    let dir = checkpoint::run_dir(ctx.env, run);
    Ok(Some(checkpoint::lock(&dir, || {
        ctx.tick(
            Stage::Train,
            0,
            1,
            "waiting for a student training this run",
        )
    })?))
}

/// The name a student adds to `Modality::warmups`: its teacher's run id (the scheduler keeps a
/// teacher's own id while it trains, sweep/queue.rs).
pub fn names(run: &RunConfig) -> Vec<String> {
    run.teacher.iter().map(|t| t.run_id()).collect()
}

/// The teacher `t`'s checkpoint folder, and whether it is finished (checked under its lock, so a
/// run training it is waited for).
pub fn finished(t: &RunConfig, ctx: &mut Context<'_>) -> Result<(PathBuf, bool)> {
    let dir = checkpoint::run_dir(ctx.env, t);
    let _lock = checkpoint::lock(&dir, || {
        ctx.tick(
            Stage::Train,
            0,
            1,
            "waiting for the N = 1 run, this run's teacher",
        )
    })?;
    let done = checkpoint::verify(&dir).is_ok();
    Ok((dir, done))
}
