//! Writing GGUF v3 files (the layout [`super::gguf`] reads): metadata in the order given, tensor
//! infos, then each tensor's bytes at a 32-byte aligned offset. Tensors are produced one at a time
//! by a callback, so a model is never held twice in memory, and the file appears only when it is
//! complete (written beside the target, synced, then renamed).

use super::gguf::{GgufValue, ggml_type_id};
use super::{DType, checked_numel};
use crate::error::ModelError;
use std::io::Write;
use std::path::Path;

/// The data alignment graft writes (ggml's default; `general.alignment` is then omitted).
const ALIGNMENT: u64 = 32;

/// One tensor of a GGUF file being written: its GGUF name, dims innermost-first (`[in, out]`
/// for a linear weight) and the type its bytes are in.
#[derive(Debug, Clone, PartialEq)]
pub struct GgufTensorSpec {
    /// GGUF name, e.g. `blk.0.attn_q.weight`.
    pub name: String,
    /// Dimensions, innermost first.
    pub dims: Vec<u64>,
    /// Element type of the bytes the callback returns.
    pub dtype: DType,
}

impl GgufTensorSpec {
    /// Bytes the tensor takes, or an error naming it when its rows are not whole blocks.
    pub fn byte_len(&self, path: &Path) -> Result<usize, ModelError> {
        let dims: Option<Vec<usize>> = self.dims.iter().map(|&d| usize::try_from(d).ok()).collect();
        let numel = dims.as_deref().and_then(checked_numel);
        let row = self.dims.first().copied().unwrap_or(1);
        let block = self.dtype.block_size() as u64;
        match numel {
            Some(n) if row % block == 0 => self.dtype.storage_bytes(n).ok_or_else(|| {
                ModelError::tensor(path, &self.name, format!("dims {:?} overflow", self.dims))
            }),
            Some(_) => Err(ModelError::tensor(
                path,
                &self.name,
                format!(
                    "rows of {row} values cannot be stored as {}, whose blocks hold {block}",
                    self.dtype
                ),
            )),
            None => Err(ModelError::tensor(
                path,
                &self.name,
                format!("dims {:?} overflow", self.dims),
            )),
        }
    }
}

