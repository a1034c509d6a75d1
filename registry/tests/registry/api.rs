//! The HTTP API, called in-process: status codes, error bodies, auth and input validation.

use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{Method, Request, StatusCode, header};
use cartridge_registry::auth::{Keyring, Scope};
use cartridge_registry::{AppState, Limits, backend, routes};
use cartridge_schemas::api::{
    ErrorBody, ErrorCode, MissingBlobsResponse, Published, Resolved, UploadResponse,
};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use tower::ServiceExt;

use crate::support::encoded;

struct App {
    router: Router,
    keyring: Keyring,
}

struct Reply {
    status: StatusCode,
    headers: axum::http::HeaderMap,
    body: Vec<u8>,
}

impl Reply {
    fn json<T: serde::de::DeserializeOwned>(&self) -> T {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&self.body)))
    }

    /// Asserts an error reply with this status and code; returns the message.
    fn error(&self, status: StatusCode, code: ErrorCode) -> String {
        assert_eq!(
            self.status,
            status,
            "{}",
            String::from_utf8_lossy(&self.body)
        );
        let body: ErrorBody = self.json();
        assert_eq!(body.code, code);
        body.message
    }
}

fn app() -> App {
    app_with(Limits {
        max_blob_bytes: 64 << 10,
        max_json_bytes: 256 << 10,
        ..Limits::default()
    })
}

fn app_with(limits: Limits) -> App {
    let keyring = Keyring::generate();
    let state = AppState::new(backend::open("memory://").unwrap(), keyring.clone(), limits);
    App {
        router: routes::router(state),
        keyring,
    }
}

impl App {
    fn token(&self, scopes: &[&str]) -> String {
        let scopes: Vec<Scope> = scopes.iter().map(|s| s.parse().unwrap()).collect();
        self.keyring
            .mint("test", &scopes, Duration::from_secs(600))
            .unwrap()
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Body,
        headers: &[(header::HeaderName, &str)],
    ) -> Reply {
        let mut request = Request::builder().method(method).uri(path);
        if let Some(token) = token {
            request = request.header(header::AUTHORIZATION, format!("Bearer {token}"));
        }
        for (name, value) in headers {
            request = request.header(name, *value);
        }
        let response = self
            .router
            .clone()
            .oneshot(request.body(body).unwrap())
            .await
            .unwrap();
        let status = response.status();
        let headers = response.headers().clone();
        let body = response
            .into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec();
        Reply {
            status,
            headers,
            body,
        }
    }

    async fn get(&self, path: &str, token: Option<&str>) -> Reply {
        self.call(Method::GET, path, token, Body::empty(), &[])
            .await
    }

    async fn send_json(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: &Value,
    ) -> Reply {
        self.call(
            method,
            path,
            token,
            Body::from(body.to_string()),
            &[(header::CONTENT_TYPE, "application/json")],
        )
        .await
    }

    /// Uploads a cartridge's chunks and publishes it; returns the manifest digest.
    async fn push(&self, token: &str, repo: &str, version: &str, seed: u8) -> Reply {
        let (manifest, chunks) = encoded(seed);
        for chunk in &chunks {
            let path = format!(
                "/v1/repos/{repo}/blobs/{}",
                chunk.descriptor.stored.digest.hex()
            );
            let reply = self
                .call(
                    Method::PUT,
                    &path,
                    Some(token),
                    Body::from(chunk.bytes.clone()),
                    &[],
                )
                .await;
            assert_eq!(reply.status, StatusCode::CREATED);
        }
        let path = format!("/v1/repos/{repo}/versions/{version}");
        self.call(
            Method::PUT,
            &path,
            Some(token),
            Body::from(manifest.to_canonical_json()),
            &[],
        )
        .await
    }
}

