//! Whole-dataset tokenization with an on-disk cache keyed by content.
//!
//! The cache key hashes the bytes of every data file (and its name), the tokenizer fingerprint,
//! the chat template source and special tokens, the load options and the tokenization options, so
//! a re-run with the same inputs reads the cache and any change re-tokenizes.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::dataset::{self, Dataset, LoadOptions, RowError};
use crate::error::{Error, Result};
use crate::hash::ContentHasher;
use crate::sample::{SampleNotes, TokenizeOptions, TokenizedRecord, TokenizedSample, tokenize_record};
use crate::template::ChatTemplate;
use crate::tokenizer::Tokenizer;

/// One tokenized row and where it came from.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenizedExample {
    /// Index into [`TokenizedDataset::files`].
    pub file: usize,
    /// 1-based line of the row.
    pub line: usize,
    /// The tokenized record.
    pub record: TokenizedRecord,
}

/// A tokenized dataset.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TokenizedDataset {
    /// Source files.
    pub files: Vec<PathBuf>,
    /// Tokenized rows in file order.
    pub examples: Vec<TokenizedExample>,
    /// Rows skipped as invalid (with `skip_invalid`), including rows the template refused.
    pub skipped: Vec<RowError>,
    /// Rows dropped by the `DropRow` truncation policy: `(file index, line)`.
    pub dropped_too_long: Vec<(usize, usize)>,
    /// Whether this came from the cache.
    pub from_cache: bool,
    /// Why the cache could not be written (disk full, read-only folder): the data is still good.
    pub cache_warning: Option<String>,
}

impl TokenizedDataset {
    /// All single sequences (SFT/LM rows, text chunks and KTO rows), for packing.
    pub fn singles(&self) -> Vec<TokenizedSample> {
        self.examples
            .iter()
            .flat_map(|e| match &e.record {
                TokenizedRecord::Single(s) | TokenizedRecord::Kto { sample: s, .. } => vec![s.clone()],
                TokenizedRecord::Chunks(chunks) => chunks.clone(),
                TokenizedRecord::Pair { .. } => vec![],
            })
            .collect()
    }
}

/// Tokenizes loaded rows. A row the tokenizer or template fails on is an error naming `file:line`,
/// or with `skip_invalid` is skipped and recorded.
pub fn tokenize_dataset(
    ds: &Dataset,
    tok: &Tokenizer,
    template: Option<&ChatTemplate>,
    opts: &TokenizeOptions,
    skip_invalid: bool,
) -> Result<TokenizedDataset> {
    let mut out = TokenizedDataset {
        skipped: ds.invalid.clone(),
        ..Default::default()
    };
    let mut file_index: Vec<(Arc<Path>, usize)> = Vec::new();
    for (path, _) in &ds.formats {
        file_index.push((Arc::from(path.as_path()), out.files.len()));
        out.files.push(path.clone());
    }
    // Rows are independent: tokenize them in parallel, then collect in file order.
    let results: Vec<Result<Option<TokenizedRecord>>> = {
        use rayon::prelude::*;
        ds.rows
            .par_iter()
            .map(|row| tokenize_record(&row.record, tok, template, opts))
            .collect()
    };
    for (row, result) in ds.rows.iter().zip(results) {
        let file = file_index
            .iter()
            .find(|(p, _)| **p == *row.file)
            .map(|(_, i)| *i)
            .unwrap_or(0);
        match result {
            Ok(Some(record)) => out.examples.push(TokenizedExample {
                file,
                line: row.line,
                record,
            }),
            Ok(None) => out.dropped_too_long.push((file, row.line)),
            Err(e) => {
                if !skip_invalid {
                    return Err(Error::invalid(
                        format!("{}:{}", row.file.display(), row.line),
                        e.to_string(),
                    ));
                }
                out.skipped.push(RowError {
                    file: row.file.clone(),
                    line: row.line,
                    reason: e.to_string(),
                });
            }
        }
    }
    Ok(out)
}

const CACHE_MAGIC: &[u8; 8] = b"GRAFTTOK";
const CACHE_VERSION: u32 = 3;

/// The cache key of a dataset path under a tokenizer, template and options.
pub fn cache_key(
    path: &Path,
    load: &LoadOptions,
    tok: &Tokenizer,
    template: Option<&ChatTemplate>,
    opts: &TokenizeOptions,
) -> Result<String> {
    let mut h = ContentHasher::new();
    h.field(&CACHE_VERSION.to_le_bytes());
    for file in dataset::dataset_files(path)? {
        h.field(file.file_name().and_then(|n| n.to_str()).unwrap_or("").as_bytes());
        h.field(&std::fs::read(&file).map_err(|e| Error::io(&file, e))?);
    }
    h.field(format!("{:?}|{}", load.format, load.skip_invalid).as_bytes());
    h.field(tok.fingerprint().as_bytes());
    match template {
        Some(t) => {
            h.field(t.source().as_bytes());
            h.field(format!("{:?}", t.special_tokens()).as_bytes());
        }
        None => h.field(b"no template"),
    }
    h.field(opts.cache_key().as_bytes());
    Ok(h.hex())
}

