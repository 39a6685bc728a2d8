//! The training run: config → model + tokenizer → tokenized, packed data → the objective's
//! forward/backward per micro-batch ([`crate::objective`]; SFT today) → gradients divided by the
//! step's units → clip → AdamW → checkpoints, metrics, eval → PEFT adapter (or full model) and run
//! report. The loop knows no loss: it sums the objective's [`Contribution`]s.
//!
//! Exact resume: everything a step depends on is a function of the checkpoint — trainable
//! weights, optimizer moments, step, data position (epoch + batch index of a packing that is a
//! pure function of the seed and epoch) and the dropout seed (a function of the step) — so a
//! resumed run continues bit for bit.

use crate::checkpoint::{
    self, ADAPTER_FILE, CheckpointWriter, MODEL_FILE, OPTIMIZER_FILE, TRAINER_STATE_FILE, TrainerState,
};
use crate::config::{
    DataFormat, MaskPolicy, Method, MicroBatch, Precision as CfgPrecision, TrainConfig, Truncation,
};
use crate::metrics::{MetricsRecord, MetricsWriter, read_metrics, truncate_after};
use crate::objective::sft::Sft;
use crate::objective::{Contribution, Objective};
use crate::optim::{AdamW, AdamWHyper, Param, clip_grad_norm, find_non_finite, scale_grads};
use crate::report::{RunFacts, write_report};
use crate::rng::Rng;
use crate::schedule::LrSchedule;
use crate::signal::StopFlag;
use crate::tensors::{TensorRef, read_f32_file, write_f32_file};
use graft_data::batch::{PackedBatch, pack};
use graft_data::dataset::{DatasetFormat, LoadOptions};
use graft_data::sample::{LossMode, TokenizeOptions, TokenizedSample};
use graft_data::{ChatTemplate, Tokenizer};
use graft_kernels::{Cpu, Precision};
use graft_model::lora::LoraSpec;
use graft_model::model::{Model, WeightStorage};
use graft_model::peft::{LoraAdapterConfig, LoraModule, save_peft_adapter};
use graft_model::train::{Batch, Grads, TrainMode, TrainOptions};
use graft_model::weights::{LoadedModel, load_model};
use sha2::Digest;
use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// An error of a training run, with a message that says what to do.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct TrainError(pub String);

fn err(msg: impl std::fmt::Display) -> TrainError {
    TrainError(msg.to_string())
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq)]
pub struct RunSummary {
    /// The run directory.
    pub run_dir: PathBuf,
    /// Optimizer steps completed.
    pub steps: u64,
    /// Optimizer steps planned.
    pub total_steps: u64,
    /// Training loss of the last step.
    pub final_loss: Option<f64>,
    /// Last evaluation loss.
    pub eval_loss: Option<f64>,
    /// Set when the run stopped early on a signal (a checkpoint was saved).
    pub interrupted: bool,
    /// The name of the signal that stopped the run (`SIGINT`, `SIGTERM`), when one did.
    pub signal: Option<&'static str>,
    /// What the run wrote as its result: `adapter/` (LoRA) or `model/` (full fine-tuning); `None`
    /// when it stopped early.
    pub output: Option<PathBuf>,
}

/// How many consecutive steps with a zero gradient norm count as a collapsed run.
pub const COLLAPSE_STEPS: u64 = 10;

/// The tokenizer and chat template of a loaded model (or `override_path`), as
/// [`graft_hub::load_tokenizer`] opens them.
pub fn load_tokenizer(
    loaded: &LoadedModel,
    override_path: Option<&Path>,
    tokenizer_option: &str,
) -> Result<(Tokenizer, Option<ChatTemplate>), TrainError> {
    graft_hub::load_tokenizer(loaded, override_path, tokenizer_option).map_err(err)
}

/// The chat template `data.chat_template` names: a file (`.jinja`, or JSON holding
/// `chat_template`) or, when no such file exists and the text looks like Jinja, the template
/// itself.
pub fn config_chat_template(value: &str, tok: &Tokenizer) -> Result<ChatTemplate, TrainError> {
    let path = Path::new(value);
    if path.is_file() {
        return ChatTemplate::from_file(path, tok.special_tokens().clone())
            .map_err(|e| err(format!("data.chat_template: {e}")));
    }
    if value.contains("{%") || value.contains("{{") {
        return ChatTemplate::new(value, tok.special_tokens().clone())
            .map_err(|e| err(format!("data.chat_template: {e}")));
    }
    Err(err(format!(
        "data.chat_template: `{value}` is neither a file nor a Jinja template (expected a path to a .jinja \
         or tokenizer_config.json file, or the template text with {{% ... %}} / {{{{ ... }}}})"
    )))
}

/// The LoRA spec a config asks for.
pub fn lora_spec(cfg: &TrainConfig) -> Result<LoraSpec, TrainError> {
    let names: Vec<String> = match &cfg.lora.targets {
        crate::config::LoraTargets::AllLinear => vec!["all-linear".into()],
        crate::config::LoraTargets::Modules(m) => m.clone(),
    };
    let targets = LoraSpec::targets_from_names(&names).map_err(|e| err(format!("lora.targets: {e}")))?;
    Ok(LoraSpec {
        r: cfg.lora.r,
        alpha: cfg.lora.alpha as f32,
        rslora: cfg.lora.rslora,
        dropout: cfg.lora.dropout as f32,
        targets,
    })
}

/// The PEFT config describing a LoRA spec.
pub fn peft_config(spec: &LoraSpec, base: &str) -> LoraAdapterConfig {
    let modules: Vec<LoraModule> = LoraModule::ALL
        .iter()
        .zip(spec.targets)
        .filter(|(_, on)| *on)
        .map(|(m, _)| *m)
        .collect();
    let mut c = LoraAdapterConfig::new(spec.r, spec.alpha, &modules);
    c.use_rslora = spec.rslora;
    c.lora_dropout = spec.dropout;
    c.base_model_name_or_path = Some(base.to_string());
    c
}

fn data_format(f: DataFormat) -> Option<DatasetFormat> {
    match f {
        DataFormat::Auto => None,
        DataFormat::Openai => Some(DatasetFormat::OpenAiChat),
        DataFormat::Sharegpt => Some(DatasetFormat::ShareGpt),
        DataFormat::Alpaca => Some(DatasetFormat::Alpaca),
        DataFormat::PromptCompletion => Some(DatasetFormat::PromptCompletion),
        DataFormat::Text => Some(DatasetFormat::Text),
    }
}

