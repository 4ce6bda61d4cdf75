//! One error type for the whole toolkit.
//!
//! Every error renders as a single line that names the file (and, where known, the line or
//! tensor) and what was expected, so that shell pipelines can show it as is.

use std::path::{Path, PathBuf};

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Something wrong with the contents of an input file.
    #[error("{}: {msg}", path.display())]
    BadInput { path: PathBuf, msg: String },
    /// The file system refused a read or write.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A request that cannot be carried out (bad option combination, unsupported feature).
    #[error("{0}")]
    Usage(String),
    /// Numerical trouble during a run (NaN loss and the like).
    #[error("{0}")]
    Numeric(String),
    /// The GPU failed (driver or library missing, out of memory, a kernel fault).
    #[error("{0}")]
    Device(String),
}

impl Error {
    pub fn bad_input(path: impl AsRef<Path>, msg: impl Into<String>) -> Self {
        Error::BadInput {
            path: path.as_ref().to_path_buf(),
            msg: one_line(msg.into()),
        }
    }

    pub fn io(path: impl AsRef<Path>, source: std::io::Error) -> Self {
        // `read_to_string` reports a file that is not UTF-8 as an I/O error (InvalidData), but
        // the file system did its job: the contents are wrong (exit 3, not 4).
        if source.kind() == std::io::ErrorKind::InvalidData {
            return Error::bad_input(path, format!("not valid UTF-8 text ({source})"));
        }
        Error::Io {
            path: path.as_ref().to_path_buf(),
            source,
        }
    }

    pub fn usage(msg: impl Into<String>) -> Self {
        Error::Usage(one_line(msg.into()))
    }

    /// Process exit code, documented in docs/exit-codes.md.
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Usage(_) => 2,
            Error::BadInput { .. } => 3,
            Error::Io { .. } => 4,
            Error::Numeric(_) => 5,
            Error::Device(_) => 6,
        }
    }
}

/// Errors are shown on one line: fold any newline that came from a library message.
fn one_line(s: String) -> String {
    if s.contains('\n') {
        s.split('\n')
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect::<Vec<_>>()
            .join(" ")
    } else {
        s
    }
}

/// Attach a file to errors from libraries that do not know which file they were reading.
pub trait FileContext<T> {
    fn in_file(self, path: impl AsRef<Path>) -> Result<T>;
}

impl<T, E: std::fmt::Display> FileContext<T> for std::result::Result<T, E> {
    fn in_file(self, path: impl AsRef<Path>) -> Result<T> {
        self.map_err(|e| Error::bad_input(path, e.to_string()))
    }
}
