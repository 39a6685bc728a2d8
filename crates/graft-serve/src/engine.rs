//! The scheduler: one engine thread owns the decoding loop over a shared [`Model`].
//!
//! Each loop iteration admits waiting sequences into the running batch (up to `max_batch`),
//! feeds every running sequence in one [`Model::forward_batch`] step — prompt chunks for new
//! sequences (at most `prefill_chunk` prompt tokens per step, so decode latency stays bounded)
//! and one token for the others, each with its own adapter — then samples each sequence's next
//! token with its own sampler and sends it on the sequence's channel. A sequence ends on a stop
//! token, at `max_tokens`, when its cancel flag is set (stop string seen by the HTTP layer) or
//! when its receiver is dropped (client disconnected).
//!
//! Between steps the thread also answers [`Engine::ping`] (the `/health` check: a thread that
//! died or is stuck in a step does not answer) and [`Engine::stop`].

use crate::metrics::Metrics;
use crate::registry::AdapterEntry;
use graft_kernels::{Cpu, Precision};
use graft_model::infer::{FinishReason, KvCache, SeqStep};
use graft_model::model::Model;
use graft_model::sample::{Sampler, SamplingParams};
use std::collections::{HashMap, VecDeque};
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

/// Logit adjustments applied before sampling (OpenAI / vLLM request fields).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Penalties {
    /// Subtracted once from every token already generated.
    pub presence: f32,
    /// Subtracted per occurrence of a token already generated.
    pub frequency: f32,
    /// vLLM-style multiplicative penalty on tokens in the prompt or output (1 = off).
    pub repetition: f32,
    /// Added to the logits of these tokens.
    pub logit_bias: Vec<(u32, f32)>,
}

impl Penalties {
    fn active(&self) -> bool {
        self.presence != 0.0
            || self.frequency != 0.0
            || (self.repetition != 1.0 && self.repetition != 0.0)
            || !self.logit_bias.is_empty()
    }
}

/// Log-probabilities of a sampled token.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprobs {
    /// Log-probability of the sampled token.
    pub logprob: f32,
    /// The most likely tokens with their log-probabilities, best first.
    pub top: Vec<(u32, f32)>,
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

impl SeqRequest {
    fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::Relaxed) || self.events.is_closed()
    }
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
            config,
            rx,
            queued: queued.clone(),
            running: running.clone(),
            metrics: metrics.clone(),
            waiting: VecDeque::new(),
            active: Vec::new(),
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

struct Active {
    req: SeqRequest,
    cache: KvCache<Cpu>,
    /// Prompt tokens already in the cache.
    fed: usize,
    generated: usize,
    last: u32,
    sampler: Sampler,
    /// Token counts for penalties (prompt tokens included for the repetition penalty).
    seen: HashMap<u32, u32>,
    last_token_at: Option<Instant>,
}

struct Worker {
    model: Arc<Model<Cpu>>,
    config: EngineConfig,
    rx: mpsc::Receiver<Msg>,
    queued: Arc<AtomicUsize>,
    running: Arc<AtomicUsize>,
    metrics: Arc<Metrics>,
    waiting: VecDeque<SeqRequest>,
    active: Vec<Active>,
}

fn adapter_key(a: &Option<Arc<AdapterEntry>>) -> usize {
    a.as_ref().map_or(0, |e| Arc::as_ptr(e) as usize)
}

/// Log-softmax of the chosen token and the `k` best tokens.
fn logprobs_of(logits: &[f32], chosen: u32, k: usize) -> TokenLogprobs {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let lse = max + logits.iter().map(|&l| ((l - max) as f64).exp()).sum::<f64>().ln() as f32;
    let mut top: Vec<(u32, f32)> = Vec::with_capacity(k + 1);
    if k > 0 {
        for (i, &l) in logits.iter().enumerate() {
            if top.len() < k || l > top[top.len() - 1].1 {
                let pos = top.partition_point(|&(_, v)| v >= l);
                top.insert(pos, (i as u32, l));
                top.truncate(k);
            }
        }
    }
    TokenLogprobs {
        logprob: logits
            .get(chosen as usize)
            .map_or(f32::NEG_INFINITY, |&l| l - lse),
        top: top.into_iter().map(|(i, l)| (i, l - lse)).collect(),
    }
}

