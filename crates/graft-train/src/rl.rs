//! RL runs (`method = "grpo" | "rloo"`): prompts in, completions sampled from the model being
//! trained, scored by reward functions, and a clipped policy-gradient step on them.
//!
//! One optimizer step is one *generation batch*: `batch.micro_batch_rows × batch.grad_accum`
//! completions, `num_generations` per prompt (TRL's `generation_batch_size` with
//! `steps_per_generation = gradient_accumulation_steps`). [`Objective::prepare_step`] samples them
//! through the generation core ([`graft_model::generation`]) on the live weights — the LoRA
//! adapter being trained, or the full model — in the run's precision, scores them, and turns the
//! rewards into advantages; [`Objective::forward_backward`] then runs the training forward over
//! micro-batches of `micro_batch_rows` completions, recomputing the log-probs at the sampling
//! temperature, and back-propagates the loss of [`crate::objective::grpo`]. With
//! `num_iterations = μ > 1` the same completions serve μ consecutive steps, their ratio taken
//! against the log-probs at generation time.
//!
//! Every random draw is a function of `(train.seed, step, completion)`, so a resumed run samples
//! what the uninterrupted run sampled.

use crate::config::{Method, OnRewardError, TrainConfig};
use crate::objective::grpo::{
    Advantages, ImportanceLevel, LossInputs, LossType, PolicyLoss, ScaleRewards, combine_rewards,
    grpo_advantages, nan_mean_std, rloo_advantages,
};
use crate::objective::{Contribution, Objective};
use crate::reward_fns::{RewardFn, Sample};
use crate::rng::Rng;
use crate::sft::{BatchSource, RunSetup, RunSummary, TrainError, train_loop};
use graft_data::{ChatTemplate, Tokenizer};
use graft_kernels::Cpu;
use graft_model::generation::{GenConfig, GenRequest, GenSink, Generator, LogprobMode, TokenLogprobs};
use graft_model::infer::FinishReason;
use graft_model::model::Model;
use graft_model::sample::SamplingParams;
use graft_model::train::{Batch, Grads, TrainOptions};
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

fn err(msg: impl std::fmt::Display) -> TrainError {
    TrainError(msg.to_string())
}

/// One prompt of an RL dataset.
#[derive(Clone, Debug)]
pub struct PromptRow {
    /// `file:line`.
    pub place: String,
    /// The prompt as the reward functions see it (the rendered chat for conversational rows).
    pub text: String,
    /// Its token ids (no special tokens added beyond what a chat template writes, as TRL).
    pub ids: Vec<u32>,
    /// Every other column of the row.
    pub columns: Map<String, Value>,
}

/// Reads prompt-only rows: `{"prompt": "text"}` (standard) or `{"prompt": [{role, content}…]}`
/// (conversational, rendered with the chat template and its generation prompt). The prompt is
/// read from `column`; every other column reaches the reward functions. Prompts longer than
/// `max_prompt` tokens keep their last `max_prompt` tokens (TRL truncates on the left); the count
/// of those is returned.
pub fn load_prompts(
    files: &[String],
    column: &str,
    tok: &Tokenizer,
    template: Option<&ChatTemplate>,
    max_prompt: usize,
) -> Result<(Vec<PromptRow>, usize), TrainError> {
    let mut out = Vec::new();
    let mut truncated = 0;
    for f in files {
        let rows =
            graft_data::dataset::json_rows(Path::new(f)).map_err(|e| err(format!("data.train: {e}")))?;
        for (place, v) in rows {
            let Value::Object(mut obj) = v else {
                return Err(err(format!(
                    "{place}: expected a JSON object with a \"{column}\" field"
                )));
            };
            let Some(prompt) = obj.remove(column) else {
                let mut have: Vec<&str> = obj.keys().map(String::as_str).collect();
                have.sort_unstable();
                return Err(err(format!(
                    "{place}: no \"{column}\" field (the row has {}); GRPO and RLOO read prompt-only rows. \
                     Name the prompt's column with data.prompt_column",
                    have.join(", ")
                )));
            };
            let text = match &prompt {
                Value::String(s) => s.clone(),
                Value::Array(_) => {
                    let (messages, _) = graft_data::dataset::parse_messages(&prompt, column)
                        .map_err(|e| err(format!("{place}: {e}")))?;
                    let Some(t) = template else {
                        return Err(err(format!(
                            "{place}: a conversational prompt needs a chat template; the model has none \
                             (set data.chat_template)"
                        )));
                    };
                    t.render_text(&messages, None, true, &Map::new())
                        .map_err(|e| err(format!("{place}: rendering the chat template: {e}")))?
                }
                other => {
                    return Err(err(format!(
                        "{place}: \"{column}\" must be a string or a list of messages, not {other}"
                    )));
                }
            };
            let mut ids = tok
                .encode(&text, false)
                .map_err(|e| err(format!("{place}: {e}")))?
                .ids;
            if ids.is_empty() {
                return Err(err(format!("{place}: the prompt encodes to no tokens")));
            }
            if ids.len() > max_prompt {
                ids.drain(..ids.len() - max_prompt);
                truncated += 1;
            }
            out.push(PromptRow {
                place,
                text,
                ids,
                columns: obj,
            });
        }
    }
    Ok((out, truncated))
}

/// One generation batch's prompts, and which of its μ optimizer steps this is.
#[derive(Clone, Debug)]
pub struct RlBatch {
    /// The generation batch's number in the run (seeds its sampling).
    pub generation: u64,
    /// 0 … μ−1: the step within the μ steps on the same completions.
    pub iteration: usize,
    /// Indices into the prompt list.
    pub prompts: Vec<usize>,
}

