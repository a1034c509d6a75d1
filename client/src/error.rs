use std::path::PathBuf;
use std::time::Duration;

use cartridge_codec::CodecError;
use cartridge_schemas::api::ErrorCode;
use cartridge_schemas::file::FormatError;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The registry answered with an error body.
    #[error("{message} (HTTP {status})")]
    Api {
        status: u16,
        code: ErrorCode,
        message: String,
        /// The answer's Retry-After.
        retry_after: Option<Duration>,
    },
    /// The registry answered with something that is not the API's.
    #[error("unexpected HTTP {status} from {url}: {body}")]
    Unexpected {
        status: u16,
        url: String,
        body: String,
        retry_after: Option<Duration>,
    },
    /// The registry, or the storage a download was sent on to, did not take the connection.
    #[error("cannot reach {url}: {source}")]
    Connect { url: String, source: reqwest::Error },
    #[error("{0}")]
    Http(reqwest::Error),
    #[error("downloading blob {digest}: {source}")]
    Download {
        digest: cartridge_schemas::Digest,
        source: reqwest::Error,
    },
    #[error("no answer from the registry within {seconds} s")]
    NoAnswer { seconds: u64 },
    #[error("no data for {seconds} s while downloading blob {digest}")]
    Stalled {
        digest: cartridge_schemas::Digest,
        seconds: u64,
    },
    #[error("the download of blob {digest} ended after {received} of its {size} bytes")]
    EndedEarly {
        digest: cartridge_schemas::Digest,
        received: u64,
        size: u64,
    },
    #[error(transparent)]
    Codec(#[from] CodecError),
    #[error(transparent)]
    Format(#[from] FormatError),
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A resumed download answered with a range that does not continue it (a proxy's doing).
    #[error("asked for blob {digest} from byte {asked}, the answer starts {}", got.map_or("nowhere readable".into(), |at| format!("at byte {at}")))]
    WrongRange {
        digest: cartridge_schemas::Digest,
        asked: u64,
        got: Option<u64>,
    },
    #[error("invalid manifest from the registry: {0}")]
    Manifest(String),
    /// A well-formed answer that cannot be right (a listing page that does not move on).
    #[error("unusable answer from the registry: {0}")]
    Answer(String),
    #[error("{0}")]
    Usage(String),
}

impl From<reqwest::Error> for ClientError {
    fn from(error: reqwest::Error) -> Self {
        Self::Http(redacted(error))
    }
}

/// `error` without its URL's query, which in a presigned URL is a credential (errors are
/// printed and logged).
pub fn redacted(mut error: reqwest::Error) -> reqwest::Error {
    if let Some(url) = error.url_mut() {
        url.set_query(None);
    }
    error
}

impl ClientError {
    pub fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| Self::Io { path, source }
    }

    /// The API error code, if the registry sent one.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            Self::Api { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// Worth retrying: the network or the registry's storage failed, or a gateway throttled
    /// or timed out the request (429, 408), not the request itself.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Api { status, .. } => *status >= 500 || matches!(status, 408 | 429),
            // S3 answers a presigned PUT whose body came too slowly with 400 RequestTimeout.
            Self::Unexpected { status, body, .. } => {
                *status >= 500
                    || matches!(status, 408 | 429)
                    || (*status == 400 && body.contains("<Code>RequestTimeout</Code>"))
            }
            // A wrong range emptied the partial download: the retry asks for the whole blob.
            Self::Connect { .. }
            | Self::Http(_)
            | Self::Download { .. }
            | Self::NoAnswer { .. }
            | Self::Stalled { .. }
            | Self::EndedEarly { .. }
            | Self::WrongRange { .. } => true,
            _ => false,
        }
    }

    /// The registry put the call off (503: a garbage collection holds publishes back), a
    /// gateway lost it (502, 504) or throttled it (429), or its answer never came: the same call
    /// may be made again later. Not a failed storage (500), which waiting does not mend.
    pub fn is_deferred(&self) -> bool {
        match self {
            Self::Api { status, .. } | Self::Unexpected { status, .. } => {
                matches!(status, 429 | 502..=504)
            }
            other => other.is_transient(),
        }
    }

    /// How long the answer asked the caller to wait before trying again.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Api { retry_after, .. } | Self::Unexpected { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// The pause before retrying after this error: `planned`, or longer where the answer asked
    /// for it (at most a minute: a gateway's hint, not a schedule to keep for hours).
    pub fn pause(&self, planned: Duration) -> Duration {
        self.retry_after()
            .map_or(planned, |asked| planned.max(asked.min(MAX_RETRY_AFTER)))
    }
}

/// The longest Retry-After honoured.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(60);
