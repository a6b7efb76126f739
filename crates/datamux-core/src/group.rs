//! Grouping examples into muxed rows: M examples become `ceil(M / N)` rows of N slots; the last
//! row is filled with dummy slots that every loss and metric excludes. Nothing is truncated or
//! dropped (method.md §13, differences 7 and 8). Pure index logic, no tensors.

use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;

/// Slots of muxed rows, row-major: slot `r·N + i` is instance i of row r; `None` is a dummy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Groups {
    pub n: usize,
    pub slots: Vec<Option<usize>>,
}

impl Groups {
    /// Consecutive examples in the given order, the last row padded with dummies.
    pub fn consecutive(order: &[usize], n: usize) -> Self {
        let n = n.max(1);
        let rows = order.len().div_ceil(n);
        let mut slots: Vec<Option<usize>> = order.iter().copied().map(Some).collect();
        slots.resize(rows * n, None);
        Self { n, slots }
    }

    pub fn rows(&self) -> usize {
        self.slots.len() / self.n
    }

    /// Batches of at most `rows_per_batch` rows, as slot slices (`B·N` entries each).
    pub fn batches(&self, rows_per_batch: usize) -> impl Iterator<Item = &[Option<usize>]> {
        self.slots.chunks(rows_per_batch.max(1) * self.n)
    }
}

/// `(B·N)` flags, true for real instances.
pub fn real_mask(slots: &[Option<usize>]) -> Vec<bool> {
    slots.iter().map(Option::is_some).collect()
}

/// An endless stream of training examples: a fresh ChaCha shuffle per epoch, so consecutive
/// slots form random tuples (as the reference's shuffled sampler does).
pub struct TrainStream {
    order: Vec<usize>,
    pos: usize,
    rng: ChaCha8Rng,
    pub epoch: usize,
}

impl TrainStream {
    pub fn new(len: usize, rng: ChaCha8Rng) -> Self {
        let mut s = Self {
            order: (0..len).collect(),
            pos: 0,
            rng,
            epoch: 0,
        };
        s.order.shuffle(&mut s.rng);
        s
    }

    /// The next `count` example indices, reshuffling at each epoch boundary. Every slot is a
    /// real example, so training batches have no dummies.
    pub fn next_batch(&mut self, count: usize) -> Vec<Option<usize>> {
        let mut out = Vec::with_capacity(count);
        while out.len() < count && !self.order.is_empty() {
            if self.pos == self.order.len() {
                self.order.shuffle(&mut self.rng);
                self.pos = 0;
                self.epoch += 1;
            }
            out.push(Some(self.order[self.pos]));
            self.pos += 1;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::init::rng_for;

    #[test]
    fn last_group_is_padded_not_dropped() {
        let g = Groups::consecutive(&[0, 1, 2, 3, 4, 5, 6], 3);
        assert_eq!(g.rows(), 3);
        assert_eq!(g.slots[6..], [Some(6), None, None]);
        let batches: Vec<_> = g.batches(2).collect();
        assert_eq!(batches.len(), 2);
        assert_eq!(batches[1], [Some(6), None, None]);
        assert_eq!(real_mask(batches[1]), [true, false, false]);
    }

    #[test]
    fn stream_covers_every_example_each_epoch() {
        let mut s = TrainStream::new(5, rng_for(0, "data.shuffle"));
        let mut seen: Vec<usize> = s.next_batch(5).into_iter().flatten().collect();
        seen.sort_unstable();
        assert_eq!(seen, [0, 1, 2, 3, 4]);
        assert_eq!(s.next_batch(7).len(), 7);
        assert_eq!(s.epoch, 2); // 12 draws of 5 examples: the third pass has begun
    }
}
