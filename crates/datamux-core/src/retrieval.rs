//! The retrieval warm-up head: for every muxed row and every kept position, draw one instance
//! slot uniformly and predict that slot's input token at that position.
//!
//! DataMUX (arXiv 2202.09318), the retrieval warm-up; method.md §5. Reference:
//! `princeton-nlp/DataMUX`, `models/multiplexing.py` (`RetrievalHeadIndexDemultiplexing`,
//! `RetrievalHeadMLPDemultiplexing`). As in the reference the head has its own demultiplexer
//! parameters and an untied `D -> V` decoder. Only the sampled (position, slot) pairs are
//! demultiplexed and decoded, so the cost is `K·D·V` for K kept positions, not `N·K·D·V`.

use candle_core::{Device, Result, Tensor};
use candle_nn::VarBuilder;
use rand::Rng;
use rand_chacha::ChaCha8Rng;

use crate::demux::{self, Demux, Pairs};
use crate::layers::{self, Linear};

/// Sampled retrieval targets of one batch, on the host.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RetrievalTargets {
    /// `b·T + P + j` for each kept (row b, position j); `T = P + L`.
    pub rows: Vec<u32>,
    /// The sampled instance slot `r` of each kept position.
    pub slots: Vec<u32>,
    /// `b·T + r`: the prefix slot of the sampled instance (used by `index`).
    pub slot_rows: Vec<u32>,
    /// The token id of instance `r` at position `j`.
    pub targets: Vec<u32>,
}

impl RetrievalTargets {
    /// Draw one slot per (row, position) and keep the pair where that slot is a real instance,
    /// its token is not padding, and a draw with probability `fraction` says so (the reference's
    /// `retrieval_percentage`; 1.0 keeps every target). `tokens` and `pad` are `(B, N, L)`
    /// row-major, `real` is `(B, N)`. The draws are made for every position, kept or not, so the
    /// stream does not depend on the padding.
    pub fn sample(
        tokens: &[u32],
        pad: &[bool],
        real: &[bool],
        (b, n, l): (usize, usize, usize),
        prefix_len: usize,
        fraction: f64,
        rng: &mut ChaCha8Rng,
    ) -> Self {
        let t = prefix_len + l;
        let mut out = Self::default();
        for row in 0..b {
            for j in 0..l {
                let r = rng.random_range(0..n);
                let keep = fraction >= 1.0 || rng.random_bool(fraction.clamp(0.0, 1.0));
                let inst = row * n + r;
                if !keep || !real[inst] || pad[inst * l + j] {
                    continue;
                }
                out.rows.push((row * t + prefix_len + j) as u32);
                out.slots.push(r as u32);
                out.slot_rows.push((row * t + r) as u32);
                out.targets.push(tokens[inst * l + j]);
            }
        }
        out
    }

    pub fn len(&self) -> usize {
        self.targets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.targets.is_empty()
    }

    fn pairs(&self, dev: &Device) -> Result<Pairs> {
        let k = self.len();
        Ok(Pairs {
            rows: Tensor::from_slice(&self.rows, k, dev)?,
            slots: Tensor::from_slice(&self.slots, k, dev)?,
            slot_rows: Tensor::from_slice(&self.slot_rows, k, dev)?,
        })
    }
}

/// ref: `RetrievalHeadIndexDemultiplexing` / `RetrievalHeadMLPDemultiplexing`.
#[derive(Clone, Debug)]
pub struct RetrievalHead {
    demux: Demux,
    decoder: Linear,
}

/// Loss and counts of one retrieval evaluation.
#[derive(Debug)]
pub struct RetrievalOutput {
    /// Mean cross-entropy over the kept positions (a zero scalar when none were kept).
    pub loss: Tensor,
    pub correct: u64,
    pub total: u64,
}

impl RetrievalHead {
    pub fn new(
        cfg: &demux::Config,
        n: usize,
        d: usize,
        vocab: usize,
        vb: VarBuilder<'_>,
    ) -> Result<Self> {
        let demux = Demux::new(cfg, n, d, vb.pp("demux"))?;
        let decoder = layers::linear(d, vocab, vb.pp("decoder"))?;
        Ok(Self { demux, decoder })
    }

    /// `(B, T, D)` and K targets -> `(K, V)` logits.
    pub fn logits(
        &self,
        encoded: &Tensor,
        targets: &RetrievalTargets,
        train: bool,
    ) -> Result<Tensor> {
        let pairs = targets.pairs(encoded.device())?;
        self.demux
            .forward_pairs(encoded, &pairs, train)?
            .apply(&self.decoder)
    }

    /// Cross-entropy and accuracy of the sampled targets.
    pub fn forward_t(
        &self,
        encoded: &Tensor,
        targets: &RetrievalTargets,
        train: bool,
    ) -> Result<RetrievalOutput> {
        if targets.is_empty() {
            let loss = Tensor::zeros((), encoded.dtype(), encoded.device())?;
            return Ok(RetrievalOutput {
                loss,
                correct: 0,
                total: 0,
            });
        }
        let logits = self.logits(encoded, targets, train)?; // (K, V)
        let k = targets.len();
        let loss = crate::fused::cross_entropy(&logits, &targets.targets)?;
        let pred = logits.argmax(1)?.to_vec1::<u32>()?;
        let correct = pred
            .iter()
            .zip(&targets.targets)
            .filter(|(p, t)| p == t)
            .count() as u64;
        Ok(RetrievalOutput {
            loss,
            correct,
            total: k as u64,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::init::rng_for;

    #[test]
    fn sampling_skips_padding_and_dummies() {
        // B = 1, N = 2, L = 3; instance 1 is a dummy, instance 0 pads its last position.
        let tokens = [5, 6, 7, 8, 9, 10];
        let pad = [false, false, true, false, false, false];
        let real = [true, false];
        let t = RetrievalTargets::sample(
            &tokens,
            &pad,
            &real,
            (1, 2, 3),
            3,
            1.0,
            &mut rng_for(0, "r"),
        );
        for (i, &slot) in t.slots.iter().enumerate() {
            assert_eq!(slot, 0);
            let j = t.rows[i] as usize - 3;
            assert!(j < 2);
            assert_eq!(t.targets[i], tokens[j]);
            assert_eq!(t.slot_rows[i], 0);
        }
    }

    #[test]
    fn fraction_keeps_about_that_share() {
        let (b, n, l) = (20, 2, 50);
        let tokens = vec![1u32; b * n * l];
        let pad = vec![false; b * n * l];
        let real = vec![true; b * n];
        let all = RetrievalTargets::sample(
            &tokens,
            &pad,
            &real,
            (b, n, l),
            0,
            1.0,
            &mut rng_for(0, "r"),
        );
        let some = RetrievalTargets::sample(
            &tokens,
            &pad,
            &real,
            (b, n, l),
            0,
            0.25,
            &mut rng_for(0, "r"),
        );
        assert_eq!(all.len(), b * l);
        assert!((200..300).contains(&some.len()), "{}", some.len());
    }
}
