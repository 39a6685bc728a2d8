//! The crate's error type: every error names the place (file, line, field) and what was expected.

use std::path::PathBuf;

/// Errors from loading tokenizers, rendering templates and reading datasets.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file that failed.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// Bad input at a known place; `place` is `file:line` or `file: field`.
    #[error("{place}: {reason}")]
    Invalid {
        /// Where the problem is (`file:line`, `file: field`, …).
        place: String,
        /// What was wrong and what was expected.
        reason: String,
    },
    /// The tokenizer could not be built or failed on an input.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// The chat template failed to compile or render.
    #[error("chat template: {0}")]
    Template(String),
    /// The chat template called `raise_exception(message)`.
    #[error("chat template raised: {0}")]
    TemplateRaised(String),
}

impl Error {
    /// Builds an [`Error::Invalid`] from anything printable.
    pub fn invalid(place: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::Invalid {
            place: place.into(),
            reason: reason.into(),
        }
    }

    /// Wraps an I/O error with the path it happened on.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Reads a whole file, naming the path on failure.
pub(crate) fn read_file(path: &std::path::Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| Error::io(path, e))
}

/// Reads a whole UTF-8 file, naming the path on failure.
pub(crate) fn read_text(path: &std::path::Path) -> Result<String> {
    let bytes = read_file(path)?;
    String::from_utf8(bytes)
        .map_err(|e| Error::invalid(path.display().to_string(), format!("not valid UTF-8: {e}")))
}