#[tokio::test]
async fn push_resolve_and_download_with_ranges() {
    let app = app();
    let token = app.token(&["legal/*:push"]);
    let reply = app.push(&token, "legal/contracts", "v3", 1).await;
    assert_eq!(reply.status, StatusCode::CREATED);
    let published: Published = reply.json();
    assert_eq!(published.reference, "legal/contracts@v3");

    let reply = app.push(&token, "legal/contracts", "v3", 2).await;
    assert!(
        reply
            .error(StatusCode::CONFLICT, ErrorCode::VersionExists)
            .contains("legal/contracts@v3 already exists")
    );

    let resolved: Resolved = app
        .get("/v1/repos/legal/contracts/resolve/v3", Some(&token))
        .await
        .json();
    assert_eq!(resolved.digest, published.digest);
    let listing: Value = app
        .get("/v1/repos/legal/contracts", Some(&token))
        .await
        .json();
    assert_eq!(listing["versions"][0]["version"], "v3");
    let by_digest: Resolved = app
        .get(
            &format!("/v1/repos/legal/contracts/resolve/{}", published.digest),
            Some(&token),
        )
        .await
        .json();
    assert_eq!(by_digest.manifest, resolved.manifest);

    let chunk = &resolved.manifest.chunks[0].stored;
    let path = format!("/v1/repos/legal/contracts/blobs/{}", chunk.digest);
    let whole = app.get(&path, Some(&token)).await;
    assert_eq!(whole.status, StatusCode::OK);
    assert_eq!(whole.body.len() as u64, chunk.size);
    let part = app
        .call(
            Method::GET,
            &path,
            Some(&token),
            Body::empty(),
            &[(header::RANGE, "bytes=4-9")],
        )
        .await;
    assert_eq!(part.status, StatusCode::PARTIAL_CONTENT);
    assert_eq!(part.body, whole.body[4..10]);
    assert_eq!(
        part.headers[header::CONTENT_RANGE],
        format!("bytes 4-9/{}", chunk.size)
    );
    // HEAD answers the same headers, from the blob's metadata, and no bytes.
    for (range, length, status) in [
        (None, chunk.size, StatusCode::OK),
        (Some("bytes=4-9"), 6, StatusCode::PARTIAL_CONTENT),
    ] {
        let head = app
            .call(
                Method::HEAD,
                &path,
                Some(&token),
                Body::empty(),
                &range
                    .map(|r| (header::RANGE, r))
                    .into_iter()
                    .collect::<Vec<_>>(),
            )
            .await;
        assert_eq!(head.status, status);
        assert!(head.body.is_empty());
        assert_eq!(
            head.headers[header::CONTENT_LENGTH],
            length.to_string().as_str()
        );
        assert_eq!(
            head.headers.get(header::CONTENT_RANGE),
            (range.is_some().then(|| format!("bytes 4-9/{}", chunk.size)))
                .map(|v| v.parse().unwrap())
                .as_ref()
        );
    }
    let rest = app
        .call(
            Method::GET,
            &path,
            Some(&token),
            Body::empty(),
            &[(header::RANGE, "bytes=7-")],
        )
        .await;
    assert_eq!(rest.body, whole.body[7..]);
    let outside = app
        .call(
            Method::GET,
            &path,
            Some(&token),
            Body::empty(),
            &[(header::RANGE, &format!("bytes={}-", chunk.size + 5))],
        )
        .await;
    assert_eq!(
        outside.headers[header::CONTENT_RANGE],
        format!("bytes */{}", chunk.size).as_str()
    );
    outside.error(
        StatusCode::RANGE_NOT_SATISFIABLE,
        ErrorCode::RangeNotSatisfiable,
    );

    // Content is read only through a repository it was published in.
    let foreign = format!("/v1/repos/legal/elsewhere/blobs/{}", chunk.digest);
    app.get(&foreign, Some(&token))
        .await
        .error(StatusCode::NOT_FOUND, ErrorCode::NotFound);
    let foreign = format!("/v1/repos/legal/elsewhere/resolve/{}", published.digest);
    app.get(&foreign, Some(&token))
        .await
        .error(StatusCode::NOT_FOUND, ErrorCode::NotFound);

    let missing: MissingBlobsResponse = app
        .send_json(
            Method::POST,
            "/v1/repos/legal/contracts/blobs/missing",
            Some(&token),
            &json!({"digests": [chunk.digest, cartridge_schemas::Digest::of(b"new")]}),
        )
        .await
        .json();
    assert_eq!(missing.missing, vec![cartridge_schemas::Digest::of(b"new")]);
    let uploads: UploadResponse = app
        .send_json(
            Method::POST,
            "/v1/repos/legal/contracts/blobs/uploads",
            Some(&token),
            &json!({"blobs": [{"digest": chunk.digest, "size": 10}]}),
        )
        .await
        .json();
    assert_eq!(
        uploads.uploads[0].url,
        format!("/v1/repos/legal/contracts/blobs/{}", chunk.digest.hex())
    );
    assert_eq!(uploads.uploads[0].commit_url, None);
}