/// A reward function with how the run uses it.
struct RewardSlot {
    f: Box<dyn RewardFn>,
    weight: f64,
    on_error: OnRewardError,
    mean_key: &'static str,
    std_key: &'static str,
    errors_key: &'static str,
}

/// One sampled completion.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
struct Rollout {
    prompt: usize,
    /// Completion ids, the stop token included when it ended on one (as TRL's completion mask).
    ids: Vec<u32>,
    /// Cut at `max_completion_length`.
    truncated: bool,
    /// The sampler's log-probs of the tokens it reported (the stop token excluded).
    sampled_logp: Vec<f32>,
}

/// What one generation batch carries into its optimizer steps.
struct Prepared {
    generation: u64,
    rollouts: Vec<Rollout>,
    advantages: Vec<f64>,
    old: Option<Vec<Vec<f64>>>,
    reference: Option<Vec<Vec<f64>>>,
    /// Mask sum of the whole batch (DAPO's normaliser).
    num_items: f64,
    metrics: BTreeMap<&'static str, f64>,
}

/// The algorithm's own part.
#[derive(Clone, Copy, Debug)]
enum Algorithm {
    Grpo { scale: ScaleRewards },
    Rloo { beta: f64, normalize: bool },
}

/// GRPO / RLOO as an [`Objective`] whose batch is one generation batch.
pub struct Rl<'a> {
    algorithm: Algorithm,
    loss: PolicyLoss,
    group: usize,
    rows: usize,
    micro_batches: usize,
    num_iterations: usize,
    prompts: &'a [PromptRow],
    rewards: Vec<RewardSlot>,
    tok: &'a Tokenizer,
    stop_tokens: Vec<u32>,
    sampling: SamplingParams,
    temperature: f32,
    max_completion: usize,
    mask_truncated: bool,
    seed: u64,
    reference: Option<&'a Model<Cpu>>,
    completions_log: Option<(PathBuf, u64)>,
    prepared: Option<Prepared>,
}

/// A `'static` metric name (reward names are few and live for the run).
fn leak(s: String) -> &'static str {
    Box::leak(s.into_boxed_str())
}

