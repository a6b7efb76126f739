//! The inference loop of `datamux serve`: one bounded queue of requests from every client, one
//! thread that owns the model, takes what is queued, picks N by the policy, runs one forward of
//! muxed rows and answers each request. docs/serving.md says why the rule is what it is.

use std::collections::VecDeque;
use std::path::Path;
use std::str::FromStr;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use datamux_pipeline::serve::{Answer, Card, Prepare, Prepared};
use tokio::sync::oneshot;

use super::metrics::Metrics;

/// How many instances each muxed row carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    /// Always N (`fixed:1` is a plain dynamic batcher, the Triton-style baseline).
    Fixed(usize),
    /// The smallest served N at which everything queued is answered within the latency budget
    /// (`--max-delay-ms`) at the measured time of a muxed row, and whose measured capacity is
    /// not far below the arrival rate: N = 1 while the queue is short, wider as it grows,
    /// N_max when even that is late.
    Adaptive,
}

impl FromStr for Policy {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        if s == "adaptive" {
            return Ok(Self::Adaptive);
        }
        match s.strip_prefix("fixed:").map(str::parse::<usize>) {
            Some(Ok(n)) if n >= 1 => Ok(Self::Fixed(n)),
            _ => Err(format!(
                "`{s}` is not a policy: fixed:N (N >= 1) or adaptive"
            )),
        }
    }
}

impl std::fmt::Display for Policy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Fixed(n) => write!(f, "fixed:{n}"),
            Self::Adaptive => f.write_str("adaptive"),
        }
    }
}

impl Policy {
    /// N for the next forward when `queued` instances wait, `arrivals` arrive per second, a
    /// muxed row at width n takes `row_ms(n)` of the loop (measured: the backbone's share
    /// barely moves with n, which is the point of multiplexing; the per-instance frontend and
    /// demux, and answering each request, do) and the queue should drain within `budget_ms`;
    /// `served` rises (the model's `serve_n`). The arrival check sees an overload the queue
    /// cannot show: past `--max-connections`, clients wait outside it.
    pub fn width(
        self,
        queued: usize,
        arrivals: f64,
        times: &RowTimes,
        budget_ms: f64,
        served: &[usize],
    ) -> usize {
        match self {
            Self::Fixed(n) => n,
            Self::Adaptive => served
                .iter()
                .copied()
                .find(|n| {
                    let on_time = queued.div_ceil(*n) as f64 * times.row_ms(*n) <= budget_ms;
                    // A quarter over the capacity is noise at the knee; more is a load this
                    // width cannot carry. Unknown (no full forward yet): not the limit.
                    let keeps_up = times.capacity(*n).is_none_or(|c| arrivals <= 1.25 * c);
                    on_time && keeps_up
                })
                .or_else(|| served.last().copied())
                .unwrap_or(1),
        }
    }

    /// A fixed N the model was not trained to serve is refused.
    pub fn check(self, served: &[usize]) -> Result<()> {
        if let Self::Fixed(n) = self {
            if !served.contains(&n) {
                bail!("the model serves N in {served:?}, not fixed:{n}");
            }
        }
        Ok(())
    }
}

/// The settings of the loop.
#[derive(Debug, Clone)]
pub struct Settings {
    pub policy: Policy,
    /// Muxed rows per forward at most.
    pub max_rows: usize,
    /// The longest the oldest request waits for its row to fill before a forward runs anyway.
    pub max_delay: Duration,
    /// Queued instances at most; a request that does not fit is refused (503).
    pub queue_limit: usize,
}

/// What a request gets back: its answers and the N its row was run at.
pub type Reply = std::result::Result<(Vec<Answer>, usize), String>;

struct Job {
    inputs: Vec<Prepared>,
    arrived: Instant,
    reply: oneshot::Sender<Reply>,
}

#[derive(Default)]
struct State {
    jobs: VecDeque<Job>,
    queued: usize,
    /// Instances submitted since the loop last read it (the arrival rate's input).
    arrived: usize,
    closed: bool,
}

