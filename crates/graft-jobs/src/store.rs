//! Where jobs, files, events and checkpoints are kept: a SQLite file in the state directory, or
//! PostgreSQL shared with `graft worker`s ([`crate::sql`]); the schema is versioned and brought
//! up to date when the store is opened.
//!
//! A job is one JSON document ([`JobRow`]) plus the columns the queries filter on (status,
//! project, worker, lease). Every change to a job goes through [`Store::modify_job`], a
//! read-modify-write in one immediate transaction, so the HTTP side (cancel, pause) and the
//! runner (progress, results) never overwrite each other's fields.

use crate::JobsError;
use crate::sql::{Col, Db, P, Sql, V};
use serde::{Deserialize, Serialize};
use serde_json::Value;

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
    /// The served base model's name (the `{base}` of the `ft:` model ids).
    #[serde(default)]
    pub base: String,
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

/// The jobs state in SQLite or PostgreSQL.
pub struct Store {
    db: Db,
}

fn json_err(e: serde_json::Error) -> JobsError {
    JobsError::internal(format!("state database: a stored document does not parse: {e}"))
}

/// A page of a listing: the rows and whether more follow.
pub type Page<T> = (Vec<T>, bool);

fn doc<T: serde::de::DeserializeOwned>(v: &V) -> Result<T, JobsError> {
    serde_json::from_str(&v.text()).map_err(json_err)
}

fn page_of<T>(mut rows: Vec<T>, limit: usize) -> Page<T> {
    let more = rows.len() > limit;
    rows.truncate(limit);
    (rows, more)
}

/// The ordering key (`key`) of row `id` of `table` whose `owner` column is `owner`, for a
/// listing that starts after it. An unknown cursor starts nowhere: an empty page, as OpenAI
/// answers.
fn cursor(
    sql: &mut dyn Sql,
    table: &str,
    key: &str,
    owner: &str,
    id: Option<&str>,
    owner_value: &str,
) -> Result<Option<i64>, JobsError> {
    let Some(id) = id else {
        return Ok(None);
    };
    let rows = sql.rows(
        &format!("SELECT {key} FROM {table} WHERE id = $1 AND {owner} = $2"),
        &[P::T(Some(id)), P::T(Some(owner_value))],
        &[Col::I],
    )?;
    Ok(Some(rows.first().map_or(i64::MIN, |r| r[0].int())))
}

impl Store {
    /// Opens (creating) the database — a SQLite file path or a `postgres://` URL — and applies
    /// pending migrations (under a lock on PostgreSQL, so processes starting together agree).
    pub fn open(database: &str) -> Result<Store, JobsError> {
        let db = Db::open(database)?;
        let store = Store { db };
        store.migrate()?;
        Ok(store)
    }

    /// Whether the state is in PostgreSQL (shared with workers on other machines).
    pub fn is_shared(&self) -> bool {
        matches!(self.db, Db::Postgres(_))
    }

    fn migrate(&self) -> Result<(), JobsError> {
        let migrations = self.db.migrations();
        self.db.tx(|sql| {
            if sql.is_postgres() {
                sql.rows("SELECT pg_advisory_xact_lock(7210315)::TEXT", &[], &[Col::T])?;
            }
            sql.exec("CREATE TABLE IF NOT EXISTS schema_version (version BIGINT NOT NULL)", &[])?;
            let have = sql
                .rows("SELECT version FROM schema_version", &[], &[Col::I])?
                .first()
                .map_or(0, |r| r[0].int()) as usize;
            if have > migrations.len() {
                return Err(JobsError::internal(format!(
                    "the state database has schema version {have}, newer than this graft knows ({}); use a newer graft",
                    migrations.len()
                )));
            }
            for m in &migrations[have..] {
                for stmt in m.split(';').map(str::trim).filter(|s| !s.is_empty()) {
                    sql.exec(stmt, &[])?;
                }
            }
            sql.exec("DELETE FROM schema_version", &[])?;
            sql.exec(
                "INSERT INTO schema_version (version) VALUES ($1)",
                &[P::I(migrations.len() as i64)],
            )?;
            Ok(())
        })
    }

    /// The schema version in use.
    pub fn schema_version(&self) -> Result<usize, JobsError> {
        self.db.tx(|sql| {
            Ok(sql
                .rows("SELECT version FROM schema_version", &[], &[Col::I])?
                .first()
                .map_or(0, |r| r[0].int()) as usize)
        })
    }

    // ----- files -----