/// Writes a GGUF v3 file at `path`: `metadata` in order, then `tensors`, whose bytes
/// `data(i)` returns for tensor `i` (called once per tensor, in order; its length is checked).
/// The file is written to a temporary name beside `path` and renamed into place when complete.
pub fn write_gguf(
    path: &Path,
    metadata: &[(String, GgufValue)],
    tensors: &[GgufTensorSpec],
    mut data: impl FnMut(usize) -> Result<Vec<u8>, ModelError>,
) -> Result<(), ModelError> {
    let mut header = Vec::new();
    header.extend_from_slice(b"GGUF");
    header.extend_from_slice(&3u32.to_le_bytes());
    header.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    header.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
    for (key, value) in metadata {
        put_string(&mut header, key);
        put_value(&mut header, value, path, key)?;
    }
    let mut offset = 0u64;
    let mut lens = Vec::with_capacity(tensors.len());
    for t in tensors {
        let len = t.byte_len(path)? as u64;
        put_string(&mut header, &t.name);
        header.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
        for &d in &t.dims {
            header.extend_from_slice(&d.to_le_bytes());
        }
        header.extend_from_slice(&ggml_type_id(t.dtype).to_le_bytes());
        header.extend_from_slice(&offset.to_le_bytes());
        lens.push(len);
        offset = (offset + len).div_ceil(ALIGNMENT) * ALIGNMENT;
    }
    pad_to(&mut header, ALIGNMENT);

    let tmp = path.with_extension("gguf.partial");
    let result = (|| {
        let file = std::fs::File::create(&tmp).map_err(|e| ModelError::io(&tmp, e))?;
        let mut w = std::io::BufWriter::with_capacity(1 << 20, file);
        w.write_all(&header).map_err(|e| ModelError::io(&tmp, e))?;
        for (i, t) in tensors.iter().enumerate() {
            let mut bytes = data(i)?;
            if bytes.len() as u64 != lens[i] {
                return Err(ModelError::tensor(
                    path,
                    &t.name,
                    format!(
                        "{} bytes of {} data, expected {} for dims {:?}",
                        bytes.len(),
                        t.dtype,
                        lens[i],
                        t.dims
                    ),
                ));
            }
            pad_to(&mut bytes, ALIGNMENT);
            w.write_all(&bytes).map_err(|e| ModelError::io(&tmp, e))?;
        }
        let file = w.into_inner().map_err(|e| ModelError::io(&tmp, e.into_error()))?;
        file.sync_all().map_err(|e| ModelError::io(&tmp, e))?;
        std::fs::rename(&tmp, path).map_err(|e| ModelError::io(path, e))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

fn pad_to(buf: &mut Vec<u8>, alignment: u64) {
    let len = buf.len() as u64;
    buf.resize((len.div_ceil(alignment) * alignment) as usize, 0);
}

fn put_string(buf: &mut Vec<u8>, s: &str) {
    buf.extend_from_slice(&(s.len() as u64).to_le_bytes());
    buf.extend_from_slice(s.as_bytes());
}

/// The GGUF type tag of a value.
fn type_tag(v: &GgufValue) -> u32 {
    match v {
        GgufValue::U8(_) => 0,
        GgufValue::I8(_) => 1,
        GgufValue::U16(_) => 2,
        GgufValue::I16(_) => 3,
        GgufValue::U32(_) => 4,
        GgufValue::I32(_) => 5,
        GgufValue::F32(_) => 6,
        GgufValue::Bool(_) => 7,
        GgufValue::String(_) => 8,
        GgufValue::Array(_) => 9,
        GgufValue::U64(_) => 10,
        GgufValue::I64(_) => 11,
        GgufValue::F64(_) => 12,
    }
}

fn put_value(buf: &mut Vec<u8>, v: &GgufValue, path: &Path, key: &str) -> Result<(), ModelError> {
    buf.extend_from_slice(&type_tag(v).to_le_bytes());
    put_payload(buf, v, path, key)
}

fn put_payload(buf: &mut Vec<u8>, v: &GgufValue, path: &Path, key: &str) -> Result<(), ModelError> {
    match v {
        GgufValue::U8(x) => buf.push(*x),
        GgufValue::I8(x) => buf.push(*x as u8),
        GgufValue::U16(x) => buf.extend_from_slice(&x.to_le_bytes()),
        GgufValue::I16(x) => buf.extend_from_slice(&x.to_le_bytes()),
        GgufValue::U32(x) => buf.extend_from_slice(&x.to_le_bytes()),
        GgufValue::I32(x) => buf.extend_from_slice(&x.to_le_bytes()),
        GgufValue::F32(x) => buf.extend_from_slice(&x.to_le_bytes()),
        GgufValue::Bool(x) => buf.push(*x as u8),
        GgufValue::String(s) => put_string(buf, s),
        GgufValue::U64(x) => buf.extend_from_slice(&x.to_le_bytes()),
        GgufValue::I64(x) => buf.extend_from_slice(&x.to_le_bytes()),
        GgufValue::F64(x) => buf.extend_from_slice(&x.to_le_bytes()),
        GgufValue::Array(items) => {
            // An empty array is written as an array of strings (its element type is moot).
            let tag = items.first().map_or(8, type_tag);
            if items.iter().any(|x| type_tag(x) != tag) {
                return Err(ModelError::Config {
                    path: path.display().to_string(),
                    field: key.into(),
                    message: "a GGUF array must hold values of one type".into(),
                });
            }
            buf.extend_from_slice(&tag.to_le_bytes());
            buf.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for x in items {
                put_payload(buf, x, path, key)?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::weights::parse_gguf;

    #[test]
    fn written_files_read_back() {
        let dir = std::env::temp_dir().join(format!("graft-gguf-write-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("t.gguf");
        let meta = vec![
            (
                "general.architecture".to_string(),
                GgufValue::String("llama".into()),
            ),
            ("x.u32".into(), GgufValue::U32(7)),
            ("x.f32".into(), GgufValue::F32(1.5)),
            (
                "x.arr".into(),
                GgufValue::Array(vec![
                    GgufValue::String("a".into()),
                    GgufValue::String("bc".into()),
                ]),
            ),
            ("x.empty".into(), GgufValue::Array(vec![])),
        ];
        let tensors = vec![
            GgufTensorSpec {
                name: "a".into(),
                dims: vec![3],
                dtype: DType::F32,
            },
            GgufTensorSpec {
                name: "b".into(),
                dims: vec![32, 2],
                dtype: DType::Q8_0,
            },
        ];
        write_gguf(&path, &meta, &tensors, |i| {
            Ok(match i {
                0 => [1f32, 2.0, 3.0].iter().flat_map(|x| x.to_le_bytes()).collect(),
                _ => vec![9u8; 68],
            })
        })
        .unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let f = parse_gguf(&path, &bytes).unwrap();
        assert_eq!(f.version, 3);
        for (k, v) in &meta {
            assert_eq!(f.metadata.get(k), Some(v), "{k}");
        }
        assert_eq!(f.tensors[0].dims, vec![3]);
        assert_eq!(f.tensors[1].ggml_type, 8);
        let a = f.tensors[0].offset as usize;
        assert_eq!(&bytes[a..a + 4], &1f32.to_le_bytes());
        let b = f.tensors[1].offset as usize;
        assert_eq!(b % 32, 0);
        assert_eq!(&bytes[b..b + 68], &[9u8; 68][..]);
        assert!(!path.with_extension("gguf.partial").exists());

        // A wrong byte count is an error naming the tensor, and leaves no file behind.
        let bad = dir.join("bad.gguf");
        let e = write_gguf(&bad, &meta, &tensors, |_| Ok(vec![0u8; 5])).unwrap_err();
        assert!(
            e.to_string().contains("`a`") || e.to_string().contains("a"),
            "{e}"
        );
        assert!(!bad.exists() && !bad.with_extension("gguf.partial").exists());
        // Rows that are not whole blocks are refused before anything is written.
        let odd = [GgufTensorSpec {
            name: "odd".into(),
            dims: vec![33],
            dtype: DType::Q8_0,
        }];
        let e = write_gguf(&bad, &meta, &odd, |_| Ok(vec![])).unwrap_err();
        assert!(e.to_string().contains("odd"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
