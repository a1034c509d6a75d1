//! Bodies of the registry's HTTP API (`/v1`), shared by the server and its clients.

use serde::{Deserialize, Serialize};

use crate::digest::Digest;
use crate::manifest::{BlobInfo, Manifest};
use crate::reference::{Name, Namespace, Tag, Version};

/// `GET /v1/repos/{ns}/{name}/resolve/{selector}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Resolved {
    /// The reference as resolved, e.g. `legal/contracts@v3`.
    pub reference: String,
    pub digest: Digest,
    pub manifest: Manifest,
}

/// `GET /v1/namespaces`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NamespaceList {
    pub namespaces: Vec<Namespace>,
}

/// `GET /v1/repos/{ns}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NameList {
    pub namespace: Namespace,
    pub names: Vec<Name>,
}

/// `GET /v1/repos/{ns}/{name}[?limit=N[&after=VERSION]]`: one cartridge's versions in reading
/// order (all, or a page of N at a time), and its tags (on the first page).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RepositoryListing {
    pub repository: String,
    pub versions: Vec<VersionEntry>,
    pub tags: Vec<TagEntry>,
    /// More versions follow: ask again with `after` set to this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next: Option<Version>,
}

/// Versions a page of a listing holds at most.
pub const LISTING_PAGE: usize = 1000;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionEntry {
    pub version: Version,
    pub manifest: Digest,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TagEntry {
    pub tag: Tag,
    pub manifest: Digest,
    /// Bumped by every move; a client can watch it to see that a tag moved.
    pub generation: u64,
}

/// `POST /v1/repos/{ns}/{name}/blobs/missing`: which of these does the registry lack?
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MissingBlobsRequest {
    pub digests: Vec<Digest>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MissingBlobsResponse {
    pub missing: Vec<Digest>,
}

/// `POST /v1/repos/{ns}/{name}/blobs/uploads`: where to send these blobs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UploadRequest {
    pub blobs: Vec<BlobInfo>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UploadResponse {
    pub uploads: Vec<UploadTarget>,
}

/// Where one blob goes: `PUT` its bytes to `url`, then, if `commit_url` is set, `POST` it so the
/// registry verifies the bytes and makes the blob visible. Relative URLs are relative to the registry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UploadTarget {
    pub digest: Digest,
    pub url: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit_url: Option<String>,
}

/// `PUT /v1/repos/{ns}/{name}/versions/{version}` answers with this.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Published {
    pub reference: String,
    pub digest: Digest,
}

/// `PUT /v1/repos/{ns}/{name}/tags/{tag}`: point a tag at a manifest, optionally only if it still
/// points where the client last saw it (compare-and-swap). A misspelt condition is refused, never
/// taken for an unconditional move.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TagUpdate {
    pub manifest: Digest,
    /// Move only if the tag currently points at this manifest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub if_matches: Option<Digest>,
    /// With `if_matches`: only if the tag is still at this generation too. A move made again
    /// after its answer was lost then cannot undo a move back made meanwhile (the tag pointing
    /// at the expected manifest once more, at a later generation).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub if_generation: Option<u64>,
    /// Create only if the tag does not exist.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub if_absent: bool,
}

/// `GET/PUT /v1/namespaces/{ns}/settings`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NamespaceSettings {
    /// Anyone may pull from this namespace without a token.
    #[serde(default)]
    pub anonymous_pull: bool,
}

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
    /// The endpoint exists, but not for this method.
    MethodNotAllowed,
    /// No token, or one that is forged or expired.
    Unauthorized,
    /// A valid token without the scope the request needs.
    Forbidden,
    NotFound,
    /// The version is already published; versions never change.
    VersionExists,
    /// Something still points at what is to be deleted (a tag at a version).
    InUse,
    /// The tag moved since the client read it (compare-and-swap lost).
    TagMoved,
    /// The body is over the size cap.
    TooLarge,
    /// A byte range outside the blob.
    RangeNotSatisfiable,
    /// Uploaded bytes do not hash to the digest they were sent under.
    DigestMismatch,
    /// A manifest references blobs the registry does not hold.
    MissingBlobs,
    /// A manifest or cartridge is inconsistent.
    InvalidManifest,
    /// A cartridge made for another model than the one asking for it.
    ModelMismatch,
    /// The request does not fit in the memory budget, even after evicting everything unused.
    OutOfMemory,
    /// The storage backend (or, for the loader, the registry) failed; retrying may help.
    Unavailable,
    Internal,
}

impl ErrorCode {
    pub fn http_status(self) -> u16 {
        match self {
            Self::BadRequest => 400,
            Self::MethodNotAllowed => 405,
            Self::Unauthorized => 401,
            Self::Forbidden => 403,
            Self::NotFound => 404,
            Self::VersionExists | Self::InUse | Self::ModelMismatch => 409,
            Self::TagMoved => 412,
            Self::TooLarge => 413,
            Self::RangeNotSatisfiable => 416,
            Self::DigestMismatch | Self::MissingBlobs | Self::InvalidManifest => 422,
            Self::Unavailable => 503,
            Self::OutOfMemory => 507,
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
