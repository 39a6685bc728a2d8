//! The two databases the jobs state can live in — SQLite (one server, a file in the state
//! directory) and PostgreSQL (a server and any number of `graft worker`s) — behind one small
//! interface: statements with `$1…` parameters of two types (64-bit integers and text), run
//! inside a transaction. [`crate::store::Store`] is written once against it.

use crate::JobsError;

/// A statement parameter.
#[derive(Clone, Debug)]
pub enum P<'a> {
    /// An integer (`BIGINT` / `INTEGER`).
    I(i64),
    /// A text value, or NULL.
    T(Option<&'a str>),
    /// An integer, or NULL.
    OI(Option<i64>),
}

/// A result cell.
#[derive(Clone, Debug, PartialEq)]
pub enum V {
    /// An integer column (NULL as `None`).
    I(Option<i64>),
    /// A text column (NULL as `None`).
    T(Option<String>),
}

impl V {
    /// The text of a text cell (empty for NULL or an integer).
    pub fn text(&self) -> String {
        match self {
            V::T(Some(s)) => s.clone(),
            _ => String::new(),
        }
    }

    /// The text of a text cell, NULL as `None`.
    pub fn opt_text(&self) -> Option<String> {
        match self {
            V::T(s) => s.clone(),
            V::I(_) => None,
        }
    }

    /// The value of an integer cell (0 for NULL or text).
    pub fn int(&self) -> i64 {
        match self {
            V::I(Some(i)) => *i,
            _ => 0,
        }
    }
}

/// What a result column holds.
#[derive(Clone, Copy, Debug)]
pub enum Col {
    /// Integer.
    I,
    /// Text.
    T,
}

/// Statements inside one transaction.
pub trait Sql {
    /// Runs a statement; returns the rows it changed.
    fn exec(&mut self, sql: &str, params: &[P]) -> Result<u64, JobsError>;
    /// Runs a query whose columns are `cols`.
    fn rows(&mut self, sql: &str, params: &[P], cols: &[Col]) -> Result<Vec<Vec<V>>, JobsError>;
    /// ` FOR UPDATE` on PostgreSQL (rows locked for the transaction), empty on SQLite (whose
    /// write transactions are exclusive already).
    fn for_update(&self) -> &'static str;
    /// ` FOR UPDATE SKIP LOCKED` on PostgreSQL, empty on SQLite.
    fn skip_locked(&self) -> &'static str;
    /// Whether this is PostgreSQL.
    fn is_postgres(&self) -> bool {
        !self.for_update().is_empty()
    }
}

fn db_err(e: impl std::fmt::Display) -> JobsError {
    JobsError::internal(format!("state database: {e}"))
}

/// Schema migrations of SQLite, in order; `schema_version` records how many have run.
pub const SQLITE_MIGRATIONS: &[&str] = &["CREATE TABLE files (
        id TEXT PRIMARY KEY, seq INTEGER NOT NULL, project TEXT NOT NULL, doc TEXT NOT NULL,
        purpose TEXT NOT NULL, deleted INTEGER NOT NULL DEFAULT 0);
    CREATE INDEX files_project ON files(project, seq);
    CREATE TABLE jobs (
        id TEXT PRIMARY KEY, seq INTEGER NOT NULL, project TEXT NOT NULL, status TEXT NOT NULL,
        worker TEXT, lease_until INTEGER NOT NULL DEFAULT 0, doc TEXT NOT NULL);
    CREATE INDEX jobs_project ON jobs(project, seq);
    CREATE INDEX jobs_status ON jobs(status, seq);
    CREATE TABLE events (
        seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE, job_id TEXT NOT NULL,
        created_at INTEGER NOT NULL, level TEXT NOT NULL, message TEXT NOT NULL, data TEXT,
        kind TEXT NOT NULL);
    CREATE INDEX events_job ON events(job_id, seq);
    CREATE TABLE checkpoints (
        id TEXT PRIMARY KEY, job_id TEXT NOT NULL, step INTEGER NOT NULL,
        created_at INTEGER NOT NULL, metrics TEXT NOT NULL, model_id TEXT NOT NULL UNIQUE,
        UNIQUE(job_id, step));"];

