//! Preference training runs (`method = "dpo" | "cpo" | "simpo" | "orpo"`): preference pairs from
//! the data files, for DPO the reference log-probs (computed once before training and kept in the
//! run directory, so a resumed run compares with the same reference), pair micro-batches, then the
//! common loop with the method's [`PairLoss`].
//!
//! A pair's chosen and rejected sequences always sit in the same micro-batch (attention isolated
//! per sequence); `batch.micro_batch_rows` counts pairs, `batch.micro_batch_tokens` bounds the
//! tokens of a micro-batch (a pair longer than the budget gets a micro-batch of its own).

use crate::config::{Method, Reference, TrainConfig};
use crate::objective::kto::{Kto, KtoBatch, KtoSlot};
use crate::objective::pairs::{PairBatch, PairLoss, PairObjective, PairSlot, sequence_logps};
use crate::objective::reward::{Reward, RewardBatch, RewardParams, RewardSlot, score_position};
use crate::rng::Rng;
use crate::sft::{
    BatchSource, DataReader, RowCounts, RunSetup, RunSummary, TrainError, print_data_warnings, split_eval,
    train_loop,
};
use graft_data::batch::PackedBatch;
use graft_data::sample::{TokenizedRecord, TokenizedSample};
use graft_data::{ChatTemplate, Tokenizer};
use graft_kernels::IGNORE_INDEX;
use graft_model::train::{Batch, TrainMode, TrainOptions};
use std::path::Path;

fn err(msg: impl std::fmt::Display) -> TrainError {
    TrainError(msg.to_string())
}

/// A tokenized preference pair: prompt + chosen and prompt + rejected, completions trained.
#[derive(Clone, Debug)]
pub struct Pair {
    /// Prompt + chosen completion.
    pub chosen: TokenizedSample,
    /// Prompt + rejected completion.
    pub rejected: TokenizedSample,
    /// The row's `margin` column (reward modelling), if any.
    pub margin: Option<f64>,
}

/// The pairs of a config's data.
pub struct PreparedPairs {
    /// Training pairs.
    pub train: Vec<Pair>,
    /// Evaluation pairs (`data.eval`, or split off by `data.eval_fraction`).
    pub eval: Vec<Pair>,
    /// SHA-256 over the training files.
    pub data_hash: String,
    /// Rows skipped, cut or dropped.
    pub counts: RowCounts,
    /// Pairs whose chosen and rejected completions are the same tokens (they teach nothing).
    pub identical: usize,
    /// Warnings for the user.
    pub warnings: Vec<String>,
}

/// Loads and tokenizes the preference pairs of `cfg` (through the tokenization cache).
pub fn prepare_pairs(
    cfg: &TrainConfig,
    tok: &Tokenizer,
    template: Option<&ChatTemplate>,
    cache_dir: &Path,
) -> Result<PreparedPairs, TrainError> {
    let mut reader = DataReader::new(cfg, tok, template, cache_dir);
    let read = |reader: &mut DataReader<'_>, paths: &[String], key: &str| -> Result<Vec<Pair>, TrainError> {
        let mut out = Vec::new();
        for ds in reader.read(paths, key)? {
            for e in &ds.examples {
                let at = || {
                    format!(
                        "{}:{}",
                        ds.files
                            .get(e.file)
                            .map_or("?".into(), |f| f.display().to_string()),
                        e.line
                    )
                };
                match &e.record {
                    TokenizedRecord::Pair {
                        chosen,
                        rejected,
                        margin,
                    } => {
                        if key == "train" {
                            reader.counts.truncated +=
                                chosen.notes.truncated as usize + rejected.notes.truncated as usize;
                        }
                        if chosen.trained_count() == 0 || rejected.trained_count() == 0 {
                            return Err(err(format!(
                                "data.{key}: {}: the {} completion has no token left to train within data.max_length = {} \
                                 (or is empty); raise data.max_length or fix the row",
                                at(),
                                if chosen.trained_count() == 0 {
                                    "chosen"
                                } else {
                                    "rejected"
                                },
                                cfg.data.max_length
                            )));
                        }
                        out.push(Pair {
                            chosen: chosen.clone(),
                            rejected: rejected.clone(),
                            margin: *margin,
                        });
                    }
                    TokenizedRecord::Kto { .. } => {
                        return Err(err(format!(
                            "data.{key}: {}: this is KTO data (prompt / completion / label), unpaired; method = \"{}\" \
                             needs prompt / chosen / rejected pairs",
                            at(),
                            cfg.method.name()
                        )));
                    }
                    _ => {
                        return Err(err(format!(
                            "data.{key}: {}: this row has a single answer, not a preference pair; method = \"{}\" needs \
                             prompt / chosen / rejected (or OpenAI's input / preferred_output / non_preferred_output); \
                             for single answers use method = \"sft\"",
                            at(),
                            cfg.method.name()
                        )));
                    }
                }
            }
        }
        Ok(out)
    };
    let train = read(&mut reader, &cfg.data.train, "train")?;
    let mut eval = read(&mut reader, &cfg.data.eval, "eval")?;
    if train.is_empty() {
        return Err(err("data.train: no usable preference pairs"));
    }
    let identical = train
        .iter()
        .filter(|p| p.chosen.input_ids == p.rejected.input_ids)
        .count();
    let train = if eval.is_empty() {
        let (kept, held) = split_eval(train, cfg.data.eval_fraction, cfg.train.seed);
        eval = held;
        kept
    } else {
        train
    };
    Ok(PreparedPairs {
        train,
        eval,
        data_hash: reader.data_hash(),
        counts: reader.counts,
        identical,
        warnings: reader.warnings,
    })
}

