//! AdamW with candle-nn's arithmetic, updating f32 CPU parameters in place in one pass.
//!
//! Why: candle-nn's `AdamW` runs ten tensor ops per parameter per step, each a full pass that
//! allocates a new tensor. On the two `30 522 x 256` tables of the text model (the token
//! embeddings and the retrieval projection, 15.6 M values) that is most of a training step at
//! high N (docs/performance.md). Here one parallel pass reads the gradient and updates the
//! parameter and both moments where they lie, with the same operations in the same order as
//! candle-nn 0.11.1 (`optim.rs`), so the two agree to float tolerance (a test checks it).
//! Parameters that are not f32 on the CPU go to candle-nn's `AdamW` unchanged.

use std::sync::Mutex;

use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, InplaceOp2, Layout, Result, Var};
use candle_nn::{Optimizer, ParamsAdamW};
use rayon::prelude::*;

use crate::fused;

/// One parameter with its first and second moments.
struct Slot {
    var: Var,
    m: Vec<f32>,
    v: Vec<f32>,
    /// This parameter's learning rate over the optimizer's (`scale_lr`).
    lr_scale: f64,
}

/// Drop-in for `candle_nn::AdamW` (same `ParamsAdamW`, same update).
pub struct AdamW {
    params: ParamsAdamW,
    step_t: usize,
    slots: Vec<Slot>,
    /// The parameters the in-place pass cannot take (not f32 on the CPU).
    rest: Option<candle_nn::AdamW>,
}

impl AdamW {
    /// Give each parameter its own learning rate, `scale(var)` times the optimizer's (a fresh
    /// head beside a pretrained encoder learns faster than the encoder may change). Parameters
    /// on candle-nn's path (not f32 on the CPU) keep the optimizer's rate.
    pub fn scale_lr(&mut self, scale: impl Fn(&Var) -> f64) {
        for slot in &mut self.slots {
            slot.lr_scale = scale(&slot.var);
        }
    }
}

impl Optimizer for AdamW {
    type Config = ParamsAdamW;

    fn new(vars: Vec<Var>, params: ParamsAdamW) -> Result<Self> {
        let (fast, rest): (Vec<Var>, Vec<Var>) = vars
            .into_iter()
            .filter(|v| v.dtype().is_float())
            .partition(|v| fused::supported(v.as_tensor()) && v.is_contiguous());
        let slots = fast
            .into_iter()
            .map(|var| {
                let n = var.elem_count();
                Slot {
                    var,
                    m: vec![0.0; n],
                    v: vec![0.0; n],
                    lr_scale: 1.0,
                }
            })
            .collect();
        let rest = if rest.is_empty() {
            None
        } else {
            Some(candle_nn::AdamW::new(rest, params.clone())?)
        };
        Ok(Self {
            params,
            step_t: 0,
            slots,
            rest,
        })
    }

    fn learning_rate(&self) -> f64 {
        self.params.lr
    }

    fn set_learning_rate(&mut self, lr: f64) {
        self.params.lr = lr;
        if let Some(rest) = &mut self.rest {
            rest.set_learning_rate(lr);
        }
    }

    fn step(&mut self, grads: &GradStore) -> Result<()> {
        self.step_t += 1;
        let p = &self.params;
        let t = self.step_t as i32;
        // The scalars as candle-nn computes them (f64), applied in f32 as its affine ops do.
        let k = Consts {
            beta1: p.beta1 as f32,
            one_minus_beta1: (1.0 - p.beta1) as f32,
            beta2: p.beta2 as f32,
            one_minus_beta2: (1.0 - p.beta2) as f32,
            scale_m: (1.0 / (1.0 - p.beta1.powi(t))) as f32,
            scale_v: (1.0 / (1.0 - p.beta2.powi(t))) as f32,
            decay: (1.0 - p.lr * p.weight_decay) as f32,
            eps: p.eps as f32,
            lr: p.lr as f32,
        };
        for slot in &mut self.slots {
            let Some(g) = grads.get(slot.var.as_tensor()) else {
                continue;
            };
            let mut k = k;
            if slot.lr_scale != 1.0 {
                let lr = p.lr * slot.lr_scale;
                k.lr = lr as f32;
                k.decay = (1.0 - lr * p.weight_decay) as f32;
            }
            let update = Update {
                k,
                moments: Mutex::new((&mut slot.m, &mut slot.v)),
            };
            slot.var
                .as_tensor()
                .inplace_op2(&g.contiguous()?, &update)?;
        }
        if let Some(rest) = &mut self.rest {
            rest.step(grads)?;
        }
        Ok(())
    }
}

#[derive(Clone, Copy)]
struct Consts {
    beta1: f32,
    one_minus_beta1: f32,
    beta2: f32,
    one_minus_beta2: f32,
    scale_m: f32,
    scale_v: f32,
    decay: f32,
    eps: f32,
    lr: f32,
}

/// One parameter's update; the moments are borrowed for the call (`InplaceOp2` takes `&self`).
struct Update<'a> {
    k: Consts,
    moments: Mutex<(&'a mut Vec<f32>, &'a mut Vec<f32>)>,
}

/// Elements per parallel task: ~256 KiB of each of the four arrays.
const CHUNK: usize = 1 << 16;

