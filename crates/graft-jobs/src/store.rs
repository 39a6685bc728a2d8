//! Where jobs, files, events and checkpoints are kept: a SQLite database in the state directory,
//! its schema versioned by [`MIGRATIONS`] and brought up to date when it is opened.
//!
//! A job is one JSON document ([`JobRow`]) plus the columns the queries filter on (status,
//! project, worker, lease). Every change to a job goes through [`Store::modify_job`], a
//! read-modify-write in one immediate transaction, so the HTTP side (cancel, pause) and the
//! runner (progress, results) never overwrite each other's fields.

use crate::JobsError;
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::path::Path;
use std::sync::Mutex;

/// Schema migrations, applied in order; `schema_version` records how many have run.
pub const MIGRATIONS: &[&str] = &[
    // 1: files, jobs, events, checkpoints.
    "CREATE TABLE files (
        id TEXT PRIMARY KEY,
        seq INTEGER NOT NULL,
        project TEXT NOT NULL,
        doc TEXT NOT NULL,
        purpose TEXT NOT NULL,
        deleted INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX files_project ON files(project, seq);
    CREATE TABLE jobs (
        id TEXT PRIMARY KEY,
        seq INTEGER NOT NULL,
        project TEXT NOT NULL,
        status TEXT NOT NULL,
        worker TEXT,
        lease_until INTEGER NOT NULL DEFAULT 0,
        doc TEXT NOT NULL
    );
    CREATE INDEX jobs_project ON jobs(project, seq);
    CREATE INDEX jobs_status ON jobs(status, seq);
    CREATE TABLE events (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        id TEXT NOT NULL UNIQUE,
        job_id TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        level TEXT NOT NULL,
        message TEXT NOT NULL,
        data TEXT,
        kind TEXT NOT NULL
    );
    CREATE INDEX events_job ON events(job_id, seq);
    CREATE TABLE checkpoints (
        id TEXT PRIMARY KEY,
        job_id TEXT NOT NULL,
        step INTEGER NOT NULL,
        created_at INTEGER NOT NULL,
        metrics TEXT NOT NULL,
        model_id TEXT NOT NULL UNIQUE,
        UNIQUE(job_id, step)
    );",
];

/// An uploaded file's record (the bytes live in the state directory).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FileRow {
    /// `file-…`.
    pub id: String,
    /// The project (API key) that owns it.
    pub project: String,
    /// The name the client gave.
    pub filename: String,
    /// `fine-tune` (uploads) or `fine-tune-results` (a job's metrics).
    pub purpose: String,
    /// Size in bytes.
    pub bytes: u64,
    /// Unix seconds.
    pub created_at: u64,
    /// What validation found: `supervised`, `dpo`, `reinforcement` (fine-tune uploads).
    pub kind: Option<String>,
    /// Examples (lines) in the file.
    pub examples: u64,
}

/// A fine-tuning job: the request as resolved at creation, and what running it produced.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct JobRow {
    /// `ftjob-…`.
    pub id: String,
    /// The project (API key) that owns it.
    pub project: String,
    /// Unix seconds.
    pub created_at: u64,
    /// `validating_files`, `queued`, `running`, `paused`, `succeeded`, `failed`, `cancelled`.
    pub status: String,
    /// The base model as the client named it (or the `ft:` model it continues).
    pub model: String,
    /// Training file id.
    pub training_file: String,
    /// Validation file id.
    pub validation_file: Option<String>,
    /// The client's suffix for the model name.
    pub suffix: Option<String>,
    /// Seed of the run.
    pub seed: u64,
    /// Client metadata (string → string).
    pub metadata: Option<Value>,
    /// The method object as returned (`{type, supervised|dpo|reinforcement: {hyperparameters, …}}`),
    /// `auto` resolved to numbers.
    pub method: Value,
    /// graft's own settings given in the request (`--set`-style keys → values).
    pub graft: Value,
    /// The adapter a continued fine-tune starts from (the `ft:` model's directory).
    pub init_from: Option<String>,
    /// The fine-tuned model's id once the job succeeded.
    pub fine_tuned_model: Option<String>,
    /// Unix seconds when the job ended.
    pub finished_at: Option<u64>,
    /// `{code, message, param}` of a failed job.
    pub error: Option<Value>,
    /// Tokens trained on.
    pub trained_tokens: Option<u64>,
    /// Result file ids (the metrics CSV).
    pub result_files: Vec<String>,
    /// A request from the API the runner acts on: `cancel` or `pause`.
    pub control: Option<String>,
    /// The worker running it.
    pub worker: Option<String>,
    /// Unix seconds until which the worker's claim holds.
    pub lease_until: u64,
    /// The last training step reported as an event (events are not repeated after a resume).
    pub last_step: u64,
    /// Steps the run plans.
    pub total_steps: Option<u64>,
    /// Unix seconds the job is expected to finish.
    pub estimated_finish: Option<u64>,
    /// Set when `DELETE /v1/models/{id}` removed the fine-tuned model.
    pub model_deleted: bool,
    /// Times the job was started (a resume after a crash or a pause counts).
    pub attempts: u32,
}

