//! Token and position embeddings, `(B, N, L)` ids -> `(B, N, L, D)`, and the text backbone (the
//! core encoder, optionally behind a LayerNorm on the muxed sequence).
//!
//! Reference: RoBERTa's embedding block (word + position embeddings, LayerNorm, dropout), which
//! the reference multiplexes after (method.md §2). Positions count from 0 per instance; padding
//! positions are zeroed so they add nothing to the mix, and prefix slots take no positions.

use candle_core::{DType, Result, Storage, Tensor};
use candle_nn::VarBuilder;
use datamux_core::fused::{lane_dot, lane_sum};
use rayon::prelude::*;

use datamux_core::encoder::{self, Encoder};
use datamux_core::layers::{self, LayerNorm, PositionEmbedding};
use datamux_core::model::{Backbone, Embedded, Frontend};

/// Token ids `(B, N, L)` u32 and padding flags `(B, N, L)` u8 (1 = padding).
#[derive(Clone, Debug)]
pub struct TextInput {
    pub ids: Tensor,
    pub pad: Tensor,
}

/// Parameter paths: `tokens.weight`, `positions.weight`, `norm.*`, and `token_types.weight`
/// with [`TextFrontend::with_token_types`].
#[derive(Clone, Debug)]
pub struct TextFrontend {
    tokens: Tensor,
    /// BERT's token type table `(T, D)`; every instance is segment 0, so row 0 is added to
    /// every position (pairs are not told apart by type: the from-scratch model does not either).
    token_types: Option<Tensor>,
    tail: PositionEmbedding,
    d: usize,
}

impl TextFrontend {
    pub fn new(
        vocab: usize,
        max_length: usize,
        d: usize,
        norm: bool,
        dropout: f64,
        eps: f64,
        vb: VarBuilder<'_>,
    ) -> Result<Self> {
        Ok(Self {
            tokens: layers::embedding_table(vocab, d, vb.pp("tokens"))?,
            tail: PositionEmbedding::new(max_length, d, norm, dropout, eps, vb)?,
            token_types: None,
            d,
        })
    }

    /// BERT's embedding block: a `(count, D)` token type table, row 0 added at every position.
    pub fn with_token_types(mut self, count: usize, vb: VarBuilder<'_>) -> Result<Self> {
        self.token_types = Some(layers::embedding_table(
            count,
            self.d,
            vb.pp("token_types"),
        )?);
        Ok(self)
    }

    /// Row 0 of the token type table, `(1, D)`, where there is one.
    fn segment(&self) -> Result<Option<Tensor>> {
        self.token_types
            .as_ref()
            .map(|t| t.narrow(0, 0, 1))
            .transpose()
    }
}

impl Frontend for TextFrontend {
    type Input = TextInput;

    /// `(B, N, L)` -> `(B, N, L, D)`.
    fn embed(&self, input: &TextInput, train: bool) -> Result<Embedded> {
        let (b, n, l) = input.ids.dims3()?;
        self.tail.check_len(l)?;
        // (B·N·L) ids -> (B·N·L, D) -> (B, N, L, D)
        let tok = self
            .tokens
            .index_select(&input.ids.flatten_all()?, 0)?
            .reshape((b, n, l, self.d))?;
        let tok = match self.segment()? {
            Some(row) => tok.broadcast_add(&row)?, // + (1, D)
            None => tok,
        };
        self.tail.forward_t(&tok, &input.pad, train)
    }

    fn hidden_size(&self) -> usize {
        self.d
    }

