//! Checkpoints: atomic directories with a hashed manifest, the trainer state, finding the latest
//! good one, and retention.
//!
//! A checkpoint of step `N` lives in `RUN_DIR/checkpoints/step-N/`. It is written into
//! `checkpoints/.tmp-step-N/` first ([`CheckpointWriter`]); [`CheckpointWriter::commit`] fsyncs every
//! file, writes `manifest.json` (step, each file's size and SHA-256, graft version, config hash),
//! fsyncs it and the directory, and renames the directory into place. A kill at any moment leaves
//! either no `step-N` or a complete one; leftover `.tmp-*` directories are ignored and cleaned up.
//!
//! [`latest_checkpoint`] scans `checkpoints/`, verifies the newest checkpoint's manifest and hashes,
//! and falls back to older ones when it is damaged, reporting what it skipped. [`prune_checkpoints`]
//! keeps the newest `keep` checkpoints and never deletes the newest good one.
//!
//! What a checkpoint holds is up to the loop; the usual files are [`TRAINER_STATE_FILE`],
//! [`OPTIMIZER_FILE`] and [`ADAPTER_FILE`] or [`MODEL_FILE`].

use crate::rng::RngState;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

/// The trainer state file in a checkpoint ([`TrainerState`] as JSON).
pub const TRAINER_STATE_FILE: &str = "trainer_state.json";
/// The optimizer state file in a checkpoint ([`AdamW::write_state_file`](crate::optim::AdamW::write_state_file)).
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
/// The trainable LoRA weights in a checkpoint (graft's own names, `f32`).
pub const ADAPTER_FILE: &str = "adapter.safetensors";
/// The full weights in a checkpoint of a full fine-tuning run (`f32`).
pub const MODEL_FILE: &str = "model.safetensors";
/// The manifest file in a checkpoint.
pub const MANIFEST_FILE: &str = "manifest.json";
/// Format tag of the manifest.
pub const MANIFEST_FORMAT: &str = "graft-checkpoint-v1";

const TMP_PREFIX: &str = ".tmp-";
const STEP_PREFIX: &str = "step-";

/// An error writing, reading or verifying a checkpoint.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// I/O failed on a path.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The manifest is missing or unreadable.
    #[error("{path}: bad manifest: {message}")]
    Manifest {
        /// The manifest file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A file does not match its manifest entry.
    #[error("{path}: {message}")]
    Mismatch {
        /// The file.
        path: PathBuf,
        /// What differs (missing, size, hash).
        message: String,
    },
    /// A file name passed to the writer is not a plain relative path.
    #[error("checkpoint file name `{0}` must be a relative path without `..`")]
    BadName(String),
    /// A JSON file in the checkpoint could not be read.
    #[error("{path}: {message}")]
    Json {
        /// The file.
        path: PathBuf,
        /// The JSON error.
        message: String,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> CheckpointError + '_ {
    move |source| CheckpointError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Where the data loader stands: the epoch and the index of the next example in that epoch's
/// shuffled order.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataPosition {
    /// 0-based epoch.
    pub epoch: u64,
    /// Index of the next example (or packed row) in the epoch's shuffled order.
    pub index: u64,
}

/// Everything besides tensors that a run needs to continue exactly where it stopped.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// Optimizer steps completed.
    pub step: u64,
    /// Total optimizer steps of the run (fixes the schedule).
    pub total_steps: u64,
    /// 0-based epoch in progress.
    pub epoch: u64,
    /// Position of the data loader.
    pub data_position: DataPosition,
    /// State of the run's [`Rng`](crate::rng::Rng) after the last completed step.
    pub rng_state: RngState,
    /// Trained (unmasked) tokens so far.
    pub tokens_seen: u64,
    /// Best evaluation loss so far, if any evaluation ran.
    pub best_eval: Option<f64>,
    /// Step of the best evaluation loss.
    pub best_eval_step: Option<u64>,
    /// Training loss of the last logged step.
    pub last_loss: Option<f64>,
    /// Seconds spent training, summed over sessions.
    pub elapsed_s: f64,
    /// SHA-256 of the resolved config the run started with ([`TrainConfig::hash`](crate::config::TrainConfig::hash)).
    pub config_hash: String,
    /// SHA-256 over the training data files, to detect changed data on resume.
    pub data_hash: String,
}

