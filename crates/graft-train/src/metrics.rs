//! `metrics.jsonl`: one JSON object per logged step, appended and flushed line by line.
//!
//! A record holds what was measured at that step: training loss, learning rate, gradient norm and
//! throughput on logging steps, `eval_loss` on evaluation steps (a step can carry both). Absent
//! values are left out of the line. NaN and infinities (which JSON cannot hold) are written as
//! `null` and read back as absent. The reader skips a torn last line, which a killed process can
//! leave.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

/// An error reading or writing a metrics file.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// I/O on the file failed.
    #[error("{path}: {source}")]
    Io {
        /// The metrics file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A line that is not the last one is not a valid record.
    #[error("{path}:{line}: not a metrics record: {message}")]
    Parse {
        /// The metrics file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// The JSON error.
        message: String,
    },
}

/// One line of `metrics.jsonl`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct MetricsRecord {
    /// Optimizer steps completed when this was logged.
    pub step: u64,
    /// Mean training loss per trained token over the steps since the last log.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "finite_or_none"
    )]
    pub loss: Option<f64>,
    /// Learning rate of the last step.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "finite_or_none"
    )]
    pub lr: Option<f64>,
    /// Global gradient norm of the last step, before clipping.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "finite_or_none"
    )]
    pub grad_norm: Option<f64>,
    /// Trained tokens per second since the last log.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "finite_or_none"
    )]
    pub tokens_per_s: Option<f64>,
    /// Mean evaluation loss per token, on evaluation steps.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "finite_or_none"
    )]
    pub eval_loss: Option<f64>,
    /// Tokens trained on so far.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_seen: Option<u64>,
    /// Fractional epoch (1.5 = halfway through the second epoch).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "finite_or_none"
    )]
    pub epoch: Option<f64>,
    /// Seconds of training so far (summed over resumed sessions).
    pub elapsed_s: f64,
    /// The objective's own metrics, by TRL's names (`rewards/accuracies`, …; eval ones prefixed
    /// `eval_`), means over the logged steps. Only finite values are written.
    #[serde(flatten, default, skip_serializing_if = "BTreeMap::is_empty")]
    pub extra: BTreeMap<String, f64>,
}

fn finite_or_none<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<f64>, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.filter(|x| x.is_finite()))
}

/// Appends records to a metrics file, one flushed line each.
#[derive(Debug)]
pub struct MetricsWriter {
    path: PathBuf,
    file: File,
}

impl MetricsWriter {
    /// Opens `path` for appending, creating it if needed.
    pub fn open(path: &Path) -> Result<Self, MetricsError> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|source| MetricsError::Io {
                path: path.to_path_buf(),
                source,
            })?;
        Ok(MetricsWriter {
            path: path.to_path_buf(),
            file,
        })
    }

    /// Appends `record` as one line and flushes it to the OS (one `write` call per line, so a crash
    /// leaves at most the last line torn).
    pub fn append(&mut self, record: &MetricsRecord) -> Result<(), MetricsError> {
        let mut line = serde_json::to_string(record).expect("a metrics record always serialises");
        line.push('\n');
        self.file
            .write_all(line.as_bytes())
            .and_then(|()| self.file.flush())
            .map_err(|source| MetricsError::Io {
                path: self.path.clone(),
                source,
            })
    }

    /// The file being written.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Reads every record of a metrics file. A missing file reads as no records; an unparsable last
/// line (torn by a kill) is skipped; any other bad line is an error naming it.
pub fn read_metrics(path: &Path) -> Result<Vec<MetricsRecord>, MetricsError> {
    let io = |source| MetricsError::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io(e)),
    };
    let lines: Vec<String> = BufReader::new(file)
        .lines()
        .collect::<Result<_, _>>()
        .map_err(io)?;
    let mut records = Vec::with_capacity(lines.len());
    let last = lines.iter().rposition(|l| !l.trim().is_empty());
    for (i, line) in lines.iter().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str(line) {
            Ok(r) => records.push(r),
            Err(_) if Some(i) == last => break,
            Err(e) => {
                return Err(MetricsError::Parse {
                    path: path.to_path_buf(),
                    line: i + 1,
                    message: e.to_string(),
                });
            }
        }
    }
    Ok(records)
}