/// One job event.
#[derive(Clone, Debug, PartialEq)]
pub struct EventRow {
    /// `ftevent-…`.
    pub id: String,
    /// Unix seconds.
    pub created_at: u64,
    /// `info`, `warn`, `error`.
    pub level: String,
    /// What happened.
    pub message: String,
    /// Structured data (metrics events).
    pub data: Option<Value>,
    /// `message` or `metrics`.
    pub kind: String,
}

/// One checkpoint of a job.
#[derive(Clone, Debug, PartialEq)]
pub struct CheckpointRow {
    /// `ftckpt-…`.
    pub id: String,
    /// The job.
    pub job_id: String,
    /// Optimizer step.
    pub step: u64,
    /// Unix seconds.
    pub created_at: u64,
    /// OpenAI's checkpoint metrics object.
    pub metrics: Value,
    /// `ft:…:ckpt-step-N`.
    pub model_id: String,
}

/// The SQLite state of the jobs service.
pub struct Store {
    conn: Mutex<Connection>,
}

fn db_err(e: rusqlite::Error) -> JobsError {
    JobsError::internal(format!("state database: {e}"))
}

fn json_err(e: serde_json::Error) -> JobsError {
    JobsError::internal(format!("state database: a stored document does not parse: {e}"))
}

/// A page of a listing: the rows and whether more follow.
pub type Page<T> = (Vec<T>, bool);