fn tokenize_options(cfg: &TrainConfig) -> TokenizeOptions {
    TokenizeOptions {
        loss: match cfg.data.mask {
            MaskPolicy::Assistant => LossMode::AssistantOnly,
            MaskPolicy::All => LossMode::AllTokens,
            MaskPolicy::LastAssistant => LossMode::LastAssistant,
            MaskPolicy::Completion => LossMode::CompletionOnly,
        },
        max_len: Some(cfg.data.max_length),
        truncation: match cfg.data.truncation {
            Truncation::Right => graft_data::sample::Truncation::KeepStart,
            Truncation::Left => graft_data::sample::Truncation::KeepEnd,
            Truncation::Drop => graft_data::sample::Truncation::DropRow,
        },
        join_prompt_text: cfg.method == Method::Reward,
        ..Default::default()
    }
}

/// Tokenized train and eval samples of a config, plus a hash over the training data files.
pub struct PreparedData {
    /// Training samples.
    pub train: Vec<TokenizedSample>,
    /// Evaluation samples (from `data.eval` or split off by `data.eval_fraction`).
    pub eval: Vec<TokenizedSample>,
    /// SHA-256 over the training data files.
    pub data_hash: String,
    /// Rows skipped, cut or dropped.
    pub counts: RowCounts,
    /// Warnings to show the user (e.g. a tokenization cache that could not be written).
    pub warnings: Vec<String>,
}

/// Reads a config's data files through the tokenization cache for every method: hashes what it
/// reads, counts skipped and dropped training rows, and collects warnings (a cache that could not
/// be written).
pub(crate) struct DataReader<'a> {
    tok: &'a Tokenizer,
    template: Option<&'a ChatTemplate>,
    cache_dir: &'a Path,
    load: LoadOptions,
    opts: TokenizeOptions,
    hasher: sha2::Sha256,
    /// Training rows skipped, cut or dropped (callers add the cut ones).
    pub counts: RowCounts,
    /// Warnings for the user.
    pub warnings: Vec<String>,
}

impl<'a> DataReader<'a> {
    /// A reader for `cfg`'s data options.
    pub fn new(
        cfg: &TrainConfig,
        tok: &'a Tokenizer,
        template: Option<&'a ChatTemplate>,
        cache_dir: &'a Path,
    ) -> Self {
        DataReader {
            tok,
            template,
            cache_dir,
            load: LoadOptions {
                format: data_format(cfg.data.format),
                skip_invalid: cfg.data.skip_invalid,
            },
            opts: tokenize_options(cfg),
            hasher: sha2::Sha256::new(),
            counts: RowCounts::default(),
            warnings: Vec::new(),
        }
    }

    /// The tokenized datasets of `paths`, the value of `data.{key}`.
    pub fn read(
        &mut self,
        paths: &[String],
        key: &str,
    ) -> Result<Vec<graft_data::tokenized::TokenizedDataset>, TrainError> {
        let mut out = Vec::new();
        for p in paths {
            let path = Path::new(p);
            if !path.exists() {
                return Err(err(format!("data.{key}: `{p}` does not exist")));
            }
            for f in graft_data::dataset::dataset_files(path).map_err(err)? {
                self.hasher
                    .update(&std::fs::read(&f).map_err(|e| err(format!("{}: {e}", f.display())))?);
            }
            let ds = graft_data::tokenized::load_tokenized(
                path,
                &self.load,
                self.tok,
                self.template,
                &self.opts,
                Some(self.cache_dir),
            )
            .map_err(|e| err(format!("data.{key}: {e}")))?;
            if let Some(w) = &ds.cache_warning {
                self.warnings.push(format!(
                    "the tokenization cache was not written ({w}); training goes on without it"
                ));
            }
            if key == "train" {
                self.counts.skipped += ds.skipped.len();
                self.counts.dropped += ds.dropped_too_long.len();
            }
            out.push(ds);
        }
        Ok(out)
    }

    /// SHA-256 (hex) over every file read.
    pub fn data_hash(&self) -> String {
        self.hasher
            .clone()
            .finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }
}

/// `data.eval_fraction` of `train` (at least one row, never all), held out at random (seeded).
pub(crate) fn split_eval<T>(train: Vec<T>, fraction: f64, seed: u64) -> (Vec<T>, Vec<T>) {
    if fraction <= 0.0 || train.len() < 2 {
        return (train, Vec::new());
    }
    let n = ((train.len() as f64) * fraction).round().max(1.0) as usize;
    let mut order: Vec<usize> = (0..train.len()).collect();
    Rng::for_stream(seed, u64::MAX).shuffle(&mut order);
    let held: std::collections::HashSet<usize> = order[..n.min(train.len() - 1)].iter().copied().collect();
    let (mut kept, mut eval) = (Vec::new(), Vec::new());
    for (i, s) in train.into_iter().enumerate() {
        if held.contains(&i) {
            eval.push(s)
        } else {
            kept.push(s)
        }
    }
    (kept, eval)
}

/// Loads, tokenizes (through the content-hash cache) and splits the data of `cfg`.
pub fn prepare_data(
    cfg: &TrainConfig,
    tok: &Tokenizer,
    template: Option<&ChatTemplate>,
    cache_dir: &Path,
) -> Result<PreparedData, TrainError> {
    let mut reader = DataReader::new(cfg, tok, template, cache_dir);
    let singles = |key: &str,
                   reader: &mut DataReader<'_>,
                   paths: &[String]|
     -> Result<Vec<TokenizedSample>, TrainError> {
        let mut out = Vec::new();
        for ds in reader.read(paths, key)? {
            check_sft_records(&ds, key)?;
            let rows = ds.singles();
            if key == "train" {
                reader.counts.truncated += rows.iter().filter(|s| s.notes.truncated).count();
            }
            out.extend(rows);
        }
        Ok(out)
    };
    let train = singles("train", &mut reader, &cfg.data.train)?;
    let mut eval = singles("eval", &mut reader, &cfg.data.eval)?;
    if train.is_empty() {
        return Err(err(
            "data.train: no usable rows (every row empty, invalid or without trained tokens)",
        ));
    }
    let train = if eval.is_empty() {
        let (kept, held) = split_eval(train, cfg.data.eval_fraction, cfg.train.seed);
        eval = held;
        kept
    } else {
        train
    };
    Ok(PreparedData {
        train,
        eval,
        data_hash: reader.data_hash(),
        counts: reader.counts,
        warnings: reader.warnings,
    })
}

