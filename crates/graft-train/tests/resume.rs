//! End-to-end exact resume on a toy model: a run stopped after a checkpoint (with a half-written
//! checkpoint left behind, as a kill during a save leaves) and resumed from it ends with weights
//! byte-equal to an uninterrupted run's. Exercises config, schedule, RNG (shuffle and dropout),
//! gradient scaling and clipping, AdamW, checkpoints, tensors and metrics together, the way the
//! SFT loop uses them.

use graft_train::checkpoint::{
    CheckpointWriter, DataPosition, MODEL_FILE, OPTIMIZER_FILE, TRAINER_STATE_FILE, TrainerState,
    latest_checkpoint, prune_checkpoints,
};
use graft_train::config::TrainConfig;
use graft_train::metrics::{MetricsRecord, MetricsWriter, read_metrics, truncate_after};
use graft_train::optim::{AdamW, Param, clip_grad_norm, scale_grads};
use graft_train::rng::{Rng, uniform_at};
use graft_train::schedule::LrSchedule;
use graft_train::tensors::{TensorRef, read_f32_file, write_f32_file};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

const DIM: usize = 16;
const EXAMPLES: usize = 60;
const ROWS: usize = 4;

fn config(run_dir: &Path) -> TrainConfig {
    let sets = [
        "optimizer.lr=0.05".to_string(),
        "optimizer.weight_decay=0.01".to_string(),
        "schedule.warmup_steps=3".to_string(),
        "schedule.min_lr_ratio=0.1".to_string(),
        "batch.micro_batch_rows=4".to_string(),
        "batch.grad_accum=2".to_string(),
        "batch.max_grad_norm=0.5".to_string(),
        "train.epochs=3".to_string(),
        "train.save_every=5".to_string(),
        "train.keep_checkpoints=2".to_string(),
        "lora.dropout=0.1".to_string(),
        format!("output.dir=\"{}\"", run_dir.display()),
    ];
    TrainConfig::from_toml_str(
        "[model]\npath = \"toy\"\n[data]\ntrain = \"toy.jsonl\"\n",
        "toy",
        &sets,
    )
    .unwrap()
}

fn dataset() -> Vec<([f32; DIM], f32)> {
    let mut rng = Rng::new(123);
    (0..EXAMPLES)
        .map(|_| {
            let x: [f32; DIM] = std::array::from_fn(|_| rng.next_f32() * 2.0 - 1.0);
            let y = x
                .iter()
                .enumerate()
                .map(|(i, v)| v * (i as f32 * 0.1 - 0.7))
                .sum::<f32>()
                + 0.3;
            (x, y)
        })
        .collect()
}

