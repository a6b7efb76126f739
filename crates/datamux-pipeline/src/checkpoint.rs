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

/// The file a finished checkpoint folder lists its files in (name and size); written last,
/// inside the folder that is then renamed into place.
const MANIFEST: &str = "manifest.json";

/// Save weights and fixed buffers, the resolved settings and `extra` files (name, contents)
/// beside them, as one folder that appears whole or not at all (`atomic::write_dir`): a kill
/// at any moment leaves either the earlier folder or the new one.
pub fn save(
    dir: &Path,
    map: &SeededVarMap,
    buffers: &HashMap<String, Tensor>,
    run: &RunConfig,
    extra: &[(&str, String)],
) -> Result<()> {
    let settings = toml::to_string(&run.to_toml()?)?;
    datamux_data::atomic::write_dir(dir, |tmp| -> Result<()> {
        map.varmap().save(tmp.join("model.safetensors"))?;
        if !buffers.is_empty() {
            candle_core::safetensors::save(buffers, tmp.join("buffers.safetensors"))?;
        }
        std::fs::write(tmp.join("resolved.toml"), &settings)?;
        for (name, text) in extra {
            std::fs::write(tmp.join(name), text)?;
        }
        let mut files = serde_json::Map::new();
        for e in std::fs::read_dir(tmp)? {
            let e = e?;
            files.insert(
                e.file_name().to_string_lossy().into_owned(),
                e.metadata()?.len().into(),
            );
        }
        std::fs::write(
            tmp.join(MANIFEST),
            serde_json::Value::Object(files).to_string(),
        )?;
        Ok(())
    })
    .map_err(|e| anyhow::anyhow!("{e:#}"))
}

/// Whether `dir` holds a whole checkpoint: every file its manifest lists, at its size. A folder
/// without a manifest was written before checkpoints had one: whole if loading it works.
pub fn verify(dir: &Path) -> Result<()> {
    let manifest = dir.join(MANIFEST);
    let Some(text) = datamux_data::atomic::read_optional(&manifest)? else {
        return Ok(());
    };
    let files: serde_json::Map<String, serde_json::Value> = serde_json::from_str(&text)
        .with_context(|| format!("{} is not a manifest", manifest.display()))?;
    for (name, size) in files {
        let path = dir.join(&name);
        let have = std::fs::metadata(&path)
            .with_context(|| format!("{} is missing", path.display()))?
            .len();
        if Some(have) != size.as_u64() {
            bail!(
                "{} has {have} bytes, the manifest says {size}",
                path.display()
            );
        }
    }
    Ok(())
}

/// Load the weights saved in `dir` into `map`, and the buffers saved beside them, after
/// [`verify`].
pub fn load(dir: &Path, map: &SeededVarMap) -> Result<HashMap<String, Tensor>> {
    verify(dir)?;
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

/// An exclusive lock on a checkpoint folder (`<dir>.lock` beside it), so two workers (of one
/// run or of two runs on one folder) never train the same checkpoint: the second waits, after
/// `on_wait` says so, and then finds it finished. A file lock (`datamux_data::lock`): the
/// kernel releases it when its holder dies, so a killed run leaves nothing to clean up.
pub fn lock(dir: &Path, on_wait: impl FnOnce()) -> Result<datamux_data::lock::Lock> {
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let lock =
        datamux_data::lock::Lock::acquire(&dir.with_file_name(format!("{name}.lock")), on_wait)?;
    // The only writer of `dir` now: a temporary of it is a killed writer's. Best effort, as
    // before: a leftover that cannot be removed does not stop the training.
    let _ = datamux_data::atomic::remove_stale_of(dir);
    Ok(lock)
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