    /// One pass over the N instances of each muxed position: gather the token row, add the
    /// position, LayerNorm, scale by the slot's key and accumulate, `(B, N, L)` ids ->
    /// `(B, L, D)`. The two-step path writes and re-reads `(B, N, L, D)` a dozen times (gather,
    /// add, the norm's ops, the padding mask, the key product, the slot mean); at N = 40 and small
    /// widths that cost a fifth of a pass (docs/performance.md). CPU and f32 only; elsewhere
    /// `None`, and the model takes the two-step path.
    fn embed_muxed(&self, input: &TextInput, scales: &Tensor) -> Result<Option<Embedded>> {
        if !self.tokens.device().is_cpu() || self.tokens.dtype() != DType::F32 {
            return Ok(None);
        }
        let (b, n, l) = input.ids.dims3()?;
        let d = self.d;
        self.tail.check_len(l)?;
        if scales.dims2()? != (n, d) {
            candle_core::bail!("slot scales {:?} for (N, D) = ({n}, {d})", scales.shape());
        }
        let vocab = self.tokens.dim(0)?;
        let ids = input.ids.flatten_all()?.to_vec1::<u32>()?; // B·N·L
        let pad = input.pad.flatten_all()?.to_vec1::<u8>()?; // B·N·L
        if let Some(bad) = ids.iter().find(|&&id| id as usize >= vocab) {
            candle_core::bail!("token id {bad} is outside the vocabulary of {vocab}");
        }
        let scales = scales
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?; // N·D
        let positions = self.tail.positions.narrow(0, 0, l)?;
        let positions = match self.segment()? {
            Some(row) => positions.broadcast_add(&row)?, // the segment's row folded in, (L, D)
            None => positions,
        };
        let positions = positions.flatten_all()?.to_vec1::<f32>()?; // L·D
        let norm = match &self.tail.norm {
            Some(norm) => {
                let (w, bias, eps) = norm.params();
                Some((w.to_vec1::<f32>()?, bias.to_vec1::<f32>()?, eps as f32))
            }
            None => None,
        };
        // The token table is read in place: copying (vocab, D) per call would cost more than
        // the whole frontend.
        let (storage, layout) = self.tokens.storage_and_layout();
        let Storage::Cpu(cpu) = &*storage else {
            return Ok(None);
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            return Ok(None);
        };
        let table = &cpu.as_slice::<f32>()?[start..end]; // vocab·D
        let mut out = vec![0f32; b * l * d]; // (B, L, D), one row per muxed position
        out.par_chunks_mut(d).enumerate().for_each_init(
            || vec![0f32; d],
            |x, (row, acc)| {
                let (bi, li) = (row / l, row % l);
                let pos = &positions[li * d..(li + 1) * d];
                // The loops below compiled for this CPU's SIMD width, the sums in lanes.
                datamux_core::fused::vectorized(|| {
                    for i in 0..n {
                        let k = (bi * n + i) * l + li; // (bi, i, li) in (B, N, L)
                        if pad[k] != 0 {
                            continue; // padding adds nothing to the mix
                        }
                        let id = ids[k] as usize;
                        let tok = &table[id * d..(id + 1) * d];
                        for ((x, t), p) in x.iter_mut().zip(tok).zip(pos) {
                            *x = t + p;
                        }
                        let s = &scales[i * d..(i + 1) * d];
                        match &norm {
                            Some((w, bias, eps)) => {
                                let mean = lane_sum(x) / d as f32;
                                x.iter_mut().for_each(|v| *v -= mean);
                                let var = lane_dot(x, x) / d as f32;
                                let r = 1.0 / (var + eps).sqrt();
                                let terms = x.iter().zip(s).zip(w).zip(bias);
                                for (a, (((x, s), w), c)) in acc.iter_mut().zip(terms) {
                                    *a += s * (x * r * w + c);
                                }
                            }
                            None => {
                                for ((a, x), s) in acc.iter_mut().zip(x.iter()).zip(s) {
                                    *a += s * x;
                                }
                            }
                        }
                    }
                });
            },
        );
        drop(storage);
        Ok(Some(Embedded {
            xs: Tensor::from_vec(out, (b, l, d), self.tokens.device())?,
            pad: Some(input.pad.clone()),
        }))
    }
}

/// The core encoder, optionally behind a LayerNorm on the muxed input (`mux_norm`).
#[derive(Clone, Debug)]
pub struct TextBackbone {
    norm: Option<LayerNorm>,
    encoder: Encoder,
}

impl TextBackbone {
    pub fn new(cfg: &encoder::Config, mux_norm: bool, vb: VarBuilder<'_>) -> Result<Self> {
        let norm = if mux_norm {
            Some(LayerNorm::new(
                cfg.hidden_size,
                cfg.layer_norm_eps,
                vb.pp("mux_norm"),
            )?)
        } else {
            None
        };
        Ok(Self {
            norm,
            encoder: Encoder::new(cfg, vb)?,
        })
    }

    pub fn encoder(&self) -> &Encoder {
        &self.encoder
    }
}

