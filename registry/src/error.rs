//! The one mapping from errors to HTTP responses: `{code, message}` with the code's status.
//! Anything unexpected is logged and answered as 500 or 503, never with internals leaked.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use cartridge_schemas::api::{ErrorBody, ErrorCode};
use cartridge_schemas::reference::ReferenceError;

use crate::auth::AuthError;
use crate::storage::StorageError;

#[derive(Debug)]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: String,
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::BadRequest, message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::NotFound, message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.code.http_status())
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let body = ErrorBody {
            code: self.code,
            message: self.message,
        };
        let mut response = (status, Json(body)).into_response();
        if status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"cartridge\""),
            );
        }
        response
    }
}

impl From<StorageError> for ApiError {
    fn from(error: StorageError) -> Self {
        let message = error.to_string();
        let code = match &error {
            StorageError::NotFound { .. } => ErrorCode::NotFound,
            StorageError::VersionExists { .. } => ErrorCode::VersionExists,
            StorageError::InUse { .. } => ErrorCode::InUse,
            StorageError::TagMoved { .. } => ErrorCode::TagMoved,
            StorageError::DigestMismatch { .. } => ErrorCode::DigestMismatch,
            StorageError::TooLarge { .. } => ErrorCode::TooLarge,
            StorageError::MissingBlobs { .. } => ErrorCode::MissingBlobs,
            StorageError::GcRunning | StorageError::GcLeaseLost | StorageError::GcInterrupted => {
                ErrorCode::Unavailable
            }
            StorageError::InvalidManifest(_) => ErrorCode::InvalidManifest,
            // Both name object keys: the log gets them, the caller what it can act on.
            StorageError::Contended { .. } => {
                tracing::warn!(%error, "storage contended");
                return Self::new(
                    ErrorCode::Unavailable,
                    "the registry's state changed under this request repeatedly; retry in a moment",
                );
            }
            StorageError::Unconditional => ErrorCode::Internal,
            StorageError::Corrupt { .. } => {
                tracing::error!(%error, "corrupt object in storage");
                return Self::new(
                    ErrorCode::Internal,
                    "stored data this request needs is corrupt; the registry's log names it",
                );
            }
            // Refused for want of rights or support: a deployment's fault, which waiting does
            // not mend.
            StorageError::Backend(
                object_store::Error::PermissionDenied { .. }
                | object_store::Error::Unauthenticated { .. }
                | object_store::Error::NotImplemented { .. },
            ) => {
                tracing::error!(%error, "storage refused the registry");
                return Self::new(
                    ErrorCode::Internal,
                    "storage refused the registry (its permissions or configuration); the registry's log says more",
                );
            }
            StorageError::Backend(_) => {
                tracing::error!(%error, "storage backend failed");
                return Self::new(
                    ErrorCode::Unavailable,
                    "storage is unavailable; retry later",
                );
            }
        };
        Self::new(code, message)
    }
}

impl From<ReferenceError> for ApiError {
    fn from(error: ReferenceError) -> Self {
        Self::bad_request(error.to_string())
    }
}

impl From<AuthError> for ApiError {
    fn from(error: AuthError) -> Self {
        Self::new(ErrorCode::Unauthorized, error.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_never_name_object_keys() {
        let key = "repos/legal/contracts/tags/stable/00000000000000000007";
        for (error, code) in [
            (
                StorageError::Corrupt {
                    key: key.into(),
                    detail: "expected value at line 1".into(),
                },
                ErrorCode::Internal,
            ),
            (
                StorageError::Contended { what: key.into() },
                ErrorCode::Unavailable,
            ),
        ] {
            let answer = ApiError::from(error);
            assert_eq!(answer.code, code);
            assert!(!answer.message.contains("repos/"), "{}", answer.message);
        }
    }
}
