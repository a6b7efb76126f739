//! The [`Task`] trait that the runner's one training loop and one speed harness drive, and the
//! additive [`Score`] counts every evaluation returns.

use candle_core::{Result, Tensor};
use rand_chacha::ChaCha8Rng;

/// The losses of one batch. `total = α_task · task + α_ret · retrieval`.
#[derive(Debug)]
pub struct Losses {
    pub total: Tensor,
    pub task: Option<Tensor>,
    pub retrieval: Option<Tensor>,
}

/// Counts for one batch or one split, added up across batches; metrics are derived at the end.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Score {
    /// Correct predictions per instance slot (examples, or labelled tokens for token tasks).
    pub slot_correct: Vec<u64>,
    pub slot_total: Vec<u64>,
    /// Real examples scored (dummies excluded); must equal the split size.
    pub examples: u64,
    pub retrieval_correct: u64,
    pub retrieval_total: u64,
    /// Entity-level true positives, false positives and false negatives (token tasks).
    pub spans: Option<[u64; 3]>,
}

impl Score {
    pub fn with_slots(n: usize) -> Self {
        Self {
            slot_correct: vec![0; n],
            slot_total: vec![0; n],
            ..Self::default()
        }
    }

    pub fn merge(&mut self, other: &Score) {
        if self.slot_correct.len() < other.slot_correct.len() {
            self.slot_correct.resize(other.slot_correct.len(), 0);
            self.slot_total.resize(other.slot_total.len(), 0);
        }
        for (i, (c, t)) in other.slot_correct.iter().zip(&other.slot_total).enumerate() {
            self.slot_correct[i] += c;
            self.slot_total[i] += t;
        }
        self.examples += other.examples;
        self.retrieval_correct += other.retrieval_correct;
        self.retrieval_total += other.retrieval_total;
        if let Some(o) = other.spans {
            let s = self.spans.get_or_insert([0; 3]);
            (0..3).for_each(|i| s[i] += o[i]);
        }
    }

    /// `(metric, value)` pairs: `accuracy` with its per-slot `accuracy_slot_min` and
    /// `accuracy_slot_max` (slots interfere unequally), `retrieval_accuracy`, and `f1` (entity
    /// level, micro, as seqeval computes it) for token tasks. Metrics with nothing counted are
    /// left out rather than reported as 0.
    pub fn metrics(&self) -> Vec<(&'static str, f64)> {
        let mut out = Vec::new();
        let total: u64 = self.slot_total.iter().sum();
        if total > 0 {
            let correct: u64 = self.slot_correct.iter().sum();
            out.push(("accuracy", correct as f64 / total as f64));
            let per_slot: Vec<f64> = self
                .slot_correct
                .iter()
                .zip(&self.slot_total)
                .filter(|(_, t)| **t > 0)
                .map(|(c, t)| *c as f64 / *t as f64)
                .collect();
            out.push((
                "accuracy_slot_min",
                per_slot.iter().copied().fold(f64::INFINITY, f64::min),
            ));
            out.push((
                "accuracy_slot_max",
                per_slot.iter().copied().fold(f64::NEG_INFINITY, f64::max),
            ));
        }
        if self.retrieval_total > 0 {
            out.push((
                "retrieval_accuracy",
                self.retrieval_correct as f64 / self.retrieval_total as f64,
            ));
        }
        if let Some([tp, fp, fn_]) = self.spans {
            let p = if tp + fp > 0 {
                tp as f64 / (tp + fp) as f64
            } else {
                0.0
            };
            let r = if tp + fn_ > 0 {
                tp as f64 / (tp + fn_) as f64
            } else {
                0.0
            };
            out.push((
                "f1",
                if p + r > 0.0 {
                    2.0 * p * r / (p + r)
                } else {
                    0.0
                },
            ));
        }
        out
    }

    pub fn metric(&self, name: &str) -> Option<f64> {
        self.metrics()
            .into_iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v)
    }
}

/// A task a modality crate implements and the runner drives: batching of plain Rust data, the
/// training loss, scoring and inference.
pub trait Task {
    /// One split of the task's data, in plain Rust (no polars, no tensors).
    type Data;
    /// A device-ready batch of muxed rows.
    type Batch;

    fn n_instances(&self) -> usize;
    /// Examples in a split.
    fn len(&self, data: &Self::Data) -> usize;
    /// The length of example `i`, for batching examples of similar length together; tasks whose
    /// examples all cost the same keep the default.
    fn example_len(&self, _data: &Self::Data, _i: usize) -> usize {
        0
    }
    /// Build a batch from group slots (`B·N` entries, `None` = dummy instance). `rng` draws
    /// anything random about the batch (retrieval slots).
    fn batch(
        &self,
        data: &Self::Data,
        slots: &[Option<usize>],
        rng: &mut ChaCha8Rng,
    ) -> Result<Self::Batch>;
    /// Losses on the real instances only.
    fn loss(&self, batch: &Self::Batch, train: bool) -> Result<Losses>;
    /// Counts on the real instances only.
    fn score(&self, batch: &Self::Batch) -> Result<Score>;
    /// Inference only: the task logits, without the retrieval head or any loss.
    fn predict(&self, batch: &Self::Batch) -> Result<Tensor>;
    /// The validation metric that selects the best checkpoint.
    fn selection_metric(&self) -> &'static str {
        "accuracy"
    }
}

/// Mean cross-entropy over the real rows of `(B·N, C)` logits; dummy rows are removed before
/// the loss, so neither their labels nor their predictions can change it.
pub fn real_cross_entropy(logits: &Tensor, labels: &[u32], real: &[bool]) -> Result<Tensor> {
    let keep: Vec<u32> = (0..real.len() as u32)
        .filter(|i| real[*i as usize])
        .collect();
    let dev = logits.device();
    let idx = Tensor::from_slice(&keep, keep.len(), dev)?;
    let kept_labels: Vec<u32> = keep.iter().map(|i| labels[*i as usize]).collect();
    crate::fused::cross_entropy(&logits.index_select(&idx, 0)?, &kept_labels)
}

/// Per-slot accuracy counts of `(B·N, C)` logits over the real rows; row `r` is slot `r % N`.
pub fn slot_counts(logits: &Tensor, labels: &[u32], real: &[bool], n: usize) -> Result<Score> {
    let pred = logits.argmax(candle_core::D::Minus1)?.to_vec1::<u32>()?;
    let mut score = Score::with_slots(n);
    for (row, p) in pred.iter().enumerate() {
        if !real[row] {
            continue;
        }
        score.slot_total[row % n] += 1;
        score.slot_correct[row % n] += u64::from(*p == labels[row]);
        score.examples += 1;
    }
    Ok(score)
}