struct Shared {
    state: Mutex<State>,
    wake: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain data; the queue stays usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The queue's refusal: full, or closing for shutdown.
#[derive(Debug, PartialEq, Eq)]
pub enum Refused {
    Full,
    Closed,
}

/// A running inference loop; [`Engine::close`] drains it and joins the thread.
pub struct Engine {
    shared: Arc<Shared>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    pub card: Card,
    pub prepare: Arc<dyn Prepare>,
    pub settings: Settings,
}

impl Engine {
    /// Load the model of `dir` on a thread of its own (the model never leaves it) and start
    /// the loop there.
    pub fn start(dir: &Path, settings: Settings, metrics: Arc<Metrics>) -> Result<Self> {
        let card = Card::read(dir)?;
        let modality = crate::registry::modality(&card.modality)?;
        settings.policy.check(&card.serve_n)?;
        if settings.max_rows == 0 || settings.queue_limit == 0 {
            bail!("--max-rows and --queue must be at least 1");
        }
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            wake: Condvar::new(),
        });
        let (tx, rx) = std::sync::mpsc::channel();
        let (dir, loop_card, loop_settings, loop_shared) = (
            dir.to_path_buf(),
            card.clone(),
            settings.clone(),
            shared.clone(),
        );
        let thread = std::thread::Builder::new()
            .name("datamux-infer".into())
            .spawn(move || match modality.load_served(&dir, &loop_card) {
                Ok(model) => {
                    let _ = tx.send(Ok(model.preparer()));
                    run(&*model, &loop_card, &loop_settings, &loop_shared, &metrics);
                }
                Err(e) => {
                    let _ = tx.send(Err(format!("{e:#}")));
                }
            })?;
        let prepare = rx
            .recv()
            .context("the inference thread ended before the model loaded")?
            .map_err(|e| anyhow::anyhow!("{}: {e}", card.run_id))?;
        Ok(Self {
            shared,
            thread: Mutex::new(Some(thread)),
            card,
            prepare,
            settings,
        })
    }

    /// Queue a request's prepared inputs; the answer comes through `reply`.
    pub fn submit(
        &self,
        inputs: Vec<Prepared>,
        reply: oneshot::Sender<Reply>,
    ) -> std::result::Result<(), Refused> {
        let mut st = self.shared.lock();
        if st.closed {
            return Err(Refused::Closed);
        }
        if st.queued + inputs.len() > self.settings.queue_limit {
            return Err(Refused::Full);
        }
        st.queued += inputs.len();
        st.arrived += inputs.len();
        st.jobs.push_back(Job {
            inputs,
            arrived: Instant::now(),
            reply,
        });
        drop(st);
        self.shared.wake.notify_one();
        Ok(())
    }

    /// Instances waiting.
    pub fn queued(&self) -> usize {
        self.shared.lock().queued
    }

    /// Refuse new requests, answer the queued ones, and stop the loop.
    pub fn close(&self) {
        self.shared.lock().closed = true;
        self.shared.wake.notify_all();
        let thread = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(t) = thread {
            let _ = t.join();
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.close();
    }
}

/// What the loop has measured at each width, smoothed over its forwards (exponentially, 0.2
/// for the newest): the time of a muxed row, and the instances per second of a full forward
/// (`--max-rows` rows; a short forward's fixed costs would make it look slower than the width
/// is under load). A width not run yet borrows the nearest smaller one's row time
/// (optimistic: it is tried, then known); before any forward every width is free, so the first
/// choice is N = 1.
#[derive(Default)]
pub struct RowTimes {
    row_ms: std::collections::BTreeMap<usize, f64>,
    full: std::collections::BTreeMap<usize, f64>,
}

impl RowTimes {
    pub fn row_ms(&self, n: usize) -> f64 {
        self.row_ms
            .range(..=n)
            .next_back()
            .or_else(|| self.row_ms.iter().next())
            .map_or(0.0, |(_, ms)| *ms)
    }

    /// Instances per second at width `n`, from its full forwards.
    pub fn capacity(&self, n: usize) -> Option<f64> {
        self.full.get(&n).copied()
    }

    /// A forward at width `n` of `rows` rows (`full`: as many as it may take) and `inputs`
    /// instances, which took `ms` of the loop.
    pub fn record(&mut self, n: usize, rows: usize, inputs: usize, full: bool, ms: f64) {
        let smooth = |m: &mut std::collections::BTreeMap<usize, f64>, v: f64| {
            let e = m.entry(n).or_insert(v);
            *e = 0.8 * *e + 0.2 * v;
        };
        smooth(&mut self.row_ms, ms / rows.max(1) as f64);
        if full && ms > 0.0 {
            smooth(&mut self.full, inputs as f64 * 1000.0 / ms);
        }
    }
}

