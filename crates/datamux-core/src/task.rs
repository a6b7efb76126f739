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
    /// Embedding tasks: every real instance's predicted and target embedding, kept whole
    /// because the nearest-neighbour agreement compares each instance with all the others.
    pub embeddings: Vec<EmbeddingPair>,
}

/// One instance of an embedding task: its slot, the demultiplexed embedding and the target.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct EmbeddingPair {
    pub slot: usize,
    pub predicted: Vec<f32>,
    pub target: Vec<f32>,
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
        self.embeddings.extend(other.embeddings.iter().cloned());
    }

    /// `(metric, value)` pairs: `accuracy` with its per-slot `accuracy_slot_min` and
    /// `accuracy_slot_max` (slots interfere unequally), `retrieval_accuracy`, and `f1` (entity
    /// level, micro, as seqeval computes it) for token tasks, and for embedding tasks `cosine`
    /// (mean cosine of each instance's embedding to its target) with `cosine_slot_min` /
    /// `cosine_slot_max` and `nn_agreement` ([`nn_agreement`]). Metrics with nothing counted
    /// are left out rather than reported as 0.
    pub fn metrics(&self) -> Vec<(&'static str, f64)> {
        let mut out = Vec::new();
        if !self.embeddings.is_empty() {
            let n = self
                .embeddings
                .iter()
                .map(|e| e.slot + 1)
                .max()
                .unwrap_or(1);
            let mut slots = vec![(0.0f64, 0u64); n];
            for e in &self.embeddings {
                slots[e.slot].0 += f64::from(cosine(&e.predicted, &e.target));
                slots[e.slot].1 += 1;
            }
            let (sum, count) = slots
                .iter()
                .fold((0.0, 0), |(s, c), (ss, cc)| (s + ss, c + cc));
            let per_slot = slots
                .iter()
                .filter(|(_, c)| *c > 0)
                .map(|(s, c)| s / *c as f64);
            out.push(("cosine", sum / count as f64));
            out.push((
                "cosine_slot_min",
                per_slot.clone().fold(f64::INFINITY, f64::min),
            ));
            out.push((
                "cosine_slot_max",
                per_slot.fold(f64::NEG_INFINITY, f64::max),
            ));
            if self.embeddings.len() > 1 {
                out.push(("nn_agreement", nn_agreement(&self.embeddings)));
            }
        }
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

/// Cosine similarity; 0 where either vector is all zeros.
pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
    let d = norm(a) * norm(b);
    if d > 0.0 { dot / d } else { 0.0 }
}

/// The share of instances whose nearest neighbour (by cosine, among all the other instances)
/// is the same with the predicted embeddings as with the targets. Ties go to the lower index.
pub fn nn_agreement(pairs: &[EmbeddingPair]) -> f64 {
    fn unit(v: &[f32]) -> Vec<f32> {
        let n = v
            .iter()
            .map(|x| x * x)
            .sum::<f32>()
            .sqrt()
            .max(f32::MIN_POSITIVE);
        v.iter().map(|x| x / n).collect()
    }
    fn nearest(units: &[Vec<f32>]) -> Vec<usize> {
        (0..units.len())
            .map(|i| {
                let mut best = (f32::NEG_INFINITY, usize::MAX);
                for (j, u) in units.iter().enumerate() {
                    if j == i {
                        continue;
                    }
                    let c: f32 = units[i].iter().zip(u).map(|(x, y)| x * y).sum();
                    if c > best.0 {
                        best = (c, j);
                    }
                }
                best.1
            })
            .collect()
    }
    let pred: Vec<Vec<f32>> = pairs.iter().map(|p| unit(&p.predicted)).collect();
    let target: Vec<Vec<f32>> = pairs.iter().map(|p| unit(&p.target)).collect();
    let same = nearest(&pred)
        .iter()
        .zip(nearest(&target))
        .filter(|(a, b)| **a == *b)
        .count();
    same as f64 / pairs.len().max(1) as f64
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
    /// The learning rate of the parameter `name` over the stage's (all 1 by default).
    fn lr_scale(&self, _name: &str) -> f64 {
        1.0
    }
    /// The validation metric that selects the best checkpoint.
    fn selection_metric(&self) -> &'static str {
        "accuracy"
    }
    /// [`Self::loss`] with soft targets: `(1 − w)·task + w·distillation`, the distillation term
    /// [`real_distillation`] against `teacher` logits laid out as [`Self::predict`]'s (one row per
    /// slot). A task without it says so.
    fn loss_distilled(
        &self,
        _batch: &Self::Batch,
        _teacher: &Tensor,
        _soft: Soft,
        _train: bool,
    ) -> Result<Losses> {
        candle_core::bail!("this task has no distillation (train.distill)")
    }
}