impl Worker {
    fn run(&mut self) {
        loop {
            if self.active.is_empty() && self.waiting.is_empty() {
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
            if !self.active.is_empty() {
                self.step();
            }
        }
    }

    /// Acts on one message; `false` when the thread should exit.
    fn handle(&mut self, m: Msg) -> bool {
        match m {
            Msg::Submit(batch) => self.waiting.extend(batch),
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
        self.queued.fetch_sub(self.waiting.len(), Ordering::SeqCst);
        for req in self.waiting.drain(..).chain(self.active.drain(..).map(|a| a.req)) {
            let _ = req.events.send(SeqEvent::Failed {
                index: req.index,
                message: message.to_string(),
            });
        }
        self.running.store(0, Ordering::SeqCst);
        self.metrics.active_sequences.store(0, Ordering::Relaxed);
        self.metrics.queue_depth.store(0, Ordering::Relaxed);
    }

    fn drop_cancelled(&mut self) {
        let before = self.waiting.len();
        self.waiting.retain(|r| !r.cancelled());
        let gone = before - self.waiting.len();
        if gone > 0 {
            self.queued.fetch_sub(gone, Ordering::SeqCst);
            self.metrics
                .cancelled_sequences
                .fetch_add(gone as u64, Ordering::Relaxed);
        }
        let before = self.active.len();
        self.active.retain(|a| !a.req.cancelled());
        let gone = before - self.active.len();
        if gone > 0 {
            self.metrics
                .cancelled_sequences
                .fetch_add(gone as u64, Ordering::Relaxed);
        }
    }

    fn admit(&mut self) {
        let mut reserved: usize = self
            .active
            .iter()
            .map(|a| a.req.prompt.len() + a.req.max_tokens)
            .sum();
        while self.active.len() < self.config.max_batch.max(1) {
            let Some(front) = self.waiting.front() else {
                break;
            };
            let need = (front.prompt.len() + front.max_tokens).min(self.config.max_context);
            if !self.active.is_empty() && reserved + need > self.config.kv_budget_tokens {
                break;
            }
            let Some(mut req) = self.waiting.pop_front() else {
                break;
            };
            reserved += need;
            self.queued.fetch_sub(1, Ordering::SeqCst);
            let room = self.config.max_context.saturating_sub(req.prompt.len());
            if req.prompt.is_empty() || room == 0 {
                let _ = req.events.send(SeqEvent::Failed {
                    index: req.index,
                    message: format!(
                        "the prompt has {} tokens; the model's context is {}",
                        req.prompt.len(),
                        self.config.max_context
                    ),
                });
                continue;
            }
            req.max_tokens = req.max_tokens.min(room);
            if req.max_tokens == 0 {
                let _ = req.events.send(SeqEvent::Finished {
                    index: req.index,
                    reason: FinishReason::Length,
                });
                continue;
            }
            let initial = (req.prompt.len() + req.max_tokens.min(64)).min(self.config.max_context);
            let mut seen = HashMap::new();
            if req.penalties.repetition != 1.0 && req.penalties.repetition != 0.0 {
                for &t in &req.prompt {
                    seen.entry(t).or_insert(0);
                }
            }
            self.active.push(Active {
                cache: self.model.new_cache(initial),
                sampler: Sampler::new(req.sampling),
                req,
                fed: 0,
                generated: 0,
                last: 0,
                seen,
                last_token_at: None,
            });
        }
        self.metrics
            .queue_depth
            .store(self.queued.load(Ordering::Relaxed) as u64, Ordering::Relaxed);
        self.running.store(self.active.len(), Ordering::SeqCst);
        self.metrics
            .active_sequences
            .store(self.active.len() as u64, Ordering::Relaxed);
    }

    fn step(&mut self) {
        // Rows sharing an adapter sit together so its LoRA runs once over them.
        self.active.sort_by_key(|a| adapter_key(&a.req.adapter));
        let mut budget = self.config.prefill_chunk.max(1);
        // Per active sequence: tokens fed this step (0 = skipped), and whether it samples.
        let mut plan: Vec<(usize, bool)> = Vec::with_capacity(self.active.len());
        for a in &mut self.active {
            let (n, samples) = if a.fed < a.req.prompt.len() {
                let n = (a.req.prompt.len() - a.fed).min(budget);
                budget -= n;
                (n, n > 0 && a.fed + n == a.req.prompt.len())
            } else {
                (1, true)
            };
            if n > 0 {
                let need = a.cache.len + n;
                if need > a.cache.capacity {
                    let most = a.req.prompt.len() + a.req.max_tokens;
                    let cap = need.max((a.cache.capacity * 2).min(most));
                    self.model.grow_cache(&mut a.cache, cap);
                }
            }
            plan.push((n, samples));
        }
        let precision = self.config.precision;
        let model = &self.model;
        let mut steps: Vec<SeqStep<'_, Cpu>> = Vec::with_capacity(plan.len());
        for (a, &(n, _)) in self.active.iter_mut().zip(&plan) {
            if n == 0 {
                continue;
            }
            let Active {
                req,
                cache,
                fed,
                last,
                ..
            } = a;
            let tokens: &[u32] = if *fed < req.prompt.len() {
                &req.prompt[*fed..*fed + n]
            } else {
                std::slice::from_ref(last)
            };
            steps.push(SeqStep {
                cache,
                tokens,
                adapter: req.adapter.as_deref().map(|e| &e.adapter),
            });
        }
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            model.forward_batch(&mut steps, precision)
        }));
        drop(steps);
        self.metrics.engine_steps.fetch_add(1, Ordering::Relaxed);
        let logits = match result {
            Ok(l) => l,
            Err(panic) => {
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "unknown panic".into());
                for a in self.active.drain(..) {
                    let _ = a.req.events.send(SeqEvent::Failed {
                        index: a.req.index,
                        message: format!("engine failure: {what}"),
                    });
                }
                self.running.store(0, Ordering::SeqCst);
                self.metrics.active_sequences.store(0, Ordering::Relaxed);
                return;
            }
        };
        let mut logits = logits.into_iter();
        let mut finished = vec![false; self.active.len()];
        for (i, (a, &(n, samples))) in self.active.iter_mut().zip(&plan).enumerate() {
            if n == 0 {
                continue;
            }
            let Some(mut row) = logits.next() else {
                break;
            };
            if a.fed < a.req.prompt.len() {
                a.fed += n;
                self.metrics.prompt_tokens.fetch_add(n as u64, Ordering::Relaxed);
            }
            if !samples {
                continue;
            }
            finished[i] = Self::sample_one(a, &mut row, &self.metrics, self.config.max_context);
        }
        let mut i = 0;
        self.active.retain(|_| {
            i += 1;
            !finished[i - 1]
        });
        self.running.store(self.active.len(), Ordering::SeqCst);
        self.metrics
            .active_sequences
            .store(self.active.len() as u64, Ordering::Relaxed);
    }

    /// Samples the next token of `a`; returns whether the sequence is done.
    fn sample_one(a: &mut Active, row: &mut [f32], metrics: &Metrics, max_context: usize) -> bool {
        let req = &a.req;
        let raw_logprobs = req.logprobs.is_some();
        let lp_source: Option<Vec<f32>> = (raw_logprobs && req.penalties.active()).then(|| row.to_vec());
        if req.penalties.active() {
            let p = &req.penalties;
            for (&t, &c) in &a.seen {
                if let Some(l) = row.get_mut(t as usize) {
                    if p.repetition != 1.0 && p.repetition > 0.0 {
                        *l = if *l > 0.0 {
                            *l / p.repetition
                        } else {
                            *l * p.repetition
                        };
                    }
                    if c > 0 {
                        *l -= p.presence + p.frequency * c as f32;
                    }
                }
            }
            for &(t, b) in &p.logit_bias {
                if let Some(l) = row.get_mut(t as usize) {
                    *l += b;
                }
            }
        }
        let id = a.sampler.sample(row);
        let now = Instant::now();
        let send = |ev: SeqEvent| req.events.send(ev).is_ok();
        if req.stop_tokens.contains(&id) {
            let _ = send(SeqEvent::Finished {
                index: req.index,
                reason: FinishReason::Stop,
            });
            metrics.finished_sequences.fetch_add(1, Ordering::Relaxed);
            metrics
                .request_duration
                .observe(req.arrived.elapsed().as_secs_f64());
            return true;
        }
        let logprobs = req
            .logprobs
            .map(|k| logprobs_of(lp_source.as_deref().unwrap_or(row), id, k));
        match a.last_token_at {
            None => metrics
                .time_to_first_token
                .observe(now.duration_since(req.arrived).as_secs_f64()),
            Some(t) => metrics
                .inter_token_latency
                .observe(now.duration_since(t).as_secs_f64()),
        }
        a.last_token_at = Some(now);
        metrics.generation_tokens.fetch_add(1, Ordering::Relaxed);
        if !send(SeqEvent::Token {
            index: req.index,
            id,
            logprobs,
        }) {
            metrics.cancelled_sequences.fetch_add(1, Ordering::Relaxed);
            return true;
        }
        a.generated += 1;
        a.last = id;
        if req.penalties.active() {
            *a.seen.entry(id).or_insert(0) += 1;
        }
        if a.generated >= req.max_tokens || a.cache.len + 1 > max_context {
            let _ = send(SeqEvent::Finished {
                index: req.index,
                reason: FinishReason::Length,
            });
            metrics.finished_sequences.fetch_add(1, Ordering::Relaxed);
            metrics
                .request_duration
                .observe(req.arrived.elapsed().as_secs_f64());
            return true;
        }
        false
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

    #[test]
    fn logprobs_are_normalised_and_sorted() {
        let lp = logprobs_of(&[1.0, 3.0, 2.0, 0.0], 2, 2);
        assert_eq!(lp.top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![1, 2]);
        let total: f32 = [1.0f32, 3.0, 2.0, 0.0]
            .iter()
            .map(|l| (l - 3.0 + lp.top[0].1).exp())
            .sum::<f32>();
        assert!(lp.top[0].1 < 0.0 && (total - 1.0).abs() < 1e-3);
        assert!((lp.logprob - lp.top[1].1).abs() < 1e-6);
    }
}