impl Backbone for TextBackbone {
    fn forward_t(&self, xs: &Tensor, pad: Option<&Tensor>, train: bool) -> Result<Tensor> {
        match &self.norm {
            Some(norm) => self
                .encoder
                .forward_t(&norm.forward_t(xs, train)?, pad, train),
            None => self.encoder.forward_t(xs, pad, train),
        }
    }

    fn hidden_size(&self) -> usize {
        Backbone::hidden_size(&self.encoder)
    }

    fn name(&self) -> String {
        "the text transformer".into()
    }

    fn forward_flops(&self, rows: usize, len: usize) -> Option<f64> {
        self.encoder.forward_flops(rows, len)
    }

    fn forward_prefix(
        &self,
        xs: &Tensor,
        pad: Option<&Tensor>,
        train: bool,
        rows: usize,
    ) -> Result<Tensor> {
        match &self.norm {
            Some(norm) => {
                self.encoder
                    .forward_prefix(&norm.forward_t(xs, train)?, pad, train, rows)
            }
            None => self.encoder.forward_prefix(xs, pad, train, rows),
        }
    }

    fn prefix_flops(&self, rows: usize, len: usize, keep: usize) -> Option<f64> {
        self.encoder.prefix_flops(rows, len, keep)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use datamux_core::SeededVarMap;
    use datamux_core::init::{randn_vec, rng_for};

    /// The fused pass equals the two-step one: Σᵢ sᵢ ⊙ embed(input)[:, i], padding included.
    #[test]
    fn embed_muxed_agrees_with_embed_then_scaled_sum() -> Result<()> {
        let dev = Device::Cpu;
        let (b, n, l, d, vocab) = (2, 3, 7, 13, 29);
        let ids: Vec<u32> = (0..b * n * l).map(|i| (i * 7 % vocab) as u32).collect();
        // Instance 1 of every row is padded from position 4; position 6 of row 0 is padding in
        // every instance.
        let pad: Vec<u8> = (0..b * n * l)
            .map(|k| {
                let (row, slot, pos) = (k / (n * l), k / l % n, k % l);
                u8::from((slot == 1 && pos >= 4) || (row == 0 && pos == 6))
            })
            .collect();
        let input = TextInput {
            ids: Tensor::from_vec(ids, (b, n, l), &dev)?,
            pad: Tensor::from_vec(pad, (b, n, l), &dev)?,
        };
        let scales = randn_vec(&mut rng_for(1, "scales"), n * d);
        let scales = Tensor::from_vec(scales, (n, d), &dev)?;
        for norm in [true, false] {
            let map = SeededVarMap::new(3);
            let vb = map.var_builder(DType::F32, &dev);
            let fe = TextFrontend::new(vocab, 11, d, norm, 0.1, 1e-5, vb)?;
            let fused = fe
                .embed_muxed(&input, &scales)?
                .expect("CPU f32 has a fused path");
            assert_eq!(fused.xs.dims3()?, (b, l, d));
            // Two steps: (B, N, L, D) ⊙ (1, N, 1, D), summed over N.
            let two = fe
                .embed(&input, false)?
                .xs
                .broadcast_mul(&scales.reshape((1, n, 1, d))?)?
                .sum(1)?;
            let diff = (&fused.xs - &two)?.abs()?.max_all()?.to_scalar::<f32>()?;
            let size = two.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(size > 0.1, "norm {norm}: degenerate test, max {size}");
            assert!(diff <= 1e-5 * size.max(1.0), "norm {norm}: diff {diff}");
        }
        Ok(())
    }

    #[test]
    fn embed_muxed_rejects_ids_outside_the_vocabulary() -> Result<()> {
        let dev = Device::Cpu;
        let map = SeededVarMap::new(0);
        let fe = TextFrontend::new(5, 4, 3, true, 0.0, 1e-5, map.var_builder(DType::F32, &dev))?;
        let input = TextInput {
            ids: Tensor::from_vec(vec![1u32, 9], (1, 1, 2), &dev)?,
            pad: Tensor::zeros((1, 1, 2), DType::U8, &dev)?,
        };
        let err = fe
            .embed_muxed(&input, &Tensor::ones((1, 3), DType::F32, &dev)?)
            .unwrap_err();
        assert!(err.to_string().contains("token id 9"), "{err}");
        Ok(())
    }
}