impl<'a> Rl<'a> {
    /// The objective of an RL run: `p` from [`RlSettings::from_config`], the reward functions of
    /// `cfg.rewards`, sampling with `stop_tokens` on the live model, the KL reference a separate
    /// `reference` model under full fine-tuning (`None`: the base without the adapter).
    pub fn new(
        cfg: &TrainConfig,
        p: &RlSettings,
        prompts: &'a [PromptRow],
        tok: &'a Tokenizer,
        stop_tokens: Vec<u32>,
        reference: Option<&'a Model<Cpu>>,
    ) -> Result<Rl<'a>, TrainError> {
        let mut rewards = Vec::with_capacity(cfg.rewards.len());
        for (i, r) in cfg.rewards.iter().enumerate() {
            let args = serde_json::to_value(&r.options).map_err(err)?;
            let f = crate::reward_fns::from_config(&r.name, &args)
                .map_err(|e| err(format!("rewards[{i}]: {e}")))?;
            let name = f.name().to_string();
            rewards.push(RewardSlot {
                f,
                weight: p.reward_weights.as_ref().map_or(1.0, |w| w[i]),
                on_error: r.on_error,
                mean_key: leak(format!("rewards/{name}/mean")),
                std_key: leak(format!("rewards/{name}/std")),
                errors_key: leak(format!("rewards/{name}/errors")),
            });
        }
        Ok(Rl {
            algorithm: p.algorithm,
            loss: PolicyLoss {
                loss_type: p.loss_type,
                beta: p.loss_beta,
                epsilon_low: p.epsilon,
                epsilon_high: p.epsilon_high,
                delta: p.delta,
                level: p.level,
                bias_correction_kl: p.bias_correction_kl,
                max_completion_length: p.max_completion,
            },
            group: p.group,
            rows: p.rows,
            micro_batches: p.micro_batches,
            num_iterations: p.num_iterations,
            prompts,
            rewards,
            tok,
            stop_tokens,
            sampling: SamplingParams {
                temperature: p.temperature,
                top_k: p.top_k,
                top_p: p.top_p,
                seed: 0,
            },
            temperature: p.temperature,
            max_completion: p.max_completion,
            mask_truncated: p.mask_truncated,
            seed: cfg.train.seed,
            reference,
            completions_log: None,
            prepared: None,
        })
    }

    /// The seed of completion `j` of generation batch `generation`.
    fn sample_seed(&self, generation: u64, j: usize) -> u64 {
        let mut s = self.seed ^ 0x5EED_0F6E_4E00_u64.wrapping_mul(generation.wrapping_add(1));
        let a = crate::rng::splitmix64(&mut s);
        a ^ (j as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
    }

    /// Samples `group` completions of every prompt of `batch` on the live model.
    fn rollout(&self, model: &Model<Cpu>, batch: &RlBatch, opts: TrainOptions) -> Vec<Rollout> {
        struct Collect {
            out: Vec<Rollout>,
        }
        impl GenSink<usize> for Collect {
            fn token(&mut self, tag: &mut usize, id: u32, lp: Option<TokenLogprobs>) -> bool {
                let r = &mut self.out[*tag];
                r.ids.push(id);
                r.sampled_logp.push(lp.map_or(f32::NAN, |l| l.logprob));
                true
            }
            fn finished(&mut self, tag: usize, reason: FinishReason, _: usize, stop: Option<u32>) {
                let r = &mut self.out[tag];
                r.truncated = reason == FinishReason::Length;
                if let Some(s) = stop {
                    r.ids.push(s);
                }
            }
            fn failed(&mut self, tag: usize, _: String) {
                self.out[tag].truncated = true;
            }
        }
        let n = batch.prompts.len() * self.group;
        let longest = batch
            .prompts
            .iter()
            .map(|&p| self.prompts[p].ids.len())
            .max()
            .unwrap_or(0);
        let context = longest + self.max_completion;
        let mut g: Generator<Cpu, usize> = Generator::new(GenConfig {
            max_batch: n.clamp(1, 64),
            prefill_chunk: 2048,
            precision: opts.precision,
            max_context: context,
            kv_budget_tokens: usize::MAX / 2,
        });
        let mut sink = Collect {
            out: vec![Rollout::default(); n],
        };
        for (j, r) in sink.out.iter_mut().enumerate() {
            r.prompt = batch.prompts[j / self.group];
            g.submit(GenRequest {
                prompt: self.prompts[r.prompt].ids.clone(),
                sampling: SamplingParams {
                    seed: self.sample_seed(batch.generation, j),
                    ..self.sampling
                },
                penalties: Default::default(),
                max_tokens: self.max_completion,
                stop_tokens: self.stop_tokens.clone(),
                logprobs: Some(LogprobMode::Sampled),
                tag: j,
            });
        }
        g.run(model, &mut sink);
        sink.out
    }

    /// Scores every rollout with every reward function: `[completion][function]` (NaN where a
    /// function could not score and `on_error = "zero"` did not apply), and the error counts.
    ///
    /// With `strict = false` (evaluation) a sample a function cannot score is NaN (left out of the
    /// means) and counted, whatever its `on_error`.
    fn score(
        &self,
        rollouts: &[Rollout],
        texts: &[String],
        strict: bool,
    ) -> Result<(Vec<Vec<f64>>, Vec<usize>), String> {
        let samples: Vec<Sample<'_>> = rollouts
            .iter()
            .zip(texts)
            .map(|(r, t)| {
                let p = &self.prompts[r.prompt];
                Sample {
                    prompt: &p.text,
                    completion: t,
                    columns: &p.columns,
                }
            })
            .collect();
        let mut scores = vec![vec![0.0; self.rewards.len()]; rollouts.len()];
        let mut errors = vec![0usize; self.rewards.len()];
        for (f, slot) in self.rewards.iter().enumerate() {
            let got = slot.f.score_batch(&samples);
            for (j, res) in got.into_iter().enumerate() {
                scores[j][f] = match res {
                    Ok(x) => x,
                    Err(e) => match slot.on_error {
                        _ if !strict => {
                            errors[f] += 1;
                            f64::NAN
                        }
                        OnRewardError::Zero => {
                            errors[f] += 1;
                            0.0
                        }
                        OnRewardError::Fail => {
                            return Err(format!(
                                "{}: completion {} of this prompt: reward {e} (set on_error = \"zero\" in its \
                                 [[rewards]] table to score such samples 0)",
                                self.prompts[rollouts[j].prompt].place,
                                j % self.group
                            ));
                        }
                    },
                };
            }
        }
        Ok((scores, errors))
    }

    /// The completions' text, as the reward functions see it (special tokens skipped, as TRL).
    fn texts(&self, rollouts: &[Rollout]) -> Vec<String> {
        rollouts.iter().map(|r| self.tok.decode(&r.ids, true)).collect()
    }

    /// `Σ_f w_f r_f` per completion.
    fn combined(&self, scores: &[Vec<f64>]) -> Vec<f64> {
        let weights: Vec<f64> = self.rewards.iter().map(|s| s.weight).collect();
        combine_rewards(scores, &weights)
    }

    /// `rewards/<name>/mean|std` (NaN scores left out) and, where samples could not be scored,
    /// `rewards/<name>/errors` (always with `all_errors`, else only for `on_error = "zero"`).
    fn reward_fn_metrics(
        &self,
        scores: &[Vec<f64>],
        errors: &[usize],
        all_errors: bool,
        metrics: &mut BTreeMap<&'static str, f64>,
    ) {
        for (f, slot) in self.rewards.iter().enumerate() {
            let col: Vec<f64> = scores.iter().map(|s| s[f]).collect();
            let (m, s) = nan_mean_std(&col);
            metrics.insert(slot.mean_key, m);
            metrics.insert(slot.std_key, s);
            if slot.on_error == OnRewardError::Zero || (all_errors && errors[f] > 0) {
                metrics.insert(slot.errors_key, errors[f] as f64);
            }
        }
    }

    /// Packs rollouts `range` into one training batch: prompt + completion per row, targets on
    /// the completion tokens. Returns the batch and, per row, the positions of its targets.
    fn pack(&self, rollouts: &[Rollout]) -> (Batch, Vec<Vec<usize>>) {
        let mut b = Batch {
            input_ids: Vec::new(),
            positions: Vec::new(),
            seq_ids: Vec::new(),
            targets: Vec::new(),
        };
        let mut where_ = Vec::with_capacity(rollouts.len());
        for (s, r) in rollouts.iter().enumerate() {
            let p = &self.prompts[r.prompt].ids;
            let full: Vec<u32> = p.iter().chain(&r.ids).copied().collect();
            let start = b.input_ids.len();
            let mut at = Vec::with_capacity(r.ids.len());
            // Position i predicts full[i + 1]; the completion starts at p.len().
            for i in 0..full.len().saturating_sub(1) {
                b.input_ids.push(full[i]);
                b.positions.push(i as u32);
                b.seq_ids.push(s as u32);
                if i + 1 >= p.len() {
                    b.targets.push(full[i + 1] as i32);
                    at.push(start + i);
                } else {
                    b.targets.push(graft_kernels::IGNORE_INDEX);
                }
            }
            where_.push(at);
        }
        (b, where_)
    }

    /// Per-token log-probs of every rollout under `model` (forward only), at the temperature.
    fn logprobs(&self, model: &Model<Cpu>, rollouts: &[Rollout], opts: TrainOptions) -> Vec<Vec<f64>> {
        let mut out = Vec::with_capacity(rollouts.len());
        for chunk in rollouts.chunks(self.rows.max(1)) {
            let (b, at) = self.pack(chunk);
            let f = model.forward_logprobs_with(&b, opts);
            for a in at {
                out.push(a.iter().map(|&i| f.logprobs[i] as f64).collect());
            }
        }
        out
    }

    fn mask_of(&self, r: &Rollout) -> Vec<f64> {
        let keep = !(self.mask_truncated && r.truncated);
        vec![f64::from(u8::from(keep)); r.ids.len()]
    }

    fn write_completions(&self, generation: u64, prep: &Prepared, texts: &[String], scores: &[Vec<f64>]) {
        let Some((path, every)) = &self.completions_log else {
            return;
        };
        if *every == 0 || !(generation + 1).is_multiple_of(*every) {
            return;
        }
        let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(path) else {
            return;
        };
        for (j, r) in prep.rollouts.iter().enumerate() {
            let rewards: Map<String, Value> = self
                .rewards
                .iter()
                .zip(&scores[j])
                .map(|(s, &x)| (s.f.name().to_string(), serde_json::json!(x)))
                .collect();
            let line = serde_json::json!({
                "step": generation * self.num_iterations as u64 + 1,
                "prompt": self.prompts[r.prompt].text,
                "completion": texts[j],
                "rewards": rewards,
                "advantage": prep.advantages[j],
                "truncated": r.truncated,
            });
            let _ = writeln!(f, "{line}");
        }
    }
}

