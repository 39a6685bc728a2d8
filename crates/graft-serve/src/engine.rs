//! The scheduler: one engine thread owns the decoding loop over a shared [`Model`].
//!
//! The batching itself — admission under the KV budget, chunked prefill, one
//! [`Model::forward_batch`] per step with per-row adapters, penalties, sampling, stop conditions,
//! log-probs — is the generation core ([`graft_model::generation::Generator`]). This thread feeds
//! it the sequences that arrive on its channel and turns its events into each sequence's own
//! channel messages and the server's metrics. A sequence also ends when its cancel flag is set
//! (stop string seen by the HTTP layer) or when its receiver is dropped (client disconnected).
//!
//! Between steps the thread also answers [`Engine::ping`] (the `/health` check: a thread that
//! died or is stuck in a step does not answer) and [`Engine::stop`].

use crate::metrics::Metrics;
use crate::registry::AdapterEntry;
use graft_kernels::{Cpu, Precision};
use graft_model::generation::{GenConfig, GenRequest, GenSink, Generator, LogprobMode, SeqTag};
pub use graft_model::generation::{Penalties, TokenLogprobs};
use graft_model::infer::FinishReason;
use graft_model::lora::Adapter;
use graft_model::model::Model;
use graft_model::sample::SamplingParams;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tokio::sync::mpsc::UnboundedSender;

/// Scheduler limits.
#[derive(Debug, Clone, Copy)]
pub struct EngineConfig {
    /// Sequences decoded together at most.
    pub max_batch: usize,
    /// Sequences allowed to wait for a batch slot; beyond, submissions are refused.
    pub max_queue: usize,
    /// Prompt tokens prefilled per step at most (shared by the sequences being prefilled).
    pub prefill_chunk: usize,
    /// Matrix-product precision.
    pub precision: Precision,
    /// Longest sequence (prompt + completion) the model runs.
    pub max_context: usize,
    /// KV-cache positions the running batch may reserve in total (each sequence reserves its
    /// prompt + `max_tokens`); a sequence that does not fit waits until others finish.
    pub kv_budget_tokens: usize,
}

impl EngineConfig {
    /// The generation core's share of these limits.
    fn generation(&self) -> GenConfig {
        GenConfig {
            max_batch: self.max_batch,
            prefill_chunk: self.prefill_chunk,
            precision: self.precision,
            max_context: self.max_context,
            kv_budget_tokens: self.kv_budget_tokens,
        }
    }
}

/// What the engine reports about a sequence.
#[derive(Debug, Clone, PartialEq)]
pub enum SeqEvent {
    /// A generated token (stop tokens are not sent).
    Token {
        /// The sequence's index within its request.
        index: usize,
        /// Token id.
        id: u32,
        /// Log-probabilities, when requested.
        logprobs: Option<TokenLogprobs>,
    },
    /// The sequence ended.
    Finished {
        /// The sequence's index within its request.
        index: usize,
        /// Why.
        reason: FinishReason,
    },
    /// The engine failed on this sequence.
    Failed {
        /// The sequence's index within its request.
        index: usize,
        /// What went wrong.
        message: String,
    },
}

/// One sequence to generate.
pub struct SeqRequest {
    /// Index within its request (the choice index).
    pub index: usize,
    /// Prompt token ids (non-empty).
    pub prompt: Vec<u32>,
    /// LoRA adapter (`None`: the base model).
    pub adapter: Option<Arc<AdapterEntry>>,
    /// Sampling settings (own seeded stream).
    pub sampling: SamplingParams,
    /// Logit adjustments.
    pub penalties: Penalties,
    /// Tokens to generate at most.
    pub max_tokens: usize,
    /// Tokens ending the sequence (not sent).
    pub stop_tokens: Vec<u32>,
    /// Report log-probabilities with this many top alternatives.
    pub logprobs: Option<usize>,
    /// Set to end the sequence early.
    pub cancel: Arc<AtomicBool>,
    /// Where events go; a closed receiver cancels the sequence.
    pub events: UnboundedSender<SeqEvent>,
    /// When the request arrived (for time-to-first-token).
    pub arrived: Instant,
}

