//! Extractors that validate input before a handler runs, answering bad input with `{code, message}`.

use std::collections::HashMap;

use axum::extract::rejection::{BytesRejection, JsonRejection};
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::StatusCode;
use axum::http::request::Parts;
use bytes::Bytes;
use cartridge_schemas::Digest;
use cartridge_schemas::api::ErrorCode;
use cartridge_schemas::reference::{Namespace, Repository, Tag, Version};
use serde::de::DeserializeOwned;

use crate::AppState;
use crate::auth::Claims;
use crate::error::ApiError;

/// The path parameters of a route, parsed on demand into validated types.
pub struct Params(HashMap<String, String>);

impl Params {
    fn get(&self, key: &str) -> Result<&str, ApiError> {
        self.0
            .get(key)
            .map(String::as_str)
            .ok_or_else(|| ApiError::bad_request(format!("missing path parameter {key}")))
    }

    pub fn namespace(&self) -> Result<Namespace, ApiError> {
        Ok(self.get("ns")?.parse()?)
    }

    pub fn repository(&self) -> Result<Repository, ApiError> {
        Ok(Repository {
            namespace: self.namespace()?,
            name: self.get("name")?.parse()?,
        })
    }

    pub fn version(&self) -> Result<Version, ApiError> {
        Ok(self.get("version")?.parse()?)
    }

    pub fn tag(&self) -> Result<Tag, ApiError> {
        Ok(self.get("tag")?.parse()?)
    }

    pub fn selector(&self) -> Result<&str, ApiError> {
        self.get("selector")
    }

    pub fn digest(&self) -> Result<Digest, ApiError> {
        let text = self.get("digest")?;
        // Bare hex or the `blake3:` form.
        let parsed = if text.starts_with("blake3:") {
            text.parse()
        } else {
            Digest::from_hex(text)
        };
        parsed.map_err(|e| ApiError::bad_request(e.to_string()))
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Params {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let axum::extract::Path(map) =
            axum::extract::Path::<HashMap<String, String>>::from_request_parts(parts, state)
                .await
                .map_err(|rejection| ApiError::bad_request(rejection.body_text()))?;
        Ok(Self(map))
    }
}

/// A query parameter of a request, decoded.
pub fn query_param(query: Option<&str>, key: &str) -> Option<String> {
    url::form_urlencoded::parse(query.unwrap_or_default().as_bytes())
        .find_map(|(k, value)| (k == key).then(|| value.into_owned()))
}

/// Who is calling: verified claims, or `None` for a request without a token. A token that is
/// present but forged, expired or malformed is refused here, never treated as anonymous.
pub struct Caller(pub Option<Claims>);

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let Some(value) = parts.headers.get(axum::http::header::AUTHORIZATION) else {
            return Ok(Self(None));
        };
        let token = value
            .to_str()
            .ok()
            // The scheme's name is case-insensitive (RFC 9110).
            .and_then(|v| {
                let (scheme, token) = v.split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then_some(token)
            })
            .ok_or_else(|| {
                ApiError::new(
                    ErrorCode::Unauthorized,
                    "the Authorization header must be 'Bearer <token>'",
                )
            })?;
        Ok(Self(Some(state.keyring().verify(token.trim())?)))
    }
}

fn rejection_error(status: StatusCode, text: String) -> ApiError {
    if status == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::new(
            ErrorCode::TooLarge,
            format!("request body too large: {text}"),
        )
    } else {
        ApiError::bad_request(text)
    }
}

/// A request's body, not read yet: its handler reads it once the caller is authorized, so a
/// caller who may not write is refused (403) before the body is buffered or parsed, and the
/// body's size and syntax errors go only to one who may.
pub struct Unread(Request);

impl<S: Send + Sync> FromRequest<S> for Unread {
    type Rejection = ApiError;

    async fn from_request(request: Request, _: &S) -> Result<Self, Self::Rejection> {
        require_token(&request)?;
        Ok(Self(request))
    }
}

impl Unread {
    /// The whole body, within the route's size limit.
    pub async fn bytes(self) -> Result<Bytes, ApiError> {
        Bytes::from_request(self.0, &())
            .await
            .map_err(|rejection: BytesRejection| {
                rejection_error(rejection.status(), rejection.body_text())
            })
    }

    /// The body as JSON, within the route's size limit.
    pub async fn json<T: DeserializeOwned>(self) -> Result<T, ApiError> {
        axum::Json::<T>::from_request(self.0, &())
            .await
            .map(|axum::Json(value)| value)
            .map_err(|rejection: JsonRejection| {
                rejection_error(rejection.status(), rejection.body_text())
            })
    }
}

/// Every route that takes a body writes, which no anonymous caller may: an anonymous request is
/// refused before anything else about it is looked at.
fn require_token(request: &Request) -> Result<(), ApiError> {
    if request
        .headers()
        .contains_key(axum::http::header::AUTHORIZATION)
    {
        return Ok(());
    }
    Err(ApiError::new(
        ErrorCode::Unauthorized,
        "this needs a token (cartridge login, or CARTRIDGE_TOKEN)",
    ))
}