/// Training rows that data preparation skipped (invalid, with `data.skip_invalid`), cut to
/// `data.max_length` or dropped for their length.
#[derive(Clone, Copy, Debug, Default)]
pub struct RowCounts {
    /// Invalid rows skipped.
    pub skipped: usize,
    /// Rows cut to `data.max_length`.
    pub truncated: usize,
    /// Rows dropped for their length.
    pub dropped: usize,
}

/// SFT trains on single sequences: preference pairs and KTO rows (whose `label = false` answers
/// are examples of what *not* to say) are refused with the method that fits them.
fn check_sft_records(ds: &graft_data::tokenized::TokenizedDataset, key: &str) -> Result<(), TrainError> {
    use graft_data::sample::TokenizedRecord;
    let at = |e: &graft_data::tokenized::TokenizedExample| {
        format!(
            "{}:{}",
            ds.files
                .get(e.file)
                .map_or("?".into(), |f| f.display().to_string()),
            e.line
        )
    };
    if let Some(e) = ds
        .examples
        .iter()
        .find(|e| matches!(e.record, TokenizedRecord::Pair { .. }))
    {
        return Err(err(format!(
            "data.{key}: {}: this is preference data (prompt / chosen / rejected pairs), for preference training: \
             set method = \"dpo\" (or \"cpo\", \"simpo\", \"orpo\"; method = \"sft\" trains on single answers). To fine-tune on the chosen answers \
             alone, convert the rows to prompt/completion or messages",
            at(e)
        )));
    }
    if let Some(e) = ds
        .examples
        .iter()
        .find(|e| matches!(e.record, TokenizedRecord::Kto { .. }))
    {
        let undesirable = ds
            .examples
            .iter()
            .filter(|e| matches!(e.record, TokenizedRecord::Kto { label: false, .. }))
            .count();
        return Err(err(format!(
            "data.{key}: {}: this is KTO data (prompt / completion / label, {undesirable} rows labelled false). \
             It is for KTO: set method = \"kto\" (method = \"sft\" would also train the undesirable, label = false, \
             answers). To fine-tune on the desirable answers alone, keep the label = true rows and drop the label field",
            at(e)
        )));
    }
    Ok(())
}

/// The micro-batches of one epoch: a pure function of the samples, config, seed and epoch.
pub fn epoch_batches(
    samples: &[TokenizedSample],
    cfg: &TrainConfig,
    epoch: u64,
) -> Result<Vec<Batch>, TrainError> {
    let packed: Vec<PackedBatch> = match cfg.micro_batch() {
        MicroBatch::Tokens(budget) => {
            let budget = budget.max(cfg.data.max_length);
            pack(samples, budget, cfg.train.seed, epoch).map_err(err)?.0
        }
        MicroBatch::Rows(rows) => {
            let mut order: Vec<usize> = (0..samples.len())
                .filter(|&i| samples[i].trained_count() > 0)
                .collect();
            Rng::for_stream(cfg.train.seed, epoch).shuffle(&mut order);
            order
                .chunks(rows.max(1))
                .map(|c| PackedBatch::from_samples(&c.iter().map(|&i| &samples[i]).collect::<Vec<_>>()))
                .collect()
        }
    };
    Ok(packed
        .into_iter()
        .map(|p| Batch {
            input_ids: p.input_ids,
            positions: p.positions,
            seq_ids: p.seq_ids,
            targets: p.targets,
        })
        .collect())
}

fn progress(line: &str, tty: bool) {
    let mut e = std::io::stderr().lock();
    if tty {
        let _ = write!(e, "\r\x1b[2K{line}");
    } else {
        let _ = writeln!(e, "{line}");
    }
    let _ = e.flush();
}

fn fmt_eta(s: f64) -> String {
    let s = s.max(0.0) as u64;
    if s >= 3600 {
        format!("{}h{:02}m", s / 3600, (s % 3600) / 60)
    } else {
        format!("{}m{:02}s", s / 60, s % 60)
    }
}

/// Seconds left for `steps_left` steps at this session's pace (`steps_done` in `elapsed_s`): a
/// resumed run's earlier steps took no time in this process and do not count.
pub fn eta_seconds(steps_left: u64, steps_done: u64, elapsed_s: f64) -> f64 {
    steps_left as f64 * elapsed_s / (steps_done as f64).max(1.0)
}

/// The objective's summed contribution over `batches` (forward only).
pub fn evaluate<O: Objective>(
    objective: &O,
    model: &Model<Cpu>,
    batches: &[O::Batch],
    precision: Precision,
) -> Contribution {
    let opts = TrainOptions {
        precision,
        ..Default::default()
    };
    let mut total = Contribution::default();
    for b in batches {
        total.add(&objective.evaluate(model, b, opts));
    }
    total
}

