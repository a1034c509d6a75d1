//! Bodies of the registry's HTTP API that more than one crate reads or writes.

use serde::{Deserialize, Serialize};

/// Every error response's body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub code: ErrorCode,
    pub message: String,
}

/// Machine-readable error kinds; each has one HTTP status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// A malformed name, reference, digest or body.
    BadRequest,
    /// No token, or one that is forged or expired.
    Unauthorized,
    /// A valid token without the scope the request needs.
    Forbidden,
    NotFound,
    /// The version is already published; versions never change.
    VersionExists,
    /// The tag moved since the client read it (compare-and-swap lost).
    TagMoved,
    /// The body is over the size cap.
    TooLarge,
    /// Uploaded bytes do not hash to the digest they were sent under.
    DigestMismatch,
    /// A manifest references blobs the registry does not hold.
    MissingBlobs,
    /// A manifest or cartridge is inconsistent.
    InvalidManifest,
    /// The storage backend failed; retrying may help.
    Unavailable,
    Internal,
}

impl ErrorCode {
    pub fn http_status(self) -> u16 {
        match self {
            Self::BadRequest => 400,
            Self::Unauthorized => 401,
            Self::Forbidden => 403,
            Self::NotFound => 404,
            Self::VersionExists => 409,
            Self::TagMoved => 412,
            Self::TooLarge => 413,
            Self::DigestMismatch | Self::MissingBlobs | Self::InvalidManifest => 422,
            Self::Unavailable => 503,
            Self::Internal => 500,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_body_wire_shape() {
        let body = ErrorBody {
            code: ErrorCode::VersionExists,
            message: "legal/contracts@v3 exists".into(),
        };
        let json = serde_json::to_string(&body).unwrap();
        assert_eq!(
            json,
            r#"{"code":"version_exists","message":"legal/contracts@v3 exists"}"#
        );
        assert_eq!(serde_json::from_str::<ErrorBody>(&json).unwrap(), body);
        assert_eq!(body.code.http_status(), 409);
    }
}
