//! A tensor derived from learned keys, kept between inference calls.
//!
//! The `hrr` mux and demux (and a learned `random_ortho` mux) turn their `(N, D)` keys into
//! `N·D²` matrix entries, a gather, on every forward; at inference that gather is most of the
//! demux's time at a 512-wide output (docs/images.md). The cache is keyed on the keys' values, not
//! on a flag someone must remember to clear: an optimizer step, a checkpoint load or a warm start
//! writes the variables in place, and the next inference call sees different values and rebuilds.
//! Comparing `N·D` values costs far less than building `N·D²`.

use std::sync::{Arc, Mutex, PoisonError};

use candle_core::{DType, Result, Tensor};

type Entry = (Vec<f32>, Tensor);

/// What `build(keys)` last returned at inference, with the key values it was built from. Clones
/// share one entry (a model cloned for another thread reuses it; the values decide validity).
#[derive(Clone, Default)]
pub struct KeyedCache(Arc<Mutex<Option<Entry>>>);

impl std::fmt::Debug for KeyedCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let filled = self.entry().is_some();
        f.debug_struct("KeyedCache")
            .field("filled", &filled)
            .finish()
    }
}

impl KeyedCache {
    fn entry(&self) -> std::sync::MutexGuard<'_, Option<Entry>> {
        // A panic elsewhere while holding the lock leaves at worst a stale entry, which the value
        // check below still rejects.
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// `build(keys)`; in training always fresh (gradients flow through it to the keys), at
    /// inference the previous result when the keys hold the same values as when it was built.
    pub fn get(
        &self,
        keys: &Tensor,
        train: bool,
        build: impl FnOnce(&Tensor) -> Result<Tensor>,
    ) -> Result<Tensor> {
        if train {
            return build(keys);
        }
        let values = keys.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        let mut entry = self.entry();
        if let Some((seen, built)) = entry.as_ref() {
            if *seen == values {
                return Ok(built.clone());
            }
        }
        // Detached: an inference result needs no graph back to the variables.
        let built = build(&keys.detach())?;
        *entry = Some((values, built.clone()));
        Ok(built)
    }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use candle_core::{Device, Var};

    use super::*;

    #[test]
    fn builds_once_per_key_values_at_inference_and_always_in_training() -> Result<()> {
        let keys = Var::from_vec(vec![1f32, 2., 3., 4., 5., 6.], (2, 3), &Device::Cpu)?;
        let cache = KeyedCache::default();
        let builds = Cell::new(0);
        let double = |k: &Tensor| {
            builds.set(builds.get() + 1);
            k * 2.0
        };
        let a = cache.get(keys.as_tensor(), false, double)?;
        let b = cache.get(keys.as_tensor(), false, double)?;
        assert_eq!(builds.get(), 1);
        assert_eq!(a.to_vec2::<f32>()?, b.to_vec2::<f32>()?);
        // An in-place write (an optimizer step, a checkpoint load) is seen by the next call.
        keys.set(&Tensor::new(&[[1f32, 2., 3.], [4., 5., 7.]], &Device::Cpu)?)?;
        let c = cache.get(keys.as_tensor(), false, double)?;
        assert_eq!(builds.get(), 2);
        assert_eq!(c.to_vec2::<f32>()?, [[2., 4., 6.], [8., 10., 14.]]);
        // Training builds every time, on the variable itself: its gradient arrives.
        let t = cache.get(keys.as_tensor(), true, double)?;
        assert_eq!(builds.get(), 3);
        let grads = t.sum_all()?.backward()?;
        let g = grads.get(keys.as_tensor()).expect("keys get a gradient");
        assert_eq!(g.to_vec2::<f32>()?, [[2.; 3]; 2]);
        // A clone shares the entry.
        let _ = cache.clone().get(keys.as_tensor(), false, double)?;
        assert_eq!(builds.get(), 3);
        Ok(())
    }
}