/// Runs (or, with `resume`, continues) a fine-tuning run.
pub fn run(cfg: &TrainConfig, resume: bool, stop: &StopFlag) -> Result<RunSummary, TrainError> {
    /// Hands the activation arena's kept blocks back when the run ends, however it ends (a
    /// server that ran a job should not keep its activations resident).
    struct ReleaseArena;
    impl Drop for ReleaseArena {
        fn drop(&mut self) {
            graft_kernels::cpu::alloc::release_kept();
        }
    }
    let _release = ReleaseArena;
    let run_dir = cfg.output_dir();
    let started = Instant::now();
    std::fs::create_dir_all(&run_dir).map_err(|e| err(format!("{}: {e}", run_dir.display())))?;
    if !resume
        && checkpoint::list_checkpoints(&run_dir)
            .map(|v| !v.is_empty())
            .unwrap_or(false)
    {
        return Err(err(format!(
            "{} already holds checkpoints; continue it with --resume {0}, or set output.dir to a new directory",
            run_dir.display()
        )));
    }
    if cfg.train.threads > 0 {
        let _ = rayon::ThreadPoolBuilder::new()
            .num_threads(cfg.train.threads)
            .build_global();
    }
    // Model, tokenizer, data.
    let loaded = graft_hub::hub::load_model_or_download(&cfg.model.path)
        .map_err(|e| err(format!("model.path: {e}")))?;
    let (tok, mut template) = load_tokenizer(
        &loaded,
        cfg.model.tokenizer.as_deref().map(Path::new),
        "model.tokenizer",
    )?;
    if let Some(t) = &cfg.data.chat_template {
        template = Some(config_chat_template(t, &tok)?);
    }
    let context = loaded.spec.max_position_embeddings;
    if cfg.data.max_length > context {
        return Err(err(format!(
            "data.max_length ({}) is longer than the model's context ({context} positions, \
             max_position_embeddings of {}); set data.max_length to at most {context}",
            cfg.data.max_length,
            loaded.path.display()
        )));
    }
    let precision = match cfg.model.precision {
        CfgPrecision::Exact => Precision::Exact,
        CfgPrecision::Fast => Precision::Fast.effective(),
    };
    let mode = if cfg.uses_lora() {
        TrainMode::Lora
    } else {
        TrainMode::Full
    };
    if mode == TrainMode::Full
        && let Some((name, dtype)) = loaded.weights.quantized_type()
    {
        return Err(err(format!(
            "model.path: {} holds quantized weights ({name} is {dtype}); full fine-tuning would train \
             dequantized copies that cannot be written back to {dtype} without loss. Train a LoRA adapter on it \
             (full = false, QLoRA-style), or fully fine-tune the f16/bf16 model it was made from",
            loaded.path.display()
        )));
    }
    let storage = if mode == TrainMode::Lora && precision == Precision::Fast {
        WeightStorage::Bf16
    } else {
        WeightStorage::F32
    };
    let mut model = Model::from_weights(Cpu, &loaded.spec, &loaded.weights, storage).map_err(err)?;
    // RL with a KL term under full fine-tuning compares with a frozen copy of the start (under
    // LoRA the base without the adapter is the reference, at no cost).
    let rl_beta = match cfg.method {
        Method::Grpo => cfg.grpo.beta,
        Method::Rloo => cfg.rloo.beta,
        _ => 0.0,
    };
    let rl_reference = if mode == TrainMode::Full && rl_beta != 0.0 {
        let mut r = Model::from_weights(Cpu, &loaded.spec, &loaded.weights, storage).map_err(err)?;
        r.ensure_positions(cfg.data.max_length + 1);
        Some(r)
    } else {
        None
    };
    model.ensure_positions(cfg.data.max_length + 1);
    if loaded.spec.sequence_classifier && cfg.method != Method::Reward {
        return Err(err(format!(
            "model.path: {} is a reward model (*ForSequenceClassification, a score head and no LM head); \
             train it further with method = \"reward\", or start {} from a causal LM",
            loaded.path.display(),
            cfg.method.name()
        )));
    }
    if cfg.method == Method::Reward && model.score.is_none() {
        // A new score head on a causal LM, initialised as transformers does (normal, std 0.02);
        // an adapter in lora.init_from that carries one replaces it below.
        let mut rng = crate::rng::Rng::for_stream(cfg.train.seed, 0x5C0E);
        let w: Vec<f32> = (0..loaded.spec.hidden_size)
            .map(|_| {
                // Box–Muller.
                let (u, v) = (1.0 - rng.next_f64(), rng.next_f64());
                (0.02 * (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()) as f32
            })
            .collect();
        model.attach_score_head(&w);
    }
    let (lora, peft_out) = if mode == TrainMode::Lora {
        let spec = lora_spec(cfg)?;
        let out = match &cfg.lora.init_from {
            Some(dir) => {
                let a = graft_model::peft::load_peft_adapter(Path::new(dir), &loaded.spec)
                    .map_err(|e| err(format!("lora.init_from: {e}")))?;
                model.set_adapter(&a);
                let mut c = a.config.clone();
                c.base_model_name_or_path = Some(cfg.model.path.clone());
                c
            }
            None => {
                model.init_lora(&spec, cfg.train.seed);
                peft_config(&spec, &cfg.model.path)
            }
        };
        let out = if cfg.method == Method::Reward {
            out.for_sequence_classification()
        } else {
            out
        };
        (Some(spec), Some(out))
    } else {
        (None, None)
    };
    drop(loaded);
    if let MicroBatch::Tokens(budget) = cfg.micro_batch()
        && budget < cfg.data.max_length
    {
        return Err(err(format!(
            "batch.micro_batch_tokens ({budget}) must be at least data.max_length ({})",
            cfg.data.max_length
        )));
    }
    let cache_dir = run_dir.join("cache");
    let setup = RunSetup {
        cfg,
        pad_token_id: crate::preference::reward_pad_id(&tok),
        resume,
        stop,
        run_dir: run_dir.clone(),
        started,
        model,
        mode,
        lora,
        peft_out,
        precision,
    };
    match cfg.method {
        Method::Sft => {
            let data = prepare_data(cfg, &tok, template.as_ref(), &cache_dir)?;
            print_data_warnings(cfg, &data.counts, &data.warnings);
            let eval = if data.eval.is_empty() {
                Vec::new()
            } else {
                let mut c = cfg.clone();
                c.batch.micro_batch_rows = None;
                epoch_batches(&data.eval, &c, 0)?
            };
            let epoch = |e: u64| epoch_batches(&data.train, cfg, e);
            let source = BatchSource {
                samples: data.train.len(),
                data_hash: data.data_hash.clone(),
                epoch: &epoch,
                eval,
            };
            train_loop(setup, Sft, source)
        }
        m if m.is_rl() => crate::rl::run_rl(setup, &tok, template.as_ref(), rl_reference),
        _ => crate::preference::run_preference(setup, &tok, template.as_ref(), &cache_dir),
    }
}

/// What the loop trains: the model and how it runs.
pub struct RunSetup<'a> {
    /// The resolved config.
    pub cfg: &'a TrainConfig,
    /// The tokenizer's padding id (EOS without one), written into a reward model's config.json.
    pub pad_token_id: Option<u32>,
    /// Continue from the latest checkpoint.
    pub resume: bool,
    /// Polled once per step.
    pub stop: &'a StopFlag,
    /// The run directory.
    pub run_dir: PathBuf,
    /// When the run started.
    pub started: Instant,
    /// The model, adapter attached under LoRA.
    pub model: Model<Cpu>,
    /// What is trained.
    pub mode: TrainMode,
    /// The LoRA spec (dropout), under LoRA.
    pub lora: Option<LoraSpec>,
    /// The PEFT config the adapter is saved with, under LoRA.
    pub peft_out: Option<LoraAdapterConfig>,
    /// Matmul precision.
    pub precision: Precision,
}

