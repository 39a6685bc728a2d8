//! Named `f32` tensors in safetensors files: the format of checkpointed weights, adapters and
//! optimizer state.
//!
//! Values are stored as little-endian `F32` and read back bit for bit (NaN payloads included).
//! String metadata (the safetensors `__metadata__` map) carries small scalars such as the optimizer
//! step.

use safetensors::tensor::{Dtype, SafeTensors};
use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::path::Path;

/// An error reading or writing a safetensors file.
#[derive(Debug, thiserror::Error)]
pub enum TensorFileError {
    /// The bytes are not a valid safetensors file.
    #[error("{what}: not a valid safetensors file: {source}")]
    Format {
        /// The file or buffer being read.
        what: String,
        /// The parser's error.
        #[source]
        source: safetensors::SafeTensorError,
    },
    /// A tensor has a dtype other than `F32`.
    #[error("{what}: tensor `{name}` has dtype {dtype:?}, expected F32")]
    Dtype {
        /// The file or buffer being read.
        what: String,
        /// The tensor's name.
        name: String,
        /// Its dtype.
        dtype: Dtype,
    },
    /// A tensor's element count does not match its shape.
    #[error("tensor `{name}`: shape {shape:?} holds {expected} values but {got} were given")]
    Shape {
        /// The tensor's name.
        name: String,
        /// The declared shape.
        shape: Vec<usize>,
        /// Elements the shape implies.
        expected: usize,
        /// Elements given.
        got: usize,
    },
    /// Two tensors share a name (or a tensor is called `__metadata__`).
    #[error("tensor name `{0}` used twice (or reserved)")]
    DuplicateName(String),
    /// Reading or writing the file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

/// An owned `f32` tensor: its shape and row-major values.
#[derive(Clone, Debug, PartialEq)]
pub struct F32Tensor {
    /// Dimensions, outermost first.
    pub shape: Vec<usize>,
    /// Values in row-major order; `data.len()` is the product of `shape`.
    pub data: Vec<f32>,
}

/// A borrowed `f32` tensor to write: a name, a shape and the values.
#[derive(Clone, Copy, Debug)]
pub struct TensorRef<'a> {
    /// The tensor's key in the file.
    pub name: &'a str,
    /// Dimensions, outermost first.
    pub shape: &'a [usize],
    /// Values in row-major order.
    pub data: &'a [f32],
}

/// Checks shapes and names, and returns the safetensors header (JSON, padded with spaces to a
/// multiple of 8 bytes). The header is built by hand so that its bytes are deterministic: the
/// `safetensors` crate writes metadata from a `HashMap`, whose order changes from run to run.
fn header(
    tensors: &[TensorRef<'_>],
    metadata: &BTreeMap<String, String>,
) -> Result<Vec<u8>, TensorFileError> {
    let mut seen = std::collections::HashSet::new();
    let mut json = String::from("{");
    if !metadata.is_empty() {
        json.push_str("\"__metadata__\":");
        json.push_str(&serde_json::to_string(metadata).expect("string map serialises"));
    }
    let mut offset = 0usize;
    for t in tensors {
        let expected: usize = t.shape.iter().product();
        if expected != t.data.len() {
            return Err(TensorFileError::Shape {
                name: t.name.to_string(),
                shape: t.shape.to_vec(),
                expected,
                got: t.data.len(),
            });
        }
        if !seen.insert(t.name) || t.name == "__metadata__" {
            return Err(TensorFileError::DuplicateName(t.name.to_string()));
        }
        if json.len() > 1 {
            json.push(',');
        }
        let end = offset + 4 * t.data.len();
        json.push_str(&format!(
            "{}:{{\"dtype\":\"F32\",\"shape\":{},\"data_offsets\":[{offset},{end}]}}",
            serde_json::to_string(t.name).expect("string serialises"),
            serde_json::to_string(t.shape).expect("shape serialises"),
        ));
        offset = end;
    }
    json.push('}');
    while json.len() % 8 != 0 {
        json.push(' ');
    }
    let mut out = Vec::with_capacity(8 + json.len());
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(json.as_bytes());
    Ok(out)
}

fn write_data(w: &mut impl Write, data: &[f32]) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(4 * 4096);
    for chunk in data.chunks(4096) {
        buf.clear();
        buf.extend(chunk.iter().flat_map(|x| x.to_le_bytes()));
        w.write_all(&buf)?;
    }
    Ok(())
}