/// Weight and temperature of the distillation term.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Soft {
    pub weight: f64,
    pub temperature: f64,
}

/// `(1 − w)·task + w·T²·KL(softmax(teacher / T) ‖ softmax(student / T))` over the real rows of
/// `(B·N, C)` logits (Hinton et al. 2015: the `T²` keeps the soft term's gradients on the scale
/// of the hard one's as `T` grows). The teacher's logits are constants.
pub fn distilled(
    task_loss: &Tensor,
    student: &Tensor,
    teacher: &Tensor,
    real: &[bool],
    soft: Soft,
) -> Result<Tensor> {
    let kl = real_distillation(student, teacher, real, soft.temperature)?;
    (task_loss * (1.0 - soft.weight))? + (kl * soft.weight)?
}

/// `T²` times the mean over the real rows of `KL(softmax(teacher / T) ‖ softmax(student / T))`,
/// both `(B·N, C)`; gradients reach the student only.
pub fn real_distillation(
    student: &Tensor,
    teacher: &Tensor,
    real: &[bool],
    temperature: f64,
) -> Result<Tensor> {
    if student.dims() != teacher.dims() {
        candle_core::bail!(
            "distillation: student logits {:?}, teacher logits {:?}",
            student.dims(),
            teacher.dims()
        );
    }
    let (keep, idx) = real_rows(real, student.device())?;
    let t = temperature;
    let log_q = candle_nn::ops::log_softmax(&(student.index_select(&idx, 0)? / t)?, 1)?; // (R, C)
    let log_p = candle_nn::ops::log_softmax(&(teacher.detach().index_select(&idx, 0)? / t)?, 1)?;
    let p = log_p.exp()?;
    let kl = (p * (log_p - log_q)?)?.sum_all()?; // Σ over rows and classes
    kl * (t * t / keep.len().max(1) as f64)
}

/// Mean cross-entropy over the real rows of `(B·N, C)` logits; dummy rows are removed before
/// the loss, so neither their labels nor their predictions can change it.
pub fn real_cross_entropy(logits: &Tensor, labels: &[u32], real: &[bool]) -> Result<Tensor> {
    let (keep, idx) = real_rows(real, logits.device())?;
    let kept_labels: Vec<u32> = keep.iter().map(|i| labels[*i as usize]).collect();
    crate::fused::cross_entropy(&logits.index_select(&idx, 0)?, &kept_labels)
}