/// The micro-batches an objective trains on.
pub struct BatchSource<'a, B> {
    /// Training examples (rows, pairs), for the start-up line.
    pub samples: usize,
    /// SHA-256 over the training files.
    pub data_hash: String,
    /// The micro-batches of an epoch: a pure function of the epoch (exact resume).
    pub epoch: &'a dyn Fn(u64) -> Result<Vec<B>, TrainError>,
    /// Evaluation micro-batches.
    pub eval: Vec<B>,
}

/// Prints what data preparation dropped or cut.
pub fn print_data_warnings(cfg: &TrainConfig, counts: &RowCounts, warnings: &[String]) {
    if counts.skipped > 0 {
        eprintln!("skipped {} invalid rows (data.skip_invalid)", counts.skipped);
    }
    if counts.truncated > 0 {
        let kept = match cfg.data.truncation {
            Truncation::Left => "their last",
            _ => "their first",
        };
        eprintln!(
            "warning: {} training rows are longer than data.max_length = {} and were cut to {kept} {} tokens \
             (data.truncation); `graft data inspect` lists them",
            counts.truncated, cfg.data.max_length, cfg.data.max_length
        );
    }
    if counts.dropped > 0 {
        eprintln!(
            "warning: {} training rows are longer than data.max_length = {} and were dropped (data.truncation = \"drop\")",
            counts.dropped, cfg.data.max_length
        );
    }
    for w in warnings {
        eprintln!("warning: {w}");
    }
}

