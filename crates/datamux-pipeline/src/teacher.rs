//! What every modality's distillation (`train.distill`) shares: the lock an N = 1 run holds while
//! it trains (it may be a student's teacher), the names the scheduler keeps for it, and loading a
//! teacher's finished checkpoint.

use std::path::PathBuf;

use anyhow::Result;
use datamux_core::SeededVarMap;
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

/// The teacher `t`'s checkpoint folder and its lock, waited for while another run trains it.
pub fn lock(t: &RunConfig, ctx: &mut Context<'_>) -> Result<(PathBuf, datamux_data::lock::Lock)> {
    let dir = checkpoint::run_dir(ctx.env, t);
    let lock = checkpoint::lock(&dir, || {
        ctx.tick(
            Stage::Train,
            0,
            1,
            "waiting for the N = 1 run, this run's teacher",
        )
    })?;
    Ok((dir, lock))
}

/// The teacher `t`'s checkpoint folder, and whether it is finished (checked under its lock, so a
/// run training it is waited for).
pub fn finished(t: &RunConfig, ctx: &mut Context<'_>) -> Result<(PathBuf, bool)> {
    let (dir, _lock) = lock(t, ctx)?;
    let done = checkpoint::verify(&dir).is_ok();
    Ok((dir, done))
}

/// Start a student from its teacher (`train.distill.init`): every variable of `student` whose
/// name and shape are the teacher's takes the teacher's value; the others (per-slot keys and
/// demultiplexers, whose shapes depend on N) keep their fresh initialisation. Returns how many
/// were copied; none in common is an error, since then the two are not the same model.
pub fn start_from(student: &SeededVarMap, teacher: &SeededVarMap) -> Result<usize> {
    let saved = checkpoint::tensors(teacher)?;
    let mut copied = 0;
    for (name, var) in student.sorted_vars()? {
        if let Some(t) = saved.get(&name).filter(|t| t.shape() == var.shape()) {
            var.set(t)?;
            copied += 1;
        }
    }
    anyhow::ensure!(
        copied > 0,
        "train.distill.init: the student shares no parameter (name and shape) with its teacher"
    );
    Ok(copied)
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device};
    use candle_nn::Init;

    use super::*;

    fn map(seed: u64, slots: usize) -> SeededVarMap {
        let m = SeededVarMap::new(seed);
        let vb = m.var_builder(DType::F32, &Device::Cpu);
        let init = Init::Randn {
            mean: 0.,
            stdev: 1.,
        };
        vb.get_with_hints((3, 5), "trunk.w", init).unwrap();
        vb.get_with_hints((slots, 7), "mux.keys", init).unwrap();
        m
    }

    fn value(m: &SeededVarMap, name: &str) -> Vec<f32> {
        let vars = m.sorted_vars().unwrap();
        let (_, v) = vars.iter().find(|(n, _)| n == name).unwrap();
        v.as_tensor().flatten_all().unwrap().to_vec1().unwrap()
    }

    /// The shared variable takes the teacher's value; the per-slot one (another shape at
    /// N = 3) keeps the student's own; nothing in common is an error.
    #[test]
    fn a_student_starts_from_what_it_shares_with_its_teacher() {
        let (teacher, student) = (map(1, 1), map(2, 3));
        let own_keys = value(&student, "mux.keys");
        assert_ne!(value(&student, "trunk.w"), value(&teacher, "trunk.w"));
        assert_eq!(start_from(&student, &teacher).unwrap(), 1);
        assert_eq!(value(&student, "trunk.w"), value(&teacher, "trunk.w"));
        assert_eq!(value(&student, "mux.keys"), own_keys);

        let other = SeededVarMap::new(3);
        other
            .var_builder(DType::F32, &Device::Cpu)
            .get_with_hints((2, 2), "head.w", Init::Const(0.))
            .unwrap();
        let e = start_from(&other, &teacher).unwrap_err().to_string();
        assert!(e.contains("shares no parameter"), "{e}");
    }
}