impl TrainerState {
    /// A state at step 0 for a run of `total_steps` steps.
    pub fn new(total_steps: u64, rng_state: RngState, config_hash: String, data_hash: String) -> Self {
        TrainerState {
            step: 0,
            total_steps,
            epoch: 0,
            data_position: DataPosition::default(),
            rng_state,
            tokens_seen: 0,
            best_eval: None,
            best_eval_step: None,
            last_loss: None,
            elapsed_s: 0.0,
            config_hash,
            data_hash,
        }
    }

    /// Reads the trainer state of a checkpoint directory.
    pub fn read(checkpoint_dir: &Path) -> Result<Self, CheckpointError> {
        let path = checkpoint_dir.join(TRAINER_STATE_FILE);
        let text = std::fs::read_to_string(&path).map_err(io_err(&path))?;
        serde_json::from_str(&text).map_err(|e| CheckpointError::Json {
            path,
            message: e.to_string(),
        })
    }
}

/// One file listed in a manifest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestEntry {
    /// Path relative to the checkpoint directory, `/`-separated.
    pub path: String,
    /// Size in bytes.
    pub bytes: u64,
    /// SHA-256, lowercase hex.
    pub sha256: String,
}

/// `manifest.json`: what a checkpoint holds and how to check it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Always [`MANIFEST_FORMAT`].
    pub format: String,
    /// The step the checkpoint was taken after.
    pub step: u64,
    /// Version of graft that wrote it.
    pub graft_version: String,
    /// SHA-256 of the run's resolved config.
    pub config_hash: String,
    /// Seconds since the Unix epoch when it was committed.
    pub created_unix: u64,
    /// Every file except the manifest, sorted by path.
    pub files: Vec<ManifestEntry>,
}

/// Lowercase hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

fn hex(digest: &[u8]) -> String {
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// Lowercase hex SHA-256 and size of the file at `path`, read in 1 MiB blocks.
pub fn sha256_file(path: &Path) -> Result<(String, u64), CheckpointError> {
    let mut file = File::open(path).map_err(io_err(path))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = file.read(&mut buf).map_err(io_err(path))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        total += n as u64;
    }
    Ok((hex(&hasher.finalize()), total))
}

/// The `checkpoints/` directory of a run.
pub fn checkpoints_dir(run_dir: &Path) -> PathBuf {
    run_dir.join("checkpoints")
}

/// The directory of the checkpoint of `step` in a run.
pub fn checkpoint_dir(run_dir: &Path, step: u64) -> PathBuf {
    checkpoints_dir(run_dir).join(format!("{STEP_PREFIX}{step}"))
}

fn sync_dir(dir: &Path) -> Result<(), CheckpointError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io_err(dir))
}

fn check_name(name: &str) -> Result<(), CheckpointError> {
    let p = Path::new(name);
    let plain = !name.is_empty()
        && name != MANIFEST_FILE
        && p.components()
            .all(|c| matches!(c, std::path::Component::Normal(_)));
    if plain {
        Ok(())
    } else {
        Err(CheckpointError::BadName(name.to_string()))
    }
}

/// Writes one checkpoint into a temporary directory and commits it atomically.
///
/// ```no_run
/// # use graft_train::checkpoint::*;
/// # fn f(run_dir: &std::path::Path, state: &TrainerState) -> Result<(), CheckpointError> {
/// let mut ckpt = CheckpointWriter::begin(run_dir, state.step)?;
/// ckpt.write_json(TRAINER_STATE_FILE, state)?;
/// ckpt.write_bytes(OPTIMIZER_FILE, b"...")?;            // or write into ckpt.path(OPTIMIZER_FILE)
/// let dir = ckpt.commit(&state.config_hash)?;           // checkpoints/step-N
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct CheckpointWriter {
    run_dir: PathBuf,
    step: u64,
    tmp: PathBuf,
}

