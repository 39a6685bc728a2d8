//! Workers: each claims the oldest queued job (a lease it renews while it runs), trains it with
//! [`graft_train::sft::run`] on its own thread pool, and meanwhile turns the run's
//! `metrics.jsonl` and checkpoints into events and checkpoint records. Cancel and pause
//! requests, a lost lease and server shutdown stop the run at its next step (a checkpoint is
//! saved); a job started again continues from its last checkpoint, and events already reported
//! are not repeated.

use crate::store::{CheckpointRow, EventRow, JobRow};
use crate::{Jobs, JobsError, new_id, now};
use graft_train::metrics::{MetricsRecord, read_metrics};
use graft_train::signal::StopFlag;
use serde_json::{Value, json};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// How long a claim holds without renewal (a worker that dies loses its jobs after this).
pub const LEASE_S: u64 = 60;
/// How often an idle worker looks for a queued job.
const POLL: Duration = Duration::from_millis(300);
/// How often a running job's progress is reported and its lease renewed.
const TICK: Duration = Duration::from_millis(500);

/// Starts the configured number of worker threads of this process.
pub(crate) fn start_workers(jobs: &Arc<Jobs>) {
    for i in 0..jobs.config.max_concurrent_jobs {
        let j = jobs.clone();
        let name = format!("{}-{i}", jobs.config.worker_id);
        let h = std::thread::Builder::new()
            .name(format!("graft-job-{i}"))
            .spawn(move || worker_loop(&j, &name));
        match h {
            Ok(h) => jobs.add_worker(h),
            Err(e) => eprintln!("graft: cannot start job worker {i}: {e}"),
        }
    }
}

/// Claims and runs jobs until the service shuts down.
pub fn worker_loop(jobs: &Arc<Jobs>, worker: &str) {
    let lease = jobs.config.lease_s.max(2);
    while !jobs.is_shutting_down() {
        // A worker that died left its jobs running with a lease that runs out: take them back.
        if jobs.store.is_shared() {
            match jobs.store.requeue_orphans(now()) {
                Ok(ids) => {
                    for id in ids {
                        let _ = jobs.event(
                            &id,
                            "warn",
                            "The worker running this job stopped answering; the job continues from its last checkpoint.",
                            None,
                        );
                    }
                }
                Err(e) => eprintln!("graft: job worker {worker}: {e}"),
            }
        }
        match jobs.store.claim_job(worker, now() + lease) {
            Ok(Some(job)) => {
                if let Err(e) = run_job(jobs, job, worker) {
                    eprintln!("graft: job worker {worker}: {e}");
                }
            }
            Ok(None) => std::thread::sleep(POLL),
            Err(e) => {
                eprintln!("graft: job worker {worker}: {e}");
                std::thread::sleep(POLL * 10);
            }
        }
    }
}

/// A message for the client: server paths replaced by what the client knows.
fn sanitize(jobs: &Jobs, msg: &str) -> String {
    let mut m = msg.replace(&jobs.config.model_path, &jobs.config.base_model);
    let state = jobs.config.state_dir.display().to_string();
    for d in ["files", "jobs"] {
        m = m.replace(&format!("{state}/{d}/"), "");
    }
    m.replace(&state, "<state>")
}

fn steps_planned(jobs: &Jobs, job: &JobRow) -> Option<u64> {
    let kind = job.method["type"].as_str()?;
    let h = &job.method[kind]["hyperparameters"];
    let examples = jobs
        .store
        .get_file(&job.project, &job.training_file)
        .ok()??
        .examples;
    Some(h["n_epochs"].as_u64()? * examples.div_ceil(h["batch_size"].as_u64()?.max(1)))
}

fn metrics_data(r: &MetricsRecord, total: Option<u64>) -> Value {
    let mut d = json!({"step": r.step, "train_loss": r.loss, "total_steps": total});
    if let Some(v) = r.eval_loss {
        d["valid_loss"] = json!(v);
        d["full_valid_loss"] = json!(v);
    }
    if let Some(a) = r.extra.get("mean_token_accuracy") {
        d["train_mean_token_accuracy"] = json!(a);
    }
    for (k, v) in &r.extra {
        if k.starts_with("reward") || k == "kl" || k.starts_with("rewards/") {
            d[k] = json!(v);
        }
    }
    d
}