/// Pairs (in `order`) grouped into micro-batches, each with its samples: the chosen and rejected
/// sequence of every pair, side by side.
fn pair_groups<'a>(
    pairs: &'a [Pair],
    order: &[usize],
    cfg: &TrainConfig,
) -> Vec<(Vec<usize>, Vec<&'a TokenizedSample>)> {
    group_in_order(order, cfg, |i| {
        pairs[i].chosen.input_ids.len() + pairs[i].rejected.input_ids.len()
    })
    .into_iter()
    .map(|g| {
        let samples = g
            .iter()
            .flat_map(|&i| [&pairs[i].chosen, &pairs[i].rejected])
            .collect();
        (g, samples)
    })
    .collect()
}

/// Groups pairs (in `order`) into micro-batches: `rows` pairs each, or as many as fit `budget`
/// tokens. Reference log-probs come from `refs` (indexed like `pairs`).
/// With `train_prompt` (ORPO) the chosen sequences get a target at every position, and the
/// batch's `completion` mask says which targets are completion tokens.
fn group_pairs(
    pairs: &[Pair],
    refs: &[(f64, f64)],
    order: &[usize],
    cfg: &TrainConfig,
    train_prompt: bool,
) -> Vec<PairBatch> {
    pair_groups(pairs, order, cfg)
        .into_iter()
        .map(|(g, samples)| {
            let (batch, completion) = if train_prompt {
                let whole: Vec<TokenizedSample> = samples
                    .iter()
                    .enumerate()
                    .map(|(k, s)| {
                        let mut s = (*s).clone();
                        if k % 2 == 0 {
                            s.trained.iter_mut().skip(1).for_each(|t| *t = true);
                        }
                        s
                    })
                    .collect();
                let refs: Vec<&TokenizedSample> = whole.iter().collect();
                let completion: Vec<bool> =
                    samples.iter().flat_map(|s| s.targets()).map(|t| t >= 0).collect();
                (to_batch(&refs), completion)
            } else {
                (to_batch(&samples), Vec::new())
            };
            let slots = g
                .iter()
                .enumerate()
                .map(|(k, &i)| PairSlot {
                    chosen_seq: 2 * k as u32,
                    rejected_seq: 2 * k as u32 + 1,
                    ref_chosen: refs.get(i).map_or(0.0, |r| r.0),
                    ref_rejected: refs.get(i).map_or(0.0, |r| r.1),
                })
                .collect();
            PairBatch {
                batch,
                pairs: slots,
                completion,
            }
        })
        .collect()
}

/// The reference log-probs file of a run: the pairs' summed completion log-probs under the
/// reference, train pairs then eval pairs, as little-endian f64 after a header.
pub const REFERENCE_FILE: &str = "reference_logps.bin";
const REFERENCE_MAGIC: &[u8; 8] = b"GRAFTREF";