/// Versions list a page at a time, in reading order, reading only the page's versions.
#[tokio::test]
async fn listings_come_in_pages() {
    let app = app();
    let token = app.token(&["legal/contracts:push"]);
    for (seed, version) in ["v10", "v2", "v1", "v11+build", "v3"].iter().enumerate() {
        let reply = app
            .push(&token, "legal/contracts", version, seed as u8)
            .await;
        assert_eq!(reply.status, StatusCode::CREATED, "{version}");
    }
    let page = |query: &str| {
        let app = &app;
        let token = token.clone();
        let path = format!("/v1/repos/legal/contracts{query}");
        async move { app.get(&path, Some(&token)).await }
    };
    let versions = |listing: &Value| -> Vec<String> {
        listing["versions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v["version"].as_str().unwrap().to_owned())
            .collect()
    };
    let tags = |listing: &Value| listing["tags"].as_array().unwrap().len();
    let published: Published = app.push(&token, "legal/contracts", "v12", 9).await.json();
    let update = json!({"manifest": published.digest});
    let tag = app
        .send_json(
            Method::PUT,
            "/v1/repos/legal/contracts/tags/stable",
            Some(&token),
            &update,
        )
        .await;
    assert_eq!(tag.status, StatusCode::OK);
    let first: Value = page("?limit=2").await.json();
    assert_eq!(versions(&first), ["v1", "v2"]);
    assert_eq!(first["next"], "v2");
    assert_eq!(tags(&first), 1);
    // Tags come with the first page alone.
    let second: Value = page("?after=v2&limit=2").await.json();
    assert_eq!(versions(&second), ["v3", "v10"]);
    assert_eq!((&second["next"], tags(&second)), (&json!("v10"), 0));
    let last: Value = page("?after=v10&limit=2").await.json();
    assert_eq!(versions(&last), ["v11+build", "v12"]);
    assert!(last.get("next").is_none(), "{last}");
    // `+` arrives encoded; a page past the end is empty, not missing.
    let past: Value = page("?limit=5&after=v11%2Bbuild").await.json();
    assert_eq!(versions(&past), ["v12"]);
    let past: Value = page("?limit=5&after=v12").await.json();
    assert!(versions(&past).is_empty());
    // Without a limit, everything (as before pages).
    let all: Value = page("").await.json();
    assert_eq!(
        versions(&all),
        ["v1", "v2", "v3", "v10", "v11+build", "v12"]
    );
    assert_eq!((all.get("next"), tags(&all)), (None, 1));
    // A page of deleted versions is read past: it holds a live one unless none is left.
    let admin = app.token(&["legal/*:admin"]);
    for version in ["v1", "v2", "v3"] {
        let path = format!("/v1/repos/legal/contracts/versions/{version}");
        let deleted = app
            .call(Method::DELETE, &path, Some(&admin), Body::empty(), &[])
            .await;
        assert_eq!(deleted.status, StatusCode::NO_CONTENT);
    }
    let first: Value = page("?limit=2").await.json();
    assert_eq!(versions(&first), ["v10", "v11+build"]);
    assert_eq!(first["next"], "v11+build");
    // A cartridge with nothing to list is missing, paged or not: never published, or all
    // deleted with no tag left.
    app.get("/v1/repos/legal/nothing?limit=2&after=v1", Some(&admin))
        .await
        .error(StatusCode::NOT_FOUND, ErrorCode::NotFound);
    assert_eq!(
        app.push(&admin, "legal/gone", "v1", 7).await.status,
        StatusCode::CREATED
    );
    let gone = "/v1/repos/legal/gone";
    let deleted = app
        .call(
            Method::DELETE,
            &format!("{gone}/versions/v1"),
            Some(&admin),
            Body::empty(),
            &[],
        )
        .await;
    assert_eq!(deleted.status, StatusCode::NO_CONTENT);
    for query in ["", "?limit=2"] {
        app.get(&format!("{gone}{query}"), Some(&admin))
            .await
            .error(StatusCode::NOT_FOUND, ErrorCode::NotFound);
    }
    for bad in [
        "?limit=0",
        "?limit=1001",
        "?limit=x",
        "?limit=2&after=V1",
        "?after=v1",
    ] {
        page(bad)
            .await
            .error(StatusCode::BAD_REQUEST, ErrorCode::BadRequest);
    }
}

#[tokio::test]
async fn tags_compare_and_swap() {
    let app = app();
    let token = app.token(&["legal/contracts:push"]);
    let a: Published = app.push(&token, "legal/contracts", "v1", 1).await.json();
    let b: Published = app.push(&token, "legal/contracts", "v2", 2).await.json();
    let path = "/v1/repos/legal/contracts/tags/stable";
    let reply = app
        .send_json(
            Method::PUT,
            path,
            Some(&token),
            &json!({"manifest": a.digest, "if_absent": true}),
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK);
    let reply = app
        .send_json(
            Method::PUT,
            path,
            Some(&token),
            &json!({"manifest": b.digest, "if_matches": b.digest}),
        )
        .await;
    assert!(
        reply
            .error(StatusCode::PRECONDITION_FAILED, ErrorCode::TagMoved)
            .contains("moved")
    );
    // A misspelt condition is no condition: refused, not taken for a plain move.
    let reply = app
        .send_json(
            Method::PUT,
            path,
            Some(&token),
            &json!({"manifest": b.digest, "if_match": b.digest}),
        )
        .await;
    assert!(
        reply
            .error(StatusCode::BAD_REQUEST, ErrorCode::BadRequest)
            .contains("if_match"),
    );
    let reply = app
        .send_json(
            Method::PUT,
            path,
            Some(&token),
            &json!({"manifest": b.digest, "if_matches": a.digest}),
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK);
    let resolved: Resolved = app
        .get("/v1/repos/legal/contracts/resolve/stable", Some(&token))
        .await
        .json();
    assert_eq!(resolved.digest, b.digest);
    assert_eq!(
        app.call(Method::DELETE, path, Some(&token), Body::empty(), &[])
            .await
            .status,
        StatusCode::NO_CONTENT
    );
    app.get("/v1/repos/legal/contracts/resolve/stable", Some(&token))
        .await
        .error(StatusCode::NOT_FOUND, ErrorCode::NotFound);
}

#[tokio::test]
async fn a_digest_alone_never_reads_another_namespaces_blobs() {
    let app = app();
    let owner = app.token(&["legal/*:push"]);
    let reply = app.push(&owner, "legal/contracts", "v1", 7).await;
    assert_eq!(reply.status, StatusCode::CREATED);
    // Mallory may push to her own namespace and has learned the manifest's digests, not its
    // bytes: a manifest of her own naming them is refused, and nothing is readable through it.
    let mallory = app.token(&["mallory/*:push"]);
    let (manifest, chunks) = encoded(7);
    let digest = chunks[0].descriptor.stored.digest;
    let missing: Value = app
        .call(
            Method::POST,
            "/v1/repos/mallory/x/blobs/missing",
            Some(&mallory),
            Body::from(json!({"digests": [digest]}).to_string()),
            &[(header::CONTENT_TYPE, "application/json")],
        )
        .await
        .json();
    assert_eq!(missing["missing"], json!([digest]), "no existence oracle");
    app.call(
        Method::PUT,
        "/v1/repos/mallory/x/versions/v1",
        Some(&mallory),
        Body::from(manifest.to_canonical_json()),
        &[],
    )
    .await
    .error(StatusCode::UNPROCESSABLE_ENTITY, ErrorCode::MissingBlobs);
    let path = format!("/v1/repos/mallory/x/blobs/{digest}");
    app.get(&path, Some(&mallory))
        .await
        .error(StatusCode::NOT_FOUND, ErrorCode::NotFound);
}

#[tokio::test]
async fn tokens_and_scopes() {
    let app = app();
    let pusher = app.token(&["legal/contracts:push"]);
    assert_eq!(
        app.push(&pusher, "legal/contracts", "v1", 1).await.status,
        StatusCode::CREATED
    );
    let path = "/v1/repos/legal/contracts/resolve/v1";

    let anonymous = app.get(path, None).await;
    assert!(
        anonymous
            .error(StatusCode::UNAUTHORIZED, ErrorCode::Unauthorized)
            .contains("needs a token")
    );
    assert_eq!(
        anonymous.headers[header::WWW_AUTHENTICATE],
        "Bearer realm=\"cartridge\""
    );

    let forger = Keyring::generate();
    let forged = forger
        .mint(
            "mallory",
            &["*:admin".parse().unwrap()],
            Duration::from_secs(60),
        )
        .unwrap();
    assert!(
        app.get(path, Some(&forged))
            .await
            .error(StatusCode::UNAUTHORIZED, ErrorCode::Unauthorized)
            .contains("unknown key")
    );
    let garbage = app.get(path, Some("not-a-jwt")).await;
    garbage.error(StatusCode::UNAUTHORIZED, ErrorCode::Unauthorized);
    let expired = app
        .keyring
        .mint("old", &["*:admin".parse().unwrap()], Duration::ZERO)
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert!(
        app.get(path, Some(&expired))
            .await
            .error(StatusCode::UNAUTHORIZED, ErrorCode::Unauthorized)
            .contains("expired")
    );

    let reader = app.token(&["legal/*:pull"]);
    assert_eq!(app.get(path, Some(&reader)).await.status, StatusCode::OK);
    let blob = format!(
        "/v1/repos/legal/contracts/blobs/{}",
        cartridge_schemas::Digest::of(b"x").hex()
    );
    let upload = app
        .call(Method::PUT, &blob, Some(&reader), Body::from("x"), &[])
        .await;
    assert!(
        upload
            .error(StatusCode::FORBIDDEN, ErrorCode::Forbidden)
            .contains("does not grant push"),
        "a pull token cannot upload"
    );
    // Nor is a body read for a caller who may not write it: a malformed one gets 403, not 400.
    for (method, path) in [
        (Method::PUT, "/v1/repos/legal/contracts/versions/v9"),
        (Method::PUT, "/v1/repos/legal/contracts/tags/stable"),
        (Method::POST, "/v1/repos/legal/contracts/blobs/missing"),
        (Method::POST, "/v1/repos/legal/contracts/blobs/uploads"),
        (Method::PUT, "/v1/namespaces/legal/settings"),
    ] {
        app.call(method, path, Some(&reader), Body::from("{not json"), &[])
            .await
            .error(StatusCode::FORBIDDEN, ErrorCode::Forbidden);
    }
    let elsewhere = app.token(&["hr/*:admin"]);
    assert!(
        app.get(path, Some(&elsewhere))
            .await
            .error(StatusCode::FORBIDDEN, ErrorCode::Forbidden)
            .contains("does not grant pull on legal/contracts")
    );
    // Nor list the namespace: forbidden, as its repositories are, not an empty list.
    app.get("/v1/repos/legal", Some(&elsewhere))
        .await
        .error(StatusCode::FORBIDDEN, ErrorCode::Forbidden);
    let names: Value = app.get("/v1/repos/legal", Some(&reader)).await.json();
    assert_eq!(names["names"], json!(["contracts"]));
    let delete = app
        .call(
            Method::DELETE,
            "/v1/repos/legal/contracts/versions/v1",
            Some(&pusher),
            Body::empty(),
            &[],
        )
        .await;
    delete.error(StatusCode::FORBIDDEN, ErrorCode::Forbidden);

    // Anonymous pull is a per-namespace setting, changed by an admin of the namespace.
    let settings = "/v1/namespaces/legal/settings";
    app.send_json(
        Method::PUT,
        settings,
        Some(&pusher),
        &json!({"anonymous_pull": true}),
    )
    .await
    .error(StatusCode::FORBIDDEN, ErrorCode::Forbidden);
    let admin = app.token(&["legal/*:admin"]);
    assert_eq!(
        app.send_json(
            Method::PUT,
            settings,
            Some(&admin),
            &json!({"anonymous_pull": true})
        )
        .await
        .status,
        StatusCode::OK
    );
    assert_eq!(app.get(path, None).await.status, StatusCode::OK);
    assert_eq!(
        app.get(path, Some(&elsewhere)).await.status,
        StatusCode::OK,
        "a token may pull what anyone may"
    );
    let namespaces: Value = app.get("/v1/namespaces", None).await.json();
    assert_eq!(namespaces["namespaces"], json!(["legal"]));
    let namespaces: Value = app.get("/v1/namespaces", Some(&elsewhere)).await.json();
    assert_eq!(
        namespaces["namespaces"],
        json!(["legal"]),
        "a token sees what anyone sees"
    );
    // Anonymous pull never extends to writes, and an anonymous body is not even read: a
    // malformed one gets 401, not 400.
    app.call(Method::PUT, &blob, None, Body::from("x"), &[])
        .await
        .error(StatusCode::UNAUTHORIZED, ErrorCode::Unauthorized);
    for path in [
        "/v1/repos/legal/contracts/versions/v9",
        "/v1/repos/legal/contracts/tags/stable",
    ] {
        app.call(Method::PUT, path, None, Body::from("{not json"), &[])
            .await
            .error(StatusCode::UNAUTHORIZED, ErrorCode::Unauthorized);
    }
    let delete = app
        .call(
            Method::DELETE,
            "/v1/repos/legal/contracts/versions/v1",
            Some(&admin),
            Body::empty(),
            &[],
        )
        .await;
    assert_eq!(delete.status, StatusCode::NO_CONTENT);
}

#[tokio::test]
async fn bad_input_gets_4xx_never_500() {
    let app = app();
    let token = app.token(&["*:admin"]);
    let cases = [
        ("/v1/repos/Legal/contracts", "namespace must be lowercase"),
        ("/v1/repos/legal/..", "name must not contain '..'"),
        ("/v1/repos/legal/a%2Fb", "name contains '/'"),
        ("/v1/repos/legal/a%07b", "name contains '\\u{7}'"),
        ("/v1/repos/legal/a%20b", "name contains ' '"),
        (
            "/v1/repos/legal/.hidden/resolve/v1",
            "name must start with a letter or digit",
        ),
        ("/v1/repos/legal/x/resolve/V1", "must be lowercase"),
        ("/v1/repos/legal/x/resolve/blake3:zz", "64 hex"),
        ("/v1/repos/legal/x/manifests/nothex", "64 hex"),
    ];
    for (path, expected) in cases {
        let message = app
            .get(path, Some(&token))
            .await
            .error(StatusCode::BAD_REQUEST, ErrorCode::BadRequest);
        assert!(message.contains(expected), "{path}: {message}");
    }
    let long = format!("/v1/repos/legal/{}", "a".repeat(200));
    assert!(
        app.get(&long, Some(&token))
            .await
            .error(StatusCode::BAD_REQUEST, ErrorCode::BadRequest)
            .contains("longer than 128")
    );

    app.get("/v1/nothing/here", Some(&token))
        .await
        .error(StatusCode::NOT_FOUND, ErrorCode::NotFound);
    let wrong_method = app
        .call(
            Method::PATCH,
            "/v1/repos/legal/x/versions/v1",
            Some(&token),
            Body::empty(),
            &[],
        )
        .await;
    wrong_method.error(StatusCode::METHOD_NOT_ALLOWED, ErrorCode::MethodNotAllowed);

    // Oversize bodies: a JSON body over the JSON cap, a blob over the blob cap.
    let huge = json!({"digests": vec![cartridge_schemas::Digest::of(b"x"); 5000]});
    app.send_json(
        Method::POST,
        "/v1/repos/legal/x/blobs/missing",
        Some(&token),
        &huge,
    )
    .await
    .error(StatusCode::PAYLOAD_TOO_LARGE, ErrorCode::TooLarge);
    let blob = vec![7u8; 70 << 10];
    let path = format!(
        "/v1/repos/legal/x/blobs/{}",
        cartridge_schemas::Digest::of(&blob).hex()
    );
    app.call(Method::PUT, &path, Some(&token), Body::from(blob), &[])
        .await
        .error(StatusCode::PAYLOAD_TOO_LARGE, ErrorCode::TooLarge);

    // Bytes that do not match their digest; a manifest that is not one; malformed JSON.
    let path = format!(
        "/v1/repos/legal/x/blobs/{}",
        cartridge_schemas::Digest::of(b"claimed").hex()
    );
    let message = app
        .call(Method::PUT, &path, Some(&token), Body::from("actual"), &[])
        .await
        .error(StatusCode::UNPROCESSABLE_ENTITY, ErrorCode::DigestMismatch);
    assert!(message.contains("hash to"), "{message}");
    app.call(
        Method::PUT,
        "/v1/repos/legal/x/versions/v1",
        Some(&token),
        Body::from("{}"),
        &[],
    )
    .await
    .error(StatusCode::UNPROCESSABLE_ENTITY, ErrorCode::InvalidManifest);
    app.call(
        Method::POST,
        "/v1/repos/legal/x/blobs/missing",
        Some(&token),
        Body::from("{nope"),
        &[(header::CONTENT_TYPE, "application/json")],
    )
    .await
    .error(StatusCode::BAD_REQUEST, ErrorCode::BadRequest);
    let (manifest, _) = encoded(9);
    let message = app
        .call(
            Method::PUT,
            "/v1/repos/legal/x/versions/v1",
            Some(&token),
            Body::from(manifest.to_canonical_json()),
            &[],
        )
        .await
        .error(StatusCode::UNPROCESSABLE_ENTITY, ErrorCode::MissingBlobs);
    assert!(message.contains("4 blobs are missing"), "{message}");
    let commit = format!(
        "/v1/repos/legal/x/blobs/{}/commit?upload=../../etc",
        cartridge_schemas::Digest::of(b"x").hex()
    );
    app.call(Method::POST, &commit, Some(&token), Body::empty(), &[])
        .await
        .error(StatusCode::BAD_REQUEST, ErrorCode::BadRequest);
    // Without its upload id, or without a token: answered in the API's shape, the missing
    // token first.
    let bare = commit.split_once('?').unwrap().0;
    let message = app
        .call(Method::POST, bare, Some(&token), Body::empty(), &[])
        .await
        .error(StatusCode::BAD_REQUEST, ErrorCode::BadRequest);
    assert!(message.contains("upload id"), "{message}");
    app.call(Method::POST, bare, None, Body::empty(), &[])
        .await
        .error(StatusCode::UNAUTHORIZED, ErrorCode::Unauthorized);
    // The scheme's name in any case.
    let shouted = app
        .call(
            Method::GET,
            "/v1/namespaces",
            None,
            Body::empty(),
            &[(header::AUTHORIZATION, &format!("BEARER {token}"))],
        )
        .await;
    assert_eq!(shouted.status, StatusCode::OK);
}

/// A trickling upload keeps its slot only while nobody waits for it, and one waiting too long
/// for a slot is told to come back.
#[tokio::test]
async fn uploads_give_up_busy_slots_and_slow_senders() {
    let limits = |upload_wait, upload_stall| Limits {
        max_concurrent_uploads: 1,
        upload_wait,
        upload_stall,
        min_upload_rate: 1 << 20,
        ..Limits::default()
    };
    let ms = Duration::from_millis;
    let path = |blob: &[u8]| {
        format!(
            "/v1/repos/legal/x/blobs/{}",
            cartridge_schemas::Digest::of(blob).hex()
        )
    };
    // An upload sending a byte every 50 ms, without end.
    let trickle = |app: &App, token: &str| {
        let trickle = futures::stream::unfold((), |()| async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            Some((Ok::<_, std::io::Error>(bytes::Bytes::from_static(b"x")), ()))
        });
        let router = app.router.clone();
        let request = Request::put(path(b"never"))
            .header(header::AUTHORIZATION, format!("Bearer {token}"))
            .body(Body::from_stream(trickle))
            .unwrap();
        tokio::spawn(async move { router.oneshot(request).await.unwrap() })
    };
    let blob = path(b"blob");

    // Alone, a slow upload keeps its slot.
    let app = app_with(limits(ms(200), ms(100)));
    let token = app.token(&["legal/*:push"]);
    let slow = trickle(&app, &token);
    tokio::time::sleep(ms(400)).await;
    assert!(
        !slow.is_finished(),
        "an uncontested slow upload was dropped"
    );
    slow.abort();
    // One waiting past its time for a slot is answered 503.
    let app = app_with(limits(ms(200), Duration::from_secs(60)));
    let token = app.token(&["legal/*:push"]);
    let slow = trickle(&app, &token);
    tokio::time::sleep(ms(50)).await;
    let message = app
        .call(Method::PUT, &blob, Some(&token), Body::from("blob"), &[])
        .await
        .error(StatusCode::SERVICE_UNAVAILABLE, ErrorCode::Unavailable);
    assert!(message.contains("upload slots stayed busy"), "{message}");
    slow.abort();

    // With another waiting, the slow one gives its slot up, and the other gets it.
    let app = app_with(limits(Duration::from_secs(10), ms(300)));
    let token = app.token(&["legal/*:push"]);
    let slow = trickle(&app, &token);
    tokio::time::sleep(ms(50)).await;
    let put = app
        .call(Method::PUT, &blob, Some(&token), Body::from("blob"), &[])
        .await;
    assert_eq!(put.status, StatusCode::CREATED);
    let slow = slow.await.unwrap();
    assert_eq!(slow.status(), StatusCode::SERVICE_UNAVAILABLE);
    let body = slow.into_body().collect().await.unwrap().to_bytes();
    let body: ErrorBody = serde_json::from_slice(&body).unwrap();
    assert!(
        body.message.contains("while other uploads wait"),
        "{}",
        body.message
    );
}

#[tokio::test]
async fn health_and_metrics() {
    let app = app();
    let health: Value = app.get("/v1/health", None).await.json();
    assert_eq!(health["status"], "ok");
    // Any token is a method to HTTP: made-up ones share one label, so they cannot grow the
    // metrics without end.
    for method in ["BREW", "WHEN"] {
        let method = Method::from_bytes(method.as_bytes()).unwrap();
        app.call(method, "/v1/health", None, Body::empty(), &[])
            .await;
    }
    let metrics = app.get("/metrics", None).await;
    assert_eq!(metrics.status, StatusCode::OK);
    let text = String::from_utf8(metrics.body).unwrap();
    assert!(text.contains("registry_requests_total"), "{text}");
    // Latencies are histograms, which add up across replicas.
    assert!(
        text.contains("registry_request_duration_seconds_bucket{"),
        "{text}"
    );
    // These requests' own series (a PATCH elsewhere in this process is "other" too).
    assert!(
        text.lines()
            .any(|l| l.contains("method=\"other\"") && l.contains("route=\"/v1/health\"")),
        "{text}"
    );
    assert!(!text.contains("BREW") && !text.contains("WHEN"), "{text}");
}
