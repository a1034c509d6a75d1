//! The registry's HTTP API, one method per endpoint.

use std::time::Duration;

use bytes::Bytes;
use cartridge_schemas::Digest;
use cartridge_schemas::api::{
    ErrorBody, LISTING_PAGE, MissingBlobsRequest, MissingBlobsResponse, NameList, NamespaceList,
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
        // Redirects are followed by hand (see `blob`): reqwest's own following sends the token
        // again to any further hop on the redirected-to host.
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            // Under the registry's 30 s for an idle connection's next request: a request is
            // never sent on a connection the registry is closing.
            .pool_idle_timeout(Duration::from_secs(20))
            .connect_timeout(Duration::from_secs(10))
            .user_agent(concat!("cartridge/", env!("CARGO_PKG_VERSION")))
            .build()?;
        // A token read from a file (a Kubernetes secret made `--from-file`) often ends in a
        // newline, which no header carries.
        let token = token
            .map(|token| token.trim().to_owned())
            .filter(|token| !token.is_empty());
        if let Some(bad) = token
            .iter()
            .flat_map(|token| token.chars())
            .find(|c| !c.is_ascii_graphic())
        {
            return Err(ClientError::Usage(format!(
                "the token holds {bad:?}, which an HTTP header cannot carry (a token is printable ASCII)"
            )));
        }
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
        self.checked(self.exchange(builder, limit).await?).await
    }

    /// [`check`], saying so where a 401 answers a client that sent no token: tokens are saved
    /// per registry URL, and one spelled otherwise finds none.
    async fn checked(&self, response: Response) -> Result<Response, ClientError> {
        check(response).await.map_err(|error| match error {
            ClientError::Api {
                status: 401,
                code,
                message,
                retry_after,
            } if self.token.is_none() => ClientError::Api {
                status: 401,
                code,
                message: format!("{message} (no token was sent to {})", self.base),
                retry_after,
            },
            other => other,
        })
    }

    /// Sends a request and waits up to `limit` for the answer's head, whatever its status.
    async fn exchange(
        &self,
        builder: RequestBuilder,
        limit: Duration,
    ) -> Result<Response, ClientError> {
        let sent = tokio::time::timeout(limit, builder.send())
            .await
            .map_err(|_| ClientError::NoAnswer {
                seconds: limit.as_secs(),
            })?;
        sent.map_err(|source| {
            let source = redacted(source);
            if source.is_connect() {
                // The registry, or the storage it sent the request on to.
                let url = source.url().map_or_else(
                    || self.base.to_string(),
                    |u| u.origin().ascii_serialization(),
                );
                ClientError::Connect { url, source }
            } else if source.is_builder() {
                // Nothing was sent, and sending again makes the same request.
                ClientError::Usage(format!("the request could not be made: {source}"))
            } else {
                ClientError::Http(source)
            }
        })
    }

    /// An API answer's JSON, read up to [`JSON_LIMIT`] bytes with [`BODY_STALL`] between pieces:
    /// a registry (or what poses as one) cannot fill memory or hold the call without end.
    async fn json<T: DeserializeOwned>(&self, builder: RequestBuilder) -> Result<T, ClientError> {
        let mut response = self.send(builder).await?;
        let (status, url) = (response.status().as_u16(), bare_url(&response));
        let mut body = Vec::new();
        if !read_up_to(&mut response, JSON_LIMIT, &mut body).await? {
            return Err(ClientError::Unexpected {
                status,
                url,
                body: format!("an answer longer than {JSON_LIMIT} bytes"),
                retry_after: None,
            });
        }
        serde_json::from_slice(&body).map_err(|e| ClientError::Unexpected {
            status,
            url,
            body: format!("an answer that is not the API's JSON: {e}"),
            retry_after: None,
        })
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

    /// Every version (page after page) and tag of a cartridge.
    pub async fn listing(&self, repo: &Repository) -> Result<RepositoryListing, ClientError> {
        let path = format!("/v1/repos/{repo}");
        let mut listing = self
            .listing_page(&path, format!("limit={LISTING_PAGE}"))
            .await?;
        while let Some(after) = listing.next.take() {
            // A version's `+` is a space in a query: encoded.
            let query = url::form_urlencoded::Serializer::new(String::new())
                .append_pair("limit", &LISTING_PAGE.to_string())
                .append_pair("after", after.as_str())
                .finish();
            let page = self.listing_page(&path, query).await?;
            // Each page must move on, or a registry could keep the client asking.
            if page
                .versions
                .iter()
                .any(|v| v.version.precedence() <= after.precedence())
                || page
                    .next
                    .as_ref()
                    .is_some_and(|n| n.precedence() <= after.precedence())
            {
                return Err(ClientError::Answer(format!(
                    "the listing of {repo} after {after} did not move on"
                )));
            }
            // Tags come with the first page alone.
            listing.versions.extend(page.versions);
            listing.next = page.next;
        }
        Ok(listing)
    }

    /// A cartridge's tags (with as few versions as a listing gives).
    pub async fn tags(&self, repo: &Repository) -> Result<Vec<TagEntry>, ClientError> {
        let path = format!("/v1/repos/{repo}");
        Ok(self.listing_page(&path, "limit=1".into()).await?.tags)
    }

    async fn listing_page(
        &self,
        path: &str,
        query: String,
    ) -> Result<RepositoryListing, ClientError> {
        self.json(self.request(Method::GET, &format!("{path}?{query}"))?)
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
                retry_after: None,
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

    pub async fn namespace_settings(
        &self,
        namespace: &Namespace,
    ) -> Result<NamespaceSettings, ClientError> {
        self.json(self.request(Method::GET, &format!("/v1/namespaces/{namespace}/settings"))?)
            .await
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

    /// Starts downloading a blob from byte `offset` on, waiting up to `limit` for each answer's
    /// head. The registry may redirect to where the blob lies (a presigned URL): that hop, and
    /// any after it, goes without the token.
    pub async fn blob(
        &self,
        repo: &Repository,
        digest: &Digest,
        offset: u64,
        limit: Duration,
    ) -> Result<Response, ClientError> {
        let range = |builder: RequestBuilder| {
            if offset > 0 {
                builder.header(reqwest::header::RANGE, format!("bytes={offset}-"))
            } else {
                builder
            }
        };
        let builder = self.request(
            Method::GET,
            &format!("/v1/repos/{repo}/blobs/{}", digest.hex()),
        )?;
        let mut response = self.exchange(range(builder), limit).await?;
        for _ in 0..MAX_REDIRECTS {
            let Some(next) = redirect_target(&response) else {
                break;
            };
            response = self.exchange(range(self.http.get(next)), limit).await?;
        }
        self.checked(response).await
    }
}

/// Where a redirect points, resolved against the URL that answered it.
fn redirect_target(response: &Response) -> Option<Url> {
    if !response.status().is_redirection() {
        return None;
    }
    let location = response.headers().get(reqwest::header::LOCATION)?;
    response.url().join(location.to_str().ok()?).ok()
}

/// A response's URL without its query (a presigned URL's query is a credential).
fn bare_url(response: &Response) -> String {
    let mut url = response.url().clone();
    url.set_query(None);
    url.to_string()
}

/// Reads a body into `body`, at most `limit` bytes of it, waiting at most [`BODY_STALL`] for
/// each piece. Whether that was the whole body; on an error, `body` holds what came.
async fn read_up_to(
    response: &mut Response,
    limit: usize,
    body: &mut Vec<u8>,
) -> Result<bool, ClientError> {
    loop {
        let piece = tokio::time::timeout(BODY_STALL, response.chunk())
            .await
            .map_err(|_| ClientError::NoAnswer {
                seconds: BODY_STALL.as_secs(),
            })??;
        let Some(piece) = piece else {
            return Ok(true);
        };
        let room = limit - body.len();
        body.extend_from_slice(&piece[..piece.len().min(room)]);
        if piece.len() > room {
            return Ok(false);
        }
    }
}

async fn check(mut response: Response) -> Result<Response, ClientError> {
    let status = response.status();
    if status.is_success() {
        return Ok(response);
    }
    let url = bare_url(&response);
    // Seconds only; an HTTP date is rare from the services in front of a registry.
    let retry_after = response
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok()?.trim().parse().ok())
        .map(Duration::from_secs);
    if status.is_redirection() {
        let to = redirect_target(&response).map_or("nowhere readable".into(), |u| {
            let mut u = u;
            u.set_query(None);
            u.to_string()
        });
        // Not followed: a request to the registry carries the token.
        return Err(ClientError::Unexpected {
            status: status.as_u16(),
            url,
            body: format!("redirected to {to}"),
            retry_after,
        });
    }
    // Only the start of an error is read and shown, however it ends.
    let mut body = Vec::new();
    let _ = read_up_to(&mut response, ERROR_LIMIT, &mut body).await;
    let text = String::from_utf8_lossy(&body).into_owned();
    match serde_json::from_str::<ErrorBody>(&text) {
        Ok(body) => Err(ClientError::Api {
            status: status.as_u16(),
            code: body.code,
            message: body.message,
            retry_after,
        }),
        Err(_) => Err(ClientError::Unexpected {
            status: status.as_u16(),
            url,
            body: text.chars().take(300).collect(),
            retry_after,
        }),
    }
}

/// The longest wait for an answer's head: longer than a publish that first waits out a garbage
/// collection and then checks thousands of blobs.
const ANSWER_WITHIN: Duration = Duration::from_secs(300);

/// The longest pause within an answer's body (its head came).
const BODY_STALL: Duration = Duration::from_secs(60);

/// The largest API answer read: a listing of tens of thousands of versions fits.
const JSON_LIMIT: usize = 64 << 20;

/// The most of an error answer read.
const ERROR_LIMIT: usize = 64 << 10;

/// Hops a blob download follows (the registry's redirect to storage, and storage's own).
const MAX_REDIRECTS: usize = 5;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_token_goes_to_the_registry_only() {
        let client = Client::new("http://127.0.0.1:7070", Some("secret".into())).unwrap();
        let sent = client
            .request(Method::PUT, "/v1/uploads/x")
            .unwrap()
            .build()
            .unwrap();
        assert_eq!(
            sent.headers()[reqwest::header::AUTHORIZATION],
            "Bearer secret"
        );
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

    #[test]
    fn a_token_from_a_file_loses_its_newline_and_one_no_header_carries_is_refused() {
        let client = Client::new("http://127.0.0.1:7070", Some("secret\n".into())).unwrap();
        assert_eq!(client.token.as_deref(), Some("secret"));
        let error = Client::new("http://127.0.0.1:7070", Some("sec\nret".into()))
            .unwrap_err()
            .to_string();
        assert!(error.contains("the token holds '\\n'"), "{error}");
        assert!(
            !error.contains("sec"),
            "the token stays out of errors: {error}"
        );
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

    #[tokio::test(flavor = "multi_thread")]
    async fn a_redirect_carries_no_token_past_the_registry() {
        use std::io::Write;

        use crate::testing::{serve, target};
        // Storage redirects to itself once more, as S3 and CDNs may.
        let storage = serve(|head, stream| {
            let _ = match target(head) {
                "/blob" => write!(
                    stream,
                    "HTTP/1.1 307 Again\r\nLocation: /blob?hop=1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                ),
                _ => write!(
                    stream,
                    "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nbytes"
                ),
            };
        });
        let to = format!("{}/blob", storage.url);
        let registry = serve(move |head, stream| {
            let _ = if target(head).starts_with("/v1/repos/") {
                write!(
                    stream,
                    "HTTP/1.1 302 Found\r\nLocation: {to}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                )
            } else {
                write!(
                    stream,
                    "HTTP/1.1 301 Moved\r\nLocation: https://elsewhere.example/v1/health\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                )
            };
        });
        let client = Client::new(&registry.url, Some("s3cr3t".into())).unwrap();
        let response = client
            .blob(
                &"team/x".parse().unwrap(),
                &Digest::of(b"x"),
                0,
                Duration::from_secs(10),
            )
            .await
            .unwrap();
        assert_eq!(response.bytes().await.unwrap().as_ref(), b"bytes");
        let asked = storage.requests.lock().unwrap().clone();
        assert_eq!(asked.len(), 2, "{asked:?}");
        assert!(
            asked.iter().all(|head| !head.contains("s3cr3t")),
            "{asked:?}"
        );
        assert!(registry.requests.lock().unwrap()[0].contains("Bearer s3cr3t"));
        // The API itself is never redirected: the answer names where to go instead.
        let error = client.health().await.unwrap_err().to_string();
        assert!(
            error.contains("redirected to https://elsewhere.example/v1/health"),
            "{error}"
        );
        assert_eq!(registry.requests.lock().unwrap().len(), 2);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn an_endless_answer_is_cut_short() {
        use std::io::Write;

        use crate::testing::{serve, target};
        // An error, or an answer, whose body never ends.
        let server = serve(|head, stream| {
            let status = if target(head) == "/v1/health" {
                "500 Oops"
            } else {
                "200 OK"
            };
            let _ = write!(
                stream,
                "HTTP/1.1 {status}\r\nTransfer-Encoding: chunked\r\nContent-Type: application/json\r\n\r\n"
            );
            let piece = [b'['; 1 << 16];
            while write!(stream, "{:x}\r\n", piece.len())
                .and_then(|()| stream.write_all(&piece))
                .and_then(|()| stream.write_all(b"\r\n"))
                .is_ok()
            {}
        });
        let client = Client::new(&server.url, None).unwrap();
        let error = client.health().await.unwrap_err();
        assert!(
            matches!(&error, ClientError::Unexpected { status: 500, body, .. } if body.starts_with("[[[[")),
            "{error}"
        );
        let error = client.namespaces().await.unwrap_err().to_string();
        assert!(error.contains("an answer longer than"), "{error}");
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_listing_follows_its_pages_and_they_must_move_on() {
        use std::io::Write;

        use crate::testing::{serve, target};
        let answer = |body: serde_json::Value| {
            let body = body.to_string();
            format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            )
        };
        let entry =
            |v: &str| serde_json::json!({"version": v, "manifest": Digest::of(v.as_bytes())});
        let server = serve(move |head, stream| {
            let body = match target(head) {
                "/v1/repos/ns/x?limit=1000" => {
                    serde_json::json!({"repository": "ns/x", "versions": [entry("v1")], "next": "v1+b",
                        "tags": [{"tag": "latest", "manifest": Digest::of(b"v2"), "generation": 2}]})
                }
                "/v1/repos/ns/x?limit=1000&after=v1%2Bb" => {
                    serde_json::json!({"repository": "ns/x", "versions": [entry("v2")], "tags": []})
                }
                // A registry sending the client back where it was.
                "/v1/repos/ns/loop?limit=1000" => {
                    serde_json::json!({"repository": "ns/loop", "versions": [], "tags": [], "next": "v1"})
                }
                _ => {
                    serde_json::json!({"repository": "ns/loop", "versions": [entry("v1")], "tags": [], "next": "v1"})
                }
            };
            let _ = stream.write_all(answer(body).as_bytes());
        });
        let client = Client::new(&server.url, None).unwrap();
        let listing = client.listing(&"ns/x".parse().unwrap()).await.unwrap();
        let versions: Vec<&str> = listing
            .versions
            .iter()
            .map(|v| v.version.as_str())
            .collect();
        assert_eq!(versions, ["v1", "v2"]);
        assert_eq!(listing.tags.len(), 1);
        assert_eq!(listing.next, None);
        let error = client
            .listing(&"ns/loop".parse().unwrap())
            .await
            .unwrap_err()
            .to_string();
        assert!(error.contains("did not move on"), "{error}");
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_throttled_answer_says_how_long_to_wait() {
        use std::io::Write;
        let server = crate::testing::serve(|_, stream| {
            let body = r#"{"code": "unavailable", "message": "slow down"}"#;
            let _ = write!(
                stream,
                "HTTP/1.1 429 Too Many\r\nRetry-After: 7\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        });
        let error = Client::new(&server.url, None)
            .unwrap()
            .health()
            .await
            .unwrap_err();
        assert_eq!(error.retry_after(), Some(Duration::from_secs(7)), "{error}");
        assert!(error.is_transient() && error.to_string().contains("slow down"));
    }

    #[test]
    fn a_throttled_call_waits_as_asked_within_reason() {
        let throttled = |seconds| ClientError::Api {
            status: 429,
            code: cartridge_schemas::api::ErrorCode::Unavailable,
            message: "slow down".into(),
            retry_after: Some(Duration::from_secs(seconds)),
        };
        assert!(throttled(3).is_transient() && throttled(3).is_deferred());
        let planned = Duration::from_millis(200);
        assert_eq!(throttled(3).pause(planned), Duration::from_secs(3));
        assert_eq!(throttled(3600).pause(planned), Duration::from_secs(60));
        assert_eq!(throttled(0).pause(planned), planned);
        // S3's answer to a body that came too slowly is worth another try; other 400s are not.
        let s3 = |body: &str| ClientError::Unexpected {
            status: 400,
            url: "http://s3".into(),
            body: body.into(),
            retry_after: None,
        };
        assert!(s3("<Error><Code>RequestTimeout</Code></Error>").is_transient());
        assert!(!s3("<Error><Code>InvalidArgument</Code></Error>").is_transient());
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