    /// Records a file.
    pub fn insert_file(&self, f: &FileRow) -> Result<(), JobsError> {
        let d = serde_json::to_string(f).map_err(json_err)?;
        self.db.tx(|sql| {
            sql.exec(
                "INSERT INTO files (id, seq, project, doc, purpose)
                 VALUES ($1, (SELECT COALESCE(MAX(seq), 0) + 1 FROM files), $2, $3, $4)",
                &[
                    P::T(Some(&f.id)),
                    P::T(Some(&f.project)),
                    P::T(Some(&d)),
                    P::T(Some(&f.purpose)),
                ],
            )
            .map(|_| ())
        })
    }

    /// The file `id` of `project` (deleted files are gone).
    pub fn get_file(&self, project: &str, id: &str) -> Result<Option<FileRow>, JobsError> {
        let rows = self.db.tx(|sql| {
            sql.rows(
                "SELECT doc FROM files WHERE id = $1 AND project = $2 AND deleted = 0",
                &[P::T(Some(id)), P::T(Some(project))],
                &[Col::T],
            )
        })?;
        rows.first().map(|r| doc(&r[0])).transpose()
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
        let (cmp, order) = if ascending { (">", "ASC") } else { ("<", "DESC") };
        let rows = self.db.tx(|sql| {
            let after = cursor(sql, "files", "seq", "project", after, project)?;
            sql.rows(
                &format!(
                    "SELECT doc FROM files WHERE project = $1 AND deleted = 0
                     AND (CAST($2 AS TEXT) IS NULL OR purpose = $2)
                     AND (CAST($3 AS BIGINT) IS NULL OR seq {cmp} $3) ORDER BY seq {order} LIMIT $4"
                ),
                &[
                    P::T(Some(project)),
                    P::T(purpose),
                    P::OI(after),
                    P::I(limit as i64 + 1),
                ],
                &[Col::T],
            )
        })?;
        let files = rows.iter().map(|r| doc(&r[0])).collect::<Result<Vec<_>, _>>()?;
        Ok(page_of(files, limit))
    }

    /// Marks a file deleted; false when `project` has no such file.
    pub fn delete_file(&self, project: &str, id: &str) -> Result<bool, JobsError> {
        let n = self.db.tx(|sql| {
            sql.exec(
                "UPDATE files SET deleted = 1 WHERE id = $1 AND project = $2 AND deleted = 0",
                &[P::T(Some(id)), P::T(Some(project))],
            )
        })?;
        Ok(n > 0)
    }

    // ----- jobs -----

    /// Records a new job.
    pub fn insert_job(&self, j: &JobRow) -> Result<(), JobsError> {
        let d = serde_json::to_string(j).map_err(json_err)?;
        self.db.tx(|sql| {
            sql.exec(
                "INSERT INTO jobs (id, seq, project, status, worker, lease_until, doc)
                 VALUES ($1, (SELECT COALESCE(MAX(seq), 0) + 1 FROM jobs), $2, $3, $4, $5, $6)",
                &[
                    P::T(Some(&j.id)),
                    P::T(Some(&j.project)),
                    P::T(Some(&j.status)),
                    P::T(j.worker.as_deref()),
                    P::I(j.lease_until.min(i64::MAX as u64) as i64),
                    P::T(Some(&d)),
                ],
            )
            .map(|_| ())
        })
    }

