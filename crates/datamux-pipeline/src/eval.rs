//! Evaluation: every example of a split, consecutive groups of N, the last group padded with
//! dummies that no metric counts.

use anyhow::Result;
use datamux_core::init::rng_for;
use datamux_core::{Groups, Score, Task};

/// Score `task` on the examples `order` of `data` (all of them when `None`), `rows` muxed rows
/// per batch. Retrieval slots are drawn from a fixed stream, so a score is reproducible.
pub fn evaluate<T: Task>(
    task: &T,
    data: &T::Data,
    order: Option<&[usize]>,
    rows: usize,
    seed: u64,
    progress: impl FnMut(usize, usize),
) -> Result<Score> {
    evaluate_at(task, data, order, rows, seed, task.n_instances(), progress)
}

/// [`evaluate`] with `n` real instances in each row (the first `n` slots; the others are
/// empty), as a model of several widths serves `n` (`mux.serve_n`).
pub fn evaluate_at<T: Task>(
    task: &T,
    data: &T::Data,
    order: Option<&[usize]>,
    rows: usize,
    seed: u64,
    n: usize,
    mut progress: impl FnMut(usize, usize),
) -> Result<Score> {
    let all: Vec<usize>;
    let order = match order {
        Some(o) => o,
        None => {
            all = (0..task.len(data)).collect();
            &all
        }
    };
    let order: Vec<Option<usize>> = order.iter().copied().map(Some).collect();
    let groups = Groups::partial(&order, task.n_instances(), n);
    let mut rng = rng_for(seed, "eval.retrieval");
    let mut score = Score::with_slots(task.n_instances());
    let total = groups.rows().div_ceil(rows.max(1));
    for (i, slots) in groups.batches(rows).enumerate() {
        let batch = task.batch(data, slots, &mut rng)?;
        score.merge(&task.score(&batch)?);
        progress(i + 1, total);
    }
    Ok(score)
}