/// The indices of the real rows, as a list and as a `(R)` tensor for `index_select`.
fn real_rows(real: &[bool], dev: &candle_core::Device) -> Result<(Vec<u32>, Tensor)> {
    let keep: Vec<u32> = (0..real.len() as u32)
        .filter(|i| real[*i as usize])
        .collect();
    let idx = Tensor::from_slice(&keep, keep.len(), dev)?;
    Ok((keep, idx))
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

/// `1 − cos(predicted, target)` averaged over the real rows of `(B·N, D)` embeddings, in
/// plain tensor ops so that every input receives a gradient. The norms are floored at 1e-6 so
/// an all-zero row (a fresh head's output can be one) gives a finite gradient.
pub fn real_cosine_loss(predicted: &Tensor, target: &Tensor, real: &[bool]) -> Result<Tensor> {
    let (_, idx) = real_rows(real, predicted.device())?;
    let (p, t) = (
        predicted.index_select(&idx, 0)?,
        target.index_select(&idx, 0)?,
    ); // (R, D)
    let norm =
        |x: &Tensor| -> Result<Tensor> { x.sqr()?.sum_keepdim(1)?.sqrt()?.clamp(1e-6, f64::MAX) };
    let dot = (&p * &t)?.sum_keepdim(1)?; // (R, 1)
    let cos = (dot / (norm(&p)? * norm(&t)?)?)?;
    cos.mean_all()?.affine(-1.0, 1.0)
}

/// The [`EmbeddingPair`]s of the real rows of `(B·N, D)` predictions and targets; row `r` is
/// slot `r % N`.
pub fn embedding_pairs(
    predicted: &Tensor,
    target: &Tensor,
    real: &[bool],
    n: usize,
) -> Result<Score> {
    let (p, t) = (predicted.to_vec2::<f32>()?, target.to_vec2::<f32>()?);
    let mut score = Score::default();
    for (row, (p, t)) in p.into_iter().zip(t).enumerate() {
        if !real[row] {
            continue;
        }
        score.examples += 1;
        score.embeddings.push(EmbeddingPair {
            slot: row % n,
            predicted: p,
            target: t,
        });
    }
    Ok(score)
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Var};

    use super::*;

    #[test]
    fn distillation_is_zero_at_the_teacher_and_trains_the_student_only() -> Result<()> {
        let dev = Device::Cpu;
        let teacher = Tensor::new(
            &[[2.0f32, -1.0, 0.5], [0.0, 1.0, 3.0], [9.0, 9.0, 9.0]],
            &dev,
        )?;
        let real = [true, true, false]; // the dummy row would dominate if it counted
        let same = real_distillation(&teacher, &teacher, &real, 3.0)?.to_scalar::<f32>()?;
        assert!(same.abs() < 1e-6, "{same}");
        let var = Var::from_tensor(&Tensor::zeros((3, 3), candle_core::DType::F32, &dev)?)?;
        let kl = real_distillation(var.as_tensor(), &teacher, &real, 2.0)?;
        assert!(kl.to_scalar::<f32>()? > 0.0);
        let grads = kl.backward()?;
        let g = grads
            .get(var.as_tensor())
            .expect("student gradient")
            .to_vec2::<f32>()?;
        assert!(g[0].iter().any(|v| v.abs() > 1e-4));
        assert!(
            g[2].iter().all(|v| *v == 0.0),
            "a dummy row got a gradient: {:?}",
            g[2]
        );
        Ok(())
    }

    fn pair(slot: usize, predicted: &[f32], target: &[f32]) -> EmbeddingPair {
        EmbeddingPair {
            slot,
            predicted: predicted.to_vec(),
            target: target.to_vec(),
        }
    }

    #[test]
    fn embedding_metrics_average_cosines_per_slot_and_compare_neighbours() {
        // Targets: 0 and 1 are neighbours, 2 is nearest to 1. Predictions keep 0 <-> 1 but make
        // 2 nearest to 0.
        let pairs = vec![
            pair(0, &[1.0, 0.0, 0.0], &[1.0, 0.0, 0.0]),
            pair(1, &[0.9, 0.1, 0.0], &[0.8, 0.6, 0.0]),
            pair(0, &[0.8, 0.0, 0.6], &[0.0, 1.0, 0.0]),
        ];
        let score = Score {
            embeddings: pairs.clone(),
            ..Score::default()
        };
        let m: std::collections::HashMap<_, _> = score.metrics().into_iter().collect();
        let cos: Vec<f64> = pairs
            .iter()
            .map(|p| f64::from(cosine(&p.predicted, &p.target)))
            .collect();
        assert!((m["cosine"] - cos.iter().sum::<f64>() / 3.0).abs() < 1e-9);
        assert!((m["cosine_slot_min"] - (cos[0] + cos[2]) / 2.0).abs() < 1e-9);
        assert!((m["cosine_slot_max"] - cos[1]).abs() < 1e-9);
        assert!((m["nn_agreement"] - 2.0 / 3.0).abs() < 1e-9);
        assert!(!m.contains_key("accuracy"));
    }

    #[test]
    fn cosine_loss_skips_dummies_and_reaches_every_input() -> Result<()> {
        let dev = Device::Cpu;
        let p = Var::from_vec(vec![1f32, 0.0, 0.5, 0.5, 3.0, -1.0], (3, 2), &dev)?;
        let t = Tensor::from_vec(vec![1f32, 0.0, 0.0, 1.0, 9.0, 9.0], (3, 2), &dev)?;
        let loss = real_cosine_loss(p.as_tensor(), &t, &[true, true, false])?;
        let want = 1.0 - (1.0 + 0.5f32.sqrt()) / 2.0;
        assert!((loss.to_scalar::<f32>()? - want).abs() < 1e-6);
        let g = loss
            .backward()?
            .get(p.as_tensor())
            .expect("grad")
            .to_vec2::<f32>()?;
        assert!(g[1].iter().any(|x| x.abs() > 1e-4), "{g:?}");
        assert_eq!(g[2], [0.0, 0.0], "a dummy row moved the loss");
        Ok(())
    }
}