/// Loads and tokenizes a dataset path, reading `cache_dir/<key>.tok` when present and writing it
/// otherwise (the cache is skipped when `cache_dir` is `None`).
pub fn load_tokenized(
    path: &Path,
    load: &LoadOptions,
    tok: &Tokenizer,
    template: Option<&ChatTemplate>,
    opts: &TokenizeOptions,
    cache_dir: Option<&Path>,
) -> Result<TokenizedDataset> {
    let cache_file = match cache_dir {
        Some(dir) => Some(dir.join(format!("{}.tok", cache_key(path, load, tok, template, opts)?))),
        None => None,
    };
    if let Some(f) = &cache_file
        && let Ok(bytes) = std::fs::read(f)
        && let Some(mut ds) = decode_cache(&bytes)
    {
        ds.from_cache = true;
        return Ok(ds);
    }
    let ds = dataset::load(path, load)?;
    let mut tokenized = tokenize_dataset(&ds, tok, template, opts, load.skip_invalid)?;
    if let Some(f) = &cache_file
        && let Err(e) = write_cache(f, &tokenized)
    {
        tokenized.cache_warning = Some(e.to_string());
    }
    Ok(tokenized)
}

/// Writes the cache file through a temporary name and a rename, so a concurrent reader never sees
/// half a file; a failed write (disk full) leaves no temporary file behind.
fn write_cache(file: &Path, ds: &TokenizedDataset) -> Result<()> {
    if let Some(dir) = file.parent() {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    let tmp = file.with_extension(format!("tmp{}", std::process::id()));
    let written = std::fs::write(&tmp, encode_cache(ds)).and_then(|()| std::fs::rename(&tmp, file));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io(file, e));
    }
    Ok(())
}

struct Writer(Vec<u8>);

impl Writer {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn str(&mut self, s: &str) {
        self.u64(s.len() as u64);
        self.0.extend_from_slice(s.as_bytes());
    }
    fn sample(&mut self, s: &TokenizedSample) {
        self.u64(s.input_ids.len() as u64);
        for &id in &s.input_ids {
            self.u32(id);
        }
        for &t in &s.trained {
            self.u8(t as u8);
        }
        self.u64(s.original_len as u64);
        let n = &s.notes;
        self.u8(n.bos_deduplicated as u8
            | (n.truncated as u8) << 1
            | (n.template_not_prefix_stable as u8) << 2
            | (n.chunked as u8) << 3);
        self.u32(n.appended_eos);
        self.u32(n.missing_end_of_turn);
    }
}

struct Reader<'a> {
    b: &'a [u8],
    pos: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Option<&[u8]> {
        let s = self.b.get(self.pos..self.pos.checked_add(n)?)?;
        self.pos += n;
        Some(s)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|s| s[0])
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4).map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
    }
    fn u64(&mut self) -> Option<u64> {
        self.take(8).map(|s| {
            let mut a = [0u8; 8];
            a.copy_from_slice(s);
            u64::from_le_bytes(a)
        })
    }
    fn str(&mut self) -> Option<String> {
        let n = self.u64()? as usize;
        String::from_utf8(self.take(n)?.to_vec()).ok()
    }
    fn sample(&mut self) -> Option<TokenizedSample> {
        let n = self.u64()? as usize;
        if n > self.b.len() {
            return None;
        }
        let ids = (0..n).map(|_| self.u32()).collect::<Option<Vec<u32>>>()?;
        let trained = (0..n)
            .map(|_| self.u8().map(|b| b != 0))
            .collect::<Option<Vec<bool>>>()?;
        let original_len = self.u64()? as usize;
        let flags = self.u8()?;
        let notes = SampleNotes {
            bos_deduplicated: flags & 1 != 0,
            truncated: flags & 2 != 0,
            template_not_prefix_stable: flags & 4 != 0,
            chunked: flags & 8 != 0,
            appended_eos: self.u32()?,
            missing_end_of_turn: self.u32()?,
        };
        Some(TokenizedSample {
            input_ids: ids,
            trained,
            original_len,
            notes,
        })
    }
}