impl Store {
    /// Opens (creating) the database at `path` and applies pending migrations.
    pub fn open(path: &Path) -> Result<Store, JobsError> {
        let conn = Connection::open(path)
            .map_err(|e| JobsError::internal(format!("cannot open {}: {e}", path.display())))?;
        conn.busy_timeout(std::time::Duration::from_secs(30))
            .map_err(db_err)?;
        conn.pragma_update(None, "journal_mode", "WAL").map_err(db_err)?;
        conn.pragma_update(None, "synchronous", "FULL").map_err(db_err)?;
        let store = Store {
            conn: Mutex::new(conn),
        };
        store.migrate()?;
        Ok(store)
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn migrate(&self) -> Result<(), JobsError> {
        let mut conn = self.conn();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(db_err)?;
        tx.execute_batch("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            .map_err(db_err)?;
        let version: Option<i64> = tx
            .query_row("SELECT version FROM schema_version", [], |r| r.get(0))
            .optional()
            .map_err(db_err)?;
        let have = version.unwrap_or(0) as usize;
        if have > MIGRATIONS.len() {
            return Err(JobsError::internal(format!(
                "the state database has schema version {have}, newer than this graft knows ({}); use a newer graft",
                MIGRATIONS.len()
            )));
        }
        for m in &MIGRATIONS[have..] {
            tx.execute_batch(m).map_err(db_err)?;
        }
        tx.execute("DELETE FROM schema_version", []).map_err(db_err)?;
        tx.execute(
            "INSERT INTO schema_version (version) VALUES (?1)",
            params![MIGRATIONS.len() as i64],
        )
        .map_err(db_err)?;
        tx.commit().map_err(db_err)
    }

    /// The schema version in use.
    pub fn schema_version(&self) -> Result<usize, JobsError> {
        let v: i64 = self
            .conn()
            .query_row("SELECT version FROM schema_version", [], |r| r.get(0))
            .map_err(db_err)?;
        Ok(v as usize)
    }

    fn next_seq(conn: &Connection, table: &str) -> Result<i64, JobsError> {
        conn.query_row(
            &format!("SELECT COALESCE(MAX(seq), 0) + 1 FROM {table}"),
            [],
            |r| r.get(0),
        )
        .map_err(db_err)
    }

    // ----- files -----

    /// Records a file.
    pub fn insert_file(&self, f: &FileRow) -> Result<(), JobsError> {
        let conn = self.conn();
        let seq = Self::next_seq(&conn, "files")?;
        let doc = serde_json::to_string(f).map_err(json_err)?;
        conn.execute(
            "INSERT INTO files (id, seq, project, doc, purpose) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![f.id, seq, f.project, doc, f.purpose],
        )
        .map_err(db_err)?;
        Ok(())
    }

    /// The file `id` of `project` (deleted files are gone).
    pub fn get_file(&self, project: &str, id: &str) -> Result<Option<FileRow>, JobsError> {
        let doc: Option<String> = self
            .conn()
            .query_row(
                "SELECT doc FROM files WHERE id = ?1 AND project = ?2 AND deleted = 0",
                params![id, project],
                |r| r.get(0),
            )
            .optional()
            .map_err(db_err)?;
        doc.map(|d| serde_json::from_str(&d).map_err(json_err))
            .transpose()
    }

    /// A project's files, newest first (`ascending`: oldest first), after the file `after`.
    pub fn list_files(
        &self,
        project: &str,
        purpose: Option<&str>,
        after: Option<&str>,
        limit: usize,
        ascending: bool,
    ) -> Result<Page<FileRow>, JobsError> {
        let conn = self.conn();
        let after_seq: Option<i64> = match after {
            Some(a) => conn
                .query_row(
                    "SELECT seq FROM files WHERE id = ?1 AND project = ?2",
                    params![a, project],
                    |r| r.get(0),
                )
                .optional()
                .map_err(db_err)?,
            None => None,
        };
        let (cmp, order) = if ascending { (">", "ASC") } else { ("<", "DESC") };
        let sql = format!(
            "SELECT doc FROM files WHERE project = ?1 AND deleted = 0 AND (?2 IS NULL OR purpose = ?2)
             AND (?3 IS NULL OR seq {cmp} ?3) ORDER BY seq {order} LIMIT ?4"
        );
        let mut stmt = conn.prepare(&sql).map_err(db_err)?;
        let rows = stmt
            .query_map(params![project, purpose, after_seq, (limit + 1) as i64], |r| {
                r.get::<_, String>(0)
            })
            .map_err(db_err)?;
        let mut out = Vec::new();
        for r in rows {
            out.push(serde_json::from_str(&r.map_err(db_err)?).map_err(json_err)?);
        }
        let more = out.len() > limit;
        out.truncate(limit);
        Ok((out, more))
    }

    /// Marks a file deleted; false when `project` has no such file.
    pub fn delete_file(&self, project: &str, id: &str) -> Result<bool, JobsError> {
        let n = self
            .conn()
            .execute(
                "UPDATE files SET deleted = 1 WHERE id = ?1 AND project = ?2 AND deleted = 0",
                params![id, project],
            )
            .map_err(db_err)?;
        Ok(n > 0)
    }

    // ----- jobs -----

    /// Records a new job.
    pub fn insert_job(&self, j: &JobRow) -> Result<(), JobsError> {
        let conn = self.conn();
        let seq = Self::next_seq(&conn, "jobs")?;
        let doc = serde_json::to_string(j).map_err(json_err)?;
        conn.execute(
            "INSERT INTO jobs (id, seq, project, status, worker, lease_until, doc) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![j.id, seq, j.project, j.status, j.worker, j.lease_until as i64, doc],
        )
        .map_err(db_err)?;
        Ok(())
    }

    /// The job `id` (of `project`, when given).
    pub fn get_job(&self, project: Option<&str>, id: &str) -> Result<Option<JobRow>, JobsError> {
        let doc: Option<String> = self
            .conn()
            .query_row(
                "SELECT doc FROM jobs WHERE id = ?1 AND (?2 IS NULL OR project = ?2)",
                params![id, project],
                |r| r.get(0),
            )
            .optional()
            .map_err(db_err)?;
        doc.map(|d| serde_json::from_str(&d).map_err(json_err))
            .transpose()
    }

    /// A project's jobs, newest first, after the job `after`, those whose metadata holds every
    /// pair of `metadata`.
    pub fn list_jobs(
        &self,
        project: &str,
        after: Option<&str>,
        limit: usize,
        metadata: &[(String, String)],
    ) -> Result<Page<JobRow>, JobsError> {
        let conn = self.conn();
        let after_seq: Option<i64> = match after {
            Some(a) => conn
                .query_row(
                    "SELECT seq FROM jobs WHERE id = ?1 AND project = ?2",
                    params![a, project],
                    |r| r.get(0),
                )
                .optional()
                .map_err(db_err)?,
            None => None,
        };
        let mut stmt = conn
            .prepare("SELECT doc FROM jobs WHERE project = ?1 AND (?2 IS NULL OR seq < ?2) ORDER BY seq DESC")
            .map_err(db_err)?;
        let rows = stmt
            .query_map(params![project, after_seq], |r| r.get::<_, String>(0))
            .map_err(db_err)?;
        let mut out = Vec::new();
        for r in rows {
            let job: JobRow = serde_json::from_str(&r.map_err(db_err)?).map_err(json_err)?;
            let matches = metadata.iter().all(|(k, v)| {
                job.metadata
                    .as_ref()
                    .and_then(|m| m.get(k))
                    .and_then(Value::as_str)
                    == Some(v.as_str())
            });
            if matches {
                out.push(job);
                if out.len() > limit {
                    break;
                }
            }
        }
        let more = out.len() > limit;
        out.truncate(limit);
        Ok((out, more))
    }

    /// Reads job `id`, lets `f` change it, writes it back — in one transaction. Returns the
    /// job as written, or `None` when there is no such job.
    pub fn modify_job<R>(
        &self,
        id: &str,
        f: impl FnOnce(&mut JobRow) -> R,
    ) -> Result<Option<(JobRow, R)>, JobsError> {
        let mut conn = self.conn();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(db_err)?;
        let doc: Option<String> = tx
            .query_row("SELECT doc FROM jobs WHERE id = ?1", params![id], |r| r.get(0))
            .optional()
            .map_err(db_err)?;
        let Some(doc) = doc else {
            return Ok(None);
        };
        let mut job: JobRow = serde_json::from_str(&doc).map_err(json_err)?;
        let r = f(&mut job);
        let doc = serde_json::to_string(&job).map_err(json_err)?;
        tx.execute(
            "UPDATE jobs SET status = ?2, worker = ?3, lease_until = ?4, doc = ?5 WHERE id = ?1",
            params![job.id, job.status, job.worker, job.lease_until as i64, doc],
        )
        .map_err(db_err)?;
        tx.commit().map_err(db_err)?;
        Ok(Some((job, r)))
    }

    /// Claims the oldest queued job for `worker` until `lease_until`: it becomes `running`.
    pub fn claim_job(&self, worker: &str, lease_until: u64) -> Result<Option<JobRow>, JobsError> {
        let id: Option<String> = self
            .conn()
            .query_row(
                "SELECT id FROM jobs WHERE status = 'queued' ORDER BY seq LIMIT 1",
                [],
                |r| r.get(0),
            )
            .optional()
            .map_err(db_err)?;
        let Some(id) = id else {
            return Ok(None);
        };
        let claimed = self.modify_job(&id, |j| {
            if j.status != "queued" {
                return false;
            }
            j.status = "running".into();
            j.worker = Some(worker.to_string());
            j.lease_until = lease_until;
            j.attempts += 1;
            true
        })?;
        Ok(claimed.and_then(|(j, ok)| ok.then_some(j)))
    }

    /// Jobs `running` whose lease ended before `now` (their worker died), or held by `worker`
    /// (this process before a restart), go back to `queued`; returns their ids.
    pub fn requeue_orphans(&self, now: u64, worker: Option<&str>) -> Result<Vec<String>, JobsError> {
        let ids: Vec<String> = {
            let conn = self.conn();
            let mut stmt = conn
                .prepare(
                    "SELECT id FROM jobs WHERE status = 'running' AND (lease_until < ?1 OR (?2 IS NOT NULL AND worker = ?2))",
                )
                .map_err(db_err)?;
            let rows = stmt
                .query_map(params![now.min(i64::MAX as u64) as i64, worker], |r| {
                    r.get::<_, String>(0)
                })
                .map_err(db_err)?;
            rows.collect::<Result<_, _>>().map_err(db_err)?
        };
        let mut out = Vec::new();
        for id in ids {
            let changed = self.modify_job(&id, |j| {
                if j.status != "running" {
                    return false;
                }
                j.status = "queued".into();
                j.worker = None;
                j.lease_until = 0;
                true
            })?;
            if matches!(changed, Some((_, true))) {
                out.push(id);
            }
        }
        Ok(out)
    }

    // ----- events -----

    /// Appends an event to job `job_id`.
    pub fn add_event(&self, job_id: &str, e: &EventRow) -> Result<(), JobsError> {
        let data = e
            .data
            .as_ref()
            .map(serde_json::to_string)
            .transpose()
            .map_err(json_err)?;
        self.conn()
            .execute(
                "INSERT INTO events (id, job_id, created_at, level, message, data, kind) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![e.id, job_id, e.created_at as i64, e.level, e.message, data, e.kind],
            )
            .map_err(db_err)?;
        Ok(())
    }

    /// A job's events, newest first, after the event `after`.
    pub fn list_events(
        &self,
        job_id: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Page<EventRow>, JobsError> {
        let conn = self.conn();
        let after_seq: Option<i64> = match after {
            Some(a) => conn
                .query_row(
                    "SELECT seq FROM events WHERE id = ?1 AND job_id = ?2",
                    params![a, job_id],
                    |r| r.get(0),
                )
                .optional()
                .map_err(db_err)?,
            None => None,
        };
        let mut stmt = conn
            .prepare(
                "SELECT id, created_at, level, message, data, kind FROM events
                 WHERE job_id = ?1 AND (?2 IS NULL OR seq < ?2) ORDER BY seq DESC LIMIT ?3",
            )
            .map_err(db_err)?;
        let rows = stmt
            .query_map(params![job_id, after_seq, (limit + 1) as i64], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, Option<String>>(4)?,
                    r.get::<_, String>(5)?,
                ))
            })
            .map_err(db_err)?;
        let mut out = Vec::new();
        for r in rows {
            let (id, created_at, level, message, data, kind) = r.map_err(db_err)?;
            let data = data
                .map(|d| serde_json::from_str(&d))
                .transpose()
                .map_err(json_err)?;
            out.push(EventRow {
                id,
                created_at: created_at as u64,
                level,
                message,
                data,
                kind,
            });
        }
        let more = out.len() > limit;
        out.truncate(limit);
        Ok((out, more))
    }