impl InplaceOp2 for Update<'_> {
    fn name(&self) -> &'static str {
        "fused-adamw"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<()> {
        let (CpuStorage::F32(theta), CpuStorage::F32(grad)) = (s1, s2) else {
            candle_core::bail!("fused-adamw: f32 parameters and gradients only");
        };
        let (Some((a, b)), Some((c, d))) = (l1.contiguous_offsets(), l2.contiguous_offsets())
        else {
            candle_core::bail!("fused-adamw: contiguous parameters and gradients only");
        };
        let (theta, grad) = (&mut theta[a..b], &grad[c..d]);
        let mut moments = self
            .moments
            .lock()
            .map_err(|_| candle_core::Error::Msg("fused-adamw: poisoned moments".into()))?;
        let (m, v) = &mut *moments;
        if grad.len() != theta.len() || m.len() != theta.len() || v.len() != theta.len() {
            candle_core::bail!(
                "fused-adamw: a gradient of {} for {}",
                grad.len(),
                theta.len()
            );
        }
        let k = self.k;
        theta
            .par_chunks_mut(CHUNK)
            .zip(grad.par_chunks(CHUNK))
            .zip(m.par_chunks_mut(CHUNK).zip(v.par_chunks_mut(CHUNK)))
            .for_each(|((th, g), (m, v))| {
                fused::vectorized(|| {
                    for (((th, &g), m), v) in th.iter_mut().zip(g).zip(m).zip(v) {
                        // candle-nn's order: next_m, next_v, the bias corrections, the decayed
                        // parameter minus lr times the adjusted gradient.
                        *m = *m * k.beta1 + g * k.one_minus_beta1;
                        *v = *v * k.beta2 + g * g * k.one_minus_beta2;
                        let (m_hat, v_hat) = (*m * k.scale_m, *v * k.scale_v);
                        *th = *th * k.decay - m_hat / (v_hat.sqrt() + k.eps) * k.lr;
                    }
                })
            });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Tensor};

    /// Three steps of both optimizers from the same start, with weight decay and a changing
    /// learning rate, give the same parameters; a parameter without a gradient is left alone.
    /// A parameter at lr scale 2 moves exactly twice as far in its first step as its twin at 1
    /// (weight decay included: both terms carry the rate).
    #[test]
    fn lr_scale_multiplies_one_parameters_rate() -> Result<()> {
        let dev = Device::Cpu;
        let init = Tensor::randn(0f32, 1., (7, 3), &dev)?;
        let params = ParamsAdamW {
            lr: 0.01,
            weight_decay: 0.1,
            ..ParamsAdamW::default()
        };
        let (a, b) = (Var::from_tensor(&init)?, Var::from_tensor(&init)?);
        let mut opt = AdamW::new(vec![a.clone(), b.clone()], params)?;
        let fast = b.as_tensor().id();
        opt.scale_lr(|v| if v.as_tensor().id() == fast { 2.0 } else { 1.0 });
        let loss = ((a.as_tensor().sqr()?.sum_all()? + b.as_tensor().sqr()?.sum_all()?)? * 3.0)?;
        opt.backward_step(&loss)?;
        let da = (a.as_tensor() - &init)?;
        let db = (b.as_tensor() - &init)?;
        let diff = ((da * 2.0)? - db)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-6, "scale 2 moved {diff} off twice the step");
        Ok(())
    }

    #[test]
    fn matches_candle_adamw() -> Result<()> {
        let dev = Device::Cpu;
        let init = Tensor::randn(0f32, 1., (37, 5), &dev)?;
        let target = Tensor::randn(0f32, 1., (37, 5), &dev)?;
        let params = ParamsAdamW {
            lr: 0.05,
            weight_decay: 0.1,
            ..ParamsAdamW::default()
        };
        let (a, b, idle) = (
            Var::from_tensor(&init)?,
            Var::from_tensor(&init)?,
            Var::from_tensor(&init)?,
        );
        let mut ours = AdamW::new(vec![a.clone(), idle.clone()], params.clone())?;
        let mut theirs = candle_nn::AdamW::new(vec![b.clone()], params)?;
        for step in 0..3 {
            let lr = 0.05 / (step + 1) as f64;
            ours.set_learning_rate(lr);
            theirs.set_learning_rate(lr);
            ours.backward_step(&(a.as_tensor() - &target)?.sqr()?.sum_all()?)?;
            theirs.backward_step(&(b.as_tensor() - &target)?.sqr()?.sum_all()?)?;
        }
        let diff = (a.as_tensor() - b.as_tensor())?
            .abs()?
            .flatten_all()?
            .max(0)?;
        assert!(diff.to_scalar::<f32>()? < 1e-6);
        let moved = (a.as_tensor() - &init)?.abs()?.flatten_all()?.max(0)?;
        assert!(moved.to_scalar::<f32>()? > 0.01, "the parameters moved");
        let still = (idle.as_tensor() - &init)?.abs()?.flatten_all()?.max(0)?;
        assert_eq!(still.to_scalar::<f32>()?, 0.0);
        // f64 parameters take candle-nn's path and still train.
        let d = Var::from_tensor(&init.to_dtype(DType::F64)?)?;
        let mut opt = AdamW::new(vec![d.clone()], ParamsAdamW::default())?;
        opt.backward_step(&d.as_tensor().sqr()?.sum_all()?)?;
        let moved = (d.as_tensor().to_dtype(DType::F32)? - &init)?
            .abs()?
            .sum_all()?;
        assert!(moved.to_scalar::<f32>()? > 0.0);
        Ok(())
    }
}