impl CheckpointWriter {
    /// Starts checkpoint `step` of the run in `run_dir`: creates `checkpoints/.tmp-step-N/`
    /// (replacing a leftover one from an interrupted save).
    pub fn begin(run_dir: &Path, step: u64) -> Result<Self, CheckpointError> {
        let parent = checkpoints_dir(run_dir);
        std::fs::create_dir_all(&parent).map_err(io_err(&parent))?;
        let tmp = parent.join(format!("{TMP_PREFIX}{STEP_PREFIX}{step}"));
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(io_err(&tmp))?;
        }
        std::fs::create_dir(&tmp).map_err(io_err(&tmp))?;
        Ok(CheckpointWriter {
            run_dir: run_dir.to_path_buf(),
            step,
            tmp,
        })
    }

    /// The temporary directory being filled.
    pub fn dir(&self) -> &Path {
        &self.tmp
    }

    /// Where a file `name` (relative, may contain `/`) goes, with its parent directories created;
    /// for writers that need a path (e.g. [`write_f32_file`](crate::tensors::write_f32_file)).
    pub fn path(&self, name: &str) -> Result<PathBuf, CheckpointError> {
        check_name(name)?;
        let path = self.tmp.join(name);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(io_err(parent))?;
        }
        Ok(path)
    }

    /// Writes `bytes` as file `name`.
    pub fn write_bytes(&mut self, name: &str, bytes: &[u8]) -> Result<(), CheckpointError> {
        let path = self.path(name)?;
        std::fs::write(&path, bytes).map_err(io_err(&path))
    }

    /// Writes `value` as pretty JSON to file `name`.
    pub fn write_json<T: Serialize>(&mut self, name: &str, value: &T) -> Result<(), CheckpointError> {
        let mut text = serde_json::to_string_pretty(value).map_err(|e| CheckpointError::Json {
            path: self.tmp.join(name),
            message: e.to_string(),
        })?;
        text.push('\n');
        self.write_bytes(name, text.as_bytes())
    }

    /// Finishes the checkpoint: fsyncs every file, writes the manifest (with `config_hash`),
    /// renames the directory to `checkpoints/step-N` and fsyncs `checkpoints/`. An existing
    /// `step-N` (say, a damaged one a resumed run skipped) is replaced. Returns the final path.
    pub fn commit(self, config_hash: &str) -> Result<PathBuf, CheckpointError> {
        let mut files = Vec::new();
        collect_files(&self.tmp, &self.tmp, &mut files)?;
        files.sort();
        let mut entries = Vec::with_capacity(files.len());
        for rel in files {
            let path = self.tmp.join(&rel);
            File::open(&path)
                .and_then(|f| f.sync_all())
                .map_err(io_err(&path))?;
            let (sha256, bytes) = sha256_file(&path)?;
            entries.push(ManifestEntry {
                path: rel,
                bytes,
                sha256,
            });
        }
        let manifest = Manifest {
            format: MANIFEST_FORMAT.to_string(),
            step: self.step,
            graft_version: env!("CARGO_PKG_VERSION").to_string(),
            config_hash: config_hash.to_string(),
            created_unix: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            files: entries,
        };
        let manifest_path = self.tmp.join(MANIFEST_FILE);
        {
            let mut f = File::create(&manifest_path).map_err(io_err(&manifest_path))?;
            let text = serde_json::to_string_pretty(&manifest).expect("manifest serialises");
            f.write_all(text.as_bytes())
                .and_then(|()| f.write_all(b"\n"))
                .map_err(io_err(&manifest_path))?;
            f.sync_all().map_err(io_err(&manifest_path))?;
        }
        sync_dir(&self.tmp)?;
        let final_dir = checkpoint_dir(&self.run_dir, self.step);
        let parent = checkpoints_dir(&self.run_dir);
        if final_dir.exists() {
            let old = parent.join(format!("{TMP_PREFIX}old-{STEP_PREFIX}{}", self.step));
            if old.exists() {
                std::fs::remove_dir_all(&old).map_err(io_err(&old))?;
            }
            std::fs::rename(&final_dir, &old).map_err(io_err(&final_dir))?;
            std::fs::rename(&self.tmp, &final_dir).map_err(io_err(&final_dir))?;
            std::fs::remove_dir_all(&old).map_err(io_err(&old))?;
        } else {
            std::fs::rename(&self.tmp, &final_dir).map_err(io_err(&final_dir))?;
        }
        sync_dir(&parent)?;
        Ok(final_dir)
    }
}

