//! Multiplexed sentence embeddings (issue 16, item 4): the cloud-API use of a sentence
//! encoder. The target of each instance is the pretrained model's own mean-pooled embedding of
//! it at N = 1, through candle-transformers' `BertModel` (the reference forward), computed once
//! per split and cached; the multiplexed model learns to give every instance of a mixture that
//! embedding back (cosine loss, `datamux_core::task::real_cosine_loss`), or, beside a sentence
//! classification loss, learns to keep it (`embedding_weight`: a distillation of the plain model).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result, ensure};
use candle_core::{DType, Device, Tensor};
use candle_transformers::models::bert::BertModel;

use crate::pretrained::Pretrained;

/// Sentences per `BertModel` call: enough to keep the matmuls large, few enough to pad little
/// (they are sorted by length first).
const CHUNK: usize = 64;

/// Mean pooling over the real positions, as sentence-transformers pools: `(B, L, D)` and a
/// `(B, L)` 0/1 mask -> `(B, D)`.
pub fn mean_pool(h: &Tensor, mask: &Tensor) -> candle_core::Result<Tensor> {
    let m = mask.to_dtype(DType::F32)?.unsqueeze(2)?; // (B, L, 1)
    let sum = h.broadcast_mul(&m)?.sum(1)?; // (B, D)
    sum.broadcast_div(&m.sum(1)?.clamp(1f32, f32::MAX)?)
}

/// The N = 1 mean-pooled embedding of every sentence of `ids` under `pre`, in order.
/// `progress(done, total)` is called after each chunk.
pub fn compute(
    pre: &Pretrained,
    ids: &[Vec<u32>],
    pad_id: u32,
    mut progress: impl FnMut(usize, usize),
) -> Result<Vec<Vec<f32>>> {
    let dev = Device::Cpu;
    let model = BertModel::load(pre.var_builder(), &pre.config)
        .with_context(|| format!("model `{}`: building BertModel", pre.repo))?;
    let mut order: Vec<usize> = (0..ids.len()).collect();
    order.sort_by_key(|i| ids[*i].len());
    let mut out = vec![Vec::new(); ids.len()];
    let chunks = order.len().div_ceil(CHUNK);
    for (c, chunk) in order.chunks(CHUNK).enumerate() {
        let l = chunk
            .iter()
            .map(|i| ids[*i].len())
            .max()
            .unwrap_or(1)
            .max(1);
        let (mut flat, mut mask) = (Vec::with_capacity(chunk.len() * l), Vec::new());
        for i in chunk {
            let row = &ids[*i];
            flat.extend((0..l).map(|j| row.get(j).copied().unwrap_or(pad_id)));
            mask.extend((0..l).map(|j| u32::from(j < row.len())));
        }
        let b = chunk.len();
        let t = Tensor::from_vec(flat, (b, l), &dev)?;
        let m = Tensor::from_vec(mask, (b, l), &dev)?;
        let h = model.forward(&t, &t.zeros_like()?, Some(&m))?; // (B, L, D)
        for (i, e) in chunk.iter().zip(mean_pool(&h, &m)?.to_vec2::<f32>()?) {
            out[*i] = e;
        }
        progress(c + 1, chunks);
    }
    Ok(out)
}

/// Where the targets of one split are cached: named by the model, the dataset and split, and a
/// fingerprint of the token ids (so `max_length` and the tokenizer are in it) and the weights.
pub fn cache_path(
    cache_dir: &Path,
    pre: &Pretrained,
    dataset: &str,
    split: &str,
    ids: &[Vec<u32>],
) -> PathBuf {
    let mut key = format!("{}\n{:?}\n{}\n", pre.repo, pre.source, pre.weights_len());
    for row in ids {
        key.extend(row.iter().map(|t| format!("{t},")));
        key.push('\n');
    }
    let hash = datamux_core::init::name_seed(ids.len() as u64, &key);
    let model = pre.repo.replace('/', "--");
    cache_dir
        .join("embeddings")
        .join(format!("{model}-{dataset}-{split}-{hash:016x}.safetensors"))
}

/// The targets of one split: read from the cache, else computed and written there (through a
/// temporary file, so an interrupted run never leaves a half-written cache).
pub fn targets(
    pre: &Pretrained,
    ids: &[Vec<u32>],
    pad_id: u32,
    path: &Path,
    progress: impl FnMut(usize, usize),
) -> Result<Vec<Vec<f32>>> {
    let d = pre.config.hidden_size;
    if path.is_file() {
        let mut saved = candle_core::safetensors::load(path, &Device::Cpu)
            .with_context(|| format!("reading cached embeddings {}", path.display()))?;
        if let Some(t) = saved.remove("targets") {
            ensure!(
                t.dims() == [ids.len(), d],
                "cached embeddings {} have shape {:?}, expected [{}, {d}]; delete the file",
                path.display(),
                t.dims(),
                ids.len()
            );
            return Ok(t.to_vec2::<f32>()?);
        }
    }
    let out = compute(pre, ids, pad_id, progress)?;
    let flat: Vec<f32> = out.iter().flatten().copied().collect();
    let t = Tensor::from_vec(flat, (ids.len(), d), &Device::Cpu)?;
    std::fs::create_dir_all(path.parent().unwrap_or(Path::new(".")))?;
    let tensors = HashMap::from([("targets".to_string(), t)]);
    datamux_data::atomic::write_path(path, |tmp| candle_core::safetensors::save(&tensors, tmp))?;
    Ok(out)
}
