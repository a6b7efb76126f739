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

/// The most of its capacity (see [`Load`]) the loop may use at the width it picks. Near 1
/// every forward is full and the loop never waits: the width carries no more, and the queue is
/// about to grow (or, past the connection cap, the clients' wait outside it). So close to 1
/// because at the highest rate `fixed:1` sustains the estimate passes 0.97 and 0.98 at times
/// (lines there widened at that rate in both bench rounds that had them); only a sustained
/// overload keeps it above 0.995 (about 2.6 s of full forwards back to back), and the queue's
/// check acts sooner on any overload the queue shows.
pub const USED_MAX: f64 = 0.995;

/// How many instances each muxed row carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    /// Always N (`fixed:1` is a plain dynamic batcher, the Triton-style baseline).
    Fixed(usize),
    /// The smallest served N at which everything queued is answered within the latency budget
    /// (`--max-delay-ms`) at the measured time of a muxed row, and at which the loop would use
    /// at most [`USED_MAX`] of its capacity: N = 1 while the queue is short and the loop has
    /// room, wider as either fills, N_max when even that is late.
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
    /// N for the next forward when `queued` instances wait, the loop used `load.used` of its
    /// capacity at width `load.n`, a muxed row at width n takes `row_ms(n)` of the
    /// loop (measured: the backbone's share barely moves with n, which is the point of
    /// multiplexing; the per-instance frontend and demux, and answering each request, do) and
    /// the queue should drain within `budget_ms`; `served` rises (the model's `serve_n`).
    ///
    /// The capacity check sees an overload the queue cannot show: past `--max-connections`,
    /// clients wait outside the queue, and the loop sees only as many arrivals as it answers.
    pub fn width(
        self,
        queued: usize,
        load: Load,
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
                    on_time && load.share_at(*n) <= USED_MAX
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
                    if let Err(e) = warm(&*model, &loop_card, loop_settings.max_rows) {
                        let _ = tx.send(Err(format!("{e:#}")));
                        return;
                    }
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

/// Run full forwards at every served width before the first request: the first forwards at a
/// width are up to ten times slower (allocations, cold caches), and the policy would learn
/// that as the width's cost.
fn warm(model: &dyn datamux_pipeline::serve::Served, card: &Card, max_rows: usize) -> Result<()> {
    use datamux_pipeline::serve::{Input, InputKind};
    let png;
    let input = match card.input {
        InputKind::Text => Input::Text("a warm-up sentence"),
        InputKind::Image => {
            let mut out = std::io::Cursor::new(Vec::new());
            image::GrayImage::new(256, 256).write_to(&mut out, image::ImageFormat::Png)?;
            png = out.into_inner();
            Input::Image(&png)
        }
    };
    let one = model
        .preparer()
        .prepare(input)
        .map_err(|e| anyhow::anyhow!("warming up: {e}"))?;
    for &n in &card.serve_n {
        let inputs = vec![one.clone(); n * max_rows];
        for _ in 0..3 {
            model.answer(&inputs, n).context("warming up")?;
        }
    }
    Ok(())
}

/// The time of a muxed row at each width the loop has run, smoothed over its forwards
/// (exponentially, 0.2 for the newest). A width not run yet, or not for [`RowTimes::STALE`],
/// is unknown: it borrows the nearest smaller known one's row time, else the smallest known
/// (optimistic: it is tried, then known). So an estimate taken under other traffic, or on a
/// slow first forward, cannot keep the policy off a width for good; before any forward every
/// width is free, so the first choice is N = 1.
#[derive(Default)]
pub struct RowTimes {
    row_ms: std::collections::BTreeMap<usize, (f64, Instant)>,
}

impl RowTimes {
    pub const STALE: Duration = Duration::from_secs(1);

    /// Forget the widths other than `current` not run since `now - STALE`.
    pub fn expire(&mut self, current: usize, now: Instant) {
        self.row_ms
            .retain(|n, (_, at)| *n == current || now.duration_since(*at) < Self::STALE);
    }

    pub fn row_ms(&self, n: usize) -> f64 {
        self.row_ms
            .range(..=n)
            .next_back()
            .or_else(|| self.row_ms.iter().next())
            .map_or(0.0, |(_, (ms, _))| *ms)
    }

    /// A forward at width `n` of `rows` rows which took `ms` of the loop, ending at `at`.
    pub fn record(&mut self, n: usize, rows: usize, ms: f64, at: Instant) {
        let v = ms / rows.max(1) as f64;
        let e = self.row_ms.entry(n).or_insert((v, at));
        *e = (0.8 * e.0 + 0.2 * v, at);
    }
}

/// How much of its capacity at the width it last ran (`n`) the loop used, decayed over about
/// 500 ms: the share of wall time it ran forwards, times how full they were (rows over
/// `--max-rows`). A loop busy all the time with small forwards still has room (it would batch
/// more rows per forward); one busy all the time with full forwards has none.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Load {
    pub used: f64,
    pub n: usize,
}

impl Load {
    /// The share the same arrivals would take at width `n`: n times fewer rows. Not the
    /// measured row times: a row's measured time depends on how many rows its forwards had
    /// (a forward's fixed cost is several rows'), so a width run at light load would look
    /// dearer per row than one run full.
    pub fn share_at(self, n: usize) -> f64 {
        self.used * self.n.max(1) as f64 / n as f64
    }
}