/// Reports what the run wrote since the last report: metrics events for new steps, checkpoint
/// records for new checkpoints (and drops records of pruned ones).
fn report_progress(jobs: &Jobs, job_id: &str, run_dir: &Path) -> Result<(), JobsError> {
    let Some(job) = jobs.store.get_job(None, job_id)? else {
        return Ok(());
    };
    let records = read_metrics(&run_dir.join("metrics.jsonl")).unwrap_or_default();
    let total = steps_planned(jobs, &job);
    let mut last = job.last_step;
    for r in records.iter().filter(|r| r.step > job.last_step) {
        let mut msg = format!(
            "Step {}/{}: training loss={:.4}",
            r.step,
            total.map_or("?".into(), |t| t.to_string()),
            r.loss.unwrap_or(f64::NAN)
        );
        if let Some(v) = r.eval_loss {
            msg.push_str(&format!(", validation loss={v:.4}"));
        }
        if let Some(v) = r.extra.get("reward") {
            msg.push_str(&format!(", reward={v:.4}"));
        }
        jobs.store.add_event(
            job_id,
            &EventRow {
                id: new_id("ftevent-"),
                created_at: now(),
                level: "info".into(),
                message: msg,
                data: Some(metrics_data(r, total)),
                kind: "metrics".into(),
            },
        )?;
        last = r.step;
    }
    let elapsed = records.last().map(|r| r.elapsed_s);
    jobs.store.modify_job(job_id, |j| {
        j.last_step = j.last_step.max(last);
        j.total_steps = total;
        if let (Some(t), Some(e)) = (total, elapsed)
            && last > 0
        {
            let left = t.saturating_sub(last) as f64 * e / last as f64;
            j.estimated_finish = Some(now() + left.round() as u64);
        }
    })?;
    // Checkpoints.
    let on_disk = graft_train::checkpoint::list_checkpoints(run_dir).unwrap_or_default();
    let model = jobs.model_name(&job);
    for (step, dir) in &on_disk {
        if !dir
            .join(graft_train::sft::CHECKPOINT_PEFT_DIR)
            .join("adapter_config.json")
            .is_file()
        {
            continue;
        }
        let rec = records.iter().rev().find(|r| r.step <= *step);
        let eval = records
            .iter()
            .rev()
            .find(|r| r.step <= *step && r.eval_loss.is_some());
        let metrics = json!({
            "step": *step as f64,
            "train_loss": rec.and_then(|r| r.loss),
            "train_mean_token_accuracy": rec.and_then(|r| r.extra.get("mean_token_accuracy")),
            "valid_loss": eval.and_then(|r| r.eval_loss),
            "valid_mean_token_accuracy": null,
            "full_valid_loss": eval.and_then(|r| r.eval_loss),
            "full_valid_mean_token_accuracy": null,
        });
        let row = CheckpointRow {
            id: new_id("ftckpt-"),
            job_id: job_id.to_string(),
            step: *step,
            created_at: now(),
            metrics,
            model_id: format!("{model}:ckpt-step-{step}"),
        };
        if jobs.store.add_checkpoint(&row)? {
            jobs.store.add_event(
                job_id,
                &EventRow {
                    id: new_id("ftevent-"),
                    created_at: now(),
                    level: "info".into(),
                    message: format!("Checkpoint created at step {step}"),
                    data: Some(json!({"step": step, "fine_tuned_model_checkpoint": row.model_id})),
                    kind: "message".into(),
                },
            )?;
        }
    }
    let keep: Vec<u64> = on_disk.iter().map(|(s, _)| *s).collect();
    jobs.store.prune_checkpoints(job_id, &keep)
}

/// The metrics CSV OpenAI attaches to a finished job (`step_metrics.csv`).
fn metrics_csv(records: &[MetricsRecord]) -> String {
    let mut s = String::from("step,train_loss,train_accuracy,valid_loss,valid_mean_token_accuracy\n");
    let f = |x: Option<f64>| x.map_or(String::new(), |v| format!("{v}"));
    for r in records {
        s.push_str(&format!(
            "{},{},{},{},\n",
            r.step,
            f(r.loss),
            f(r.extra.get("mean_token_accuracy").copied()),
            f(r.eval_loss)
        ));
    }
    s
}