/// TRL's `completions/*` length metrics of a batch of rollouts.
fn completion_metrics(rollouts: &[Rollout], metrics: &mut BTreeMap<&'static str, f64>) {
    let lengths: Vec<f64> = rollouts.iter().map(|r| r.ids.len() as f64).collect();
    let term: Vec<f64> = rollouts
        .iter()
        .filter(|r| !r.truncated)
        .map(|r| r.ids.len() as f64)
        .collect();
    let n = lengths.len().max(1) as f64;
    let stat = |v: &[f64], f: fn(f64, f64) -> f64, init: f64| {
        if v.is_empty() {
            0.0
        } else {
            v.iter().copied().fold(init, f)
        }
    };
    let mean = |v: &[f64]| {
        if v.is_empty() {
            0.0
        } else {
            v.iter().sum::<f64>() / v.len() as f64
        }
    };
    metrics.insert("completions/mean_length", mean(&lengths));
    metrics.insert("completions/min_length", stat(&lengths, f64::min, f64::INFINITY));
    metrics.insert("completions/max_length", stat(&lengths, f64::max, 0.0));
    metrics.insert(
        "completions/clipped_ratio",
        (lengths.len() - term.len()) as f64 / n,
    );
    metrics.insert("completions/mean_terminated_length", mean(&term));
    metrics.insert(
        "completions/min_terminated_length",
        stat(&term, f64::min, f64::INFINITY),
    );
    metrics.insert("completions/max_terminated_length", stat(&term, f64::max, 0.0));
}