/// [`Load`] as the loop measures it, and its plain busy share (the metric).
struct Busy {
    load: Load,
    busy: f64,
    at: Instant,
}

impl Busy {
    const TAU_S: f64 = 0.5;

    fn new() -> Self {
        Self {
            load: Load { used: 0.0, n: 1 },
            busy: 0.0,
            at: Instant::now(),
        }
    }

    /// A forward at width `n` of `fill` (rows over `--max-rows`) that ran from `started`
    /// until `now`; the time since the previous one ended, less this forward, was spent waiting.
    fn record(&mut self, n: usize, fill: f64, started: Instant, now: Instant) {
        let dt = now.duration_since(self.at).as_secs_f64().max(1e-9);
        let share = (now.duration_since(started).as_secs_f64() / dt).min(1.0);
        let keep = (-dt / Self::TAU_S).exp();
        self.busy = self.busy * keep + share * (1.0 - keep);
        self.load = Load {
            used: self.load.used * keep + share * fill.min(1.0) * (1.0 - keep),
            n,
        };
        self.at = now;
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
    let mut busy = Busy::new();
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
        let load = busy.load;
        times.expire(load.n, Instant::now());
        let width = |queued: usize| s.policy.width(queued, load, &times, budget, &card.serve_n);
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
        let ended = Instant::now();
        let ms = ended.duration_since(started).as_secs_f64() * 1000.0;
        times.record(n, rows, ms, ended);
        busy.record(n, rows as f64 / s.max_rows as f64, started, ended);
        metrics.loop_busy.set(busy.busy);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adaptive_widens_with_the_queue_and_the_load_and_fixed_does_not() {
        let served = [1, 2, 5, 10];
        let a = Policy::Adaptive;
        // 1 ms a row at every width, 50 ms to drain the queue.
        let now = Instant::now();
        let mut t = RowTimes::default();
        for n in served {
            t.record(n, 4, 4.0, now);
        }
        let idle = Load { used: 0.0, n: 1 };
        let w = |q| a.width(q, idle, &t, 50.0, &served);
        assert_eq!(w(1), 1);
        assert_eq!(w(50), 1);
        assert_eq!(w(51), 2);
        assert_eq!(w(101), 5);
        assert_eq!(w(251), 10);
        assert_eq!(w(100_000), 10);
        let fresh = RowTimes::default();
        assert_eq!(
            a.width(1000, idle, &fresh, 50.0, &served),
            1,
            "before any forward"
        );
        // A short queue, but all of the capacity used at N = 1: N = 2 would take half.
        let loaded = Load { used: 1.0, n: 1 };
        assert_eq!(a.width(1, loaded, &t, 50.0, &served), 2);
        assert_eq!(a.width(1, Load { used: 0.8, n: 1 }, &t, 50.0, &served), 1);
        // All of it at N = 10: N = 5 would need twice that; it stays.
        assert_eq!(a.width(1, Load { used: 1.0, n: 10 }, &t, 50.0, &served), 10);
        // 30 % at N = 10 is 60 % at N = 5 and 150 % at N = 2.
        assert_eq!(a.width(1, Load { used: 0.3, n: 10 }, &t, 50.0, &served), 5);
        assert_eq!(Policy::Fixed(5).width(1, loaded, &t, 50.0, &served), 5);
        // A wider row that costs more is chosen later; a width not run borrows a smaller one's.
        let mut t = RowTimes::default();
        t.record(1, 2, 4.0, now);
        t.record(5, 1, 4.0, now);
        assert_eq!((t.row_ms(2), t.row_ms(5), t.row_ms(10)), (2.0, 4.0, 4.0));
        assert_eq!(a.width(60, idle, &t, 100.0, &served), 2);
        assert_eq!(Load { used: 0.5, n: 1 }.share_at(5), 0.1);
        // Widths not run for a second are forgotten, the current one kept.
        let later = now + RowTimes::STALE;
        t.expire(5, later);
        assert_eq!((t.row_ms(1), t.row_ms(5)), (4.0, 4.0));
        assert!(Policy::Fixed(3).check(&served).is_err());
        assert_eq!("fixed:2".parse::<Policy>(), Ok(Policy::Fixed(2)));
        assert!("fixed:0".parse::<Policy>().is_err());
        assert!("wide".parse::<Policy>().is_err());
    }

    #[test]
    fn the_busy_share_is_the_time_in_forwards() {
        let mut b = Busy::new();
        // 1.2 s, over twice the decay time.
        for _ in 0..100 {
            std::thread::sleep(Duration::from_millis(6));
            let started = Instant::now();
            std::thread::sleep(Duration::from_millis(6));
            b.record(2, 0.5, started, Instant::now());
        }
        // Half the time in forwards, half full; sleeps only overshoot, so the shares stay near.
        assert!((0.3..0.7).contains(&b.busy), "{}", b.busy);
        assert!((0.15..0.35).contains(&b.load.used), "{:?}", b.load);
        assert_eq!(b.load.n, 2);
    }
}