/// What the cached reference log-probs depend on: the data (its hash), how it is cut, and the
/// content of every model file involved — the base, `lora.init_from` and a reference path — so a
/// model or adapter rewritten in place is not compared against stale log-probs.
fn reference_key(cfg: &TrainConfig, reference: &Reference, data_hash: &str, n: usize) -> String {
    let model = graft_hub::hub::resolve_model_path(&cfg.model.path)
        .map(|p| content_fingerprint(&p))
        .unwrap_or_else(|_| cfg.model.path.clone());
    let init = cfg
        .lora
        .init_from
        .as_deref()
        .map(|p| content_fingerprint(Path::new(p)));
    let reference = match reference {
        Reference::Path(p) => format!("path:{}", content_fingerprint(Path::new(p))),
        other => format!("{other:?}"),
    };
    format!(
        "model:{model}|init:{init:?}|reference:{reference}|data:{data_hash}|max_length:{}|format:{:?}|n:{n}",
        cfg.data.max_length, cfg.data.format
    )
}

/// SHA-256 over a model file or directory (its files in name order, with their names and sizes).
/// Files over 1 GiB contribute their first and last 64 MiB and their size (hashing tens of GB at
/// every start would cost more than the reference pass saves).
fn content_fingerprint(path: &Path) -> String {
    use sha2::{Digest, Sha256};
    use std::io::{Read, Seek, SeekFrom};
    let mut files: Vec<std::path::PathBuf> = if path.is_dir() {
        std::fs::read_dir(path)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.is_file())
            .collect()
    } else {
        vec![path.to_path_buf()]
    };
    files.sort();
    let mut h = Sha256::new();
    for f in files {
        let Ok(mut file) = std::fs::File::open(&f) else {
            continue;
        };
        let len = file.metadata().map(|m| m.len()).unwrap_or(0);
        h.update(
            f.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
        );
        h.update(len.to_le_bytes());
        const BIG: u64 = 1 << 30;
        const SAMPLE: u64 = 64 << 20;
        let mut buf = vec![0u8; 1 << 20];
        let mut take = |file: &mut std::fs::File, mut left: u64| {
            while left > 0 {
                let want = left.min(buf.len() as u64) as usize;
                match file.read(&mut buf[..want]) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        h.update(&buf[..n]);
                        left -= n as u64;
                    }
                }
            }
        };
        if len <= BIG {
            take(&mut file, len);
        } else {
            take(&mut file, SAMPLE);
            if file.seek(SeekFrom::Start(len - SAMPLE)).is_ok() {
                take(&mut file, SAMPLE);
            }
        }
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

