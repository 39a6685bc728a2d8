//! Server metrics in the Prometheus text exposition format: request and token counters, queue
//! depth, active sequences, and histograms of time to first token, inter-token latency and
//! request duration.

use std::fmt::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

/// A histogram with fixed bucket bounds (seconds).
pub struct Histogram {
    bounds: &'static [f64],
    inner: Mutex<HistogramData>,
}

struct HistogramData {
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    /// An empty histogram with cumulative buckets at `bounds` (plus `+Inf`).
    pub fn new(bounds: &'static [f64]) -> Histogram {
        Histogram {
            bounds,
            inner: Mutex::new(HistogramData {
                counts: vec![0; bounds.len()],
                sum: 0.0,
                count: 0,
            }),
        }
    }

    /// Records one observation.
    pub fn observe(&self, v: f64) {
        let mut d = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        for (c, &b) in d.counts.iter_mut().zip(self.bounds) {
            if v <= b {
                *c += 1;
            }
        }
        d.sum += v;
        d.count += 1;
    }

    /// Number of observations so far.
    pub fn count(&self) -> u64 {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).count
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let d = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (c, b) in d.counts.iter().zip(self.bounds) {
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {c}");
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", d.count);
        let _ = writeln!(out, "{name}_sum {}", d.sum);
        let _ = writeln!(out, "{name}_count {}", d.count);
    }
}

const LATENCY_BOUNDS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
    40.0, 80.0,
];
const DURATION_BOUNDS: &[f64] = &[
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0,
];

/// All counters and gauges of one server.
pub struct Metrics {
    /// Requests received per endpoint: chat, completions.
    pub chat_requests: AtomicU64,
    /// `/v1/completions` requests received.
    pub completion_requests: AtomicU64,
    /// Requests answered with an error status.
    pub failed_requests: AtomicU64,
    /// Requests refused because the queue was full (429).
    pub rejected_requests: AtomicU64,
    /// Sequences finished (any reason).
    pub finished_sequences: AtomicU64,
    /// Sequences cancelled (client gone or stop string).
    pub cancelled_sequences: AtomicU64,
    /// Prompt tokens prefilled.
    pub prompt_tokens: AtomicU64,
    /// Tokens generated.
    pub generation_tokens: AtomicU64,
    /// Sequences waiting for a batch slot.
    pub queue_depth: AtomicU64,
    /// Sequences in the running batch.
    pub active_sequences: AtomicU64,
    /// Adapters loaded.
    pub adapters_loaded: AtomicU64,
    /// Engine steps run.
    pub engine_steps: AtomicU64,
    /// Time from arrival to the first generated token.
    pub time_to_first_token: Histogram,
    /// Time between consecutive tokens of a sequence.
    pub inter_token_latency: Histogram,
    /// Time from arrival to the last token.
    pub request_duration: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// Zeroed metrics.
    pub fn new() -> Metrics {
        Metrics {
            chat_requests: AtomicU64::new(0),
            completion_requests: AtomicU64::new(0),
            failed_requests: AtomicU64::new(0),
            rejected_requests: AtomicU64::new(0),
            finished_sequences: AtomicU64::new(0),
            cancelled_sequences: AtomicU64::new(0),
            prompt_tokens: AtomicU64::new(0),
            generation_tokens: AtomicU64::new(0),
            queue_depth: AtomicU64::new(0),
            active_sequences: AtomicU64::new(0),
            adapters_loaded: AtomicU64::new(0),
            engine_steps: AtomicU64::new(0),
            time_to_first_token: Histogram::new(LATENCY_BOUNDS),
            inter_token_latency: Histogram::new(LATENCY_BOUNDS),
            request_duration: Histogram::new(DURATION_BOUNDS),
        }
    }