impl Objective for Rl<'_> {
    type Batch = RlBatch;

    fn micro_batches_per_step(&self) -> Option<usize> {
        Some(1)
    }

    fn zero_gradient_is_collapse(&self) -> bool {
        false
    }

    /// The completions of the current generation batch, while later iterations (μ > 1) still
    /// train on them: a resumed run continues on exactly these.
    fn state(&self) -> Option<Value> {
        let p = self.prepared.as_ref()?;
        if self.num_iterations < 2 {
            return None;
        }
        let metrics: Map<String, Value> = p
            .metrics
            .iter()
            .filter(|(_, v)| v.is_finite())
            .map(|(k, v)| (k.to_string(), serde_json::json!(v)))
            .collect();
        Some(serde_json::json!({
            "generation": p.generation,
            "rollouts": p.rollouts,
            "advantages": p.advantages,
            "old": p.old,
            "reference": p.reference,
            "num_items": p.num_items,
            "metrics": metrics,
        }))
    }

    fn restore(&mut self, v: Value) -> Result<(), String> {
        fn field<T: serde::de::DeserializeOwned>(v: &Value, k: &str) -> Result<T, String> {
            serde_json::from_value(v.get(k).cloned().unwrap_or(Value::Null))
                .map_err(|e| format!("`{k}`: {e}"))
        }
        let metrics: BTreeMap<String, f64> = field(&v, "metrics")?;
        let prep = Prepared {
            generation: field(&v, "generation")?,
            rollouts: field(&v, "rollouts")?,
            advantages: field(&v, "advantages")?,
            old: field(&v, "old")?,
            reference: field(&v, "reference")?,
            num_items: field(&v, "num_items")?,
            metrics: metrics.into_iter().map(|(k, x)| (leak(k), x)).collect(),
        };
        if prep.rollouts.len() != prep.advantages.len()
            || prep.rollouts.iter().any(|r| r.prompt >= self.prompts.len())
        {
            return Err("the saved completions do not match this run's prompts".into());
        }
        self.prepared = Some(prep);
        Ok(())
    }

    fn prepare_step(
        &mut self,
        model: &Model<Cpu>,
        batch: &RlBatch,
        opts: TrainOptions,
    ) -> Result<(), String> {
        if batch.iteration > 0
            && self
                .prepared
                .as_ref()
                .is_some_and(|p| p.generation == batch.generation)
        {
            return Ok(());
        }
        let gen_opts = TrainOptions {
            lora_dropout: 0.0,
            checkpointing: false,
            temperature: Some(self.temperature),
            ..opts
        };
        let rollouts = self.rollout(model, batch, opts);
        let texts = self.texts(&rollouts);
        let (scores, errors) = self.score(&rollouts, &texts, true)?;
        let combined = self.combined(&scores);
        let needs_old =
            self.num_iterations > 1 || matches!(self.algorithm, Algorithm::Rloo { beta, .. } if beta != 0.0);
        let old = needs_old.then(|| self.logprobs(model, &rollouts, gen_opts));
        let beta_ref = match self.algorithm {
            Algorithm::Grpo { .. } => self.loss.beta,
            Algorithm::Rloo { beta, .. } => beta,
        };
        let reference = (beta_ref != 0.0).then(|| match self.reference {
            Some(r) => self.logprobs(r, &rollouts, gen_opts),
            None => self.logprobs(
                model,
                &rollouts,
                TrainOptions {
                    without_adapters: true,
                    ..gen_opts
                },
            ),
        });
        let masks: Vec<Vec<f64>> = rollouts.iter().map(|r| self.mask_of(r)).collect();
        let Advantages {
            advantages,
            metrics: reward_metrics,
            ..
        } = match self.algorithm {
            Algorithm::Grpo { scale } => grpo_advantages(&combined, self.group, scale),
            Algorithm::Rloo { beta, normalize } => {
                // The sequence KL at generation time, summed over the completion's tokens.
                let kl: Option<Vec<f64>> = match (&old, &reference) {
                    (Some(o), Some(r)) => Some(
                        o.iter()
                            .zip(r)
                            .zip(&masks)
                            .map(|((o, r), m)| o.iter().zip(r).zip(m).map(|((a, b), m)| (a - b) * m).sum())
                            .collect(),
                    ),
                    _ => None,
                };
                let mut a = rloo_advantages(&combined, self.group, beta, kl.as_deref(), normalize);
                if let Some(kl) = &kl {
                    // TRL logs the token mean of the first-order KL.
                    let tokens: f64 = masks.iter().flatten().sum();
                    a.metrics.insert("kl", kl.iter().sum::<f64>() / tokens.max(1.0));
                }
                a
            }
        };
        let mut metrics: BTreeMap<&'static str, f64> = reward_metrics;
        self.reward_fn_metrics(&scores, &errors, true, &mut metrics);
        completion_metrics(&rollouts, &mut metrics);
        let num_items: f64 = masks.iter().flatten().sum();
        let prep = Prepared {
            generation: batch.generation,
            rollouts,
            advantages,
            old,
            reference,
            num_items,
            metrics,
        };
        self.write_completions(batch.generation, &prep, &texts, &scores);
        self.prepared = Some(prep);
        Ok(())
    }

    fn forward_backward(
        &mut self,
        model: &Model<Cpu>,
        _batch: &RlBatch,
        grads: &mut Grads<Cpu>,
        opts: TrainOptions,
    ) -> Contribution {
        let prep = self
            .prepared
            .as_ref()
            .expect("prepare_step runs before forward_backward");
        let opts = TrainOptions {
            temperature: Some(self.temperature),
            ..opts
        };
        let accum_scale = self.loss.accumulation_scale(self.micro_batches);
        let mut total = Contribution::default();
        let mut loss = 0.0;
        let mut metric_sums: BTreeMap<&'static str, f64> = BTreeMap::new();
        let (mut diff_sum, mut diff_max, mut diff_n) = (0.0f64, 0.0f64, 0usize);
        let mut parts = 0usize;
        let rows = self.rows.max(1);
        for (c, chunk) in prep.rollouts.chunks(rows).enumerate() {
            let lo = c * rows;
            let (b, at) = self.pack(chunk);
            let (out, pending) = model.forward_for_backward(&b, opts);
            let logp: Vec<Vec<f64>> = at
                .iter()
                .map(|a| a.iter().map(|&i| out.logprobs[i] as f64).collect())
                .collect();
            let masks: Vec<Vec<f64>> = chunk.iter().map(|r| self.mask_of(r)).collect();
            // TRL's `entropy`: the masked token mean of the micro-batch, averaged over micro-batches.
            let (mut h_sum, mut h_n) = (0.0f64, 0.0f64);
            for (a, m) in at.iter().zip(&masks) {
                for (&i, &mt) in a.iter().zip(m) {
                    h_sum += out.entropies[i] as f64 * mt;
                    h_n += mt;
                }
            }
            *metric_sums.entry("entropy").or_insert(0.0) += h_sum / h_n.max(1.0);
            for ((r, lp), m) in chunk.iter().zip(&logp).zip(&masks) {
                for (t, &s) in r.sampled_logp.iter().enumerate() {
                    if s.is_finite() && m[t] > 0.0 {
                        let d = (lp[t] - s as f64).abs();
                        diff_sum += d;
                        diff_max = diff_max.max(d);
                        diff_n += 1;
                    }
                }
            }
            let slice = |v: &Option<Vec<Vec<f64>>>| v.as_ref().map(|v| v[lo..lo + chunk.len()].to_vec());
            let (old, reference) = (slice(&prep.old), slice(&prep.reference));
            let old = if self.num_iterations > 1 { old } else { None };
            let inputs = LossInputs {
                logp: &logp,
                old: old.as_deref(),
                reference: reference.as_deref(),
                advantages: &prep.advantages[lo..lo + chunk.len()],
                mask: &masks,
            };
            let o = self.loss.compute(&inputs, prep.num_items.max(1.0));
            loss += o.loss * accum_scale;
            let mut d_logp = vec![0.0f32; b.len()];
            for (a, d) in at.iter().zip(&o.d_logp) {
                for (&i, &g) in a.iter().zip(d) {
                    d_logp[i] = (g * accum_scale) as f32;
                }
            }
            model.backward(&b, pending, grads, &d_logp);
            for (k, v) in o.metrics {
                *metric_sums.entry(k).or_insert(0.0) += v;
            }
            total.tokens += out.num_trained;
            parts += 1;
        }
        let mut metrics = prep.metrics.clone();
        for (k, v) in metric_sums {
            metrics.insert(k, v / parts.max(1) as f64);
        }
        if diff_n > 0 {
            metrics.insert("sampling/sampling_logp_difference/mean", diff_sum / diff_n as f64);
            metrics.insert("sampling/sampling_logp_difference/max", diff_max);
        }
        total.loss_sum = loss;
        total.units = 1.0;
        total.metrics = metrics.into_iter().filter(|(_, v)| v.is_finite()).collect();
        total
    }

    /// Completions to held-out prompts, sampled as in training (from their own seeds), scored:
    /// the reward metrics (logged as `eval_reward`, `eval_rewards/<name>/mean`, …). Samples a
    /// function cannot score are left out and counted (`eval_rewards/<name>/errors`).
    fn evaluate(&self, model: &Model<Cpu>, batch: &RlBatch, opts: TrainOptions) -> Contribution {
        let rollouts = self.rollout(model, batch, opts);
        let texts = self.texts(&rollouts);
        let (scores, errors) = self
            .score(&rollouts, &texts, false)
            .expect("non-strict scoring does not fail");
        // A completion no function could score is left out, as TRL leaves unscorable rows out.
        let combined: Vec<f64> = self
            .combined(&scores)
            .into_iter()
            .zip(&scores)
            .map(|(r, s)| if s.iter().all(|x| x.is_nan()) { f64::NAN } else { r })
            .collect();
        let (mean, std) = nan_mean_std(&combined);
        let mut metrics = BTreeMap::new();
        metrics.insert("reward", mean);
        metrics.insert("reward_std", std);
        self.reward_fn_metrics(&scores, &errors, true, &mut metrics);
        completion_metrics(&rollouts, &mut metrics);
        Contribution {
            loss_sum: 0.0,
            units: 1.0,
            tokens: 0,
            metrics: metrics.into_iter().filter(|(_, v)| v.is_finite()).collect(),
        }
    }
}

