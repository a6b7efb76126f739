//! Seeded initialisation that does not depend on candle's CPU RNG.
//!
//! Candle's CPU device cannot be seeded, so every parameter is drawn from a ChaCha stream seeded by
//! a hash of (run seed, parameter name). Values depend only on the seed and the name: building the
//! modules in another order gives the same weights. [`SeededVarMap`] plugs into
//! `VarBuilder::from_backend` and fills an ordinary `VarMap`, so saving, loading and `all_vars`
//! keep working.

use candle_core::{DType, Device, Result, Shape, Tensor, Var};
use candle_nn::{Init, VarBuilder, VarMap, init::NormalOrUniform};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};

/// FNV-1a over the seed and the name, finished with a SplitMix64 mix so that names differing in
/// one character give unrelated streams. Stable across platforms and Rust versions, unlike
/// `std::hash`.
pub fn name_seed(seed: u64, name: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in seed.to_le_bytes().iter().chain(name.as_bytes()) {
        h ^= u64::from(*byte);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// The ChaCha stream for one named random quantity of a run.
pub fn rng_for(seed: u64, name: &str) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(name_seed(seed, name))
}

/// `count` standard-normal draws.
pub fn randn_vec(rng: &mut ChaCha8Rng, count: usize) -> Vec<f32> {
    (0..count).map(|_| StandardNormal.sample(rng)).collect()
}

/// Host values for one parameter, following candle's `Init` hint.
fn sample(init: Init, shape: &Shape, rng: &mut ChaCha8Rng) -> Vec<f32> {
    let count = shape.elem_count();
    let uniform = |rng: &mut ChaCha8Rng, lo: f64, up: f64| -> Vec<f32> {
        (0..count)
            .map(|_| rng.random_range(lo..up) as f32)
            .collect()
    };
    let normal = |rng: &mut ChaCha8Rng, mean: f64, std: f64| -> Vec<f32> {
        randn_vec(rng, count)
            .into_iter()
            .map(|z| (mean + std * f64::from(z)) as f32)
            .collect()
    };
    match init {
        Init::Const(c) => vec![c as f32; count],
        Init::Uniform { lo, up } if lo < up => uniform(rng, lo, up),
        Init::Uniform { lo, .. } => vec![lo as f32; count],
        Init::Randn { mean, stdev } => normal(rng, mean, stdev),
        Init::Kaiming {
            dist,
            fan,
            non_linearity,
        } => {
            let std = non_linearity.gain() / (fan.for_shape(shape) as f64).sqrt();
            match dist {
                NormalOrUniform::Uniform => {
                    let bound = 3f64.sqrt() * std;
                    uniform(rng, -bound, bound)
                }
                NormalOrUniform::Normal => normal(rng, 0.0, std),
            }
        }
    }
}

/// A `VarMap` whose missing entries are initialised from per-name seeded streams.
#[derive(Clone)]
pub struct SeededVarMap {
    varmap: VarMap,
    seed: u64,
}

impl SeededVarMap {
    pub fn new(seed: u64) -> Self {
        Self {
            varmap: VarMap::new(),
            seed,
        }
    }

    pub fn seed(&self) -> u64 {
        self.seed
    }

    pub fn varmap(&self) -> &VarMap {
        &self.varmap
    }

    /// A `VarBuilder` that creates missing variables from the seeded streams.
    pub fn var_builder(&self, dtype: DType, dev: &Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(self.clone()), dtype, dev.clone())
    }

    /// Every trainable variable, sorted by name so the optimizer sees a stable order
    /// (`VarMap::all_vars` iterates a hash map).
    pub fn sorted_vars(&self) -> Result<Vec<(String, Var)>> {
        let data = self.varmap.data().lock().map_err(|_| poisoned())?;
        let mut vars: Vec<(String, Var)> =
            data.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(vars)
    }
}

fn poisoned() -> candle_core::Error {
    candle_core::Error::Msg("the variable map's lock was poisoned by a panic".into())
}

impl candle_nn::var_builder::SimpleBackend for SeededVarMap {
    fn get(&self, s: Shape, name: &str, h: Init, dtype: DType, dev: &Device) -> Result<Tensor> {
        let mut data = self.varmap.data().lock().map_err(|_| poisoned())?;
        if let Some(var) = data.get(name) {
            if var.shape() != &s {
                candle_core::bail!(
                    "variable {name} exists with shape {:?}, requested {s:?}",
                    var.shape()
                );
            }
            return Ok(var.as_tensor().clone());
        }
        let values = sample(h, &s, &mut rng_for(self.seed, name));
        let tensor = Tensor::from_vec(values, s, dev)?.to_dtype(dtype)?;
        let var = Var::from_tensor(&tensor)?;
        let out = var.as_tensor().clone();
        data.insert(name.to_string(), var);
        Ok(out)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> Result<Tensor> {
        let data = self.varmap.data().lock().map_err(|_| poisoned())?;
        match data.get(name) {
            Some(var) => var.as_tensor().to_dtype(dtype)?.to_device(dev),
            None => candle_core::bail!("no variable named {name}"),
        }
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.varmap
            .data()
            .lock()
            .map(|d| d.contains_key(name))
            .unwrap_or(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn name_seed_separates_names_and_seeds() {
        assert_ne!(name_seed(0, "a.weight"), name_seed(0, "a.bias"));
        assert_ne!(name_seed(0, "a.weight"), name_seed(1, "a.weight"));
        assert_eq!(name_seed(7, "mux.keys"), name_seed(7, "mux.keys"));
    }

    #[test]
    fn construction_order_does_not_change_values() -> Result<()> {
        let dev = Device::Cpu;
        let a = SeededVarMap::new(3);
        let vb = a.var_builder(DType::F32, &dev);
        let x1 = vb.get_with_hints(
            (3, 5),
            "x",
            Init::Randn {
                mean: 0.,
                stdev: 1.,
            },
        )?;
        let y1 = vb.get_with_hints(7, "y", Init::Uniform { lo: -1., up: 1. })?;
        let b = SeededVarMap::new(3);
        let vb = b.var_builder(DType::F32, &dev);
        let y2 = vb.get_with_hints(7, "y", Init::Uniform { lo: -1., up: 1. })?;
        let x2 = vb.get_with_hints(
            (3, 5),
            "x",
            Init::Randn {
                mean: 0.,
                stdev: 1.,
            },
        )?;
        assert_eq!(x1.to_vec2::<f32>()?, x2.to_vec2::<f32>()?);
        assert_eq!(y1.to_vec1::<f32>()?, y2.to_vec1::<f32>()?);
        Ok(())
    }
}
