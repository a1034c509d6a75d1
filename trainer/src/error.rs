use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
    /// A model file or configuration that cannot be used.
    #[error("{0}")]
    Model(String),
    /// Training inputs (corpus, conversations, QA sets) that cannot be used.
    #[error("{0}")]
    Data(String),
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Format(#[from] cartridge_schemas::file::FormatError),
    /// The run stopped when asked to (Ctrl-C), saying where it stopped and what it kept.
    #[error("{0}")]
    Interrupted(String),
}

impl Error {
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        Self::Io {
            path: path.to_owned(),
            source,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
