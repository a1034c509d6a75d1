//! The registry's HTTP API, one method per endpoint.

use std::time::Duration;

use bytes::Bytes;
use cartridge_schemas::Digest;
use cartridge_schemas::api::{
    ErrorBody, MissingBlobsRequest, MissingBlobsResponse, NameList, NamespaceList,
    NamespaceSettings, Published, RepositoryListing, Resolved, TagEntry, TagUpdate, UploadRequest,
    UploadResponse, UploadTarget,
};
use cartridge_schemas::manifest::{BlobInfo, Manifest};
use cartridge_schemas::reference::{Namespace, Repository, Selector, Tag, Version};
use reqwest::{Method, RequestBuilder, Response};
use serde::de::DeserializeOwned;
use url::Url;

use crate::ClientError;
use crate::error::redacted;

#[derive(Debug, Clone)]
pub struct Client {
    http: reqwest::Client,
    base: Url,
    token: Option<String>,
}

impl Client {
    /// A client of the registry at `base` (e.g. `http://127.0.0.1:7070`), with an optional token.
    pub fn new(base: &str, token: Option<String>) -> Result<Self, ClientError> {
        let base = Url::parse(base)
            .map_err(|e| ClientError::Usage(format!("registry URL {base:?}: {e}")))?;
        if !matches!(base.scheme(), "http" | "https") {
            return Err(ClientError::Usage(format!(
                "registry URL {base} must be http:// or https://"
            )));
        }
        // The API lives at the server's root (`/v1/…`, and the registry's answers name paths
        // from there): a path here would be dropped, and the token sent to whatever serves the
        // root of that host.
        if base.path() != "/" || base.query().is_some() || base.fragment().is_some() {
            return Err(ClientError::Usage(format!(
                "registry URL {base} must name the server alone, without a path (e.g. {}://{})",
                base.scheme(),
                base.host_str().unwrap_or("host")
            )));
        }
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .user_agent(concat!("cartridge/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Self { http, base, token })
    }

    pub fn base(&self) -> &Url {
        &self.base
    }

    fn url(&self, path: &str) -> Result<Url, ClientError> {
        self.base
            .join(path)
            .map_err(|e| ClientError::Usage(format!("{path}: {e}")))
    }

    /// A request to the registry itself, carrying the token.
    fn request(&self, method: Method, path: &str) -> Result<RequestBuilder, ClientError> {
        let url = self.url(path)?;
        // Paths come from the registry's answers too: one like `//host/…` must not carry the
        // token to another host.
        if url.origin() != self.base.origin() {
            return Err(ClientError::Usage(format!(
                "the registry sent a path to another host ({path}); the token goes to the registry only"
            )));
        }
        let mut builder = self.http.request(method, url);
        if let Some(token) = &self.token {
            builder = builder.bearer_auth(token);
        }
        Ok(builder)
    }

    /// Sends a request and waits for the answer's head up to [`ANSWER_WITHIN`]; API errors
    /// become [`ClientError::Api`].
    async fn send(&self, builder: RequestBuilder) -> Result<Response, ClientError> {
        self.send_within(builder, ANSWER_WITHIN).await
    }

    /// Sends a request and waits up to `limit` for the answer's head (the body sent, for an
    /// upload): a registry that takes a request and never answers (a stuck proxy, a hung
    /// handler) fails it, and the transfer retries, instead of hanging for good. A body that
    /// comes back is timed by its reader (a download's stall timeout).
    async fn send_within(
        &self,
        builder: RequestBuilder,
        limit: Duration,
    ) -> Result<Response, ClientError> {
        let sent = tokio::time::timeout(limit, builder.send())
            .await
            .map_err(|_| ClientError::NoAnswer {
                seconds: limit.as_secs(),
            })?;
        let response = sent.map_err(|source| {
            let source = redacted(source);
            if source.is_connect() {
                ClientError::Connect {
                    url: self.base.to_string(),
                    source,
                }
            } else {
                ClientError::Http(source)
            }
        })?;
        check(response).await
    }

    async fn json<T: DeserializeOwned>(&self, builder: RequestBuilder) -> Result<T, ClientError> {
        Ok(self.send(builder).await?.json().await?)
    }

    pub async fn health(&self) -> Result<serde_json::Value, ClientError> {
        self.json(self.request(Method::GET, "/v1/health")?).await
    }

    pub async fn namespaces(&self) -> Result<NamespaceList, ClientError> {
        self.json(self.request(Method::GET, "/v1/namespaces")?)
            .await
    }

    pub async fn names(&self, namespace: &Namespace) -> Result<NameList, ClientError> {
        self.json(self.request(Method::GET, &format!("/v1/repos/{namespace}"))?)
            .await
    }

    pub async fn listing(&self, repo: &Repository) -> Result<RepositoryListing, ClientError> {
        self.json(self.request(Method::GET, &format!("/v1/repos/{repo}"))?)
            .await
    }

    pub async fn resolve(
        &self,
        repo: &Repository,
        selector: &Selector,
    ) -> Result<Resolved, ClientError> {
        let resolved: Resolved = self
            .json(self.request(Method::GET, &format!("/v1/repos/{repo}/resolve/{selector}"))?)
            .await?;
        // Never trust a manifest because of where it came from: it must hash to its name.
        let actual = resolved.manifest.digest();
        if actual != resolved.digest {
            return Err(ClientError::Manifest(format!(
                "{} claims digest {} but hashes to {actual}",
                resolved.reference, resolved.digest
            )));
        }
        // A reference pinned to a digest gets that manifest, whatever the registry answers.
        if let Selector::Digest(pinned) = selector
            && resolved.digest != *pinned
        {
            return Err(ClientError::Manifest(format!(
                "{repo}@{pinned} was answered with manifest {}",
                resolved.digest
            )));
        }
        resolved
            .manifest
            .validate()
            .map_err(|e| ClientError::Manifest(e.to_string()))?;
        Ok(resolved)
    }

    pub async fn missing(
        &self,
        repo: &Repository,
        digests: Vec<Digest>,
    ) -> Result<Vec<Digest>, ClientError> {
        let builder = self
            .request(Method::POST, &format!("/v1/repos/{repo}/blobs/missing"))?
            .json(&MissingBlobsRequest { digests });
        Ok(self.json::<MissingBlobsResponse>(builder).await?.missing)
    }

    /// Where to send a blob.
    pub async fn upload_target(
        &self,
        repo: &Repository,
        blob: BlobInfo,
    ) -> Result<UploadTarget, ClientError> {
        let path = format!("/v1/repos/{repo}/blobs/uploads");
        let builder = self
            .request(Method::POST, &path)?
            .json(&UploadRequest { blobs: vec![blob] });
        match <[UploadTarget; 1]>::try_from(self.json::<UploadResponse>(builder).await?.uploads) {
            Ok([target]) if target.digest == blob.digest => Ok(target),
            _ => Err(ClientError::Unexpected {
                status: 200,
                url: path,
                body: format!("no upload target for blob {}", blob.digest),
            }),
        }
    }

    /// Sends one blob where the registry said to, and commits it if it went around the registry.
    pub async fn upload(&self, target: &UploadTarget, bytes: Bytes) -> Result<(), ClientError> {
        let builder = if target.url.starts_with('/') {
            self.request(Method::PUT, &target.url)?
        } else {
            // A presigned URL carries its own authorization; ours must not go to another host.
            let url = Url::parse(&target.url)
                .map_err(|e| ClientError::Usage(format!("upload URL: {e}")))?;
            self.http.put(url)
        };
        // However slow the link, a blob this size goes up at 256 KiB/s or faster.
        let limit = ANSWER_WITHIN + Duration::from_secs(bytes.len() as u64 / (256 << 10));
        self.send_within(builder.body(bytes), limit).await?;
        if let Some(commit) = &target.commit_url {
            self.send(self.request(Method::POST, commit)?).await?;
        }
        Ok(())
    }

    pub async fn publish(
        &self,
        repo: &Repository,
        version: &Version,
        manifest: &Manifest,
    ) -> Result<Published, ClientError> {
        let builder = self
            .request(Method::PUT, &format!("/v1/repos/{repo}/versions/{version}"))?
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(manifest.to_canonical_json());
        self.json(builder).await
    }

    pub async fn delete_version(
        &self,
        repo: &Repository,
        version: &Version,
    ) -> Result<(), ClientError> {
        self.send(self.request(
            Method::DELETE,
            &format!("/v1/repos/{repo}/versions/{version}"),
        )?)
        .await
        .map(drop)
    }

    pub async fn move_tag(
        &self,
        repo: &Repository,
        tag: &Tag,
        update: &TagUpdate,
    ) -> Result<TagEntry, ClientError> {
        self.json(
            self.request(Method::PUT, &format!("/v1/repos/{repo}/tags/{tag}"))?
                .json(update),
        )
        .await
    }

    pub async fn delete_tag(&self, repo: &Repository, tag: &Tag) -> Result<(), ClientError> {
        self.send(self.request(Method::DELETE, &format!("/v1/repos/{repo}/tags/{tag}"))?)
            .await
            .map(drop)
    }

    pub async fn set_namespace_settings(
        &self,
        namespace: &Namespace,
        settings: &NamespaceSettings,
    ) -> Result<NamespaceSettings, ClientError> {
        self.json(
            self.request(Method::PUT, &format!("/v1/namespaces/{namespace}/settings"))?
                .json(settings),
        )
        .await
    }

    /// Starts downloading a blob from byte `offset` on; the response may be a redirect's target.
    pub async fn blob(
        &self,
        repo: &Repository,
        digest: &Digest,
        offset: u64,
    ) -> Result<Response, ClientError> {
        let mut builder = self.request(
            Method::GET,
            &format!("/v1/repos/{repo}/blobs/{}", digest.hex()),
        )?;
        if offset > 0 {
            builder = builder.header(reqwest::header::RANGE, format!("bytes={offset}-"));
        }
        self.send(builder).await
    }
}

async fn check(response: Response) -> Result<Response, ClientError> {
    let status = response.status();
    if status.is_success() {
        return Ok(response);
    }
    let mut url = response.url().clone();
    url.set_query(None);
    let text = response.text().await.unwrap_or_default();
    match serde_json::from_str::<ErrorBody>(&text) {
        Ok(body) => Err(ClientError::Api {
            status: status.as_u16(),
            code: body.code,
            message: body.message,
        }),
        Err(_) => Err(ClientError::Unexpected {
            status: status.as_u16(),
            url: url.to_string(),
            body: text.chars().take(300).collect(),
        }),
    }
}

/// The longest wait for an answer's head: longer than a publish that first waits out a garbage
/// collection and then checks thousands of blobs.
const ANSWER_WITHIN: Duration = Duration::from_secs(300);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_token_goes_to_the_registry_only() {
        let client = Client::new("http://127.0.0.1:7070", Some("secret".into())).unwrap();
        assert!(client.request(Method::PUT, "/v1/uploads/x").is_ok());
        let error = client
            .request(Method::PUT, "//elsewhere.example/upload")
            .unwrap_err();
        assert!(error.to_string().contains("another host"), "{error}");
        // A path would be dropped by every request: the token would reach the host's root.
        assert!(Client::new("https://registry.example/", None).is_ok());
        for url in [
            "https://host.example/cartridge",
            "https://host.example/?a=b",
        ] {
            let error = Client::new(url, None).unwrap_err().to_string();
            assert!(error.contains("without a path"), "{url}: {error}");
        }
    }

    #[tokio::test]
    async fn a_registry_that_never_answers_fails_the_request() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        // Takes the connection and the request, and says nothing.
        let _held = std::thread::spawn(move || listener.accept().map(|(stream, _)| stream));
        let client = Client::new(&url, None).unwrap();
        let request = client.request(Method::GET, "/v1/health").unwrap();
        let error = client
            .send_within(request, Duration::from_millis(300))
            .await
            .unwrap_err();
        assert!(matches!(error, ClientError::NoAnswer { .. }), "{error}");
        assert!(error.is_transient());
    }

    #[tokio::test]
    async fn errors_leave_out_a_urls_query() {
        // A presigned URL's query is a credential; nothing listens on port 9.
        let client = Client::new("http://127.0.0.1:9", None).unwrap();
        let url = Url::parse("http://127.0.0.1:9/blob?X-Amz-Signature=s3cr3t").unwrap();
        let error = client.send(client.http.get(url)).await.unwrap_err();
        let text = cartridge_schemas::report::error_line(&error);
        assert!(text.contains("127.0.0.1:9/blob"), "{text}");
        assert!(!text.contains("s3cr3t"), "{text}");
    }
}