/// The loop: wait for work, let the oldest request's row fill for at most `max_delay`, take
/// whole requests up to N x `max_rows` instances, run them, answer.
fn run(
    model: &dyn datamux_pipeline::serve::Served,
    card: &Card,
    s: &Settings,
    shared: &Shared,
    metrics: &Metrics,
) {
    let mut times = RowTimes::default();
    let mut rate = Rate::default();
    loop {
        let mut st = shared.lock();
        while st.jobs.is_empty() && !st.closed {
            st = shared.wake.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        let Some(oldest) = st.jobs.front().map(|j| j.arrived) else {
            return; // closed and drained
        };
        let deadline = oldest + s.max_delay;
        let budget = s.max_delay.as_secs_f64() * 1000.0;
        rate.add(std::mem::take(&mut st.arrived));
        let arrivals = rate.per_second();
        let width = |queued: usize| {
            s.policy
                .width(queued, arrivals, &times, budget, &card.serve_n)
        };
        loop {
            let n = width(st.queued);
            let now = Instant::now();
            if st.queued >= n || st.closed || now >= deadline {
                break;
            }
            st = shared
                .wake
                .wait_timeout(st, deadline - now)
                .map(|(g, _)| g)
                .unwrap_or_else(|e| e.into_inner().0);
        }
        let n = width(st.queued);
        let room = n * s.max_rows;
        let mut jobs = Vec::new();
        let mut taken = 0;
        while let Some(job) = st.jobs.front() {
            if !jobs.is_empty() && taken + job.inputs.len() > room {
                break;
            }
            taken += job.inputs.len();
            jobs.extend(st.jobs.pop_front());
        }
        st.queued -= taken;
        metrics.queue_depth.set(st.queued as i64);
        drop(st);
        let started = Instant::now();
        let inputs: Vec<Prepared> = jobs.iter().flat_map(|j| j.inputs.clone()).collect();
        let result = model.answer(&inputs, n);
        let rows = inputs.len().div_ceil(n).max(1);
        let full = rows >= s.max_rows;
        metrics.batch(n, inputs.len());
        match result {
            Ok(answers) => {
                let mut rest = answers.into_iter();
                for job in jobs {
                    let mine: Vec<Answer> = rest.by_ref().take(job.inputs.len()).collect();
                    let _ = job.reply.send(Ok((mine, n)));
                }
            }
            Err(e) => {
                let msg = format!("{e:#}").replace('\n', " | ");
                tracing::error!(error = %msg, "inference failed");
                for job in jobs {
                    let _ = job.reply.send(Err(msg.clone()));
                }
            }
        }
        // The loop's time per row: the forward and answering its requests.
        let ms = started.elapsed().as_secs_f64() * 1000.0;
        times.record(n, rows, inputs.len(), full, ms);
    }
}

/// Instances arriving per second, decayed exponentially over about 100 ms.
struct Rate {
    per_s: f64,
    at: Instant,
}

impl Default for Rate {
    fn default() -> Self {
        Self {
            per_s: 0.0,
            at: Instant::now(),
        }
    }
}

impl Rate {
    const TAU_S: f64 = 0.1;

    fn add(&mut self, count: usize) {
        let now = Instant::now();
        let dt = now.duration_since(self.at).as_secs_f64();
        self.at = now;
        let keep = (-dt / Self::TAU_S).exp();
        self.per_s = self.per_s * keep + count as f64 * (1.0 - keep) / dt.max(1e-9);
    }

    fn per_second(&self) -> f64 {
        self.per_s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adaptive_widens_with_the_queue_and_fixed_does_not() {
        let served = [1, 2, 5, 10];
        let a = Policy::Adaptive;
        // 1 ms a row (forwards of 4 rows), 50 ms to drain the queue.
        let mut t = RowTimes::default();
        for n in served {
            t.record(n, 4, 4 * n, true, 4.0);
        }
        let w = |q| a.width(q, 0.0, &t, 50.0, &served);
        assert_eq!(w(1), 1);
        assert_eq!(w(50), 1);
        assert_eq!(w(51), 2);
        assert_eq!(w(101), 5);
        assert_eq!(w(251), 10);
        assert_eq!(w(100_000), 10);
        let fresh = RowTimes::default();
        assert_eq!(
            a.width(1000, 0.0, &fresh, 50.0, &served),
            1,
            "before any forward"
        );
        // A short queue, but 3000 arrivals a second where N = 1 carries 1000 and N = 2 2000.
        assert_eq!(a.width(4, 3000.0, &t, 50.0, &served), 5);
        assert_eq!(
            a.width(4, 1200.0, &t, 50.0, &served),
            1,
            "within the margin"
        );
        assert_eq!(Policy::Fixed(5).width(1, 9e9, &t, 50.0, &served), 5);
        // A wider row that costs more is chosen later; short forwards say nothing of capacity.
        let mut t = RowTimes::default();
        t.record(1, 2, 2, false, 4.0);
        t.record(5, 1, 5, true, 4.0);
        assert_eq!((t.row_ms(2), t.row_ms(5), t.row_ms(10)), (2.0, 4.0, 4.0));
        assert_eq!((t.capacity(1), t.capacity(5)), (None, Some(1250.0)));
        assert_eq!(a.width(60, 0.0, &t, 100.0, &served), 2);
        assert!(Policy::Fixed(3).check(&served).is_err());
        assert_eq!("fixed:2".parse::<Policy>(), Ok(Policy::Fixed(2)));
        assert!("fixed:0".parse::<Policy>().is_err());
        assert!("wide".parse::<Policy>().is_err());
    }
}