/// Why a submission was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubmitError {
    /// The waiting queue is full (retry later).
    QueueFull,
    /// The request has more sequences than the running batch and the queue can ever hold
    /// together ([`Engine::max_request_sequences`]); retrying cannot help.
    TooLarge,
    /// The engine thread has stopped.
    Stopped,
}

/// Why the engine did not answer a ping.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum EngineDown {
    /// The engine thread has exited (stopped, or died).
    #[error("the engine thread has stopped")]
    Stopped,
    /// The engine thread did not answer within the timeout (stuck in a step).
    #[error("the engine did not answer within {0:?}; it may be stuck")]
    Unresponsive(std::time::Duration),
}

/// What the engine thread receives.
enum Msg {
    /// The sequences of one request.
    Submit(Vec<SeqRequest>),
    /// Answer as soon as the loop comes round.
    Ping(tokio::sync::oneshot::Sender<()>),
    /// Fail every sequence and exit.
    Stop,
}

/// Handle to the engine thread.
pub struct Engine {
    tx: Mutex<mpsc::Sender<Msg>>,
    queued: Arc<AtomicUsize>,
    running: Arc<AtomicUsize>,
    config: EngineConfig,
    metrics: Arc<Metrics>,
}

impl Engine {
    /// Starts the engine thread over `model`.
    pub fn start(model: Arc<Model<Cpu>>, config: EngineConfig, metrics: Arc<Metrics>) -> Engine {
        let (tx, rx) = mpsc::channel();
        let queued = Arc::new(AtomicUsize::new(0));
        let running = Arc::new(AtomicUsize::new(0));
        let mut worker = Worker {
            model,
            rx,
            queued: queued.clone(),
            running: running.clone(),
            metrics: metrics.clone(),
            generator: Generator::new(config.generation()),
        };
        std::thread::Builder::new()
            .name("graft-engine".into())
            .spawn(move || worker.run())
            .expect("spawning the engine thread");
        Engine {
            tx: Mutex::new(tx),
            queued,
            running,
            config,
            metrics,
        }
    }

    /// The engine's limits.
    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    /// The most sequences one request may have: a full batch plus a full queue (an idle
    /// server admits that many at once).
    pub fn max_request_sequences(&self) -> usize {
        self.config.max_batch.max(1) + self.config.max_queue
    }

    /// Queues the sequences of one request (all or none). Sequences that will find a free
    /// batch slot do not count against `max_queue`.
    pub fn submit(&self, seqs: Vec<SeqRequest>) -> Result<(), SubmitError> {
        let n = seqs.len();
        if n > self.max_request_sequences() {
            return Err(SubmitError::TooLarge);
        }
        let before = self.queued.fetch_add(n, Ordering::SeqCst);
        let free = self
            .config
            .max_batch
            .max(1)
            .saturating_sub(self.running.load(Ordering::SeqCst));
        if before + n > self.config.max_queue + free {
            self.queued.fetch_sub(n, Ordering::SeqCst);
            self.metrics.rejected_requests.fetch_add(1, Ordering::Relaxed);
            return Err(SubmitError::QueueFull);
        }
        self.metrics
            .queue_depth
            .store((before + n) as u64, Ordering::Relaxed);
        let tx = self.tx.lock().unwrap_or_else(|e| e.into_inner());
        tx.send(Msg::Submit(seqs)).map_err(|_| {
            self.queued.fetch_sub(n, Ordering::SeqCst);
            SubmitError::Stopped
        })
    }