/// Schema migrations of PostgreSQL, in order (the same tables as [`SQLITE_MIGRATIONS`]).
pub const POSTGRES_MIGRATIONS: &[&str] = &["CREATE TABLE files (
        id TEXT PRIMARY KEY, seq BIGINT NOT NULL, project TEXT NOT NULL, doc TEXT NOT NULL,
        purpose TEXT NOT NULL, deleted BIGINT NOT NULL DEFAULT 0);
    CREATE INDEX files_project ON files(project, seq);
    CREATE TABLE jobs (
        id TEXT PRIMARY KEY, seq BIGINT NOT NULL, project TEXT NOT NULL, status TEXT NOT NULL,
        worker TEXT, lease_until BIGINT NOT NULL DEFAULT 0, doc TEXT NOT NULL);
    CREATE INDEX jobs_project ON jobs(project, seq);
    CREATE INDEX jobs_status ON jobs(status, seq);
    CREATE TABLE events (
        seq BIGSERIAL PRIMARY KEY, id TEXT NOT NULL UNIQUE, job_id TEXT NOT NULL,
        created_at BIGINT NOT NULL, level TEXT NOT NULL, message TEXT NOT NULL, data TEXT,
        kind TEXT NOT NULL);
    CREATE INDEX events_job ON events(job_id, seq);
    CREATE TABLE checkpoints (
        id TEXT PRIMARY KEY, job_id TEXT NOT NULL, step BIGINT NOT NULL,
        created_at BIGINT NOT NULL, metrics TEXT NOT NULL, model_id TEXT NOT NULL UNIQUE,
        UNIQUE(job_id, step));"];

// ----- SQLite -----

struct SqliteTx<'a>(rusqlite::Transaction<'a>);

fn sqlite_params<'a>(params: &'a [P<'a>]) -> Vec<Box<dyn rusqlite::ToSql + 'a>> {
    params
        .iter()
        .map(|p| -> Box<dyn rusqlite::ToSql + 'a> {
            match p {
                P::I(i) => Box::new(*i),
                P::T(t) => Box::new(*t),
                P::OI(i) => Box::new(*i),
            }
        })
        .collect()
}

impl Sql for SqliteTx<'_> {
    fn exec(&mut self, sql: &str, params: &[P]) -> Result<u64, JobsError> {
        let b = sqlite_params(params);
        let refs: Vec<&dyn rusqlite::ToSql> = b.iter().map(|p| p.as_ref()).collect();
        self.0
            .execute(&sql.replace('$', "?"), refs.as_slice())
            .map(|n| n as u64)
            .map_err(db_err)
    }

    fn rows(&mut self, sql: &str, params: &[P], cols: &[Col]) -> Result<Vec<Vec<V>>, JobsError> {
        let b = sqlite_params(params);
        let refs: Vec<&dyn rusqlite::ToSql> = b.iter().map(|p| p.as_ref()).collect();
        let mut stmt = self.0.prepare(&sql.replace('$', "?")).map_err(db_err)?;
        let rows = stmt
            .query_map(refs.as_slice(), |r| {
                cols.iter()
                    .enumerate()
                    .map(|(i, c)| {
                        Ok(match c {
                            Col::I => V::I(r.get(i)?),
                            Col::T => V::T(r.get(i)?),
                        })
                    })
                    .collect::<Result<Vec<V>, rusqlite::Error>>()
            })
            .map_err(db_err)?;
        rows.collect::<Result<_, _>>().map_err(db_err)
    }

    fn for_update(&self) -> &'static str {
        ""
    }

    fn skip_locked(&self) -> &'static str {
        ""
    }
}

// ----- PostgreSQL -----

struct PgTx<'a>(postgres::Transaction<'a>);

fn pg_params<'a>(params: &'a [P<'a>]) -> Vec<Box<dyn postgres::types::ToSql + Sync + 'a>> {
    params
        .iter()
        .map(|p| -> Box<dyn postgres::types::ToSql + Sync + 'a> {
            match p {
                P::I(i) => Box::new(*i),
                P::T(t) => Box::new(*t),
                P::OI(i) => Box::new(*i),
            }
        })
        .collect()
}

impl Sql for PgTx<'_> {
    fn exec(&mut self, sql: &str, params: &[P]) -> Result<u64, JobsError> {
        let b = pg_params(params);
        let refs: Vec<&(dyn postgres::types::ToSql + Sync)> = b.iter().map(|p| p.as_ref()).collect();
        self.0.execute(sql, &refs).map_err(db_err)
    }

    fn rows(&mut self, sql: &str, params: &[P], cols: &[Col]) -> Result<Vec<Vec<V>>, JobsError> {
        let b = pg_params(params);
        let refs: Vec<&(dyn postgres::types::ToSql + Sync)> = b.iter().map(|p| p.as_ref()).collect();
        let rows = self.0.query(sql, &refs).map_err(db_err)?;
        rows.iter()
            .map(|r| {
                cols.iter()
                    .enumerate()
                    .map(|(i, c)| {
                        Ok(match c {
                            Col::I => V::I(r.try_get(i).map_err(db_err)?),
                            Col::T => V::T(r.try_get(i).map_err(db_err)?),
                        })
                    })
                    .collect()
            })
            .collect()
    }

    fn for_update(&self) -> &'static str {
        " FOR UPDATE"
    }

    fn skip_locked(&self) -> &'static str {
        " FOR UPDATE SKIP LOCKED"
    }
}

