//! The generation core: batched sampling over one model, below every caller that generates.
//!
//! A [`Generator`] holds sequences waiting for a batch slot and the running batch. Each
//! [`Generator::step`] feeds every running sequence in one [`Model::forward_batch`] — prompt
//! chunks for new sequences (at most `prefill_chunk` prompt tokens per step, so decode latency
//! stays bounded) and one token for the others, each with its own adapter — then picks each
//! sequence's next token with its own seeded [`Sampler`] after its logit penalties, and reports it
//! to a [`GenSink`]. A sequence ends on a stop token, at `max_tokens`, at the end of the context,
//! or when the sink refuses a token (the caller's client went away).
//!
//! The core knows no channels, threads or HTTP: `graft serve` wraps it in an engine thread fed by
//! channels, `graft generate` / `graft chat` run one sequence through [`Model::generate`], and GRPO
//! / RLOO rollouts run a whole group of prompts through [`Generator::run`] on the live adapter.
//! What a caller attaches to a sequence (its channel, cancel flag, adapter, row index) is the
//! sequence's `tag`, handed back with every event.

use crate::infer::{FinishReason, KvCache, SeqStep};
use crate::lora::Adapter;
use crate::model::Model;
use crate::sample::{Sampler, SamplingParams};
use graft_kernels::{Backend, Precision};
use std::collections::{HashMap, VecDeque};

/// Scheduler limits of a [`Generator`].
#[derive(Debug, Clone, Copy)]
pub struct GenConfig {
    /// Sequences decoded together at most.
    pub max_batch: usize,
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
    /// Whether any adjustment is on.
    pub fn active(&self) -> bool {
        self.presence != 0.0 || self.frequency != 0.0 || self.repeats() || !self.logit_bias.is_empty()
    }

    fn repeats(&self) -> bool {
        self.repetition != 1.0 && self.repetition != 0.0
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

/// Which log-probabilities a sequence reports with each token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogprobMode {
    /// Of the model's raw distribution (before penalties and temperature), with this many top
    /// alternatives: what OpenAI's `logprobs` / `top_logprobs` return.
    Raw(usize),
    /// Of the distribution the token was drawn from: the logits after penalties, divided by the
    /// sampling temperature (RL: compared with the trainer's temperature-scaled log-probs).
    Sampled,
}

/// What a caller attaches to a sequence: handed back with each event, and asked for the
/// sequence's adapter.
pub trait SeqTag<B: Backend> {
    /// The LoRA adapter this sequence runs with (`None`: the model's own active adapter, if any).
    fn adapter(&self) -> Option<&Adapter<B>> {
        None
    }
}

impl<B: Backend> SeqTag<B> for () {}
impl<B: Backend> SeqTag<B> for usize {}

/// One sequence to generate.
#[derive(Debug, Clone)]
pub struct GenRequest<T> {
    /// Prompt token ids.
    pub prompt: Vec<u32>,
    /// Sampling settings (the sequence's own seeded stream).
    pub sampling: SamplingParams,
    /// Logit adjustments.
    pub penalties: Penalties,
    /// Tokens to generate at most.
    pub max_tokens: usize,
    /// Tokens ending the sequence (not reported as tokens).
    pub stop_tokens: Vec<u32>,
    /// Log-probabilities to report with each token.
    pub logprobs: Option<LogprobMode>,
    /// The caller's data for this sequence.
    pub tag: T,
}

/// Where a [`Generator`] reports what happens to its sequences.
pub trait GenSink<T> {
    /// A new token of the sequence tagged `tag` (stop tokens are not reported). Return `false`
    /// to end the sequence here (its client went away); it then gets no `finished` call.
    fn token(&mut self, tag: &mut T, id: u32, logprobs: Option<TokenLogprobs>) -> bool;
    /// The sequence ended normally, after `generated` tokens; `stop` is the stop token that
    /// ended it (not reported as a token), if one did.
    fn finished(&mut self, tag: T, reason: FinishReason, generated: usize, stop: Option<u32>);
    /// The sequence could not be run (prompt too long, engine failure).
    fn failed(&mut self, tag: T, message: String);
}

/// What one [`Generator::step`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StepStats {
    /// Prompt tokens prefilled.
    pub prompt_tokens: usize,
    /// Tokens sampled (stop tokens included).
    pub sampled: usize,
}

/// How a sequence ended: why, and the stop token that ended it (`None`: the sink refused a token).
type Ending = Option<(FinishReason, Option<u32>)>;

struct Running<B: Backend, T> {
    req: GenRequest<T>,
    cache: KvCache<B>,
    /// Prompt tokens already in the cache.
    fed: usize,
    generated: usize,
    last: u32,
    sampler: Sampler,
    /// Token counts for penalties (prompt tokens included for the repetition penalty).
    seen: HashMap<u32, u32>,
}

/// Waiting and running sequences over one model; see the module documentation.
pub struct Generator<B: Backend, T> {
    config: GenConfig,
    waiting: VecDeque<GenRequest<T>>,
    active: Vec<Running<B, T>>,
}