/// Serialises `tensors` (in the order given) and string `metadata` to safetensors bytes. Equal
/// inputs give equal bytes.
pub fn serialize_f32(
    tensors: &[TensorRef<'_>],
    metadata: &BTreeMap<String, String>,
) -> Result<Vec<u8>, TensorFileError> {
    let mut out = header(tensors, metadata)?;
    out.reserve(tensors.iter().map(|t| 4 * t.data.len()).sum());
    for t in tensors {
        write_data(&mut out, t.data).expect("writing to a Vec cannot fail");
    }
    Ok(out)
}

/// Writes `tensors` and `metadata` to a safetensors file at `path` (the bytes of
/// [`serialize_f32`]), streaming through a small buffer rather than building the file in memory.
/// The file is not fsynced; see [`CheckpointWriter`](crate::checkpoint::CheckpointWriter) for
/// durable writes.
pub fn write_f32_file(
    path: &Path,
    tensors: &[TensorRef<'_>],
    metadata: &BTreeMap<String, String>,
) -> Result<(), TensorFileError> {
    let head = header(tensors, metadata)?;
    let io = |source| TensorFileError::Io {
        path: path.display().to_string(),
        source,
    };
    let mut w = std::io::BufWriter::with_capacity(1 << 20, File::create(path).map_err(io)?);
    w.write_all(&head).map_err(io)?;
    for t in tensors {
        write_data(&mut w, t.data).map_err(io)?;
    }
    w.flush().map_err(io)
}

/// Named tensors and metadata read from a safetensors file.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TensorFile {
    /// Tensors by name.
    pub tensors: BTreeMap<String, F32Tensor>,
    /// The `__metadata__` map (empty when absent).
    pub metadata: BTreeMap<String, String>,
}

/// Parses safetensors `bytes` whose tensors are all `F32`; `what` names the source in errors.
pub fn deserialize_f32(bytes: &[u8], what: &str) -> Result<TensorFile, TensorFileError> {
    let format = |source| TensorFileError::Format {
        what: what.to_string(),
        source,
    };
    let (_, header) = SafeTensors::read_metadata(bytes).map_err(format)?;
    let metadata: BTreeMap<String, String> = header
        .metadata()
        .as_ref()
        .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
        .unwrap_or_default();
    let st = SafeTensors::deserialize(bytes).map_err(format)?;
    let mut tensors = BTreeMap::new();
    for (name, view) in st.tensors() {
        if view.dtype() != Dtype::F32 {
            return Err(TensorFileError::Dtype {
                what: what.to_string(),
                name,
                dtype: view.dtype(),
            });
        }
        let data: Vec<f32> = view
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        tensors.insert(
            name,
            F32Tensor {
                shape: view.shape().to_vec(),
                data,
            },
        );
    }
    Ok(TensorFile { tensors, metadata })
}

/// Reads a safetensors file of `F32` tensors.
pub fn read_f32_file(path: &Path) -> Result<TensorFile, TensorFileError> {
    let bytes = std::fs::read(path).map_err(|source| TensorFileError::Io {
        path: path.display().to_string(),
        source,
    })?;
    deserialize_f32(&bytes, &path.display().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_is_bit_exact() {
        let a = [
            1.0f32,
            -0.0,
            f32::MIN_POSITIVE / 2.0,
            f32::from_bits(0x7fc0_1234),
            3.5,
            f32::INFINITY,
        ];
        let b = [0.1f32; 4];
        let tensors = [
            TensorRef {
                name: "layer.0.a",
                shape: &[2, 3],
                data: &a,
            },
            TensorRef {
                name: "b",
                shape: &[4],
                data: &b,
            },
        ];
        let meta = BTreeMap::from([("step".to_string(), "7".to_string())]);
        let bytes = serialize_f32(&tensors, &meta).unwrap();
        let file = deserialize_f32(&bytes, "test").unwrap();
        assert_eq!(file.metadata, meta);
        assert_eq!(
            serialize_f32(&tensors, &meta).unwrap(),
            bytes,
            "deterministic bytes"
        );
        // The reference implementation reads what we write.
        let st = SafeTensors::deserialize(&bytes).unwrap();
        assert_eq!(st.tensor("b").unwrap().shape(), &[4]);
        let got = &file.tensors["layer.0.a"];
        assert_eq!(got.shape, vec![2, 3]);
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&got.data), bits(&a));
        assert_eq!(bits(&file.tensors["b"].data), bits(&b));

        let dir = std::env::temp_dir().join(format!("graft-tensors-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("t.safetensors");
        write_f32_file(&path, &tensors, &meta).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), bytes);
        let back = read_f32_file(&path).unwrap();
        assert_eq!(bits(&back.tensors["layer.0.a"].data), bits(&a));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn errors_name_the_problem() {
        let bad = [TensorRef {
            name: "w",
            shape: &[2, 2],
            data: &[1.0; 3],
        }];
        let err = serialize_f32(&bad, &BTreeMap::new()).unwrap_err().to_string();
        assert!(err.contains("`w`") && err.contains("4 values"), "{err}");
        let dup = [
            TensorRef {
                name: "w",
                shape: &[1],
                data: &[1.0],
            },
            TensorRef {
                name: "w",
                shape: &[1],
                data: &[1.0],
            },
        ];
        assert!(matches!(
            serialize_f32(&dup, &BTreeMap::new()),
            Err(TensorFileError::DuplicateName(_))
        ));
        let err = deserialize_f32(b"garbage", "opt.safetensors")
            .unwrap_err()
            .to_string();
        assert!(err.contains("opt.safetensors"), "{err}");
        let err = read_f32_file(Path::new("/nonexistent/x.safetensors"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("/nonexistent/x.safetensors"), "{err}");
    }
}
