//! Pretrained BERT-family text backbones (MUX-PLMs, arXiv 2302.12441): a hub repository's
//! `config.json` (candle-transformers' BERT config type), `model.safetensors` and
//! `tokenizer.json`, resolved by [`datamux_data::ModelResolver`] and copied into the variables of
//! the text model.
//!
//! candle-transformers' `BertModel` is the definition of the architecture and the reference
//! forward (the tests compare against it), but its LayerNorm and softmax are candle-nn's fused
//! kernels, which have no backward pass (house-style §2.14): fine-tuned as is, nothing below the
//! head would train. So the model that trains is the text model's own twin of it: BERT's
//! embedding block is the [`crate::TextFrontend`] (word + position + token type 0, LayerNorm),
//! the encoder stack is the core post-LN encoder (erf GELU, biases everywhere), each loaded
//! from the same tensors. The mux sits between the two, as for the from-scratch model.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{self, HiddenAct, PositionEmbeddingType};
use datamux_core::{SeededVarMap, encoder};
use datamux_data::{DataError, ModelResolver, ModelSource};

/// The files a pretrained text backbone needs from its repository.
pub const FILES: [&str; 3] = ["config.json", "model.safetensors", "tokenizer.json"];

/// What can go wrong loading a pretrained model; every message names the repository and file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PretrainedError {
    /// The data error stays in the error's source chain (where `transparent` would skip it), so
    /// the runner sees a model that cannot be had as it sees a dataset that cannot be had.
    #[error("{0}")]
    Resolve(#[from] DataError),
    #[error("model `{repo}`: cannot read {}: {message}", path.display())]
    Read {
        repo: String,
        path: PathBuf,
        message: String,
    },
    #[error(
        "model `{repo}`: {} describes a `{found}` model; only BERT (model_type \"bert\") is supported",
        path.display()
    )]
    Architecture {
        repo: String,
        path: PathBuf,
        found: String,
    },
    #[error("model `{repo}`: {}: {what} is not supported (the encoder has {supported})", path.display())]
    Unsupported {
        repo: String,
        path: PathBuf,
        what: String,
        supported: &'static str,
    },
    #[error("model `{repo}`: {} has no tensor `{tensor}`", path.display())]
    MissingTensor {
        repo: String,
        path: PathBuf,
        tensor: String,
    },
    #[error(
        "model `{repo}`: tensor `{tensor}` of {} has shape {found:?}, config.json implies {expected:?}",
        path.display()
    )]
    Shape {
        repo: String,
        path: PathBuf,
        tensor: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error("model `{repo}`: {what}")]
    Mismatch { repo: String, what: String },
}

/// A resolved and checked BERT checkpoint: its config, weights and tokenizer file.
pub struct Pretrained {
    pub repo: String,
    pub source: ModelSource,
    pub config: bert::Config,
    pub tokenizer_file: PathBuf,
    weights_file: PathBuf,
    /// BERT's tensor names without a `bert.` prefix (task checkpoints carry one).
    tensors: HashMap<String, Tensor>,
}

impl Pretrained {
    /// Resolve `repo` (`owner/name`) at `revision` and load it.
    pub fn resolve(
        repo: &str,
        revision: Option<&str>,
        resolver: &ModelResolver,
    ) -> Result<Self, PretrainedError> {
        let found = resolver.resolve(repo, revision, &FILES)?;
        let [config, weights, tokenizer] = found.files.as_slice() else {
            return Err(PretrainedError::Mismatch {
                repo: repo.to_string(),
                what: format!("resolution returned other files than {}", FILES.join(", ")),
            });
        };
        Self::from_files(repo, found.source.clone(), config, weights, tokenizer)
    }