/// The training loop, for any objective: accumulate, normalise, clip, step, log, evaluate,
/// checkpoint, and at the end the adapter or model and the report.
pub fn train_loop<O: Objective>(
    setup: RunSetup<'_>,
    mut objective: O,
    source: BatchSource<'_, O::Batch>,
) -> Result<RunSummary, TrainError> {
    let RunSetup {
        cfg,
        pad_token_id,
        resume,
        stop,
        run_dir,
        started,
        mut model,
        mode,
        lora,
        peft_out,
        precision,
    } = setup;
    let mut epoch_cache: Option<(u64, Vec<O::Batch>)> = None;
    let batches_per_epoch = (source.epoch)(0)?.len();
    if batches_per_epoch == 0 {
        return Err(err(format!(
            "data.train: no row has a trained token within data.max_length = {} (every answer is cut off); \
             raise data.max_length, or set data.truncation = \"left\" to keep the end of long rows",
            cfg.data.max_length
        )));
    }
    let accum = objective
        .micro_batches_per_step()
        .unwrap_or(cfg.batch.grad_accum)
        .max(1);
    let steps_per_epoch = batches_per_epoch.div_ceil(accum) as u64;
    let total_steps = cfg
        .train
        .max_steps
        .unwrap_or(cfg.train.epochs * steps_per_epoch)
        .max(1);
    let eval_batches = source.eval;
    let schedule = LrSchedule::from_config(&cfg.schedule, cfg.optimizer.lr, total_steps);
    let hyper = AdamWHyper::from(&cfg.optimizer);
    let mut grads: Grads<Cpu> = model.new_grads(mode);

    // Fresh start or resume.
    let metrics_path = run_dir.join("metrics.jsonl");
    let (mut state, mut opt) = if resume {
        let latest = checkpoint::latest_checkpoint(&run_dir).map_err(err)?;
        for (dir, why) in &latest.skipped {
            eprintln!("warning: skipping damaged checkpoint {}: {why}", dir.display());
        }
        let Some(good) = latest.good else {
            return Err(err(format!(
                "--resume: {} has no usable checkpoint",
                run_dir.display()
            )));
        };
        let state = TrainerState::read(&good.dir).map_err(err)?;
        if state.data_hash != source.data_hash {
            eprintln!("warning: the training data changed since this run started; continuing anyway");
        }
        let file = if mode == TrainMode::Lora {
            ADAPTER_FILE
        } else {
            MODEL_FILE
        };
        let tensors = read_f32_file(&good.dir.join(file)).map_err(err)?;
        let mut missing = None;
        model.visit_params_mut(mode, |id, p| match tensors.tensors.get(&id.name(mode)) {
            Some(t) if t.data.len() == p.len() => p.copy_from_slice(&t.data),
            _ => missing = Some(id.name(mode)),
        });
        if let Some(name) = missing {
            return Err(err(format!(
                "{}: checkpoint lacks tensor `{name}` (or its shape differs)",
                good.dir.display()
            )));
        }
        let opt = AdamW::read_state_file(hyper, &good.dir.join(OPTIMIZER_FILE)).map_err(err)?;
        let objective_state = good.dir.join(OBJECTIVE_STATE_FILE);
        if objective_state.exists() {
            let bad = |e: String| err(format!("{}: {e}", objective_state.display()));
            let text = std::fs::read_to_string(&objective_state).map_err(|e| bad(e.to_string()))?;
            let v = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
            objective.restore(v).map_err(bad)?;
        }
        truncate_after(&metrics_path, state.step).map_err(err)?;
        eprintln!(
            "resuming {} from step {} of {}",
            run_dir.display(),
            state.step,
            state.total_steps
        );
        (state, opt)
    } else {
        cfg.save(&run_dir).map_err(err)?;
        let _ = std::fs::remove_file(&metrics_path);
        let state = TrainerState::new(
            total_steps,
            Rng::new(cfg.train.seed).state(),
            cfg.hash(),
            source.data_hash.clone(),
        );
        (state, AdamW::new(hyper))
    };
    let mut metrics = MetricsWriter::open(&metrics_path).map_err(err)?;
    let trainable: usize = {
        let mut n = 0;
        model.visit_params_mut(mode, |_, p| n += p.len());
        n
    };
    eprintln!(
        "training {} ({:.1}M params, {} trainable) on {} samples ({} micro-batches/epoch, grad_accum {accum}), {} steps, {:?} precision",
        cfg.model.path,
        model.spec.num_parameters() as f64 / 1e6,
        trainable,
        source.samples,
        batches_per_epoch,
        total_steps,
        precision
    );
    let tty = std::io::stderr().is_terminal();
    let mut interrupted = false;
    let mut last_eval = None;
    let (mut window_loss, mut window_units, mut window_tokens, mut window_time) =
        (0.0f64, 0.0f64, 0usize, 0.0f64);
    let session_start_tokens = state.tokens_seen;
    let session_start_step = state.step;
    let mut window_extra = Contribution::default();
    let mut zero_grad_steps = 0u64;
    let session_start = Instant::now();
    let elapsed_before = state.elapsed_s;
    while state.step < total_steps {
        let t0 = Instant::now();
        grads.zero(&model.backend);
        let mut step_sum = Contribution::default();
        for micro in 0..accum {
            let pos = &mut state.data_position;
            let batch = loop {
                if epoch_cache.as_ref().is_none_or(|(e, _)| *e != pos.epoch) {
                    epoch_cache = Some((pos.epoch, (source.epoch)(pos.epoch)?));
                }
                let batches = &epoch_cache.as_ref().expect("filled above").1;
                match batches.get(pos.index as usize) {
                    Some(b) => break b,
                    None => {
                        pos.epoch += 1;
                        pos.index = 0;
                    }
                }
            };
            pos.index += 1;
            state.epoch = pos.epoch;
            let opts = TrainOptions {
                precision,
                checkpointing: cfg.train.activation_checkpointing,
                dropout_seed: cfg.train.seed
                    ^ (state.step << 16 | micro as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
                lora_dropout: lora.as_ref().map_or(0.0, |l| l.dropout),
                without_adapters: false,
                temperature: None,
            };
            objective.prepare_step(&model, batch, opts).map_err(|e| {
                err(format!(
                    "step {}: {e}. {}",
                    state.step + 1,
                    kept_checkpoint_note(&run_dir)
                ))
            })?;
            step_sum.add(&objective.forward_backward(&model, batch, &mut grads, opts));
        }
        // The objective's convention: sums over its units, divided by the step's units here.
        let (loss_sum, units, tokens) = (step_sum.loss_sum, step_sum.units.max(1.0), step_sum.tokens);
        let loss = loss_sum / units;
        let mut gl = model.trainable(mode, &mut grads).map_err(err)?;
        {
            let mut slices: Vec<&mut [f32]> = gl.iter_mut().map(|p| p.grad.as_mut_slice()).collect();
            scale_grads(&mut slices, 1.0 / units as f32);
        }
        let non_finite = || find_non_finite(gl.iter().map(|p| (p.name.as_str(), p.grad.as_slice())));
        if !loss.is_finite() || non_finite().is_some() {
            let what = if loss.is_finite() {
                non_finite()
                    .map(|nf| format!("the gradient has {nf}"))
                    .unwrap_or_default()
            } else {
                format!("the loss is {loss}")
            };
            return Err(err(format!(
                "step {}: non-finite values: {what}; training stopped. {} Lower optimizer.lr, set batch.max_grad_norm, or check the data",
                state.step + 1,
                kept_checkpoint_note(&run_dir)
            )));
        }
        let grad_norm = {
            let mut slices: Vec<&mut [f32]> = gl.iter_mut().map(|p| p.grad.as_mut_slice()).collect();
            if cfg.batch.max_grad_norm > 0.0 {
                clip_grad_norm(&mut slices, cfg.batch.max_grad_norm)
            } else {
                crate::optim::global_grad_norm(&slices.iter().map(|s| &**s).collect::<Vec<_>>())
            }
        };
        zero_grad_steps = if grad_norm == 0.0 && objective.zero_gradient_is_collapse() {
            zero_grad_steps + 1
        } else {
            0
        };
        if zero_grad_steps >= COLLAPSE_STEPS.min(total_steps) {
            return Err(err(format!(
                "step {}: training collapsed: the gradient norm has been 0 for {zero_grad_steps} steps (loss {loss:.4}; \
                 ln(vocab) = {:.4} is what uniform predictions give), so nothing is being learned. The weights \
                 most likely overflowed: lower optimizer.lr or set batch.max_grad_norm. {}",
                state.step + 1,
                (model.spec.vocab_size as f64).ln(),
                kept_checkpoint_note(&run_dir)
            )));
        }
        let lr = schedule.lr_at(state.step);
        let mut params: Vec<Param<'_>> = gl
            .iter_mut()
            .map(|p| Param {
                name: p.name.as_str(),
                value: &mut *p.value,
                grad: p.grad.as_slice(),
                decay: p.id.decays(),
            })
            .collect();
        opt.step(&mut params, lr).map_err(err)?;
        drop(params);
        drop(gl);
        state.step += 1;
        state.tokens_seen += tokens as u64;
        state.last_loss = Some(loss);
        let dt = t0.elapsed().as_secs_f64();
        window_loss += loss_sum;
        window_units += units;
        window_extra.add(&step_sum);
        window_tokens += tokens;
        window_time += dt;
        state.elapsed_s = elapsed_before + session_start.elapsed().as_secs_f64();
        let session_tokens = (state.tokens_seen - session_start_tokens) as f64;
        let tps = session_tokens / session_start.elapsed().as_secs_f64().max(1e-9);
        let eta = eta_seconds(
            total_steps - state.step,
            state.step - session_start_step,
            session_start.elapsed().as_secs_f64(),
        );
        progress(
            &format!(
                "step {}/{} | loss {loss:.4} | lr {lr:.2e} | {tps:.0} tok/s | ETA {}",
                state.step,
                total_steps,
                fmt_eta(eta.min(1e7))
            ),
            tty,
        );
        let do_eval = !eval_batches.is_empty()
            && (state.step == total_steps
                || (cfg.train.eval_every > 0 && state.step.is_multiple_of(cfg.train.eval_every)));
        let eval = do_eval.then(|| evaluate(&objective, &model, &eval_batches, precision));
        let eval_loss = eval.as_ref().and_then(|e| e.mean_loss());
        if let Some(e) = eval_loss {
            last_eval = Some(e);
            if state.best_eval.is_none_or(|b| e < b) {
                state.best_eval = Some(e);
                state.best_eval_step = Some(state.step);
            }
            // RL evaluates by reward (its loss is not a measure of quality).
            let shown = match eval
                .as_ref()
                .and_then(|c| c.mean_metrics().get("reward").copied())
            {
                Some(r) => format!("eval reward {r:.4}"),
                None => format!("eval loss {e:.4}"),
            };
            progress(&format!("step {}/{} | {shown}", state.step, total_steps), tty);
            if tty {
                eprintln!();
            }
        }
        if state.step.is_multiple_of(cfg.train.log_every.max(1))
            || eval_loss.is_some()
            || state.step == total_steps
        {
            metrics
                .append(&MetricsRecord {
                    step: state.step,
                    loss: Some(window_loss / window_units.max(1.0)),
                    lr: Some(lr),
                    grad_norm: Some(grad_norm),
                    tokens_per_s: Some(window_tokens as f64 / window_time.max(1e-9)),
                    eval_loss,
                    tokens_seen: Some(state.tokens_seen),
                    epoch: Some(
                        state.data_position.epoch as f64
                            + state.data_position.index as f64 / batches_per_epoch as f64,
                    ),
                    elapsed_s: state.elapsed_s,
                    extra: window_extra
                        .mean_metrics()
                        .into_iter()
                        .chain(eval.iter().flat_map(|e| {
                            e.mean_metrics()
                                .into_iter()
                                .map(|(k, v)| (format!("eval_{k}"), v))
                        }))
                        .filter(|(_, v)| v.is_finite())
                        .collect(),
                })
                .map_err(err)?;
            (window_loss, window_units, window_tokens, window_time) = (0.0, 0.0, 0, 0.0);
            window_extra = Contribution::default();
        }
        let stop_now = stop.is_set();
        if stop_now
            || state.step == total_steps
            || (cfg.train.save_every > 0 && state.step.is_multiple_of(cfg.train.save_every))
        {
            let peft = peft_out.as_ref();
            save_checkpoint(
                &run_dir,
                &mut model,
                mode,
                peft,
                &opt,
                &state,
                cfg,
                objective.state(),
            )
            .map_err(|e| {
                err(format!(
                    "saving the checkpoint of step {} failed (earlier checkpoints are intact): {e}",
                    state.step
                ))
            })?;
        }
        if stop_now {
            // The caller says how to continue (once).
            interrupted = true;
            break;
        }
    }
    if tty {
        eprintln!();
    }
    // Final outputs.
    let output = if interrupted {
        None
    } else if let Some(peft) = &peft_out {
        let dir = run_dir.join("adapter");
        let adapter = model.adapter(peft.clone());
        save_peft_adapter(&dir, &adapter, Some(&cfg.model.path)).map_err(err)?;
        Some(dir)
    } else {
        let dir = run_dir.join("model");
        let base = graft_hub::hub::resolve_model_path(&cfg.model.path)
            .unwrap_or_else(|_| PathBuf::from(&cfg.model.path));
        export_full_model(&model, &base, &dir, pad_token_id)?;
        Some(dir)
    };
    let records = read_metrics(&metrics_path).map_err(err)?;
    let mut facts = RunFacts::from_config(cfg);
    facts.status = if interrupted {
        format!("stopped at step {} of {}", state.step, total_steps)
    } else {
        "completed".to_string()
    };
    facts.data_hash = state.data_hash.clone();
    facts.trainable_params = Some(trainable as u64);
    facts.steps = state.step;
    facts.total_steps = total_steps;
    facts.tokens_seen = state.tokens_seen;
    facts.wall_time_s = state.elapsed_s;
    write_report(&run_dir, &facts, &records).map_err(err)?;
    let _ = started;
    Ok(RunSummary {
        run_dir,
        steps: state.step,
        total_steps,
        final_loss: state.last_loss,
        eval_loss: last_eval,
        interrupted,
        signal: if interrupted { stop.signal_name() } else { None },
        output,
    })
}

/// What a failed run leaves to resume from, for its error message.
fn kept_checkpoint_note(run_dir: &Path) -> String {
    let newest = checkpoint::list_checkpoints(run_dir)
        .ok()
        .and_then(|v| v.into_iter().max_by_key(|(step, _)| *step));
    match newest {
        Some((_, dir)) => format!(
            "The last checkpoint, {}, is kept: continue from it with graft train --resume {} --set KEY=VALUE.",
            dir.display(),
            run_dir.display()
        ),
        None => "No checkpoint had been saved yet (train.save_every).".to_string(),
    }
}

/// The file an objective's own resume state goes to in a checkpoint ([`Objective::state`]).
pub const OBJECTIVE_STATE_FILE: &str = "objective_state.json";

/// The directory inside a LoRA checkpoint that holds its adapter as PEFT files (servable and
/// exportable as it is: `graft serve --adapter …/checkpoints/step-N/peft`).
pub const CHECKPOINT_PEFT_DIR: &str = "peft";

#[allow(clippy::too_many_arguments)]
fn save_checkpoint(
    run_dir: &Path,
    model: &mut Model<Cpu>,
    mode: TrainMode,
    peft: Option<&LoraAdapterConfig>,
    opt: &AdamW,
    state: &TrainerState,
    cfg: &TrainConfig,
    objective_state: Option<serde_json::Value>,
) -> Result<(), TrainError> {
    let mut w = CheckpointWriter::begin(run_dir, state.step).map_err(err)?;
    let mut named: Vec<(String, Vec<usize>, Vec<f32>)> = Vec::new();
    model.visit_params_mut(mode, |id, p| {
        named.push((id.name(mode), vec![p.len()], p.to_vec()))
    });
    let refs: Vec<TensorRef<'_>> = named
        .iter()
        .map(|(n, s, d)| TensorRef {
            name: n,
            shape: s,
            data: d,
        })
        .collect();
    let file = if mode == TrainMode::Lora {
        ADAPTER_FILE
    } else {
        MODEL_FILE
    };
    write_f32_file(&w.path(file).map_err(err)?, &refs, &BTreeMap::new()).map_err(err)?;
    opt.write_state_file(&w.path(OPTIMIZER_FILE).map_err(err)?)
        .map_err(err)?;
    w.write_json(TRAINER_STATE_FILE, state).map_err(err)?;
    if let Some(peft) = peft {
        let adapter = model.adapter(peft.clone());
        save_peft_adapter(
            &w.dir().join(CHECKPOINT_PEFT_DIR),
            &adapter,
            Some(&cfg.model.path),
        )
        .map_err(err)?;
    }
    if let Some(v) = &objective_state {
        w.write_json(OBJECTIVE_STATE_FILE, v).map_err(err)?;
    }
    w.commit(&cfg.hash()).map_err(err)?;
    checkpoint::prune_checkpoints(run_dir, cfg.train.keep_checkpoints).map_err(err)?;
    Ok(())
}

/// Tokenizer and config files copied next to exported weights so the directory loads on its own.
const TOKENIZER_FILES: [&str; 6] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "chat_template.jinja",
    "chat_template.json",
];