    /// Waits up to `timeout` for the engine thread to answer (it answers between steps).
    pub async fn ping(&self, timeout: std::time::Duration) -> Result<(), EngineDown> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.tx
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .send(Msg::Ping(tx))
            .map_err(|_| EngineDown::Stopped)?;
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(EngineDown::Stopped),
            Err(_) => Err(EngineDown::Unresponsive(timeout)),
        }
    }

    /// Stops the engine thread after its current step: running and waiting sequences fail,
    /// later submissions get [`SubmitError::Stopped`].
    pub fn stop(&self) {
        let _ = self.tx.lock().unwrap_or_else(|e| e.into_inner()).send(Msg::Stop);
    }

    /// Sequences waiting for a batch slot.
    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::Relaxed)
    }
}

/// What the engine attaches to each sequence it hands the generation core.
struct ServeTag {
    index: usize,
    adapter: Option<Arc<AdapterEntry>>,
    cancel: Arc<AtomicBool>,
    events: UnboundedSender<SeqEvent>,
    arrived: Instant,
    last_token_at: Option<Instant>,
}

impl ServeTag {
    fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::Relaxed) || self.events.is_closed()
    }
}

impl SeqTag<Cpu> for ServeTag {
    fn adapter(&self) -> Option<&Adapter<Cpu>> {
        self.adapter.as_deref().map(|e| &e.adapter)
    }
}

/// Turns the core's events into channel messages and server metrics.
struct ServeSink<'a> {
    metrics: &'a Metrics,
}

impl GenSink<ServeTag> for ServeSink<'_> {
    fn token(&mut self, tag: &mut ServeTag, id: u32, logprobs: Option<TokenLogprobs>) -> bool {
        let now = Instant::now();
        let m = self.metrics;
        match tag.last_token_at {
            None => m
                .time_to_first_token
                .observe(now.duration_since(tag.arrived).as_secs_f64()),
            Some(t) => m.inter_token_latency.observe(now.duration_since(t).as_secs_f64()),
        }
        tag.last_token_at = Some(now);
        m.generation_tokens.fetch_add(1, Ordering::Relaxed);
        let sent = tag
            .events
            .send(SeqEvent::Token {
                index: tag.index,
                id,
                logprobs,
            })
            .is_ok();
        if !sent {
            m.cancelled_sequences.fetch_add(1, Ordering::Relaxed);
        }
        sent
    }

    fn finished(&mut self, tag: ServeTag, reason: FinishReason, _generated: usize, _stop: Option<u32>) {
        let _ = tag.events.send(SeqEvent::Finished {
            index: tag.index,
            reason,
        });
        self.metrics.finished_sequences.fetch_add(1, Ordering::Relaxed);
        self.metrics
            .request_duration
            .observe(tag.arrived.elapsed().as_secs_f64());
    }

    fn failed(&mut self, tag: ServeTag, message: String) {
        let _ = tag.events.send(SeqEvent::Failed {
            index: tag.index,
            message,
        });
    }
}

struct Worker {
    model: Arc<Model<Cpu>>,
    rx: mpsc::Receiver<Msg>,
    queued: Arc<AtomicUsize>,
    running: Arc<AtomicUsize>,
    metrics: Arc<Metrics>,
    generator: Generator<Cpu, ServeTag>,
}

impl Worker {
    fn run(&mut self) {
        loop {
            if self.generator.is_idle() {
                let Ok(m) = self.rx.recv() else {
                    return;
                };
                if !self.handle(m) {
                    return;
                }
            }
            while let Ok(m) = self.rx.try_recv() {
                if !self.handle(m) {
                    return;
                }
            }
            self.drop_cancelled();
            self.admit();
            if self.generator.running() > 0 {
                self.step();
            }
        }
    }

