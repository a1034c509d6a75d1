use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use cartridge_schemas::api::{ErrorBody, ErrorCode};

#[derive(Debug, Clone, thiserror::Error)]
pub enum LoaderError {
    #[error("{0}")]
    BadRequest(String),
    #[error("unknown cartridge {0}")]
    UnknownReference(String),
    #[error("{reference}: {detail}")]
    ModelMismatch { reference: String, detail: String },
    #[error("{0}")]
    OutOfMemory(String),
    #[error("no such endpoint: {0}")]
    NoEndpoint(String),
    #[error("{0} does not take this method")]
    WrongMethod(String),
    #[error("{0}")]
    TooLarge(String),
    #[error("unknown handle {0} (released, or its lease lapsed)")]
    UnknownHandle(u64),
    #[error("registry unavailable: {0}")]
    Unavailable(String),
    /// The registry lacks a blob a repository's manifest names: that repository's failure (a
    /// collection racing the load), not the registry's as a whole. Another repository may hold
    /// the same cartridge whole.
    #[error("registry unavailable: {0}")]
    MissingBlob(String),
    /// A blob failed verification (it is dropped from the disk cache).
    #[error("{0}")]
    Corrupt(String),
    #[error("{0}")]
    Internal(String),
}

impl LoaderError {
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::BadRequest(_) => ErrorCode::BadRequest,
            Self::UnknownReference(_) | Self::UnknownHandle(_) | Self::NoEndpoint(_) => {
                ErrorCode::NotFound
            }
            Self::TooLarge(_) => ErrorCode::TooLarge,
            Self::WrongMethod(_) => ErrorCode::MethodNotAllowed,
            Self::ModelMismatch { .. } => ErrorCode::ModelMismatch,
            Self::OutOfMemory(_) => ErrorCode::OutOfMemory,
            Self::Unavailable(_) | Self::MissingBlob(_) => ErrorCode::Unavailable,
            Self::Corrupt(_) | Self::Internal(_) => ErrorCode::Internal,
        }
    }
}

impl IntoResponse for LoaderError {
    fn into_response(self) -> Response {
        let code = self.code();
        if code == ErrorCode::Internal {
            tracing::error!(error = %self, "load failed");
        }
        let status =
            StatusCode::from_u16(code.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (
            status,
            Json(ErrorBody {
                code,
                message: self.to_string(),
            }),
        )
            .into_response()
    }
}