fn read_reference(path: &Path, key: &str, n: usize) -> Option<Vec<(f64, f64)>> {
    let bytes = std::fs::read(path).ok()?;
    let rest = bytes.strip_prefix(REFERENCE_MAGIC.as_slice())?;
    let klen = u64::from_le_bytes(rest.get(..8)?.try_into().ok()?) as usize;
    let stored = std::str::from_utf8(rest.get(8..8 + klen)?).ok()?;
    let body = rest.get(8 + klen..)?;
    if stored != key || body.len() != n * 16 {
        return None;
    }
    let f = |i: usize| f64::from_le_bytes(body[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
    Some((0..n).map(|i| (f(2 * i), f(2 * i + 1))).collect())
}

fn write_reference(path: &Path, key: &str, refs: &[(f64, f64)]) -> Result<(), TrainError> {
    let mut bytes = REFERENCE_MAGIC.to_vec();
    bytes.extend_from_slice(&(key.len() as u64).to_le_bytes());
    bytes.extend_from_slice(key.as_bytes());
    for (c, r) in refs {
        bytes.extend_from_slice(&c.to_le_bytes());
        bytes.extend_from_slice(&r.to_le_bytes());
    }
    crate::checkpoint::write_atomically(path, &bytes).map_err(|e| err(format!("{}: {e}", path.display())))
}

/// Runs a preference training run (the method of `setup.cfg`) with the loop of [`train_loop`].
pub fn run_preference(
    setup: RunSetup<'_>,
    tok: &Tokenizer,
    template: Option<&ChatTemplate>,
    cache_dir: &Path,
) -> Result<RunSummary, TrainError> {
    let cfg = setup.cfg;
    match cfg.method {
        Method::Dpo => {
            let params = cfg.dpo.params().map_err(err)?;
            run_pairs(setup, tok, template, cache_dir, params, true, false)
        }
        Method::Cpo | Method::Simpo => {
            let params = cfg.cpo.params(cfg.method).map_err(err)?;
            run_pairs(setup, tok, template, cache_dir, params, false, false)
        }
        Method::Orpo => {
            let params = crate::objective::orpo::OrpoParams { beta: cfg.orpo.beta };
            run_pairs(setup, tok, template, cache_dir, params, false, true)
        }
        Method::Kto => run_kto(setup, tok, template, cache_dir),
        Method::Reward => run_reward(setup, tok, template, cache_dir),
        Method::Sft | Method::Grpo | Method::Rloo => Err(err(format!(
            "method = \"{}\" is not a preference method",
            cfg.method.name()
        ))),
    }
}

fn run_pairs<L: PairLoss>(
    mut setup: RunSetup<'_>,
    tok: &Tokenizer,
    template: Option<&ChatTemplate>,
    cache_dir: &Path,
    loss: L,
    with_reference: bool,
    train_prompt: bool,
) -> Result<RunSummary, TrainError> {
    let cfg = setup.cfg;
    let data = prepare_pairs(cfg, tok, template, cache_dir)?;
    print_data_warnings(cfg, &data.counts, &data.warnings);
    if data.identical > 0 {
        eprintln!(
            "warning: {} training pairs have identical chosen and rejected completions; they contribute no preference",
            data.identical
        );
    }
    // The reference: computed once, before any step, and kept for a resumed run.
    let all: Vec<Pair> = data.train.iter().chain(&data.eval).cloned().collect();
    let key = reference_key(cfg, &cfg.dpo.reference, &data.data_hash, all.len());
    let ref_path = setup.run_dir.join(REFERENCE_FILE);
    let refs = match read_reference(&ref_path, &key, all.len()) {
        _ if !with_reference => vec![(0.0, 0.0); all.len()],
        Some(r) => r,
        None if setup.resume && cfg.dpo.reference == Reference::Init => {
            return Err(err(format!(
                "--resume: {} is missing or does not match this data, and the reference (dpo.reference = \"init\") \
                 cannot be recomputed from trained weights",
                ref_path.display()
            )));
        }
        None => {
            eprintln!(
                "computing reference log-probs of {} pairs ({})",
                all.len(),
                describe_reference(&cfg.dpo.reference)
            );
            let order: Vec<usize> = (0..all.len()).collect();
            let batches = group_pairs(&all, &[], &order, cfg, false);
            let refs = with_reference_model(&mut setup, &cfg.dpo.reference, |model, opts| {
                let mut refs = Vec::with_capacity(all.len());
                for b in &batches {
                    let out = model.forward_logprobs_with(&b.batch, opts);
                    let seqs = sequence_logps(&b.batch, &out.logprobs);
                    for s in &b.pairs {
                        refs.push((seqs[s.chosen_seq as usize].0, seqs[s.rejected_seq as usize].0));
                    }
                }
                refs
            })?;
            std::fs::create_dir_all(&setup.run_dir)
                .map_err(|e| err(format!("{}: {e}", setup.run_dir.display())))?;
            write_reference(&ref_path, &key, &refs)?;
            refs
        }
    };
    let (train_refs, eval_refs) = refs.split_at(data.train.len());
    let eval_order: Vec<usize> = (0..data.eval.len()).collect();
    let eval = group_pairs(&data.eval, eval_refs, &eval_order, cfg, train_prompt);
    let seed = cfg.train.seed;
    let epoch = |e: u64| -> Result<Vec<PairBatch>, TrainError> {
        let mut order: Vec<usize> = (0..data.train.len()).collect();
        Rng::for_stream(seed, e).shuffle(&mut order);
        Ok(group_pairs(&data.train, train_refs, &order, cfg, train_prompt))
    };
    let source = BatchSource {
        samples: data.train.len(),
        data_hash: data.data_hash.clone(),
        epoch: &epoch,
        eval,
    };
    train_loop(setup, PairObjective { loss }, source)
}

/// The token id a reward model's score position skips, as TRL sets it: the tokenizer's pad
/// token, or EOS when it has none.
pub fn reward_pad_id(tok: &Tokenizer) -> Option<u32> {
    tok.pad_id().or_else(|| tok.eos_ids().first().copied())
}

/// Reward micro-batches of `pairs` in `order`: chosen and rejected of a pair side by side, each
/// scored at its last non-padding token.
fn group_reward(pairs: &[Pair], order: &[usize], cfg: &TrainConfig, pad: Option<u32>) -> Vec<RewardBatch> {
    pair_groups(pairs, order, cfg)
        .into_iter()
        .map(|(g, samples)| {
            let mut batch = to_batch(&samples);
            batch.targets.iter_mut().for_each(|t| *t = IGNORE_INDEX);
            let mut start = 0;
            let mut at = Vec::with_capacity(samples.len());
            for s in &samples {
                at.push(start + score_position(&s.input_ids, pad));
                start += s.input_ids.len();
            }
            let slots = g
                .iter()
                .enumerate()
                .map(|(k, &i)| RewardSlot {
                    chosen_at: at[2 * k],
                    rejected_at: at[2 * k + 1],
                    margin: pairs[i].margin.unwrap_or(0.0),
                })
                .collect();
            RewardBatch { batch, pairs: slots }
        })
        .collect()
}

fn run_reward(
    setup: RunSetup<'_>,
    tok: &Tokenizer,
    template: Option<&ChatTemplate>,
    cache_dir: &Path,
) -> Result<RunSummary, TrainError> {
    let cfg = setup.cfg;
    let mut data = prepare_pairs(cfg, tok, template, cache_dir)?;
    // TRL's RewardTrainer drops pairs longer than max_length (a cut sequence would be scored at
    // the wrong token), so graft drops them too instead of truncating.
    let long = |p: &Pair| p.chosen.notes.truncated || p.rejected.notes.truncated;
    let dropped = data.train.iter().filter(|p| long(p)).count();
    data.train.retain(|p| !long(p));
    data.eval.retain(|p| !long(p));
    data.counts.truncated = 0;
    print_data_warnings(cfg, &data.counts, &data.warnings);
    if dropped > 0 {
        eprintln!(
            "warning: {dropped} training pairs are longer than data.max_length = {} and were dropped (a reward \
             model is scored at the last token, so pairs are not cut)",
            cfg.data.max_length
        );
    }
    if data.train.is_empty() {
        return Err(err(format!(
            "data.train: no preference pair fits data.max_length = {}",
            cfg.data.max_length
        )));
    }
    let identical = data
        .train
        .iter()
        .filter(|p| p.chosen.input_ids == p.rejected.input_ids)
        .count();
    if identical > 0 {
        eprintln!(
            "warning: {identical} training pairs have identical chosen and rejected answers; they contribute no preference"
        );
    }
    let pad = reward_pad_id(tok);
    let eval_order: Vec<usize> = (0..data.eval.len()).collect();
    let eval = group_reward(&data.eval, &eval_order, cfg, pad);
    let seed = cfg.train.seed;
    let epoch = |e: u64| -> Result<Vec<RewardBatch>, TrainError> {
        let mut order: Vec<usize> = (0..data.train.len()).collect();
        Rng::for_stream(seed, e).shuffle(&mut order);
        Ok(group_reward(&data.train, &order, cfg, pad))
    };
    let source = BatchSource {
        samples: data.train.len(),
        data_hash: data.data_hash.clone(),
        epoch: &epoch,
        eval,
    };
    let objective = Reward {
        params: RewardParams {
            center_rewards_coefficient: cfg.reward.center_rewards_coefficient,
        },
    };
    train_loop(setup, objective, source)
}

/// A labelled KTO example: prompt + completion (completion trained) and whether it is desirable.
#[derive(Clone, Debug)]
pub struct KtoExample {
    /// Prompt + completion.
    pub sample: TokenizedSample,
    /// Desirable (`true`) or undesirable.
    pub label: bool,
}

/// How many preference pairs TRL unpairs at a time (its `map` batch size): each chunk gives its
/// chosen completions (label true), then its rejected ones (label false).
const UNPAIR_CHUNK: usize = 1000;

/// Loads KTO examples: KTO rows as they are, preference pairs unpaired as TRL does.
fn prepare_kto(
    cfg: &TrainConfig,
    tok: &Tokenizer,
    template: Option<&ChatTemplate>,
    cache_dir: &Path,
) -> Result<PreparedKto, TrainError> {
    let mut reader = DataReader::new(cfg, tok, template, cache_dir);
    let read = |reader: &mut DataReader<'_>,
                paths: &[String],
                key: &str|
     -> Result<Vec<KtoExample>, TrainError> {
        let mut out = Vec::new();
        for ds in reader.read(paths, key)? {
            let mut pending_pairs: Vec<(TokenizedSample, TokenizedSample)> = Vec::new();
            let flush = |pending: &mut Vec<(TokenizedSample, TokenizedSample)>, out: &mut Vec<KtoExample>| {
                for chunk in pending.chunks(UNPAIR_CHUNK) {
                    out.extend(chunk.iter().map(|(c, _)| KtoExample {
                        sample: c.clone(),
                        label: true,
                    }));
                    out.extend(chunk.iter().map(|(_, r)| KtoExample {
                        sample: r.clone(),
                        label: false,
                    }));
                }
                pending.clear();
            };
            for e in &ds.examples {
                let at = || {
                    format!(
                        "{}:{}",
                        ds.files
                            .get(e.file)
                            .map_or("?".into(), |f| f.display().to_string()),
                        e.line
                    )
                };
                match &e.record {
                    TokenizedRecord::Kto { sample, label } => {
                        flush(&mut pending_pairs, &mut out);
                        if key == "train" {
                            reader.counts.truncated += sample.notes.truncated as usize;
                        }
                        if sample.trained_count() == 0 {
                            return Err(err(format!(
                                "data.{key}: {}: the completion has no token left to train within data.max_length = {}",
                                at(),
                                cfg.data.max_length
                            )));
                        }
                        out.push(KtoExample {
                            sample: sample.clone(),
                            label: *label,
                        });
                    }
                    TokenizedRecord::Pair { chosen, rejected, .. } => {
                        pending_pairs.push((chosen.clone(), rejected.clone()));
                    }
                    _ => {
                        return Err(err(format!(
                            "data.{key}: {}: this row has no label; method = \"kto\" needs prompt / completion / label \
                             rows (or preference pairs, which are unpaired); for single answers use method = \"sft\"",
                            at()
                        )));
                    }
                }
            }
            flush(&mut pending_pairs, &mut out);
        }
        Ok(out)
    };
    let mut train = read(&mut reader, &cfg.data.train, "train")?;
    let mut eval = read(&mut reader, &cfg.data.eval, "eval")?;
    if train.is_empty() {
        return Err(err("data.train: no usable KTO examples"));
    }
    if eval.is_empty() && cfg.data.eval_fraction > 0.0 {
        // The last rows, so the training order (which KTO keeps) is untouched.
        let n = ((train.len() as f64) * cfg.data.eval_fraction).round().max(1.0) as usize;
        eval = train.split_off(train.len() - n.min(train.len() - 1));
    }
    Ok(PreparedKto {
        train,
        eval,
        data_hash: reader.data_hash(),
        counts: reader.counts,
        warnings: reader.warnings,
    })
}

/// The KTO examples of a config's data.
struct PreparedKto {
    train: Vec<KtoExample>,
    eval: Vec<KtoExample>,
    data_hash: String,
    counts: RowCounts,
    warnings: Vec<String>,
}

/// The index of a sample's first trained token (where its completion starts).
fn completion_start(s: &TokenizedSample) -> usize {
    s.trained.iter().position(|&t| t).unwrap_or(s.input_ids.len())
}

/// Prompt of `a` followed by the completion of `b` (TRL's mismatched KL sequence).
fn mismatched(a: &TokenizedSample, b: &TokenizedSample) -> TokenizedSample {
    let (pa, pb) = (completion_start(a), completion_start(b));
    let mut input_ids = a.input_ids[..pa].to_vec();
    input_ids.extend_from_slice(&b.input_ids[pb..]);
    let mut trained = vec![false; pa];
    trained.extend_from_slice(&b.trained[pb..]);
    TokenizedSample {
        original_len: input_ids.len(),
        input_ids,
        trained,
        notes: Default::default(),
    }
}

/// Splits `order` into micro-batches: `batch.micro_batch_rows` items each, or as many as fit
/// `batch.micro_batch_tokens` by `tokens(item)` (an item over the budget gets one of its own).
fn group_in_order(order: &[usize], cfg: &TrainConfig, tokens: impl Fn(usize) -> usize) -> Vec<Vec<usize>> {
    match cfg.micro_batch() {
        crate::config::MicroBatch::Rows(rows) => order.chunks(rows.max(1)).map(|c| c.to_vec()).collect(),
        crate::config::MicroBatch::Tokens(budget) => {
            let mut groups = Vec::new();
            let (mut cur, mut used) = (Vec::new(), 0);
            for &i in order {
                let n = tokens(i);
                if !cur.is_empty() && used + n > budget {
                    groups.push(std::mem::take(&mut cur));
                    used = 0;
                }
                cur.push(i);
                used += n;
            }
            if !cur.is_empty() {
                groups.push(cur);
            }
            groups
        }
    }
}

/// Packs samples into one engine batch (sequence ids in order).
fn to_batch(samples: &[&TokenizedSample]) -> Batch {
    let p = PackedBatch::from_samples(samples);
    Batch {
        input_ids: p.input_ids,
        positions: p.positions,
        seq_ids: p.seq_ids,
        targets: p.targets,
    }
}

/// KTO micro-batches in data order (never shuffled): `rows` examples each or as many as fit the
/// token budget, with the KL sequences rotated within each.
fn group_kto(
    examples: &[KtoExample],
    refs: &[(f64, f64)],
    cfg: &TrainConfig,
    with_kl: bool,
) -> Vec<KtoBatch> {
    let order: Vec<usize> = (0..examples.len()).collect();
    let groups = group_in_order(&order, cfg, |i| examples[i].sample.input_ids.len());
    groups
        .into_iter()
        .map(|g| {
            let samples: Vec<&TokenizedSample> = g.iter().map(|&i| &examples[i].sample).collect();
            let kl: Vec<TokenizedSample> = if with_kl {
                (0..g.len())
                    .map(|k| {
                        mismatched(
                            &examples[g[k]].sample,
                            &examples[g[(k + g.len() - 1) % g.len()]].sample,
                        )
                    })
                    .collect()
            } else {
                Vec::new()
            };
            let kl_refs: Vec<&TokenizedSample> = kl.iter().collect();
            KtoBatch {
                batch: to_batch(&samples),
                kl_batch: if with_kl {
                    to_batch(&kl_refs)
                } else {
                    Batch::default()
                },
                slots: g
                    .iter()
                    .enumerate()
                    .map(|(k, &i)| KtoSlot {
                        seq: k as u32,
                        label: examples[i].label,
                        ref_logp: refs.get(i).map_or(0.0, |r| r.0),
                        kl_seq: k as u32,
                        ref_kl_logp: refs.get(i).map_or(0.0, |r| r.1),
                    })
                    .collect(),
            }
        })
        .collect()
}

/// TRL's warning when the weighted class ratio is outside `[1, 4/3]`.
fn kto_balance_warning(examples: &[KtoExample], des_w: f64, und_w: f64) -> Option<String> {
    let des = examples.iter().filter(|e| e.label).count().max(1) as f64;
    let und = (examples.len() as f64 - des).max(1.0);
    let round2 = |x: f64| (x * 100.0).round() / 100.0;
    let (dl, du) = (round2(und * und_w / des), round2(und * und_w / des * 1.33));
    let (ul, uu) = (round2(des * des_w / und / 1.33), round2(des * des_w / und));
    let ok = (dl..=du).contains(&des_w) || (ul..=uu).contains(&und_w);
    (!ok).then(|| {
        format!(
            "the weighted ratio of desirable to undesirable examples is outside [1, 4/3] ({des} desirable, {und} \
             undesirable): set kto.desirable_weight in [{dl}, {du}] or kto.undesirable_weight in [{ul}, {uu}] (not both)"
        )
    })
}

fn run_kto(
    mut setup: RunSetup<'_>,
    tok: &Tokenizer,
    template: Option<&ChatTemplate>,
    cache_dir: &Path,
) -> Result<RunSummary, TrainError> {
    let cfg = setup.cfg;
    let params = cfg.kto.params().map_err(err)?;
    let PreparedKto {
        train,
        eval,
        data_hash,
        counts,
        warnings,
    } = prepare_kto(cfg, tok, template, cache_dir)?;
    print_data_warnings(cfg, &counts, &warnings);
    if let Some(w) = kto_balance_warning(&train, params.desirable_weight, params.undesirable_weight) {
        eprintln!("warning: {w}");
    }
    let with_kl = params.uses_kl();
    // Reference log-probs of every example and its KL sequence (the grouping is fixed: data order).
    let key = format!(
        "kto|{}|{}",
        reference_key(cfg, &cfg.kto.reference, &data_hash, train.len() + eval.len()),
        with_kl
    );
    let ref_path = setup.run_dir.join(REFERENCE_FILE);
    let n_all = train.len() + eval.len();
    let refs = match read_reference(&ref_path, &key, n_all) {
        Some(r) => r,
        None if setup.resume && cfg.kto.reference == Reference::Init => {
            return Err(err(format!(
                "--resume: {} is missing or does not match this data, and the reference (kto.reference = \"init\") \
                 cannot be recomputed from trained weights",
                ref_path.display()
            )));
        }
        None => {
            eprintln!(
                "computing reference log-probs of {n_all} examples ({})",
                describe_reference(&cfg.kto.reference)
            );
            let batches: Vec<KtoBatch> = [&train, &eval]
                .into_iter()
                .flat_map(|part| group_kto(part, &[], cfg, with_kl))
                .collect();
            let refs = with_reference_model(&mut setup, &cfg.kto.reference, |model, opts| {
                let mut refs = Vec::with_capacity(n_all);
                for b in &batches {
                    let main = model.forward_logprobs_with(&b.batch, opts);
                    let seqs = sequence_logps(&b.batch, &main.logprobs);
                    let kl = with_kl.then(|| {
                        let out = model.forward_logprobs_with(&b.kl_batch, opts);
                        sequence_logps(&b.kl_batch, &out.logprobs)
                    });
                    for s in &b.slots {
                        let k = kl.as_ref().map_or(0.0, |v| v[s.kl_seq as usize].0);
                        refs.push((seqs[s.seq as usize].0, k));
                    }
                }
                refs
            })?;
            std::fs::create_dir_all(&setup.run_dir)
                .map_err(|e| err(format!("{}: {e}", setup.run_dir.display())))?;
            write_reference(&ref_path, &key, &refs)?;
            refs
        }
    };
    let (train_refs, eval_refs) = refs.split_at(train.len());
    let eval_batches = group_kto(&eval, eval_refs, cfg, with_kl);
    let train_batches = group_kto(&train, train_refs, cfg, with_kl);
    let epoch = |_e: u64| -> Result<Vec<KtoBatch>, TrainError> { Ok(train_batches.clone()) };
    let source = BatchSource {
        samples: train.len(),
        data_hash,
        epoch: &epoch,
        eval: eval_batches,
    };
    train_loop(setup, Kto { params }, source)
}

fn describe_reference(r: &Reference) -> String {
    match r {
        Reference::Init => "the starting weights".into(),
        Reference::Base => "the base model".into(),
        Reference::Path(p) => format!("`{p}`"),
    }
}

/// Runs `f` with the reference model: the training model as it starts (`init`), the same with
/// its adapter off (`base`), the training base with another PEFT adapter in place of its own (an
/// adapter directory; the training adapter is put back after), or another model.
fn with_reference_model<R>(
    setup: &mut RunSetup<'_>,
    reference: &Reference,
    f: impl FnOnce(&graft_model::model::Model<graft_kernels::Cpu>, TrainOptions) -> R,
) -> Result<R, TrainError> {
    let opts = TrainOptions {
        precision: setup.precision,
        ..Default::default()
    };
    match reference {
        Reference::Init => Ok(f(&setup.model, opts)),
        Reference::Base => Ok(f(
            &setup.model,
            TrainOptions {
                without_adapters: setup.mode == TrainMode::Lora,
                ..opts
            },
        )),
        Reference::Path(p) if Path::new(p).join("adapter_config.json").is_file() => {
            let adapter = graft_model::peft::load_peft_adapter(Path::new(p), &setup.model.spec)
                .map_err(|e| err(format!("reference: {e}")))?;
            let own = setup.peft_out.clone().map(|c| setup.model.adapter(c));
            setup.model.set_adapter(&adapter);
            let out = f(&setup.model, opts);
            match own {
                Some(own) => setup.model.set_adapter(&own),
                None => setup
                    .model
                    .layers
                    .iter_mut()
                    .for_each(|l| l.lora = Default::default()),
            }
            Ok(out)
        }
        Reference::Path(p) => {
            let loaded =
                graft_hub::hub::load_model_or_download(p).map_err(|e| err(format!("reference: {e}")))?;
            if loaded.spec.vocab_size != setup.model.spec.vocab_size {
                return Err(err(format!(
                    "reference: `{p}` has a vocabulary of {} tokens, the trained model {}; the reference must share \
                     the tokenizer",
                    loaded.spec.vocab_size, setup.model.spec.vocab_size
                )));
            }
            let mut model = graft_model::model::Model::from_weights(
                graft_kernels::Cpu,
                &loaded.spec,
                &loaded.weights,
                graft_model::model::WeightStorage::Bf16,
            )
            .map_err(|e| err(format!("reference: {e}")))?;
            model.ensure_positions(setup.cfg.data.max_length + 1);
            Ok(f(&model, opts))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprint_follows_content_not_names_or_times() {
        let dir = std::env::temp_dir().join(format!("graft-fp-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("config.json"), b"{}").unwrap();
        std::fs::write(dir.join("model.safetensors"), [1u8; 64]).unwrap();
        let a = content_fingerprint(&dir);
        assert_eq!(a, content_fingerprint(&dir));
        // The same size, one byte different: a different fingerprint.
        let mut w = [1u8; 64];
        w[40] = 2;
        std::fs::write(dir.join("model.safetensors"), w).unwrap();
        let b = content_fingerprint(&dir);
        assert_ne!(a, b);
        assert_ne!(b, content_fingerprint(&dir.join("config.json")));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