    /// Acts on one message; `false` when the thread should exit.
    fn handle(&mut self, m: Msg) -> bool {
        match m {
            Msg::Submit(batch) => {
                for r in batch {
                    self.generator.submit(GenRequest {
                        prompt: r.prompt,
                        sampling: r.sampling,
                        penalties: r.penalties,
                        max_tokens: r.max_tokens,
                        stop_tokens: r.stop_tokens,
                        logprobs: r.logprobs.map(LogprobMode::Raw),
                        tag: ServeTag {
                            index: r.index,
                            adapter: r.adapter,
                            cancel: r.cancel,
                            events: r.events,
                            arrived: r.arrived,
                            last_token_at: None,
                        },
                    });
                }
            }
            Msg::Ping(answer) => {
                let _ = answer.send(());
            }
            Msg::Stop => {
                self.fail_all("the engine was stopped");
                return false;
            }
        }
        true
    }

    /// Fails every running and waiting sequence with `message`.
    fn fail_all(&mut self, message: &str) {
        self.queued.fetch_sub(self.generator.waiting(), Ordering::SeqCst);
        let mut sink = ServeSink {
            metrics: &self.metrics,
        };
        self.generator.fail_all(&mut sink, message);
        self.publish_counts();
    }

    fn drop_cancelled(&mut self) {
        let (waiting, running) = self.generator.retain(|t| !t.cancelled());
        if waiting > 0 {
            self.queued.fetch_sub(waiting, Ordering::SeqCst);
        }
        if waiting + running > 0 {
            self.metrics
                .cancelled_sequences
                .fetch_add((waiting + running) as u64, Ordering::Relaxed);
        }
    }

    fn admit(&mut self) {
        let mut sink = ServeSink {
            metrics: &self.metrics,
        };
        let left = self.generator.admit(&self.model, &mut sink);
        self.queued.fetch_sub(left, Ordering::SeqCst);
        self.publish_counts();
    }

    fn step(&mut self) {
        let mut sink = ServeSink {
            metrics: &self.metrics,
        };
        let stats = self.generator.step(&self.model, &mut sink);
        self.metrics.engine_steps.fetch_add(1, Ordering::Relaxed);
        self.metrics
            .prompt_tokens
            .fetch_add(stats.prompt_tokens as u64, Ordering::Relaxed);
        self.publish_counts();
    }

    /// Stores the queue depth and running count where the handle and `/metrics` read them.
    fn publish_counts(&self) {
        self.metrics
            .queue_depth
            .store(self.queued.load(Ordering::Relaxed) as u64, Ordering::Relaxed);
        self.running.store(self.generator.running(), Ordering::SeqCst);
        self.metrics
            .active_sequences
            .store(self.generator.running() as u64, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An engine handle whose thread is `rx`, held by the test.
    fn handle_without_thread() -> (Engine, mpsc::Receiver<Msg>) {
        let (tx, rx) = mpsc::channel();
        let engine = Engine {
            tx: Mutex::new(tx),
            queued: Arc::new(AtomicUsize::new(0)),
            running: Arc::new(AtomicUsize::new(0)),
            config: EngineConfig {
                max_batch: 1,
                max_queue: 0,
                prefill_chunk: 1,
                precision: Precision::Exact,
                max_context: 8,
                kv_budget_tokens: 8,
            },
            metrics: Arc::new(Metrics::new()),
        };
        (engine, rx)
    }

    #[test]
    fn ping_tells_a_stuck_engine_from_a_stopped_one() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        let t = std::time::Duration::from_millis(50);
        let (engine, rx) = handle_without_thread();
        // Nobody reads the channel: stuck.
        assert_eq!(rt.block_on(engine.ping(t)), Err(EngineDown::Unresponsive(t)));
        // A loop that answers (the stale ping first, then the new one).
        let answering = std::thread::spawn(move || {
            for _ in 0..2 {
                if let Ok(Msg::Ping(a)) = rx.recv() {
                    let _ = a.send(());
                }
            }
        });
        assert_eq!(
            rt.block_on(engine.ping(std::time::Duration::from_secs(10))),
            Ok(())
        );
        answering.join().unwrap();
        // The receiver is gone: stopped.
        assert_eq!(rt.block_on(engine.ping(t)), Err(EngineDown::Stopped));
    }
}
