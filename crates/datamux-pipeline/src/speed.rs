//! The speed harness: inference only, a warm-up, then repeated timed passes over the same batch;
//! median, median absolute deviation, min and max latency, and real instances per second. The
//! same number of instances is timed at every N. Warm-up and measurement are each bounded by
//! count and time (house-style §2.7). On CPU every candle op completes before it returns, so the
//! clock needs no device sync.

use std::time::Instant;

use anyhow::Result;
use datamux_core::Task;
use datamux_core::init::rng_for;

use crate::settings::SpeedConfig;

#[derive(Debug, Clone)]
pub struct Timing {
    pub instances: usize,
    pub warmup_iters: usize,
    pub latencies_ms: Vec<f64>,
}

impl Timing {
    pub fn median(&self) -> f64 {
        median(&self.latencies_ms)
    }

    pub fn mad(&self) -> f64 {
        let m = self.median();
        median(
            &self
                .latencies_ms
                .iter()
                .map(|x| (x - m).abs())
                .collect::<Vec<_>>(),
        )
    }

    pub fn min(&self) -> f64 {
        self.latencies_ms
            .iter()
            .copied()
            .fold(f64::INFINITY, f64::min)
    }

    pub fn max(&self) -> f64 {
        self.latencies_ms
            .iter()
            .copied()
            .fold(f64::NEG_INFINITY, f64::max)
    }

    /// Real instances per second at the median latency.
    pub fn throughput(&self) -> f64 {
        self.instances as f64 / (self.median() / 1000.0)
    }
}

pub fn median(xs: &[f64]) -> f64 {
    if xs.is_empty() {
        return f64::NAN;
    }
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    let k = v.len() / 2;
    if v.len() % 2 == 1 {
        v[k]
    } else {
        (v[k - 1] + v[k]) / 2.0
    }
}

/// Time a closure under the config's bounds.
pub fn time<F: FnMut() -> Result<()>>(
    cfg: &SpeedConfig,
    instances: usize,
    mut f: F,
    mut progress: impl FnMut(usize, usize),
) -> Result<Timing> {
    // The file's range check refuses these; a spec written by hand still gets an error.
    let budget = std::time::Duration::try_from_secs_f64(cfg.max_seconds).map_err(|_| {
        anyhow::anyhow!(
            "speed.max_seconds must be a positive number of seconds, got {}",
            cfg.max_seconds
        )
    })?;
    let start = Instant::now();
    let mut warm = 0;
    while warm < cfg.warmup_iters && (warm == 0 || start.elapsed() < budget / 4) {
        f()?;
        warm += 1;
    }
    let start = Instant::now();
    let mut lat = Vec::with_capacity(cfg.iters);
    while lat.len() < cfg.iters.max(1) && (lat.is_empty() || start.elapsed() < budget) {
        let t = Instant::now();
        f()?;
        lat.push(t.elapsed().as_secs_f64() * 1000.0);
        progress(lat.len(), cfg.iters);
    }
    Ok(Timing {
        instances,
        warmup_iters: warm,
        latencies_ms: lat,
    })
}

/// Slots of one timed batch: `batch_instances` rounded up to a multiple of N, filled with real
/// examples (cycling through the split when it is smaller).
pub fn batch_slots(len: usize, n: usize, batch_instances: usize) -> Vec<Option<usize>> {
    let count = batch_instances.div_ceil(n) * n;
    (0..count).map(|i| Some(i % len.max(1))).collect()
}

/// The slots of one timed pass split into forward calls of at most `rows_per_call` muxed rows
/// (`rows_per_call · N` instances); one call when unset.
pub fn pass_calls(
    len: usize,
    n: usize,
    batch_instances: usize,
    rows_per_call: Option<usize>,
) -> Vec<Vec<Option<usize>>> {
    let slots = batch_slots(len, n, batch_instances);
    let per_call = rows_per_call.map_or(slots.len(), |r| r.max(1) * n).max(1);
    slots.chunks(per_call).map(<[_]>::to_vec).collect()
}

/// The batches of one timed pass over `data` (one per forward call, [`pass_calls`]) and the
/// instances they hold.
pub fn pass_batches<T: Task>(
    task: &T,
    data: &T::Data,
    cfg: &SpeedConfig,
) -> Result<(Vec<T::Batch>, usize)> {
    let calls = pass_calls(
        task.len(data),
        task.n_instances(),
        cfg.batch_instances,
        cfg.rows_per_call,
    );
    let batches = calls
        .iter()
        .map(|slots| task.batch(data, slots, &mut rng_for(0, "speed")))
        .collect::<candle_core::Result<Vec<_>>>()?;
    Ok((batches, calls.iter().map(Vec::len).sum()))
}

/// Inference throughput of `task` over prepared `batches` holding `instances` instances.
pub fn time_batches<T: Task>(
    task: &T,
    batches: &[T::Batch],
    instances: usize,
    cfg: &SpeedConfig,
    progress: impl FnMut(usize, usize),
) -> Result<Timing> {
    time(
        cfg,
        instances,
        || {
            for batch in batches {
                task.predict(batch)?;
            }
            Ok(())
        },
        progress,
    )
}

/// Inference throughput of `task` on one pass over `data`: `cfg.batch_instances` instances, in
/// calls of `cfg.rows_per_call` muxed rows.
pub fn time_inference<T: Task>(
    task: &T,
    data: &T::Data,
    cfg: &SpeedConfig,
    progress: impl FnMut(usize, usize),
) -> Result<Timing> {
    let (batches, instances) = pass_batches(task, data, cfg)?;
    time_batches(task, &batches, instances, cfg, progress)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_and_mad() {
        let t = Timing {
            instances: 10,
            warmup_iters: 0,
            latencies_ms: vec![3.0, 1.0, 2.0, 10.0],
        };
        assert_eq!(t.median(), 2.5);
        assert_eq!(t.mad(), 1.0);
        assert_eq!((t.min(), t.max()), (1.0, 10.0));
        assert_eq!(t.throughput(), 4000.0);
    }

    #[test]
    fn same_instances_at_every_n() {
        for n in [1, 2, 4, 8, 16, 5, 10, 20, 40] {
            assert_eq!(batch_slots(7, n, 80).len(), 80, "n = {n}");
        }
        assert_eq!(batch_slots(7, 3, 80).len(), 81);
    }

    #[test]
    fn a_pass_is_calls_of_the_same_rows_at_every_n() {
        for n in [1, 2, 5, 10, 20, 40] {
            let calls = pass_calls(7, n, 320, Some(8));
            assert_eq!(calls.len(), 40 / n, "n = {n}");
            assert!(calls.iter().all(|c| c.len() == 8 * n), "n = {n}");
        }
        // Unset: one call; a remainder gives a shorter last call, never a lost instance.
        assert_eq!(pass_calls(7, 3, 80, None).len(), 1);
        let calls = pass_calls(7, 3, 80, Some(4)); // 81 slots in calls of 12
        assert_eq!(
            calls.iter().map(Vec::len).collect::<Vec<_>>(),
            [12; 6].iter().copied().chain([9]).collect::<Vec<_>>()
        );
    }
}