/// Writes `model` as a Hugging Face directory (config, safetensors, tokenizer files of `base`).
/// A reward model's config.json says `*ForSequenceClassification` with one label and
/// `pad_token_id`, where its score is read.
pub fn export_full_model(
    model: &Model<Cpu>,
    base: &Path,
    out: &Path,
    pad_token_id: Option<u32>,
) -> Result<(), TrainError> {
    let tensors = model.named_tensors();
    let refs: Vec<(String, Vec<usize>, &[f32])> = tensors
        .iter()
        .map(|(n, s, d)| (n.clone(), s.clone(), d.as_slice()))
        .collect();
    graft_model::weights::save_hf_model_dir(out, &model.spec, &refs).map_err(err)?;
    // The base's own config.json, byte for byte: every key it has (`layer_types`, `mlp_bias`,
    // `rope_parameters`, eps exactly as written, …) stays as transformers wrote it. The weights
    // keep the architecture, so it describes them.
    let base_config = base.join("config.json");
    if base.is_dir() && base_config.is_file() {
        std::fs::copy(&base_config, out.join("config.json"))
            .map_err(|e| err(format!("{}: {e}", base_config.display())))?;
    }
    if model.spec.sequence_classifier {
        write_sequence_classifier_config(&out.join("config.json"), &model.spec, pad_token_id)?;
    }
    if base.is_dir() {
        for f in TOKENIZER_FILES {
            let src = base.join(f);
            if src.exists() {
                std::fs::copy(&src, out.join(f)).map_err(|e| err(format!("{}: {e}", src.display())))?;
            }
        }
    } else if let Some(dir) = base.parent() {
        // llama2.c checkpoints: carry the tokenizer file along.
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().to_string();
            if name == "tokenizer.bin" || (name.starts_with("tok") && name.ends_with(".bin")) {
                let _ = std::fs::copy(entry.path(), out.join(&name));
            }
        }
    }
    Ok(())
}