    /// The job `id` (of `project`, when given).
    pub fn get_job(&self, project: Option<&str>, id: &str) -> Result<Option<JobRow>, JobsError> {
        let rows = self.db.tx(|sql| {
            sql.rows(
                "SELECT doc FROM jobs WHERE id = $1 AND (CAST($2 AS TEXT) IS NULL OR project = $2)",
                &[P::T(Some(id)), P::T(project)],
                &[Col::T],
            )
        })?;
        rows.first().map(|r| doc(&r[0])).transpose()
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
        let rows = self.db.tx(|sql| {
            let after = cursor(sql, "jobs", "seq", "project", after, project)?;
            sql.rows(
                "SELECT doc FROM jobs WHERE project = $1 AND (CAST($2 AS BIGINT) IS NULL OR seq < $2) ORDER BY seq DESC",
                &[P::T(Some(project)), P::OI(after)],
                &[Col::T],
            )
        })?;
        let mut out = Vec::new();
        for r in &rows {
            let job: JobRow = doc(&r[0])?;
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
        Ok(page_of(out, limit))
    }

    /// Reads job `id`, lets `f` change it, writes it back — in one transaction (the row locked
    /// on PostgreSQL). Returns the job as written, or `None` when there is no such job.
    pub fn modify_job<R: Send>(
        &self,
        id: &str,
        f: impl FnOnce(&mut JobRow) -> R + Send,
    ) -> Result<Option<(JobRow, R)>, JobsError> {
        self.db.tx(|sql| {
            let q = format!("SELECT doc FROM jobs WHERE id = $1{}", sql.for_update());
            let rows = sql.rows(&q, &[P::T(Some(id))], &[Col::T])?;
            let Some(row) = rows.first() else {
                return Ok(None);
            };
            let mut job: JobRow = doc(&row[0])?;
            let r = f(&mut job);
            write_job(sql, &job)?;
            Ok(Some((job, r)))
        })
    }

    /// Claims the oldest queued job for `worker` until `lease_until`: it becomes `running`.
    /// On PostgreSQL, workers claiming at once skip each other's rows (`SKIP LOCKED`).
    pub fn claim_job(&self, worker: &str, lease_until: u64) -> Result<Option<JobRow>, JobsError> {
        self.db.tx(|sql| {
            let q = format!(
                "SELECT doc FROM jobs WHERE status = 'queued' ORDER BY seq LIMIT 1{}",
                sql.skip_locked()
            );
            let rows = sql.rows(&q, &[], &[Col::T])?;
            let Some(row) = rows.first() else {
                return Ok(None);
            };
            let mut job: JobRow = doc(&row[0])?;
            job.status = "running".into();
            job.worker = Some(worker.to_string());
            job.lease_until = lease_until;
            job.attempts += 1;
            write_job(sql, &job)?;
            Ok(Some(job))
        })
    }

    /// Jobs `running` whose lease ended before `now` (their worker died) go back to `queued`;
    /// returns their ids.
    pub fn requeue_orphans(&self, now: u64) -> Result<Vec<String>, JobsError> {
        self.db.tx(|sql| {
            let q = format!(
                "SELECT doc FROM jobs WHERE status = 'running' AND lease_until < $1{}",
                sql.skip_locked()
            );
            let rows = sql.rows(&q, &[P::I(now.min(i64::MAX as u64) as i64)], &[Col::T])?;
            let mut out = Vec::new();
            for r in &rows {
                let mut job: JobRow = doc(&r[0])?;
                job.status = "queued".into();
                job.worker = None;
                job.lease_until = 0;
                write_job(sql, &job)?;
                out.push(job.id);
            }
            Ok(out)
        })
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
        self.db.tx(|sql| {
            sql.exec(
                "INSERT INTO events (id, job_id, created_at, level, message, data, kind) VALUES ($1, $2, $3, $4, $5, $6, $7)",
                &[
                    P::T(Some(&e.id)),
                    P::T(Some(job_id)),
                    P::I(e.created_at as i64),
                    P::T(Some(&e.level)),
                    P::T(Some(&e.message)),
                    P::T(data.as_deref()),
                    P::T(Some(&e.kind)),
                ],
            )
            .map(|_| ())
        })
    }

    /// A job's events, newest first, after the event `after`.
    pub fn list_events(
        &self,
        job_id: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Page<EventRow>, JobsError> {
        let rows = self.db.tx(|sql| {
            let after = cursor(sql, "events", "seq", "job_id", after, job_id)?;
            sql.rows(
                "SELECT id, created_at, level, message, data, kind FROM events
                 WHERE job_id = $1 AND (CAST($2 AS BIGINT) IS NULL OR seq < $2) ORDER BY seq DESC LIMIT $3",
                &[P::T(Some(job_id)), P::OI(after), P::I(limit as i64 + 1)],
                &[Col::T, Col::I, Col::T, Col::T, Col::T, Col::T],
            )
        })?;
        let mut out = Vec::new();
        for r in &rows {
            let data = r[4]
                .opt_text()
                .map(|d| serde_json::from_str(&d))
                .transpose()
                .map_err(json_err)?;
            out.push(EventRow {
                id: r[0].text(),
                created_at: r[1].int() as u64,
                level: r[2].text(),
                message: r[3].text(),
                data,
                kind: r[5].text(),
            });
        }
        Ok(page_of(out, limit))
    }

    // ----- checkpoints -----

    /// Records a checkpoint; false when the job already has one at that step.
    pub fn add_checkpoint(&self, c: &CheckpointRow) -> Result<bool, JobsError> {
        let metrics = serde_json::to_string(&c.metrics).map_err(json_err)?;
        let n = self.db.tx(|sql| {
            sql.exec(
                "INSERT INTO checkpoints (id, job_id, step, created_at, metrics, model_id)
                 VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING",
                &[
                    P::T(Some(&c.id)),
                    P::T(Some(&c.job_id)),
                    P::I(c.step as i64),
                    P::I(c.created_at as i64),
                    P::T(Some(&metrics)),
                    P::T(Some(&c.model_id)),
                ],
            )
        })?;
        Ok(n > 0)
    }

    /// Removes the checkpoint records of `job_id` whose step is not in `keep` (pruned on disk).
    pub fn prune_checkpoints(&self, job_id: &str, keep: &[u64]) -> Result<(), JobsError> {
        self.db.tx(|sql| {
            let steps = sql.rows(
                "SELECT step FROM checkpoints WHERE job_id = $1",
                &[P::T(Some(job_id))],
                &[Col::I],
            )?;
            for r in steps {
                let s = r[0].int();
                if !keep.contains(&(s as u64)) {
                    sql.exec(
                        "DELETE FROM checkpoints WHERE job_id = $1 AND step = $2",
                        &[P::T(Some(job_id)), P::I(s)],
                    )?;
                }
            }
            Ok(())
        })
    }

    /// A job's checkpoints, newest first, after the checkpoint `after`.
    pub fn list_checkpoints(
        &self,
        job_id: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Page<CheckpointRow>, JobsError> {
        let rows = self.db.tx(|sql| {
            let after = cursor(sql, "checkpoints", "step", "job_id", after, job_id)?;
            sql.rows(
                "SELECT id, step, created_at, metrics, model_id FROM checkpoints
                 WHERE job_id = $1 AND (CAST($2 AS BIGINT) IS NULL OR step < $2) ORDER BY step DESC LIMIT $3",
                &[P::T(Some(job_id)), P::OI(after), P::I(limit as i64 + 1)],
                &[Col::T, Col::I, Col::I, Col::T, Col::T],
            )
        })?;
        let mut out = Vec::new();
        for r in &rows {
            out.push(CheckpointRow {
                id: r[0].text(),
                job_id: job_id.to_string(),
                step: r[1].int() as u64,
                created_at: r[2].int() as u64,
                metrics: doc(&r[3])?,
                model_id: r[4].text(),
            });
        }
        Ok(page_of(out, limit))
    }

    /// Every job (of `project`, when given) that has a fine-tuned model not deleted, newest first.
    pub fn jobs_with_models(&self, project: Option<&str>) -> Result<Vec<JobRow>, JobsError> {
        let rows = self.db.tx(|sql| {
            sql.rows(
                "SELECT doc FROM jobs WHERE status = 'succeeded' AND (CAST($1 AS TEXT) IS NULL OR project = $1) ORDER BY seq DESC",
                &[P::T(project)],
                &[Col::T],
            )
        })?;
        let mut out = Vec::new();
        for r in &rows {
            let j: JobRow = doc(&r[0])?;
            if j.fine_tuned_model.is_some() && !j.model_deleted {
                out.push(j);
            }
        }
        Ok(out)
    }
}

fn write_job(sql: &mut dyn Sql, job: &JobRow) -> Result<(), JobsError> {
    let d = serde_json::to_string(job).map_err(json_err)?;
    sql.exec(
        "UPDATE jobs SET status = $2, worker = $3, lease_until = $4, doc = $5 WHERE id = $1",
        &[
            P::T(Some(&job.id)),
            P::T(Some(&job.status)),
            P::T(job.worker.as_deref()),
            P::I(job.lease_until.min(i64::MAX as u64) as i64),
            P::T(Some(&d)),
        ],
    )
    .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> String {
        let d = std::env::temp_dir().join(format!("graft-store-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d.join("db.sqlite").display().to_string()
    }

    fn job(id: &str) -> JobRow {
        JobRow {
            id: id.into(),
            project: "p".into(),
            status: "queued".into(),
            ..JobRow::default()
        }
    }

    fn claims_take_the_oldest_queued_job_once_and_orphans_return(s: &Store) {
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
        assert_eq!(s.requeue_orphans(200).unwrap(), vec!["ftjob-1".to_string()]);
        assert_eq!(s.claim_job("w3", 300).unwrap().unwrap().attempts, 2);
        // A restarted in-process server takes back everything marked running.
        let mut back = s.requeue_orphans(u64::MAX).unwrap();
        back.sort();
        assert_eq!(back, vec!["ftjob-1".to_string(), "ftjob-2".to_string()]);
    }

    fn pages_and_checkpoints(s: &Store) {
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
        assert!(s.list_jobs("other", None, 2, &[]).unwrap().0.is_empty());
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
        for i in 0..3 {
            let e = EventRow {
                id: format!("ftevent-{i}"),
                created_at: i,
                level: "info".into(),
                message: format!("m{i}"),
                data: (i == 1).then(|| serde_json::json!({"step": 1})),
                kind: "message".into(),
            };
            s.add_event("ftjob-0", &e).unwrap();
        }
        let (ev, more) = s.list_events("ftjob-0", None, 2).unwrap();
        assert_eq!(
            ev.iter().map(|e| e.message.as_str()).collect::<Vec<_>>(),
            ["m2", "m1"]
        );
        assert!(more);
        assert_eq!(ev[1].data, Some(serde_json::json!({"step": 1})));
        let (ev, more) = s.list_events("ftjob-0", Some("ftevent-1"), 2).unwrap();
        assert_eq!((ev.len(), more), (1, false));
        let f = FileRow {
            id: "file-1".into(),
            project: "p".into(),
            filename: "a.jsonl".into(),
            purpose: "fine-tune".into(),
            bytes: 3,
            created_at: 0,
            kind: None,
            examples: 0,
        };
        s.insert_file(&f).unwrap();
        assert_eq!(
            s.list_files("p", Some("fine-tune"), None, 10, false).unwrap().0,
            vec![f.clone()]
        );
        assert!(
            s.list_files("p", Some("batch"), None, 10, false)
                .unwrap()
                .0
                .is_empty()
        );
        assert!(s.delete_file("p", "file-1").unwrap());
        assert!(s.get_file("p", "file-1").unwrap().is_none());
    }

    #[test]
    fn migrations_apply_once_and_state_survives_reopening() {
        let path = tmp("migrate");
        let s = Store::open(&path).unwrap();
        assert_eq!(s.schema_version().unwrap(), crate::sql::SQLITE_MIGRATIONS.len());
        s.insert_job(&job("ftjob-a")).unwrap();
        drop(s);
        let s = Store::open(&path).unwrap();
        assert_eq!(s.schema_version().unwrap(), crate::sql::SQLITE_MIGRATIONS.len());
        assert_eq!(s.get_job(Some("p"), "ftjob-a").unwrap().unwrap().status, "queued");
        assert!(s.get_job(Some("other"), "ftjob-a").unwrap().is_none());
    }

    #[test]
    fn sqlite_claims() {
        claims_take_the_oldest_queued_job_once_and_orphans_return(&Store::open(&tmp("claim")).unwrap());
    }

    #[test]
    fn sqlite_pages() {
        pages_and_checkpoints(&Store::open(&tmp("pages")).unwrap());
    }

    /// The same on PostgreSQL, when `GRAFT_TEST_DATABASE` names one (its tables are dropped).
    #[test]
    fn postgres_store() {
        let Ok(url) = std::env::var("GRAFT_TEST_DATABASE") else {
            eprintln!("postgres_store: skipping: set GRAFT_TEST_DATABASE=postgres://… to run it");
            return;
        };
        let fresh = || {
            let db = Db::open(&url).unwrap();
            db.batch("DROP TABLE IF EXISTS files, jobs, events, checkpoints, schema_version")
                .unwrap();
            Store::open(&url).unwrap()
        };
        let s = fresh();
        assert_eq!(s.schema_version().unwrap(), crate::sql::POSTGRES_MIGRATIONS.len());
        assert!(s.is_shared());
        drop(s);
        assert_eq!(
            Store::open(&url).unwrap().schema_version().unwrap(),
            crate::sql::POSTGRES_MIGRATIONS.len()
        );
        claims_take_the_oldest_queued_job_once_and_orphans_return(&fresh());
        pages_and_checkpoints(&fresh());
        // Two workers claiming at once get different jobs.
        let s = fresh();
        for i in 0..8 {
            s.insert_job(&job(&format!("ftjob-{i}"))).unwrap();
        }
        let claimed: Vec<String> = std::thread::scope(|sc| {
            let hs: Vec<_> = (0..4)
                .map(|w| {
                    let url = url.clone();
                    sc.spawn(move || {
                        let s = Store::open(&url).unwrap();
                        let mut got = Vec::new();
                        while let Some(j) = s.claim_job(&format!("w{w}"), 100).unwrap() {
                            got.push(j.id);
                        }
                        got
                    })
                })
                .collect();
            hs.into_iter().flat_map(|h| h.join().unwrap()).collect()
        });
        let mut sorted = claimed.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!((claimed.len(), sorted.len()), (8, 8), "{claimed:?}");
    }
}