impl Drop for CheckpointWriter {
    /// A checkpoint that was not committed (a write failed: disk full) leaves no `.tmp-step-N/`
    /// behind; after [`CheckpointWriter::commit`] the directory is gone already.
    fn drop(&mut self) {
        if self.tmp.exists() {
            let _ = std::fs::remove_dir_all(&self.tmp);
        }
    }
}

/// Writes `bytes` to `path` through `path.tmp`, fsync and rename; a failed write leaves no
/// temporary file.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let result = (|| {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

fn collect_files(root: &Path, dir: &Path, out: &mut Vec<String>) -> Result<(), CheckpointError> {
    for entry in std::fs::read_dir(dir).map_err(io_err(dir))? {
        let entry = entry.map_err(io_err(dir))?;
        let path = entry.path();
        let kind = entry.file_type().map_err(io_err(&path))?;
        if kind.is_dir() {
            collect_files(root, &path, out)?;
        } else {
            let rel = path.strip_prefix(root).expect("inside root");
            let rel: Vec<String> = rel
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect();
            let rel = rel.join("/");
            if rel != MANIFEST_FILE {
                out.push(rel);
            }
        }
    }
    Ok(())
}

/// Reads and checks a checkpoint's manifest, then every listed file's size and SHA-256. Returns
/// the manifest when everything matches.
pub fn verify_checkpoint(dir: &Path) -> Result<Manifest, CheckpointError> {
    let manifest = read_manifest(dir)?;
    for entry in &manifest.files {
        check_name(&entry.path)?;
        let path = dir.join(&entry.path);
        let meta = std::fs::metadata(&path).map_err(|e| CheckpointError::Mismatch {
            path: path.clone(),
            message: format!("unreadable: {e}"),
        })?;
        if meta.len() != entry.bytes {
            return Err(CheckpointError::Mismatch {
                path,
                message: format!("size {} bytes, manifest says {}", meta.len(), entry.bytes),
            });
        }
        let (sha, _) = sha256_file(&path)?;
        if sha != entry.sha256 {
            return Err(CheckpointError::Mismatch {
                path,
                message: "SHA-256 differs from the manifest".into(),
            });
        }
    }
    Ok(manifest)
}

/// Reads a checkpoint's `manifest.json` without checking the files.
pub fn read_manifest(dir: &Path) -> Result<Manifest, CheckpointError> {
    let path = dir.join(MANIFEST_FILE);
    let text = std::fs::read_to_string(&path).map_err(|e| CheckpointError::Manifest {
        path: path.clone(),
        message: e.to_string(),
    })?;
    let manifest: Manifest = serde_json::from_str(&text).map_err(|e| CheckpointError::Manifest {
        path: path.clone(),
        message: e.to_string(),
    })?;
    if manifest.format != MANIFEST_FORMAT {
        return Err(CheckpointError::Manifest {
            path,
            message: format!("format `{}`, expected `{MANIFEST_FORMAT}`", manifest.format),
        });
    }
    Ok(manifest)
}

/// The committed checkpoints of a run (`checkpoints/step-N`, ignoring `.tmp-*` and anything else),
/// as `(step, dir)` sorted by step. A run without `checkpoints/` has none.
pub fn list_checkpoints(run_dir: &Path) -> Result<Vec<(u64, PathBuf)>, CheckpointError> {
    let parent = checkpoints_dir(run_dir);
    let entries = match std::fs::read_dir(&parent) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => {
            return Err(CheckpointError::Io {
                path: parent,
                source: e,
            });
        }
    };
    let mut found = Vec::new();
    for entry in entries {
        let entry = entry.map_err(io_err(&parent))?;
        let name = entry.file_name();
        let Some(step) = name
            .to_str()
            .and_then(|n| n.strip_prefix(STEP_PREFIX))
            .and_then(|s| s.parse::<u64>().ok())
        else {
            continue;
        };
        if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            found.push((step, entry.path()));
        }
    }
    found.sort();
    Ok(found)
}

/// A checkpoint whose manifest and hashes verified.
#[derive(Debug)]
pub struct GoodCheckpoint {
    /// The checkpoint directory.
    pub dir: PathBuf,
    /// Its verified manifest.
    pub manifest: Manifest,
}