/// Drops the records after `step` (those a killed run logged past its last checkpoint), so a
/// resumed run's log reads as one run. The lines kept are copied byte for byte (history never
/// changes; re-serialising parsed floats could change their last digits), a torn last line is
/// dropped, and the file is rewritten atomically (temp file + rename) only when something goes.
pub fn truncate_after(path: &Path, step: u64) -> Result<(), MetricsError> {
    let io = |source| MetricsError::Io {
        path: path.to_path_buf(),
        source,
    };
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io(e)),
    };
    #[derive(Deserialize)]
    struct StepOnly {
        step: u64,
    }
    let mut kept = String::with_capacity(text.len());
    let lines: Vec<&str> = text.split_inclusive('\n').collect();
    for (i, line) in lines.iter().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<StepOnly>(line) {
            Ok(r) if r.step <= step && line.ends_with('\n') => kept.push_str(line),
            Ok(_) => {}
            Err(_) if i + 1 == lines.len() => {}
            Err(e) => {
                return Err(MetricsError::Parse {
                    path: path.to_path_buf(),
                    line: i + 1,
                    message: e.to_string(),
                });
            }
        }
    }
    if kept.len() == text.len() {
        return Ok(());
    }
    crate::checkpoint::write_atomically(path, kept.as_bytes()).map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("graft-metrics-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir.join("metrics.jsonl")
    }

    #[test]
    fn truncate_after_keeps_earlier_lines_byte_for_byte() {
        let path = tmp("verbatim");
        // Digits a parse + re-serialise round trip does not reproduce exactly.
        let lines = [
            "{\"step\":1,\"loss\":2.3025850929940455,\"lr\":0.00009999999999999999}\n",
            "{\"step\":2,\"loss\":1.1000000000000001e-7}\n",
            "{\"step\":3,\"loss\":0.5}\n",
            "{\"step\":4,\"lo",
        ];
        std::fs::write(&path, lines.concat()).unwrap();
        truncate_after(&path, 2).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), lines[..2].concat());
        truncate_after(&path, 5).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), lines[..2].concat());
    }

    #[test]
    fn append_and_read_back() {
        let path = tmp("rw");
        let a = MetricsRecord {
            step: 10,
            loss: Some(2.5),
            lr: Some(1e-4),
            grad_norm: Some(0.7),
            tokens_per_s: Some(300.0),
            tokens_seen: Some(40960),
            epoch: Some(0.25),
            elapsed_s: 12.5,
            ..Default::default()
        };
        let b = MetricsRecord {
            step: 20,
            eval_loss: Some(2.1),
            elapsed_s: 30.0,
            ..Default::default()
        };
        let mut w = MetricsWriter::open(&path).unwrap();
        w.append(&a).unwrap();
        w.append(&b).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 2);
        assert!(!text.lines().nth(1).unwrap().contains("loss\":null"));
        assert_eq!(read_metrics(&path).unwrap(), vec![a.clone(), b.clone()]);

        // Reopening appends.
        let mut w = MetricsWriter::open(&path).unwrap();
        let c = MetricsRecord {
            step: 30,
            loss: Some(f64::NAN),
            elapsed_s: 40.0,
            ..Default::default()
        };
        w.append(&c).unwrap();
        let back = read_metrics(&path).unwrap();
        assert_eq!(back.len(), 3);
        assert_eq!(back[2].loss, None);

        truncate_after(&path, 15).unwrap();
        assert_eq!(read_metrics(&path).unwrap(), vec![a]);
        std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }

    #[test]
    fn torn_last_line_is_skipped_but_corruption_elsewhere_is_an_error() {
        let path = tmp("torn");
        std::fs::write(&path, "{\"step\":1,\"elapsed_s\":1.0}\n{\"step\":2,\"elap").unwrap();
        assert_eq!(read_metrics(&path).unwrap().len(), 1);
        std::fs::write(&path, "garbage\n{\"step\":2,\"elapsed_s\":1.0}\n").unwrap();
        let err = read_metrics(&path).unwrap_err().to_string();
        assert!(err.contains("metrics.jsonl:1"), "{err}");
        assert!(
            read_metrics(&path.with_file_name("missing.jsonl"))
                .unwrap()
                .is_empty()
        );
        std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }
}