/// A PostgreSQL client, used on threads of its own: the `postgres` crate drives a private
/// async runtime with `block_on`, which must not happen on a thread of the server's runtime.
pub struct PgClient(Option<postgres::Client>);

impl Drop for PgClient {
    fn drop(&mut self) {
        if let Some(c) = self.0.take() {
            let _ = std::thread::spawn(move || drop(c)).join();
        }
    }
}

/// Runs `f` on a scoped thread of its own (outside any async runtime).
fn off_runtime<T: Send>(f: impl FnOnce() -> T + Send) -> Result<T, JobsError> {
    std::thread::scope(|s| s.spawn(f).join())
        .map_err(|_| JobsError::internal("state database: a PostgreSQL call panicked"))
}

/// A connection to either database.
pub enum Db {
    /// SQLite (one process).
    Sqlite(std::sync::Mutex<rusqlite::Connection>),
    /// PostgreSQL.
    Postgres(std::sync::Mutex<PgClient>),
}

impl Db {
    /// Opens `database`: a `postgres://` / `postgresql://` URL, or else a SQLite file path.
    pub fn open(database: &str) -> Result<Db, JobsError> {
        if database.starts_with("postgres://") || database.starts_with("postgresql://") {
            let client =
                off_runtime(|| postgres::Client::connect(database, postgres::NoTls))?.map_err(|e| {
                    JobsError::internal(format!("cannot connect to the PostgreSQL database: {e}"))
                })?;
            return Ok(Db::Postgres(std::sync::Mutex::new(PgClient(Some(client)))));
        }
        let conn = rusqlite::Connection::open(database)
            .map_err(|e| JobsError::internal(format!("cannot open {database}: {e}")))?;
        conn.busy_timeout(std::time::Duration::from_secs(30))
            .map_err(db_err)?;
        conn.pragma_update(None, "journal_mode", "WAL").map_err(db_err)?;
        conn.pragma_update(None, "synchronous", "FULL").map_err(db_err)?;
        Ok(Db::Sqlite(std::sync::Mutex::new(conn)))
    }

    /// The migrations of this database's dialect.
    pub fn migrations(&self) -> &'static [&'static str] {
        match self {
            Db::Sqlite(_) => SQLITE_MIGRATIONS,
            Db::Postgres(_) => POSTGRES_MIGRATIONS,
        }
    }

    /// Runs `f` in one transaction (SQLite: `BEGIN IMMEDIATE`), committed when it returns Ok.
    pub fn tx<R: Send>(
        &self,
        f: impl FnOnce(&mut dyn Sql) -> Result<R, JobsError> + Send,
    ) -> Result<R, JobsError> {
        match self {
            Db::Sqlite(m) => {
                let mut conn = m.lock().unwrap_or_else(|e| e.into_inner());
                let tx = conn
                    .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
                    .map_err(db_err)?;
                let mut t = SqliteTx(tx);
                let r = f(&mut t)?;
                t.0.commit().map_err(db_err)?;
                Ok(r)
            }
            Db::Postgres(m) => {
                let mut guard = m.lock().unwrap_or_else(|e| e.into_inner());
                let client = guard.0.as_mut().expect("a client until dropped");
                if client.is_closed() {
                    return Err(JobsError::internal(
                        "the connection to the PostgreSQL database was lost; restart this process",
                    ));
                }
                off_runtime(move || {
                    let tx = client.transaction().map_err(db_err)?;
                    let mut t = PgTx(tx);
                    let r = f(&mut t)?;
                    t.0.commit().map_err(db_err)?;
                    Ok(r)
                })?
            }
        }
    }

    /// Runs a batch of statements without parameters (migrations).
    pub fn batch(&self, sql: &str) -> Result<(), JobsError> {
        match self {
            Db::Sqlite(m) => m
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .execute_batch(sql)
                .map_err(db_err),
            Db::Postgres(m) => {
                let mut guard = m.lock().unwrap_or_else(|e| e.into_inner());
                let client = guard.0.as_mut().expect("a client until dropped");
                off_runtime(move || client.batch_execute(sql).map_err(db_err))?
            }
        }
    }
}