/// The result of [`latest_checkpoint`]: the newest good checkpoint, and the newer ones that failed.
#[derive(Debug)]
pub struct LatestCheckpoint {
    /// The newest checkpoint that verifies; `None` when no checkpoint does (or there are none).
    pub good: Option<GoodCheckpoint>,
    /// Newer checkpoints that failed verification, newest first, with why; the caller should warn
    /// about each.
    pub skipped: Vec<(PathBuf, CheckpointError)>,
}

/// Finds the newest checkpoint of a run whose manifest and hashes verify, falling back to older
/// ones past damaged ones (which it lists in [`LatestCheckpoint::skipped`]).
pub fn latest_checkpoint(run_dir: &Path) -> Result<LatestCheckpoint, CheckpointError> {
    let mut skipped = Vec::new();
    for (_, dir) in list_checkpoints(run_dir)?.into_iter().rev() {
        match verify_checkpoint(&dir) {
            Ok(manifest) => {
                return Ok(LatestCheckpoint {
                    good: Some(GoodCheckpoint { dir, manifest }),
                    skipped,
                });
            }
            Err(e) => skipped.push((dir, e)),
        }
    }
    Ok(LatestCheckpoint { good: None, skipped })
}

/// Deletes old checkpoints so that the newest `keep` remain (`keep == 0` keeps all), and removes
/// leftover `.tmp-*` directories. The newest checkpoint that verifies is never deleted, even when
/// newer damaged ones fill the `keep` slots. Returns the deleted directories.
pub fn prune_checkpoints(run_dir: &Path, keep: usize) -> Result<Vec<PathBuf>, CheckpointError> {
    let parent = checkpoints_dir(run_dir);
    let mut deleted = Vec::new();
    if let Ok(entries) = std::fs::read_dir(&parent) {
        for entry in entries.flatten() {
            if entry
                .file_name()
                .to_str()
                .is_some_and(|n| n.starts_with(TMP_PREFIX))
            {
                let path = entry.path();
                std::fs::remove_dir_all(&path).map_err(io_err(&path))?;
            }
        }
    }
    if keep == 0 {
        return Ok(deleted);
    }
    let all = list_checkpoints(run_dir)?;
    if all.len() <= keep {
        return Ok(deleted);
    }
    let newest_good = all
        .iter()
        .rev()
        .find(|(_, dir)| verify_checkpoint(dir).is_ok())
        .map(|(s, _)| *s);
    let cutoff = all.len() - keep;
    for (step, dir) in &all[..cutoff] {
        if Some(*step) == newest_good {
            continue;
        }
        std::fs::remove_dir_all(dir).map_err(io_err(dir))?;
        deleted.push(dir.clone());
    }
    if !deleted.is_empty() {
        sync_dir(&parent)?;
    }
    Ok(deleted)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("graft-ckpt-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn state(step: u64) -> TrainerState {
        let mut s = TrainerState::new(100, RngState([1, 2, 3, u64::MAX]), "cfg".into(), "data".into());
        s.step = step;
        s.data_position = DataPosition { epoch: 1, index: 17 };
        s.best_eval = Some(1.25);
        s.elapsed_s = 3.5;
        s
    }

    fn save(run: &Path, step: u64) -> PathBuf {
        let mut w = CheckpointWriter::begin(run, step).unwrap();
        w.write_json(TRAINER_STATE_FILE, &state(step)).unwrap();
        w.write_bytes(OPTIMIZER_FILE, &vec![step as u8; 1000]).unwrap();
        w.write_bytes("adapter/adapter_config.json", b"{}").unwrap();
        w.commit("cfg").unwrap()
    }

    #[test]
    fn commit_writes_manifest_and_state_round_trips() {
        let run = run_dir("commit");
        let dir = save(&run, 5);
        assert_eq!(dir, checkpoint_dir(&run, 5));
        assert!(!checkpoints_dir(&run).join(".tmp-step-5").exists());
        let m = verify_checkpoint(&dir).unwrap();
        assert_eq!(m.step, 5);
        assert_eq!(m.config_hash, "cfg");
        let paths: Vec<&str> = m.files.iter().map(|f| f.path.as_str()).collect();
        assert_eq!(
            paths,
            vec!["adapter/adapter_config.json", OPTIMIZER_FILE, TRAINER_STATE_FILE]
        );
        assert_eq!(m.files[1].bytes, 1000);
        assert_eq!(m.files[1].sha256, sha256_hex(&[5u8; 1000]));
        assert_eq!(TrainerState::read(&dir).unwrap(), state(5));
        // Re-saving the same step replaces it.
        save(&run, 5);
        assert_eq!(list_checkpoints(&run).unwrap().len(), 1);
        std::fs::remove_dir_all(&run).unwrap();
    }

    #[test]
    fn latest_skips_tmp_and_damaged_checkpoints() {
        let run = run_dir("latest");
        assert!(latest_checkpoint(&run).unwrap().good.is_none());
        save(&run, 10);
        save(&run, 20);
        save(&run, 30);
        // An interrupted save of step 40.
        let mut w = CheckpointWriter::begin(&run, 40).unwrap();
        w.write_bytes(OPTIMIZER_FILE, b"partial").unwrap();
        drop(w);
        assert_eq!(latest_checkpoint(&run).unwrap().good.unwrap().manifest.step, 30);
        // Corrupt step 30 (same size, different bytes) and drop step 20's manifest.
        std::fs::write(checkpoint_dir(&run, 30).join(OPTIMIZER_FILE), vec![0u8; 1000]).unwrap();
        std::fs::remove_file(checkpoint_dir(&run, 20).join(MANIFEST_FILE)).unwrap();
        let latest = latest_checkpoint(&run).unwrap();
        assert_eq!(latest.good.unwrap().manifest.step, 10);
        assert_eq!(latest.skipped.len(), 2);
        assert!(
            latest.skipped[0].1.to_string().contains("SHA-256"),
            "{}",
            latest.skipped[0].1
        );
        assert!(
            latest.skipped[1].1.to_string().contains("manifest"),
            "{}",
            latest.skipped[1].1
        );
        // A truncated file is caught by its size.
        std::fs::write(checkpoint_dir(&run, 10).join(OPTIMIZER_FILE), b"short").unwrap();
        let err = verify_checkpoint(&checkpoint_dir(&run, 10))
            .unwrap_err()
            .to_string();
        assert!(err.contains("size 5 bytes"), "{err}");
        let none = latest_checkpoint(&run).unwrap();
        assert!(none.good.is_none());
        assert_eq!(none.skipped.len(), 3);
        std::fs::remove_dir_all(&run).unwrap();
    }

    #[test]
    fn prune_keeps_newest_and_newest_good() {
        let run = run_dir("prune");
        for step in [1, 2, 3, 4, 5] {
            save(&run, step);
        }
        std::fs::create_dir_all(checkpoints_dir(&run).join(".tmp-step-6")).unwrap();
        let deleted = prune_checkpoints(&run, 2).unwrap();
        assert_eq!(deleted.len(), 3);
        let steps: Vec<u64> = list_checkpoints(&run)
            .unwrap()
            .into_iter()
            .map(|(s, _)| s)
            .collect();
        assert_eq!(steps, vec![4, 5]);
        assert!(!checkpoints_dir(&run).join(".tmp-step-6").exists());

        // Steps 6 and 7 damaged: step 5 is the newest good one and survives keep = 2.
        save(&run, 6);
        save(&run, 7);
        for s in [6, 7] {
            std::fs::write(checkpoint_dir(&run, s).join(TRAINER_STATE_FILE), b"x").unwrap();
        }
        prune_checkpoints(&run, 2).unwrap();
        let steps: Vec<u64> = list_checkpoints(&run)
            .unwrap()
            .into_iter()
            .map(|(s, _)| s)
            .collect();
        assert_eq!(steps, vec![5, 6, 7]);
        assert_eq!(prune_checkpoints(&run, 0).unwrap().len(), 0);
        std::fs::remove_dir_all(&run).unwrap();
    }

    #[test]
    fn bad_names_are_rejected() {
        let run = run_dir("names");
        let mut w = CheckpointWriter::begin(&run, 1).unwrap();
        for bad in ["../x", "/abs", "", MANIFEST_FILE, "a/../../b"] {
            assert!(
                matches!(w.write_bytes(bad, b"x"), Err(CheckpointError::BadName(_))),
                "{bad}"
            );
        }
        std::fs::remove_dir_all(&run).unwrap();
    }

    #[test]
    fn sha256_known_value() {
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