    /// Read and check `config.json` and the weights: a BERT config whose shapes the checkpoint
    /// has, tensor by tensor.
    pub fn from_files(
        repo: &str,
        source: ModelSource,
        config: &Path,
        weights: &Path,
        tokenizer: &Path,
    ) -> Result<Self, PretrainedError> {
        let read_err = |path: &Path, message: String| PretrainedError::Read {
            repo: repo.to_string(),
            path: path.to_path_buf(),
            message,
        };
        let text = std::fs::read_to_string(config).map_err(|e| read_err(config, e.to_string()))?;
        let value: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| read_err(config, e.to_string()))?;
        check_architecture(repo, config, &value)?;
        let cfg: bert::Config =
            serde_json::from_value(value).map_err(|e| read_err(config, e.to_string()))?;
        let unsupported = |what: String, supported| PretrainedError::Unsupported {
            repo: repo.to_string(),
            path: config.to_path_buf(),
            what,
            supported,
        };
        if cfg.hidden_act != HiddenAct::Gelu {
            return Err(unsupported(
                format!("hidden_act {:?}", cfg.hidden_act),
                "the erf GELU, \"gelu\"",
            ));
        }
        if cfg.position_embedding_type != PositionEmbeddingType::Absolute {
            return Err(unsupported(
                format!("position_embedding_type {:?}", cfg.position_embedding_type),
                "absolute positions",
            ));
        }
        let dims = encoder_config(&cfg, &encoder::Config::tiny());
        dims.validate()
            .map_err(|e| unsupported(e.to_string(), "sizes that validate"))?;
        let mut tensors = candle_core::safetensors::load(weights, &Device::Cpu)
            .map_err(|e| read_err(weights, e.to_string()))?;
        if tensors.keys().any(|k| k.starts_with("bert.embeddings.")) {
            tensors = tensors
                .into_iter()
                .filter_map(|(k, v)| k.strip_prefix("bert.").map(|k| (k.to_string(), v)))
                .collect();
        }
        for (name, expected) in expected_shapes(&cfg) {
            let Some(t) = tensors.get(&name) else {
                return Err(PretrainedError::MissingTensor {
                    repo: repo.to_string(),
                    path: weights.to_path_buf(),
                    tensor: name,
                });
            };
            if t.dims() != expected.as_slice() {
                return Err(PretrainedError::Shape {
                    repo: repo.to_string(),
                    path: weights.to_path_buf(),
                    tensor: name,
                    expected,
                    found: t.dims().to_vec(),
                });
            }
        }
        Ok(Self {
            repo: repo.to_string(),
            source,
            config: cfg,
            tokenizer_file: tokenizer.to_path_buf(),
            weights_file: weights.to_path_buf(),
            tensors,
        })
    }

    /// The core encoder of this checkpoint: its sizes and LayerNorm epsilon, post-LN, with the
    /// dropout probabilities of `settings` (the experiment's, not the file's).
    pub fn encoder_config(&self, settings: &encoder::Config) -> encoder::Config {
        encoder_config(&self.config, settings)
    }

    /// The size of the weights file in bytes (0 if it cannot be read): part of the cache key of
    /// what is computed from the weights.
    pub fn weights_len(&self) -> u64 {
        std::fs::metadata(&self.weights_file).map_or(0, |m| m.len())
    }

    /// The checkpoint's tensors as a `VarBuilder`, for candle-transformers' `BertModel`.
    pub fn var_builder(&self) -> VarBuilder<'static> {
        VarBuilder::from_tensors(self.tensors.clone(), DType::F32, &Device::Cpu)
    }

    /// Copy the checkpoint into the text model's variables under `frontend.*` and `backbone.*`
    /// of `map` (the position table's first rows where it is shorter), and start the retrieval
    /// decoder `retrieval.decoder.weight` from the word embeddings; every other variable (the
    /// mux, the demux and its prefix, the heads, `mux_norm`) keeps its fresh initialisation.
    /// Returns how many variables were loaded.
    pub fn load_into(&self, map: &SeededVarMap) -> Result<usize, PretrainedError> {
        let mismatch = |what: String| PretrainedError::Mismatch {
            repo: self.repo.clone(),
            what,
        };
        // BERT's masked-LM decoder is tied to the word embeddings; the retrieval head's decoder
        // (its own `V x D` table, untied) starts as a copy of them, so that the warm-up does not
        // begin by learning a vocabulary projection from noise. It is not counted as loaded.
        let decoder = "retrieval.decoder.weight";
        let mut loaded = 0;
        for (ours, var) in map.sorted_vars().map_err(|e| mismatch(e.to_string()))? {
            let Some(theirs) = bert_name(&ours) else {
                if ours == decoder {
                    if let Some(words) = self.tensors.get("embeddings.word_embeddings.weight") {
                        if var.dims() == words.dims() {
                            var.set(words).map_err(|e| mismatch(e.to_string()))?;
                        }
                    }
                }
                continue;
            };
            let t = self
                .tensors
                .get(&theirs)
                .ok_or_else(|| PretrainedError::MissingTensor {
                    repo: self.repo.clone(),
                    path: self.weights_file.clone(),
                    tensor: theirs.clone(),
                })?;
            // The model's position table may be shorter than BERT's (its max_length).
            let rows = var.dims().first().copied().unwrap_or(0);
            let t = if var.rank() == 2 && t.rank() == 2 && t.dims()[1] == var.dims()[1] {
                t.narrow(0, 0, rows.min(t.dims()[0]))
                    .map_err(|e| mismatch(e.to_string()))?
            } else {
                t.clone()
            };
            if t.dims() != var.dims() {
                return Err(mismatch(format!(
                    "`{theirs}` has shape {:?}, the model's `{ours}` {:?}",
                    t.dims(),
                    var.dims()
                )));
            }
            var.set(
                &t.to_dtype(var.dtype())
                    .map_err(|e| mismatch(e.to_string()))?,
            )
            .map_err(|e| mismatch(e.to_string()))?;
            loaded += 1;
        }
        Ok(loaded)
    }
}