/// Runs (or resumes) training; with `stop_after = Some(n)` it stops two steps after step `n`'s
/// checkpoint, as if killed, leaving a partial `.tmp` checkpoint. Returns the final weights file.
fn train(run_dir: &Path, stop_after: Option<u64>) -> PathBuf {
    let cfg = config(run_dir);
    let data = dataset();
    let steps_per_epoch = (EXAMPLES / (ROWS * cfg.batch.grad_accum)) as u64;
    let total_steps = steps_per_epoch * cfg.train.epochs;
    let sched = LrSchedule::from_config(&cfg.schedule, cfg.optimizer.lr, total_steps);
    let latest = latest_checkpoint(run_dir).unwrap();
    let (mut w, mut b, mut opt, mut state) = match latest.good {
        Some(good) => {
            let state = TrainerState::read(&good.dir).unwrap();
            assert_eq!(state.config_hash, cfg.hash());
            let weights = read_f32_file(&good.dir.join(MODEL_FILE)).unwrap();
            let opt =
                AdamW::read_state_file((&cfg.optimizer).into(), &good.dir.join(OPTIMIZER_FILE)).unwrap();
            truncate_after(&run_dir.join("metrics.jsonl"), state.step).unwrap();
            (
                weights.tensors["w"].data.clone(),
                weights.tensors["b"].data.clone(),
                opt,
                state,
            )
        }
        None => {
            let rng = Rng::new(cfg.train.seed);
            let state = TrainerState::new(total_steps, rng.state(), cfg.hash(), "toy".into());
            (
                vec![0.0; DIM],
                vec![0.0; 1],
                AdamW::new((&cfg.optimizer).into()),
                state,
            )
        }
    };
    let mut metrics = MetricsWriter::open(&run_dir.join("metrics.jsonl")).unwrap();
    while state.step < total_steps {
        let pos = state.data_position;
        let order = Rng::for_stream(cfg.train.seed, pos.epoch).permutation(EXAMPLES);
        let mut gw = vec![0.0f32; DIM];
        let mut gb = vec![0.0f32; 1];
        let mut loss_sum = 0.0f64;
        let mut count = 0usize;
        for micro in 0..cfg.batch.grad_accum {
            for r in 0..ROWS {
                let idx = pos.index as usize + micro * ROWS + r;
                let (x, y) = &data[order[idx]];
                // Dropout on the input, regenerated from (seed, stream = step, index).
                let keep = |i: usize| {
                    let u = uniform_at(cfg.train.seed, state.step, (idx * DIM + i) as u64);
                    if u < cfg.lora.dropout as f32 {
                        0.0
                    } else {
                        1.0 / (1.0 - cfg.lora.dropout as f32)
                    }
                };
                let xd: Vec<f32> = (0..DIM).map(|i| x[i] * keep(i)).collect();
                let pred = xd.iter().zip(&w).map(|(a, c)| a * c).sum::<f32>() + b[0];
                let err = pred - y;
                loss_sum += (err * err) as f64;
                for i in 0..DIM {
                    gw[i] += 2.0 * err * xd[i];
                }
                gb[0] += 2.0 * err;
                count += 1;
            }
        }
        scale_grads(&mut [&mut gw[..], &mut gb[..]], 1.0 / count as f32);
        let norm = clip_grad_norm(&mut [&mut gw[..], &mut gb[..]], cfg.batch.max_grad_norm);
        assert!(norm.is_finite());
        let lr = sched.lr_at(state.step);
        opt.step(
            &mut [
                Param {
                    name: "w",
                    value: &mut w,
                    grad: &gw,
                    decay: true,
                },
                Param {
                    name: "b",
                    value: &mut b,
                    grad: &gb,
                    decay: false,
                },
            ],
            lr,
        )
        .unwrap();
        state.step += 1;
        state.tokens_seen += count as u64;
        let next = pos.index + (ROWS * cfg.batch.grad_accum) as u64;
        state.data_position = if next as usize + ROWS * cfg.batch.grad_accum > EXAMPLES {
            DataPosition {
                epoch: pos.epoch + 1,
                index: 0,
            }
        } else {
            DataPosition {
                epoch: pos.epoch,
                index: next,
            }
        };
        state.epoch = state.data_position.epoch;
        state.last_loss = Some(loss_sum / count as f64);
        let record = MetricsRecord {
            step: state.step,
            loss: state.last_loss,
            lr: Some(lr),
            grad_norm: Some(norm),
            elapsed_s: 0.0,
            ..Default::default()
        };
        metrics.append(&record).unwrap();
        if state.step % cfg.train.save_every == 0 || state.step == total_steps {
            let mut ckpt = CheckpointWriter::begin(run_dir, state.step).unwrap();
            let shapes = ([DIM], [1usize]);
            let tensors = [
                TensorRef {
                    name: "w",
                    shape: &shapes.0,
                    data: &w,
                },
                TensorRef {
                    name: "b",
                    shape: &shapes.1,
                    data: &b,
                },
            ];
            write_f32_file(&ckpt.path(MODEL_FILE).unwrap(), &tensors, &BTreeMap::new()).unwrap();
            opt.write_state_file(&ckpt.path(OPTIMIZER_FILE).unwrap()).unwrap();
            ckpt.write_json(TRAINER_STATE_FILE, &state).unwrap();
            ckpt.commit(&cfg.hash()).unwrap();
            prune_checkpoints(run_dir, cfg.train.keep_checkpoints).unwrap();
        }
        if stop_after.is_some_and(|s| state.step == s + 2) {
            // Killed two steps after a checkpoint (metrics logged past it), during a save: a temp
            // checkpoint with only part of its files.
            let mut partial = CheckpointWriter::begin(run_dir, state.step).unwrap();
            partial.write_bytes(MODEL_FILE, b"partial").unwrap();
            return PathBuf::new();
        }
    }
    latest_checkpoint(run_dir)
        .unwrap()
        .good
        .unwrap()
        .dir
        .join(MODEL_FILE)
}

fn fresh_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("graft-resume-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn resumed_run_ends_byte_identical() {
    let straight_dir = fresh_dir("straight");
    let straight = train(&straight_dir, None);

    let resumed_dir = fresh_dir("resumed");
    train(&resumed_dir, Some(10));
    assert_eq!(
        read_metrics(&resumed_dir.join("metrics.jsonl")).unwrap().len(),
        12
    );
    assert_eq!(
        latest_checkpoint(&resumed_dir)
            .unwrap()
            .good
            .unwrap()
            .manifest
            .step,
        10
    );
    let resumed = train(&resumed_dir, None);

    assert_eq!(
        std::fs::read(&straight).unwrap(),
        std::fs::read(&resumed).unwrap()
    );
    // The metrics of both runs agree step by step too.
    let a = read_metrics(&straight_dir.join("metrics.jsonl")).unwrap();
    let b = read_metrics(&resumed_dir.join("metrics.jsonl")).unwrap();
    assert_eq!(a, b);
    assert_eq!(a.len(), 21);
    // Training made progress.
    assert!(a.last().unwrap().loss.unwrap() < a[0].loss.unwrap());
    std::fs::remove_dir_all(&straight_dir).unwrap();
    std::fs::remove_dir_all(&resumed_dir).unwrap();
}
