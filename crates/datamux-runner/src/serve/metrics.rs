//! `GET /metrics`: the server's counters in the Prometheus text format.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Route {
    pub route: String,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Width {
    pub n: u32,
}

/// Every metric the server keeps, registered once.
pub struct Metrics {
    registry: Registry,
    /// Requests by route and status code (errors and 503 rejections included).
    pub requests: Family<Route, Counter>,
    /// Instances waiting in the queue.
    pub queue_depth: Gauge,
    /// The share of time the inference loop runs forwards (decayed over ~500 ms).
    pub loop_busy: Gauge<f64, std::sync::atomic::AtomicU64>,
    /// How late the HTTP runtime wakes a timer (smoothed): its workers' backlog.
    pub runtime_lag: Gauge<f64, std::sync::atomic::AtomicU64>,
    /// Forwards and the real instances they answered, by N.
    pub batches: Family<Width, Counter>,
    pub instances: Family<Width, Counter>,
    /// Seconds from a request's arrival to its answer (answered requests).
    pub latency: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("datamux");
        let requests = Family::<Route, Counter>::default();
        let queue_depth = Gauge::default();
        let loop_busy = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        let runtime_lag = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        let batches = Family::<Width, Counter>::default();
        let instances = Family::<Width, Counter>::default();
        // 1 ms .. ~16 s.
        let latency = Histogram::new(exponential_buckets(0.001, 2.0, 15));
        registry.register(
            "requests",
            "HTTP requests by route and status",
            requests.clone(),
        );
        registry.register("queue_depth", "Instances waiting", queue_depth.clone());
        registry.register(
            "loop_busy_ratio",
            "Share of time the inference loop runs forwards",
            loop_busy.clone(),
        );
        registry.register(
            "runtime_lag_seconds",
            "How late the HTTP runtime wakes a timer, smoothed",
            runtime_lag.clone(),
        );
        registry.register("batches", "Forward passes by N", batches.clone());
        registry.register(
            "instances",
            "Real instances answered by N",
            instances.clone(),
        );
        registry.register(
            "request_latency_seconds",
            "Arrival to answer, answered requests",
            latency.clone(),
        );
        Self {
            registry,
            requests,
            queue_depth,
            loop_busy,
            runtime_lag,
            batches,
            instances,
            latency,
        }
    }
}

impl Metrics {
    pub fn request(&self, route: &str, status: u16) {
        self.requests
            .get_or_create(&Route {
                route: route.to_string(),
                status,
            })
            .inc();
    }

    pub fn batch(&self, n: usize, instances: usize) {
        let w = Width { n: n as u32 };
        self.batches.get_or_create(&w).inc();
        self.instances.get_or_create(&w).inc_by(instances as u64);
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}
