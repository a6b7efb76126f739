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

    /// Rows of `n` slots of which the first `active` hold consecutive entries of `order` and
    /// the others are dummies (a model of several widths at width `active`; `mux.serve_n`).
    /// With `active = n`, [`Self::consecutive`].
    pub fn partial(order: &[Option<usize>], n: usize, active: usize) -> Self {
        let n = n.max(1);
        let active = active.clamp(1, n);
        let mut slots = Vec::with_capacity(order.len().div_ceil(active) * n);
        for row in order.chunks(active) {
            slots.extend_from_slice(row);
            slots.resize(slots.len() + n - row.len(), None);
        }
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

/// Batches of examples of similar length, for sequence tasks padded to the longest of a batch:
/// a pool of `pool` batches is drawn from a [`TrainStream`], sorted by length, cut into batches,
/// and the batches are served in a shuffled order. Every example is still seen once per epoch;
/// instances muxed together have similar lengths, which cuts the padding a step computes.
pub struct BucketedStream {
    inner: TrainStream,
    pool: usize,
    ready: Vec<Vec<Option<usize>>>,
    rng: ChaCha8Rng,
}

impl BucketedStream {
    pub fn new(inner: TrainStream, pool: usize, rng: ChaCha8Rng) -> Self {
        Self {
            inner,
            pool: pool.max(1),
            ready: Vec::new(),
            rng,
        }
    }

    /// The next `count` examples; `len(i)` is the length of example `i`.
    pub fn next_batch(&mut self, count: usize, len: impl Fn(usize) -> usize) -> Vec<Option<usize>> {
        if self.ready.is_empty() {
            let mut pool = self.inner.next_batch(count * self.pool);
            pool.sort_by_key(|s| s.map_or(0, &len));
            self.ready = pool.chunks(count).map(<[_]>::to_vec).collect();
            self.ready.shuffle(&mut self.rng);
        }
        self.ready.pop().unwrap_or_default()
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
    fn a_partial_row_fills_its_first_slots_and_leaves_the_rest_empty() {
        let order: Vec<Option<usize>> = (0..5).map(Some).collect();
        let g = Groups::partial(&order, 4, 2);
        assert_eq!(g.rows(), 3);
        assert_eq!(
            g.slots,
            [
                Some(0),
                Some(1),
                None,
                None,
                Some(2),
                Some(3),
                None,
                None,
                Some(4),
                None,
                None,
                None
            ]
        );
        let full = Groups::partial(&order, 3, 3);
        assert_eq!(full, Groups::consecutive(&[0, 1, 2, 3, 4], 3));
    }

    #[test]
    fn buckets_group_similar_lengths_and_cover_the_pool() {
        let lens: Vec<usize> = (0..40).map(|i| (i * 7) % 40).collect();
        let mut s = BucketedStream::new(TrainStream::new(40, rng_for(0, "a")), 10, rng_for(0, "b"));
        let mut seen = Vec::new();
        for _ in 0..10 {
            let b: Vec<usize> = s.next_batch(4, |i| lens[i]).into_iter().flatten().collect();
            let (lo, hi) = (
                b.iter().map(|i| lens[*i]).min(),
                b.iter().map(|i| lens[*i]).max(),
            );
            assert!(hi.zip(lo).is_some_and(|(h, l)| h - l <= 3), "{b:?}");
            seen.extend(b);
        }
        seen.sort_unstable();
        assert_eq!(seen, (0..40).collect::<Vec<_>>());
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
