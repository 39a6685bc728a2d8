//! The error type of model loading and saving: every variant names the file, field or tensor.

use std::path::Path;

/// Something wrong with a model directory, checkpoint or config.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io { path: String, source: std::io::Error },
    /// A config field is missing, mistyped or unsupported.
    #[error("{path}: field `{field}`: {message}")]
    Config {
        path: String,
        field: String,
        message: String,
    },
    /// A weight tensor is missing or has the wrong shape or type.
    #[error("{path}: tensor `{tensor}`: {message}")]
    Tensor {
        path: String,
        tensor: String,
        message: String,
    },
    /// A file is not in the format it claims to be.
    #[error("{path}: {message}")]
    Format { path: String, message: String },
}

impl ModelError {
    /// Wraps an I/O error with the path it happened on.
    pub fn io(path: &Path, source: std::io::Error) -> ModelError {
        ModelError::Io {
            path: path.display().to_string(),
            source,
        }
    }

    /// A format error for `path`.
    pub fn format(path: &Path, message: impl Into<String>) -> ModelError {
        ModelError::Format {
            path: path.display().to_string(),
            message: message.into(),
        }
    }

    /// A tensor error for `tensor` in `path`.
    pub fn tensor(path: &Path, tensor: &str, message: impl Into<String>) -> ModelError {
        ModelError::Tensor {
            path: path.display().to_string(),
            tensor: tensor.into(),
            message: message.into(),
        }
    }

    /// Replaces the placeholder file name of a config error with the real path.
    pub fn in_file(self, path: &Path) -> ModelError {
        match self {
            ModelError::Config { field, message, .. } => ModelError::Config {
                path: path.display().to_string(),
                field,
                message,
            },
            other => other,
        }
    }
}