/// `model_type` must be `bert`; a config without one must name a `Bert*` architecture.
fn check_architecture(
    repo: &str,
    path: &Path,
    value: &serde_json::Value,
) -> Result<(), PretrainedError> {
    let model_type = value.get("model_type").and_then(|v| v.as_str());
    let arch = value
        .get("architectures")
        .and_then(|a| a.get(0))
        .and_then(|v| v.as_str());
    let ok = match model_type {
        Some(t) => t == "bert",
        None => arch.is_some_and(|a| a.starts_with("Bert")),
    };
    if ok {
        return Ok(());
    }
    Err(PretrainedError::Architecture {
        repo: repo.to_string(),
        path: path.to_path_buf(),
        found: model_type.or(arch).unwrap_or("unnamed").to_string(),
    })
}

fn encoder_config(cfg: &bert::Config, settings: &encoder::Config) -> encoder::Config {
    encoder::Config {
        num_hidden_layers: cfg.num_hidden_layers,
        hidden_size: cfg.hidden_size,
        num_attention_heads: cfg.num_attention_heads,
        intermediate_size: cfg.intermediate_size,
        hidden_dropout_prob: settings.hidden_dropout_prob,
        attention_probs_dropout_prob: settings.attention_probs_dropout_prob,
        layer_norm_eps: cfg.layer_norm_eps,
        pre_layer_norm: false, // BERT is post-LN
    }
}

/// Every tensor the forward uses (the pooler is not), with the shape `config.json` implies.
fn expected_shapes(cfg: &bert::Config) -> Vec<(String, Vec<usize>)> {
    let (d, f) = (cfg.hidden_size, cfg.intermediate_size);
    let mut out = vec![
        (
            "embeddings.word_embeddings.weight".into(),
            vec![cfg.vocab_size, d],
        ),
        (
            "embeddings.position_embeddings.weight".into(),
            vec![cfg.max_position_embeddings, d],
        ),
        (
            "embeddings.token_type_embeddings.weight".into(),
            vec![cfg.type_vocab_size, d],
        ),
        ("embeddings.LayerNorm.weight".into(), vec![d]),
        ("embeddings.LayerNorm.bias".into(), vec![d]),
    ];
    for i in 0..cfg.num_hidden_layers {
        let p = format!("encoder.layer.{i}");
        for (name, out_dim, in_dim) in [
            ("attention.self.query", d, d),
            ("attention.self.key", d, d),
            ("attention.self.value", d, d),
            ("attention.output.dense", d, d),
            ("intermediate.dense", f, d),
            ("output.dense", d, f),
        ] {
            out.push((format!("{p}.{name}.weight"), vec![out_dim, in_dim]));
            out.push((format!("{p}.{name}.bias"), vec![out_dim]));
        }
        for norm in ["attention.output.LayerNorm", "output.LayerNorm"] {
            out.push((format!("{p}.{norm}.weight"), vec![d]));
            out.push((format!("{p}.{norm}.bias"), vec![d]));
        }
    }
    out
}

/// The BERT tensor a text-model variable is loaded from; `None` for the variables pretraining
/// has no counterpart of.
pub fn bert_name(ours: &str) -> Option<String> {
    if let Some(rest) = ours.strip_prefix("frontend.") {
        let name = match rest {
            "tokens.weight" => "word_embeddings.weight",
            "positions.weight" => "position_embeddings.weight",
            "token_types.weight" => "token_type_embeddings.weight",
            "norm.weight" => "LayerNorm.weight",
            "norm.bias" => "LayerNorm.bias",
            _ => return None,
        };
        return Some(format!("embeddings.{name}"));
    }
    let rest = ours.strip_prefix("backbone.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let (module, param) = rest.rsplit_once('.')?;
    let module = match module {
        "attn.q" => "attention.self.query",
        "attn.k" => "attention.self.key",
        "attn.v" => "attention.self.value",
        "attn.o" => "attention.output.dense",
        "attn_norm" => "attention.output.LayerNorm",
        "ffn_in" => "intermediate.dense",
        "ffn_out" => "output.dense",
        "ffn_norm" => "output.LayerNorm",
        _ => return None,
    };
    Some(format!("encoder.layer.{layer}.{module}.{param}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_to_bert_and_new_parameters_to_nothing() {
        assert_eq!(
            bert_name("backbone.layers.3.attn.q.weight").as_deref(),
            Some("encoder.layer.3.attention.self.query.weight")
        );
        assert_eq!(
            bert_name("backbone.layers.0.ffn_norm.bias").as_deref(),
            Some("encoder.layer.0.output.LayerNorm.bias")
        );
        assert_eq!(
            bert_name("frontend.token_types.weight").as_deref(),
            Some("embeddings.token_type_embeddings.weight")
        );
        for new in [
            "backbone.mux_norm.weight",
            "demux.prefix",
            "head.out.weight",
            "mux.keys",
        ] {
            assert_eq!(bert_name(new), None, "{new}");
        }
    }
}