/// Log-softmax of the chosen token and the `k` best tokens of `logits`.
pub fn logprobs_of(logits: &[f32], chosen: u32, k: usize) -> TokenLogprobs {
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

impl<B: Backend, T: SeqTag<B>> Generator<B, T> {
    /// An empty generator with these limits.
    pub fn new(config: GenConfig) -> Generator<B, T> {
        Generator {
            config,
            waiting: VecDeque::new(),
            active: Vec::new(),
        }
    }

    /// The limits.
    pub fn config(&self) -> &GenConfig {
        &self.config
    }

    /// Queues a sequence; it joins the batch when a slot and KV budget are free.
    pub fn submit(&mut self, req: GenRequest<T>) {
        self.waiting.push_back(req);
    }

    /// Sequences waiting for a batch slot.
    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    /// Sequences in the running batch.
    pub fn running(&self) -> usize {
        self.active.len()
    }

    /// Nothing waits and nothing runs.
    pub fn is_idle(&self) -> bool {
        self.waiting.is_empty() && self.active.is_empty()
    }

    /// Drops every sequence whose tag `keep` refuses (cancelled by its caller), with no event;
    /// returns how many waiting and how many running sequences went.
    pub fn retain(&mut self, mut keep: impl FnMut(&T) -> bool) -> (usize, usize) {
        let (w, a) = (self.waiting.len(), self.active.len());
        self.waiting.retain(|r| keep(&r.tag));
        self.active.retain(|r| keep(&r.req.tag));
        (w - self.waiting.len(), a - self.active.len())
    }

    /// Fails every waiting and running sequence with `message`.
    pub fn fail_all(&mut self, sink: &mut impl GenSink<T>, message: &str) {
        let waiting = self.waiting.drain(..);
        let active = self.active.drain(..).map(|r| r.req);
        for req in waiting.chain(active) {
            sink.failed(req.tag, message.to_string());
        }
    }

    /// Moves waiting sequences into the batch while slots and KV budget allow; returns how many
    /// left the queue (sequences that cannot run at all are failed or finished here).
    pub fn admit(&mut self, model: &Model<B>, sink: &mut impl GenSink<T>) -> usize {
        let mut reserved: usize = self
            .active
            .iter()
            .map(|a| a.req.prompt.len() + a.req.max_tokens)
            .sum();
        let mut left = 0;
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
            left += 1;
            reserved += need;
            let room = self.config.max_context.saturating_sub(req.prompt.len());
            if req.prompt.is_empty() || room == 0 {
                let message = format!(
                    "the prompt has {} tokens; the model's context is {}",
                    req.prompt.len(),
                    self.config.max_context
                );
                sink.failed(req.tag, message);
                continue;
            }
            req.max_tokens = req.max_tokens.min(room);
            if req.max_tokens == 0 {
                sink.finished(req.tag, FinishReason::Length, 0, None);
                continue;
            }
            let initial = (req.prompt.len() + req.max_tokens.min(64)).min(self.config.max_context);
            let mut seen = HashMap::new();
            if req.penalties.repeats() {
                for &t in &req.prompt {
                    seen.entry(t).or_insert(0);
                }
            }
            self.active.push(Running {
                cache: model.new_cache(initial, self.config.precision),
                sampler: Sampler::new(req.sampling),
                req,
                fed: 0,
                generated: 0,
                last: 0,
                seen,
            });
        }
        left
    }

    /// One batched forward over the running sequences and a token for each that finished its
    /// prompt; finished sequences leave the batch. A panic in the forward fails every running
    /// sequence (the engine survives).
    pub fn step(&mut self, model: &Model<B>, sink: &mut impl GenSink<T>) -> StepStats {
        let mut stats = StepStats::default();
        if self.active.is_empty() {
            return stats;
        }
        // Rows sharing an adapter sit together so its LoRA runs once over them.
        self.active
            .sort_by_key(|a| a.req.tag.adapter().map_or(0, |x| x as *const Adapter<B> as usize));
        let mut budget = self.config.prefill_chunk.max(1);
        // Per running sequence: tokens fed this step (0 = skipped), and whether it samples.
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
                    model.grow_cache(&mut a.cache, cap);
                }
            }
            plan.push((n, samples));
        }
        let mut steps: Vec<SeqStep<'_, B>> = Vec::with_capacity(plan.len());
        for (a, &(n, _)) in self.active.iter_mut().zip(&plan) {
            if n == 0 {
                continue;
            }
            let Running {
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
                adapter: req.tag.adapter(),
            });
        }
        let precision = self.config.precision;
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            model.forward_batch(&mut steps, precision)
        }));
        drop(steps);
        let logits = match result {
            Ok(l) => l,
            Err(panic) => {
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "unknown panic".into());
                for a in self.active.drain(..) {
                    sink.failed(a.req.tag, format!("engine failure: {what}"));
                }
                return stats;
            }
        };
        let mut logits = logits.into_iter();
        let mut done: Vec<Option<Ending>> = vec![None; self.active.len()];
        for (i, (a, &(n, samples))) in self.active.iter_mut().zip(&plan).enumerate() {
            if n == 0 {
                continue;
            }
            let Some(mut row) = logits.next() else {
                break;
            };
            if a.fed < a.req.prompt.len() {
                a.fed += n;
                stats.prompt_tokens += n;
            }
            if samples {
                stats.sampled += 1;
                done[i] = Self::sample_one(a, &mut row, sink, self.config.max_context);
            }
        }
        // Finished sequences leave (the sink already heard about them).
        let mut kept = Vec::with_capacity(self.active.len());
        for (a, d) in self.active.drain(..).zip(done) {
            match d {
                Some(end) => {
                    if let Some((reason, stop)) = end {
                        sink.finished(a.req.tag, reason, a.generated, stop);
                    }
                }
                None => kept.push(a),
            }
        }
        self.active = kept;
        stats
    }

    /// Admits and steps until every sequence has ended.
    pub fn run(&mut self, model: &Model<B>, sink: &mut impl GenSink<T>) {
        while !self.is_idle() {
            self.admit(model, sink);
            self.step(model, sink);
        }
    }

    /// Samples the next token of `a`. `None`: it goes on; `Some(Some((reason, stop)))`: it
    /// finished; `Some(None)`: the sink refused the token (no `finished` call).
    fn sample_one(
        a: &mut Running<B, T>,
        row: &mut [f32],
        sink: &mut impl GenSink<T>,
        max_context: usize,
    ) -> Option<Ending> {
        let req = &mut a.req;
        let raw: Option<Vec<f32>> = (matches!(req.logprobs, Some(LogprobMode::Raw(_)))
            && req.penalties.active())
        .then(|| row.to_vec());
        if req.penalties.active() {
            let p = &req.penalties;
            for (&t, &c) in &a.seen {
                if let Some(l) = row.get_mut(t as usize) {
                    if p.repeats() && p.repetition > 0.0 {
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
        if req.stop_tokens.contains(&id) {
            return Some(Some((FinishReason::Stop, Some(id))));
        }
        let logprobs = match req.logprobs {
            None => None,
            Some(LogprobMode::Raw(k)) => Some(logprobs_of(raw.as_deref().unwrap_or(row), id, k)),
            Some(LogprobMode::Sampled) => {
                let t = req.sampling.temperature;
                if t > 0.0 && t != 1.0 {
                    row.iter_mut().for_each(|l| *l /= t);
                }
                Some(logprobs_of(row, id, 0))
            }
        };
        if !sink.token(&mut req.tag, id, logprobs) {
            return Some(None);
        }
        a.generated += 1;
        a.last = id;
        if req.penalties.active() {
            *a.seen.entry(id).or_insert(0) += 1;
        }
        if a.generated >= req.max_tokens || a.cache.len + 1 > max_context {
            return Some(Some((FinishReason::Length, None)));
        }
        None
    }
}

impl<B: Backend> Model<B> {
    /// Generates up to `max_tokens` tokens after `prompt` through the generation core, calling
    /// `on_token` for each new token (return `false` to stop early). Stop tokens end generation
    /// and are not returned.
    pub fn generate(
        &mut self,
        prompt: &[u32],
        max_tokens: usize,
        sampling: SamplingParams,
        stop_tokens: &[u32],
        precision: Precision,
        on_token: impl FnMut(u32) -> bool,
    ) -> (Vec<u32>, FinishReason) {
        let capacity = prompt.len() + max_tokens;
        self.ensure_positions(capacity);
        if prompt.is_empty() || max_tokens == 0 {
            return (Vec::new(), FinishReason::Length);
        }
        struct One<F> {
            out: Vec<u32>,
            reason: FinishReason,
            on_token: F,
        }
        impl<F: FnMut(u32) -> bool> GenSink<()> for One<F> {
            fn token(&mut self, _: &mut (), id: u32, _: Option<TokenLogprobs>) -> bool {
                self.out.push(id);
                if (self.on_token)(id) {
                    true
                } else {
                    self.reason = FinishReason::Stop;
                    false
                }
            }
            fn finished(&mut self, _: (), reason: FinishReason, _: usize, _: Option<u32>) {
                self.reason = reason;
            }
            fn failed(&mut self, _: (), _: String) {
                self.reason = FinishReason::Length;
            }
        }
        let mut g: Generator<B, ()> = Generator::new(GenConfig {
            max_batch: 1,
            prefill_chunk: prompt.len(),
            precision,
            max_context: capacity,
            kv_budget_tokens: capacity,
        });
        g.submit(GenRequest {
            prompt: prompt.to_vec(),
            sampling,
            penalties: Penalties::default(),
            max_tokens,
            stop_tokens: stop_tokens.to_vec(),
            logprobs: None,
            tag: (),
        });
        let mut sink = One {
            out: Vec::new(),
            reason: FinishReason::Length,
            on_token,
        };
        g.run(self, &mut sink);
        (sink.out, sink.reason)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