/// Rewrites `config.json` (written for a causal LM, or the base's own) for a reward model:
/// the `*ForSequenceClassification` class, one label, and the padding id its score skips.
fn write_sequence_classifier_config(
    path: &Path,
    spec: &graft_model::ModelSpec,
    pad_token_id: Option<u32>,
) -> Result<(), TrainError> {
    let text = std::fs::read_to_string(path).map_err(|e| err(format!("{}: {e}", path.display())))?;
    let mut v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| err(format!("{}: {e}", path.display())))?;
    v["architectures"] = serde_json::json!([spec.architecture.hf_sequence_classifier_name()]);
    v["id2label"] = serde_json::json!({"0": "LABEL_0"});
    v["label2id"] = serde_json::json!({"LABEL_0": 0});
    if let Some(pad) = pad_token_id {
        v["pad_token_id"] = pad.into();
    }
    if let Some(m) = v.as_object_mut() {
        m.remove("num_labels");
    }
    let text = serde_json::to_string_pretty(&v).map_err(|e| err(format!("{}: {e}", path.display())))?;
    crate::checkpoint::write_atomically(path, text.as_bytes())
        .map_err(|e| err(format!("{}: {e}", path.display())))
}

/// `graft export merge`: the run's adapter folded into its base model, written as an HF directory.
pub fn export_merged(run_dir: &Path, out: &Path) -> Result<(), TrainError> {
    let cfg_path = run_dir.join("config.toml");
    let cfg = TrainConfig::load(&cfg_path, &[]).map_err(err)?;
    let base =
        graft_hub::hub::resolve_model_path(&cfg.model.path).map_err(|e| err(format!("model.path: {e}")))?;
    let base = base.as_path();
    let loaded = load_model(base).map_err(|e| err(format!("model.path: {e}")))?;
    let mut model =
        Model::from_weights(Cpu, &loaded.spec, &loaded.weights, WeightStorage::F32).map_err(err)?;
    let adapter_dir = run_dir.join("adapter");
    if adapter_dir.join("adapter_config.json").exists() {
        let a = graft_model::peft::load_peft_adapter(&adapter_dir, &loaded.spec).map_err(err)?;
        model.set_adapter(&a);
        model.merge_adapter();
    } else if run_dir.join("model").join("config.json").exists() {
        let full = load_model(&run_dir.join("model")).map_err(err)?;
        model = Model::from_weights(Cpu, &full.spec, &full.weights, WeightStorage::F32).map_err(err)?;
    } else {
        return Err(err(format!(
            "{}: no adapter/ or model/ output (did the run finish?)",
            run_dir.display()
        )));
    }
    let pad = if model.spec.sequence_classifier {
        let (tok, _) = load_tokenizer(
            &loaded,
            cfg.model.tokenizer.as_deref().map(Path::new),
            "model.tokenizer",
        )?;
        crate::preference::reward_pad_id(&tok)
    } else {
        None
    };
    export_full_model(&model, base, out, pad)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eta_counts_only_this_sessions_steps() {
        // Resumed at step 900 of 1000: 10 steps in 20 s here leave 90 steps ≈ 180 s.
        assert_eq!(eta_seconds(90, 10, 20.0), 180.0);
        assert_eq!(eta_seconds(5, 0, 0.0), 0.0);
    }
}