    /// The same numbers under vLLM's metric names, so existing vLLM dashboards work.
    fn render_vllm_aliases(&self, out: &mut String) {
        for (name, kind, help, v) in [
            (
                "vllm:num_requests_running",
                "gauge",
                "Sequences in the running batch.",
                &self.active_sequences,
            ),
            (
                "vllm:num_requests_waiting",
                "gauge",
                "Sequences waiting for a batch slot.",
                &self.queue_depth,
            ),
            (
                "vllm:prompt_tokens_total",
                "counter",
                "Prompt tokens processed.",
                &self.prompt_tokens,
            ),
            (
                "vllm:generation_tokens_total",
                "counter",
                "Tokens generated.",
                &self.generation_tokens,
            ),
        ] {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {}",
                v.load(Ordering::Relaxed)
            );
        }
        self.time_to_first_token.render(
            out,
            "vllm:time_to_first_token_seconds",
            "Time to first token (alias of graft_time_to_first_token_seconds).",
        );
        self.inter_token_latency.render(
            out,
            "vllm:time_per_output_token_seconds",
            "Inter-token latency (alias of graft_inter_token_latency_seconds).",
        );
        self.request_duration.render(
            out,
            "vllm:e2e_request_latency_seconds",
            "Request latency (alias of graft_request_duration_seconds).",
        );
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let counter = |out: &mut String, name: &str, help: &str, v: &AtomicU64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                v.load(Ordering::Relaxed)
            );
        };
        let gauge = |out: &mut String, name: &str, help: &str, v: &AtomicU64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {}",
                v.load(Ordering::Relaxed)
            );
        };
        let _ = writeln!(
            out,
            "# HELP graft_requests_total Generation requests received.\n# TYPE graft_requests_total counter"
        );
        let _ = writeln!(
            out,
            "graft_requests_total{{endpoint=\"chat_completions\"}} {}",
            self.chat_requests.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "graft_requests_total{{endpoint=\"completions\"}} {}",
            self.completion_requests.load(Ordering::Relaxed)
        );
        counter(
            &mut out,
            "graft_request_errors_total",
            "Requests answered with an error status.",
            &self.failed_requests,
        );
        counter(
            &mut out,
            "graft_requests_rejected_total",
            "Requests refused with 429 because the queue was full.",
            &self.rejected_requests,
        );
        counter(
            &mut out,
            "graft_sequences_finished_total",
            "Sequences that finished generating.",
            &self.finished_sequences,
        );
        counter(
            &mut out,
            "graft_sequences_cancelled_total",
            "Sequences cancelled (client disconnected or stop string).",
            &self.cancelled_sequences,
        );
        counter(
            &mut out,
            "graft_prompt_tokens_total",
            "Prompt tokens processed.",
            &self.prompt_tokens,
        );
        counter(
            &mut out,
            "graft_generation_tokens_total",
            "Tokens generated.",
            &self.generation_tokens,
        );
        counter(
            &mut out,
            "graft_engine_steps_total",
            "Batched engine steps run.",
            &self.engine_steps,
        );
        gauge(
            &mut out,
            "graft_queue_depth",
            "Sequences waiting for a batch slot.",
            &self.queue_depth,
        );
        gauge(
            &mut out,
            "graft_active_sequences",
            "Sequences in the running batch.",
            &self.active_sequences,
        );
        gauge(
            &mut out,
            "graft_adapters_loaded",
            "LoRA adapters resident.",
            &self.adapters_loaded,
        );
        self.time_to_first_token.render(
            &mut out,
            "graft_time_to_first_token_seconds",
            "Time from request arrival to its first generated token.",
        );
        self.render_vllm_aliases(&mut out);
        self.inter_token_latency.render(
            &mut out,
            "graft_inter_token_latency_seconds",
            "Time between consecutive generated tokens of a sequence.",
        );
        self.request_duration.render(
            &mut out,
            "graft_request_duration_seconds",
            "Time from request arrival to its last generated token.",
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let h = Histogram::new(&[0.1, 1.0]);
        h.observe(0.05);
        h.observe(0.5);
        h.observe(5.0);
        let mut s = String::new();
        h.render(&mut s, "x", "help");
        assert!(s.contains("x_bucket{le=\"0.1\"} 1"));
        assert!(s.contains("x_bucket{le=\"1\"} 2"));
        assert!(s.contains("x_bucket{le=\"+Inf\"} 3"));
        assert!(s.contains("x_count 3"));
    }
}