    // ----- checkpoints -----

    /// Records a checkpoint; false when the job already has one at that step.
    pub fn add_checkpoint(&self, c: &CheckpointRow) -> Result<bool, JobsError> {
        let metrics = serde_json::to_string(&c.metrics).map_err(json_err)?;
        let n = self
            .conn()
            .execute(
                "INSERT OR IGNORE INTO checkpoints (id, job_id, step, created_at, metrics, model_id) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![c.id, c.job_id, c.step as i64, c.created_at as i64, metrics, c.model_id],
            )
            .map_err(db_err)?;
        Ok(n > 0)
    }

    /// Removes the checkpoint records of `job_id` whose step is not in `keep` (pruned on disk).
    pub fn prune_checkpoints(&self, job_id: &str, keep: &[u64]) -> Result<(), JobsError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare("SELECT step FROM checkpoints WHERE job_id = ?1")
            .map_err(db_err)?;
        let steps: Vec<i64> = stmt
            .query_map(params![job_id], |r| r.get(0))
            .map_err(db_err)?
            .collect::<Result<_, _>>()
            .map_err(db_err)?;
        for s in steps {
            if !keep.contains(&(s as u64)) {
                conn.execute(
                    "DELETE FROM checkpoints WHERE job_id = ?1 AND step = ?2",
                    params![job_id, s],
                )
                .map_err(db_err)?;
            }
        }
        Ok(())
    }

    /// A job's checkpoints, newest first, after the checkpoint `after`.
    pub fn list_checkpoints(
        &self,
        job_id: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Page<CheckpointRow>, JobsError> {
        let conn = self.conn();
        let after_step: Option<i64> = match after {
            Some(a) => conn
                .query_row(
                    "SELECT step FROM checkpoints WHERE id = ?1 AND job_id = ?2",
                    params![a, job_id],
                    |r| r.get(0),
                )
                .optional()
                .map_err(db_err)?,
            None => None,
        };
        let mut stmt = conn
            .prepare(
                "SELECT id, step, created_at, metrics, model_id FROM checkpoints
                 WHERE job_id = ?1 AND (?2 IS NULL OR step < ?2) ORDER BY step DESC LIMIT ?3",
            )
            .map_err(db_err)?;
        let rows = stmt
            .query_map(params![job_id, after_step, (limit + 1) as i64], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, i64>(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, String>(4)?,
                ))
            })
            .map_err(db_err)?;
        let mut out = Vec::new();
        for r in rows {
            let (id, step, created_at, metrics, model_id) = r.map_err(db_err)?;
            out.push(CheckpointRow {
                id,
                job_id: job_id.to_string(),
                step: step as u64,
                created_at: created_at as u64,
                metrics: serde_json::from_str(&metrics).map_err(json_err)?,
                model_id,
            });
        }
        let more = out.len() > limit;
        out.truncate(limit);
        Ok((out, more))
    }

    /// Every job (of `project`, when given) that has a fine-tuned model not deleted, newest first.
    pub fn jobs_with_models(&self, project: Option<&str>) -> Result<Vec<JobRow>, JobsError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare(
                "SELECT doc FROM jobs WHERE status = 'succeeded' AND (?1 IS NULL OR project = ?1) ORDER BY seq DESC",
            )
            .map_err(db_err)?;
        let rows = stmt
            .query_map(params![project], |r| r.get::<_, String>(0))
            .map_err(db_err)?;
        let mut out = Vec::new();
        for r in rows {
            let j: JobRow = serde_json::from_str(&r.map_err(db_err)?).map_err(json_err)?;
            if j.fine_tuned_model.is_some() && !j.model_deleted {
                out.push(j);
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("graft-store-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d.join("db.sqlite")
    }

    fn job(id: &str) -> JobRow {
        JobRow {
            id: id.into(),
            project: "p".into(),
            status: "queued".into(),
            ..JobRow::default()
        }
    }

    #[test]
    fn migrations_apply_once_and_state_survives_reopening() {
        let path = tmp("migrate");
        let s = Store::open(&path).unwrap();
        assert_eq!(s.schema_version().unwrap(), MIGRATIONS.len());
        s.insert_job(&job("ftjob-a")).unwrap();
        drop(s);
        let s = Store::open(&path).unwrap();
        assert_eq!(s.schema_version().unwrap(), MIGRATIONS.len());
        assert_eq!(s.get_job(Some("p"), "ftjob-a").unwrap().unwrap().status, "queued");
        assert!(s.get_job(Some("other"), "ftjob-a").unwrap().is_none());
    }

    #[test]
    fn claims_take_the_oldest_queued_job_once_and_orphans_return() {
        let s = Store::open(&tmp("claim")).unwrap();
        for id in ["ftjob-1", "ftjob-2"] {
            s.insert_job(&job(id)).unwrap();
        }
        let a = s.claim_job("w1", 100).unwrap().unwrap();
        assert_eq!(
            (a.id.as_str(), a.status.as_str(), a.attempts),
            ("ftjob-1", "running", 1)
        );
        let b = s.claim_job("w2", 100).unwrap().unwrap();
        assert_eq!(b.id, "ftjob-2");
        assert!(s.claim_job("w3", 100).unwrap().is_none());
        // w1's lease ran out at 100; w2 renews.
        s.modify_job("ftjob-2", |j| j.lease_until = 500).unwrap();
        assert_eq!(s.requeue_orphans(200, None).unwrap(), vec!["ftjob-1".to_string()]);
        assert_eq!(s.claim_job("w3", 300).unwrap().unwrap().attempts, 2);
        // A restarted in-process server takes back everything marked running.
        let mut back = s.requeue_orphans(u64::MAX, None).unwrap();
        back.sort();
        assert_eq!(back, vec!["ftjob-1".to_string(), "ftjob-2".to_string()]);
    }

    #[test]
    fn pages_and_checkpoints() {
        let s = Store::open(&tmp("pages")).unwrap();
        for i in 0..5 {
            s.insert_job(&job(&format!("ftjob-{i}"))).unwrap();
        }
        let (p1, more) = s.list_jobs("p", None, 2, &[]).unwrap();
        assert_eq!(
            p1.iter().map(|j| j.id.as_str()).collect::<Vec<_>>(),
            ["ftjob-4", "ftjob-3"]
        );
        assert!(more);
        let (p3, more) = s.list_jobs("p", Some("ftjob-1"), 2, &[]).unwrap();
        assert_eq!(p3.len(), 1);
        assert!(!more);
        let c = |step: u64| CheckpointRow {
            id: format!("ftckpt-{step}"),
            job_id: "ftjob-0".into(),
            step,
            created_at: 0,
            metrics: serde_json::json!({}),
            model_id: format!("m:ckpt-step-{step}"),
        };
        assert!(s.add_checkpoint(&c(5)).unwrap());
        assert!(!s.add_checkpoint(&c(5)).unwrap(), "one record per step");
        s.add_checkpoint(&c(10)).unwrap();
        s.prune_checkpoints("ftjob-0", &[10]).unwrap();
        let (rows, _) = s.list_checkpoints("ftjob-0", None, 10).unwrap();
        assert_eq!(rows.iter().map(|r| r.step).collect::<Vec<_>>(), [10]);
    }
}