/// Runs GRPO or RLOO: prompts, reward functions, generation batches, the loop.
pub fn run_rl(
    mut setup: RunSetup<'_>,
    tok: &Tokenizer,
    template: Option<&ChatTemplate>,
    mut reference: Option<Model<Cpu>>,
) -> Result<RunSummary, TrainError> {
    let cfg: &TrainConfig = setup.cfg;
    let p = RlSettings::from_config(cfg).map_err(err)?;
    let max_prompt = cfg.data.max_length.saturating_sub(p.max_completion).max(1);
    let (train, mut truncated) = load_prompts(
        &cfg.data.train,
        &cfg.data.prompt_column,
        tok,
        template,
        max_prompt,
    )?;
    // Held-out prompts: data.eval, or data.eval_fraction of the training rows.
    let (train, held_out) = if cfg.data.eval.is_empty() {
        crate::sft::split_eval(train, cfg.data.eval_fraction, cfg.train.seed)
    } else {
        let (eval, t) = load_prompts(&cfg.data.eval, &cfg.data.prompt_column, tok, template, max_prompt)
            .map_err(|e| err(e.0.replacen("data.train", "data.eval", 1)))?;
        truncated += t;
        (train, eval)
    };
    if train.is_empty() {
        return Err(err("data.train: no prompts"));
    }
    if truncated > 0 {
        eprintln!(
            "warning: {truncated} prompts are longer than data.max_length − max_completion_length = {max_prompt} tokens \
             and keep their last {max_prompt} tokens"
        );
    }
    // One list for the objective: the training prompts, then the held-out ones.
    let n_prompts = train.len();
    let prompts: Vec<PromptRow> = train.into_iter().chain(held_out).collect();
    let vocab = setup.model.spec.vocab_size;
    for row in &prompts {
        if let Some(&bad) = row.ids.iter().find(|&&id| id as usize >= vocab) {
            return Err(err(format!(
                "{}: the tokenizer produced id {bad}, outside the model's vocabulary ({vocab})",
                row.place
            )));
        }
    }
    let mut stop_tokens: Vec<u32> = tok.eos_ids().to_vec();
    stop_tokens.extend(setup.model.spec.eos_token_ids.iter().copied());
    stop_tokens.sort_unstable();
    stop_tokens.dedup();
    let longest = prompts.iter().map(|r| r.ids.len()).max().unwrap_or(0);
    setup.model.ensure_positions(longest + p.max_completion + 1);
    if let Some(r) = reference.as_mut() {
        r.ensure_positions(longest + p.max_completion + 1);
    }
    // A generation batch: rows × grad_accum completions, num_generations per prompt.
    let per_step = p.rows * p.micro_batches;
    let prompts_per_step = per_step / p.group;
    if n_prompts < prompts_per_step {
        return Err(err(format!(
            "data.train: {n_prompts} prompts, but one step samples {per_step} completions = {prompts_per_step} prompts ×              {} generations (batch.micro_batch_rows × batch.grad_accum); add prompts or make the step smaller",
            p.group
        )));
    }
    let seed = cfg.train.seed;
    let mu = p.num_iterations;
    let batches_per_epoch = (n_prompts / prompts_per_step).max(1);
    let epoch = move |e: u64| -> Result<Vec<RlBatch>, TrainError> {
        let mut order: Vec<usize> = (0..n_prompts).collect();
        Rng::for_stream(seed, 0x6E7E_0000 ^ e).shuffle(&mut order);
        let mut out = Vec::new();
        for (i, c) in order.chunks(prompts_per_step).take(batches_per_epoch).enumerate() {
            for it in 0..mu {
                out.push(RlBatch {
                    generation: e * batches_per_epoch as u64 + i as u64,
                    iteration: it,
                    prompts: c.to_vec(),
                });
            }
        }
        Ok(out)
    };
    let data_hash = {
        let mut h = graft_data::hash::ContentHasher::new();
        for r in &prompts {
            h.field(&r.ids.iter().flat_map(|i| i.to_le_bytes()).collect::<Vec<u8>>());
            h.field(serde_json::to_string(&r.columns).unwrap_or_default().as_bytes());
        }
        h.hex()
    };
    eprintln!(
        "{}: {} prompts, {} per step × {} generations = {} completions per step ({} micro-batches of {}), \
         up to {} tokens each, rewards: {}",
        cfg.method.name(),
        n_prompts,
        prompts_per_step,
        p.group,
        per_step,
        p.micro_batches,
        p.rows,
        p.max_completion,
        cfg.rewards
            .iter()
            .map(|r| r.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    );
    let mut objective = Rl::new(cfg, &p, &prompts, tok, stop_tokens, reference.as_ref())?;
    objective.completions_log = Some((setup.run_dir.join("completions.jsonl"), p.log_completions_every));
    if !setup.resume {
        let _ = std::fs::remove_file(setup.run_dir.join("completions.jsonl"));
    }
    // Evaluation batches of held-out prompts, each sampled from its own seeds.
    let eval: Vec<RlBatch> = (n_prompts..prompts.len())
        .collect::<Vec<_>>()
        .chunks(prompts_per_step)
        .enumerate()
        .map(|(i, c)| RlBatch {
            generation: u64::MAX - i as u64,
            iteration: 0,
            prompts: c.to_vec(),
        })
        .collect();
    let source = BatchSource {
        samples: n_prompts,
        data_hash,
        epoch: &epoch,
        eval,
    };
    train_loop(setup, objective, source)
}

/// The settings of an RL run, from `[grpo]` or `[rloo]`, checked.
#[derive(Clone, Debug)]
pub struct RlSettings {
    algorithm: Algorithm,
    /// Completions per prompt.
    pub group: usize,
    /// Completions per micro-batch.
    pub rows: usize,
    /// Micro-batches per step.
    pub micro_batches: usize,
    /// Tokens per completion at most.
    pub max_completion: usize,
    temperature: f32,
    top_p: f32,
    top_k: usize,
    loss_type: LossType,
    loss_beta: f64,
    epsilon: f64,
    epsilon_high: f64,
    delta: Option<f64>,
    level: ImportanceLevel,
    bias_correction_kl: bool,
    num_iterations: usize,
    mask_truncated: bool,
    reward_weights: Option<Vec<f64>>,
    log_completions_every: u64,
}

/// `a` under GRPO, `b` under RLOO.
fn pick<T>(grpo: bool, a: T, b: T) -> T {
    if grpo { a } else { b }
}

impl RlSettings {
    /// Reads and checks the method's section; errors name the key.
    pub fn from_config(cfg: &TrainConfig) -> Result<RlSettings, String> {
        let sec = cfg.method.name();
        let g = &cfg.grpo;
        let r = &cfg.rloo;
        let grpo = cfg.method == Method::Grpo;

        let group = pick(grpo, g.num_generations, r.num_generations);
        let max_completion = pick(grpo, g.max_completion_length, r.max_completion_length);
        let temperature = pick(grpo, g.temperature, r.temperature);
        let top_p = pick(grpo, g.top_p, r.top_p);
        let top_k = pick(grpo, g.top_k, r.top_k);
        let epsilon = pick(grpo, g.epsilon, r.epsilon);
        let epsilon_high = if grpo { g.epsilon_high } else { r.epsilon_high }.unwrap_or(epsilon);
        let num_iterations = pick(grpo, g.num_iterations, r.num_iterations);
        let mask_truncated = if grpo {
            g.mask_truncated_completions
        } else {
            r.mask_truncated_completions
        };
        let reward_weights = if grpo {
            g.reward_weights.clone()
        } else {
            r.reward_weights.clone()
        };
        let bad = |key: &str, what: String| format!("{sec}.{key}: {what}");
        if group < 2 {
            return Err(bad(
                "num_generations",
                format!("must be at least 2 (advantages compare completions of one prompt), got {group}"),
            ));
        }
        if max_completion == 0 {
            return Err(bad("max_completion_length", "must be at least 1".into()));
        }
        if max_completion >= cfg.data.max_length {
            return Err(bad(
                "max_completion_length",
                format!(
                    "({max_completion}) must be below data.max_length ({}), which bounds prompt + completion",
                    cfg.data.max_length
                ),
            ));
        }
        if !(temperature > 0.0 && temperature.is_finite()) {
            return Err(bad(
                "temperature",
                format!("must be a positive number, got {temperature}"),
            ));
        }
        if !(top_p > 0.0 && top_p <= 1.0) {
            return Err(bad("top_p", format!("must be in (0, 1], got {top_p}")));
        }
        for (k, v) in [("epsilon", epsilon), ("epsilon_high", epsilon_high)] {
            if !(v >= 0.0 && v.is_finite()) {
                return Err(bad(k, format!("must be a number >= 0, got {v}")));
            }
        }
        if epsilon >= 1.0 {
            return Err(bad(
                "epsilon",
                format!("must be below 1 (the ratio's lower bound is 1 − epsilon), got {epsilon}"),
            ));
        }
        if num_iterations == 0 {
            return Err(bad("num_iterations", "must be at least 1".into()));
        }
        let rows = match cfg.batch.micro_batch_rows {
            Some(r) => r.max(1),
            None => {
                return Err(format!(
                    "batch.micro_batch_rows: {sec} counts its micro-batches in completions; set batch.micro_batch_rows \
                     (TRL's per_device_train_batch_size), e.g. {group}"
                ));
            }
        };
        let micro_batches = cfg.batch.grad_accum.max(1);
        if !(rows * micro_batches).is_multiple_of(group) {
            return Err(bad(
                "num_generations",
                format!(
                    "({group}) must divide the completions of a step, batch.micro_batch_rows × batch.grad_accum = {}",
                    rows * micro_batches
                ),
            ));
        }
        if cfg.rewards.is_empty() {
            return Err(format!(
                "rewards: {sec} needs at least one reward function: add a [[rewards]] table, e.g.\n  [[rewards]]\n  name = \"math\"\n  column = \"answer\""
            ));
        }
        if let Some(w) = &reward_weights {
            if w.len() != cfg.rewards.len() {
                return Err(bad(
                    "reward_weights",
                    format!(
                        "has {} weights for {} [[rewards]] tables",
                        w.len(),
                        cfg.rewards.len()
                    ),
                ));
            }
            if w.iter().any(|x| !x.is_finite()) {
                return Err(bad("reward_weights", "must be finite numbers".into()));
            }
        }
        let (algorithm, loss_type, loss_beta, delta, level) = if grpo {
            let loss_type = LossType::parse(&g.loss_type).ok_or_else(|| {
                bad(
                    "loss_type",
                    format!(
                        "unknown \"{}\"; expected grpo, bnpo, dr_grpo or dapo",
                        g.loss_type
                    ),
                )
            })?;
            let scale = match g.scale_rewards.as_str() {
                "group" | "true" => ScaleRewards::Group,
                "batch" => ScaleRewards::Batch,
                "none" | "false" => ScaleRewards::None,
                other => {
                    return Err(bad(
                        "scale_rewards",
                        format!("unknown \"{other}\"; expected group, batch or none"),
                    ));
                }
            };
            let level = match g.importance_sampling_level.as_str() {
                "token" => ImportanceLevel::Token,
                "sequence" => ImportanceLevel::Sequence,
                other => {
                    return Err(bad(
                        "importance_sampling_level",
                        format!("unknown \"{other}\"; expected token or sequence"),
                    ));
                }
            };
            if !(g.beta >= 0.0 && g.beta.is_finite()) {
                return Err(bad("beta", format!("must be a number >= 0, got {}", g.beta)));
            }
            if let Some(d) = g.delta
                && !(d > 1.0 + epsilon_high && d.is_finite())
            {
                return Err(bad(
                    "delta",
                    format!("must be above 1 + epsilon_high = {}, got {d}", 1.0 + epsilon_high),
                ));
            }
            (Algorithm::Grpo { scale }, loss_type, g.beta, g.delta, level)
        } else {
            if !(r.beta >= 0.0 && r.beta.is_finite()) {
                return Err(bad("beta", format!("must be a number >= 0, got {}", r.beta)));
            }
            (
                Algorithm::Rloo {
                    beta: r.beta,
                    normalize: r.normalize_advantages,
                },
                // RLOO: the KL sits in the reward; the loss is the mean over completions of the
                // clipped surrogate on the summed sequence log-probs.
                LossType::Grpo,
                0.0,
                None,
                ImportanceLevel::SequenceSum,
            )
        };
        Ok(RlSettings {
            algorithm,
            group,
            rows,
            micro_batches,
            max_completion,
            temperature: temperature as f32,
            top_p: top_p as f32,
            top_k,
            loss_type,
            loss_beta,
            epsilon,
            epsilon_high,
            delta,
            level,
            bias_correction_kl: grpo && g.use_bias_correction_kl,
            num_iterations,
            mask_truncated,
            reward_weights,
            log_completions_every: pick(grpo, g.log_completions_every, r.log_completions_every),
        })
    }
}