fn encode_cache(ds: &TokenizedDataset) -> Vec<u8> {
    let mut w = Writer(Vec::new());
    w.0.extend_from_slice(CACHE_MAGIC);
    w.u32(CACHE_VERSION);
    w.u64(ds.files.len() as u64);
    for f in &ds.files {
        w.str(&f.to_string_lossy());
    }
    w.u64(ds.examples.len() as u64);
    for e in &ds.examples {
        w.u64(e.file as u64);
        w.u64(e.line as u64);
        match &e.record {
            TokenizedRecord::Single(s) => {
                w.u8(0);
                w.sample(s);
            }
            TokenizedRecord::Pair {
                chosen,
                rejected,
                margin,
            } => {
                w.u8(if margin.is_some() { 5 } else { 1 });
                w.sample(chosen);
                w.sample(rejected);
                if let Some(m) = margin {
                    w.u64(m.to_bits());
                }
            }
            TokenizedRecord::Kto { sample, label } => {
                w.u8(2 + *label as u8);
                w.sample(sample);
            }
            TokenizedRecord::Chunks(chunks) => {
                w.u8(4);
                w.u64(chunks.len() as u64);
                for c in chunks {
                    w.sample(c);
                }
            }
        }
    }
    w.u64(ds.skipped.len() as u64);
    for s in &ds.skipped {
        w.str(&s.file.to_string_lossy());
        w.u64(s.line as u64);
        w.str(&s.reason);
    }
    w.u64(ds.dropped_too_long.len() as u64);
    for &(f, l) in &ds.dropped_too_long {
        w.u64(f as u64);
        w.u64(l as u64);
    }
    w.0
}

fn decode_cache(bytes: &[u8]) -> Option<TokenizedDataset> {
    let mut r = Reader { b: bytes, pos: 0 };
    if r.take(8)? != CACHE_MAGIC || r.u32()? != CACHE_VERSION {
        return None;
    }
    let mut ds = TokenizedDataset::default();
    let files = r.u64()? as usize;
    for _ in 0..files.min(bytes.len()) {
        ds.files.push(PathBuf::from(r.str()?));
    }
    let n = r.u64()? as usize;
    for _ in 0..n.min(bytes.len()) {
        let file = r.u64()? as usize;
        let line = r.u64()? as usize;
        let record = match r.u8()? {
            0 => TokenizedRecord::Single(r.sample()?),
            k @ (1 | 5) => TokenizedRecord::Pair {
                chosen: r.sample()?,
                rejected: r.sample()?,
                margin: if k == 5 {
                    Some(f64::from_bits(r.u64()?))
                } else {
                    None
                },
            },
            k @ (2 | 3) => TokenizedRecord::Kto {
                sample: r.sample()?,
                label: k == 3,
            },
            4 => {
                let n = r.u64()? as usize;
                if n > bytes.len() {
                    return None;
                }
                TokenizedRecord::Chunks((0..n).map(|_| r.sample()).collect::<Option<Vec<_>>>()?)
            }
            _ => return None,
        };
        ds.examples.push(TokenizedExample { file, line, record });
    }
    let n = r.u64()? as usize;
    for _ in 0..n.min(bytes.len()) {
        let file: Arc<Path> = Arc::from(PathBuf::from(r.str()?).as_path());
        ds.skipped.push(RowError {
            file,
            line: r.u64()? as usize,
            reason: r.str()?,
        });
    }
    let n = r.u64()? as usize;
    for _ in 0..n.min(bytes.len()) {
        ds.dropped_too_long.push((r.u64()? as usize, r.u64()? as usize));
    }
    (r.pos == bytes.len()).then_some(ds)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_round_trips_and_rejects_truncation() {
        let s = TokenizedSample {
            input_ids: vec![1, 2, 3],
            trained: vec![false, true, true],
            original_len: 5,
            notes: SampleNotes {
                truncated: true,
                appended_eos: 1,
                ..Default::default()
            },
        };
        let ds = TokenizedDataset {
            files: vec![PathBuf::from("a.jsonl")],
            examples: vec![
                TokenizedExample {
                    file: 0,
                    line: 3,
                    record: TokenizedRecord::Single(s.clone()),
                },
                TokenizedExample {
                    file: 0,
                    line: 4,
                    record: TokenizedRecord::Pair {
                        chosen: s.clone(),
                        rejected: s.clone(),
                        margin: None,
                    },
                },
                TokenizedExample {
                    file: 0,
                    line: 6,
                    record: TokenizedRecord::Pair {
                        chosen: s.clone(),
                        rejected: s.clone(),
                        margin: Some(-0.25),
                    },
                },
                TokenizedExample {
                    file: 0,
                    line: 5,
                    record: TokenizedRecord::Kto {
                        sample: s.clone(),
                        label: true,
                    },
                },
                TokenizedExample {
                    file: 0,
                    line: 6,
                    record: TokenizedRecord::Chunks(vec![s.clone(), s]),
                },
            ],
            skipped: vec![RowError {
                file: Arc::from(Path::new("a.jsonl")),
                line: 9,
                reason: "bad".into(),
            }],
            dropped_too_long: vec![(0, 7)],
            from_cache: false,
            cache_warning: None,
        };
        let bytes = encode_cache(&ds);
        assert_eq!(decode_cache(&bytes).unwrap(), ds);
        assert!(decode_cache(&bytes[..bytes.len() - 1]).is_none());
        assert!(decode_cache(b"GRAFTTOKxxxx").is_none());
    }
}
