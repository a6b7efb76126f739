//! Checkpoints under `runs/`: the trained weights (`model.safetensors`), the fixed buffers that
//! regenerate from the seed (`buffers.safetensors`, compared on load) and the run's resolved
//! settings (`resolved.toml`); a lock for a checkpoint that several workers may want to train;
//! and starting a model at N from one trained at a smaller N.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result, bail};
use candle_core::{Tensor, Var};
use datamux_core::SeededVarMap;

use crate::modality::Env;
use crate::settings::RunConfig;

/// `runs/<experiment>/<run_id>`.
pub fn run_dir(env: &Env, run: &RunConfig) -> PathBuf {
    env.runs_dir.join(&run.experiment).join(run.run_id())
}

/// Save weights and fixed buffers; the resolved settings go beside them.
pub fn save(
    dir: &Path,
    map: &SeededVarMap,
    buffers: &HashMap<String, Tensor>,
    run: &RunConfig,
) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    map.varmap().save(dir.join("model.safetensors"))?;
    if !buffers.is_empty() {
        candle_core::safetensors::save(buffers, dir.join("buffers.safetensors"))?;
    }
    std::fs::write(dir.join("resolved.toml"), toml::to_string(&run.to_toml()?)?)?;
    Ok(())
}

/// Load the weights saved in `dir` into `map`, and the buffers saved beside them.
pub fn load(dir: &Path, map: &SeededVarMap) -> Result<HashMap<String, Tensor>> {
    let ckpt = dir.join("model.safetensors");
    let mut vm = map.varmap().clone();
    vm.load(&ckpt)
        .with_context(|| format!("cannot load checkpoint {}", ckpt.display()))?;
    let buffers = dir.join("buffers.safetensors");
    Ok(if buffers.is_file() {
        candle_core::safetensors::load(&buffers, &candle_core::Device::Cpu)
            .with_context(|| format!("cannot load {}", buffers.display()))?
    } else {
        HashMap::new()
    })
}

/// An exclusive lock on a directory, so two workers never train the same checkpoint at once.
/// A lock left by a process that no longer exists is taken over.
pub struct Lock(PathBuf);

impl Lock {
    pub fn acquire(dir: &Path) -> Result<Self> {
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
pub fn grow_from(vars: &[(String, Var)], saved: &HashMap<String, Tensor>) -> Result<()> {
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

/// The variables of `map` by name, as tensors.
pub fn tensors(map: &SeededVarMap) -> Result<HashMap<String, Tensor>> {
    Ok(map
        .sorted_vars()?
        .into_iter()
        .map(|(name, var)| (name, var.as_tensor().clone()))
        .collect())
}