/// Runs one claimed job to its end (or until it is stopped).
pub fn run_job(jobs: &Arc<Jobs>, job: JobRow, worker: &str) -> Result<(), JobsError> {
    let id = job.id.clone();
    let run_dir = jobs.run_dir(&id);
    let resume_from = graft_train::checkpoint::list_checkpoints(&run_dir)
        .unwrap_or_default()
        .last()
        .map(|(s, _)| *s);
    if resume_from.is_none() && run_dir.exists() {
        // Started before and stopped before its first checkpoint: start over.
        let _ = std::fs::remove_dir_all(&run_dir);
    }
    let cfg = match crate::config::train_config(jobs, &job) {
        Ok(c) => c,
        Err(e) => return fail(jobs, &id, &e.message, "invalid_job_config"),
    };
    match resume_from {
        Some(s) => jobs.event(
            &id,
            "info",
            &format!("Fine-tuning job resumed from step {s}"),
            None,
        )?,
        None => jobs.event(&id, "info", "Fine-tuning job started", None)?,
    }
    let stop = StopFlag::new();
    let done = Arc::new(AtomicBool::new(false));
    let lost = Arc::new(AtomicBool::new(false));
    let lease = jobs.config.lease_s.max(2);
    let monitor = {
        let (jobs, id, run_dir, stop, done, lost) = (
            jobs.clone(),
            id.clone(),
            run_dir.clone(),
            stop.clone(),
            done.clone(),
            lost.clone(),
        );
        let worker = worker.to_string();
        std::thread::spawn(move || {
            while !done.load(Ordering::SeqCst) {
                std::thread::sleep(TICK);
                if let Err(e) = report_progress(&jobs, &id, &run_dir) {
                    eprintln!("graft: job {id}: {e}");
                }
                let renewed = jobs.store.modify_job(&id, |j| {
                    if j.worker.as_deref() != Some(worker.as_str()) || j.status != "running" {
                        return (false, None);
                    }
                    j.lease_until = now() + lease;
                    (true, j.control.clone())
                });
                match renewed {
                    Ok(Some((_, (true, control)))) => {
                        if control.is_some() || jobs.is_shutting_down() {
                            stop.request();
                        }
                    }
                    Ok(_) => {
                        lost.store(true, Ordering::SeqCst);
                        stop.request();
                    }
                    Err(e) => eprintln!("graft: job {id}: cannot renew its lease: {e}"),
                }
            }
        })
    };
    let threads = jobs.config.train_threads;
    let result = match rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("graft-train-{i}"))
        .build()
    {
        Ok(pool) => pool.install(|| graft_train::sft::run(&cfg, resume_from.is_some(), &stop)),
        Err(e) => Err(graft_train::sft::TrainError(format!(
            "cannot start the training threads: {e}"
        ))),
    };
    done.store(true, Ordering::SeqCst);
    let _ = monitor.join();
    report_progress(jobs, &id, &run_dir)?;
    if lost.load(Ordering::SeqCst) {
        // Another worker holds the job now (our lease ran out): leave it alone.
        return Ok(());
    }
    match result {
        Err(e) => fail(jobs, &id, &e.0, "training_failed"),
        Ok(summary) if summary.interrupted => {
            let control = jobs.store.get_job(None, &id)?.and_then(|j| j.control);
            let (status, msg) = match control.as_deref() {
                Some("cancel") => ("cancelled", "Fine-tuning job cancelled".to_string()),
                Some("pause") => (
                    "paused",
                    format!("Fine-tuning job paused at step {}", summary.steps),
                ),
                _ => (
                    "queued",
                    format!(
                        "The server is stopping; the job continues from step {} when it runs again",
                        summary.steps
                    ),
                ),
            };
            jobs.store.modify_job(&id, |j| {
                j.status = status.into();
                j.worker = None;
                j.lease_until = 0;
                if status != "queued" {
                    j.control = None;
                }
                if status == "cancelled" {
                    j.finished_at = Some(now());
                }
            })?;
            jobs.event(&id, "info", &msg, None)
        }
        Ok(_) => {
            let records = read_metrics(&run_dir.join("metrics.jsonl")).unwrap_or_default();
            let file = jobs.store_result_file(&job.project, metrics_csv(&records).as_bytes())?;
            let model = jobs.model_name(&job);
            let tokens = records.iter().rev().find_map(|r| r.tokens_seen);
            jobs.store.modify_job(&id, |j| {
                j.status = "succeeded".into();
                j.fine_tuned_model = Some(model.clone());
                j.finished_at = Some(now());
                j.trained_tokens = tokens;
                j.result_files = vec![file.clone()];
                j.worker = None;
                j.control = None;
                j.estimated_finish = None;
            })?;
            jobs.event(
                &id,
                "info",
                &format!("New fine-tuned model created: {model}"),
                None,
            )?;
            jobs.event(&id, "info", "The job has successfully completed", None)
        }
    }
}

fn fail(jobs: &Jobs, id: &str, message: &str, code: &str) -> Result<(), JobsError> {
    let message = sanitize(jobs, message);
    jobs.store.modify_job(id, |j| {
        j.status = "failed".into();
        j.finished_at = Some(now());
        j.worker = None;
        j.control = None;
        j.error = Some(json!({"code": code, "message": message, "param": null}));
    })?;
    jobs.event(id, "error", &format!("Fine-tuning job failed: {message}"), None)
}

impl Jobs {
    /// Stores a job's metrics CSV as a `fine-tune-results` file of `project`; returns its id.
    fn store_result_file(&self, project: &str, bytes: &[u8]) -> Result<String, JobsError> {
        let f = self.store_file(project, "step_metrics.csv", "fine-tune-results", bytes, None, 0)?;
        Ok(f["id"].as_str().unwrap_or_default().to_string())
    }
}
