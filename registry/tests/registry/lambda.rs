//! The same Router behind AWS Lambda: Lambda function-URL events (API Gateway HTTP API v2 format)
//! go through lambda_http's request conversion into the Router.

use std::time::Duration;

use cartridge_registry::auth::Keyring;
use cartridge_registry::{AppState, Limits, backend, routes};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use tower::ServiceExt;

fn event(method: &str, path: &str, token: Option<&str>, body: Option<&Value>) -> String {
    let mut headers = json!({"host": "abc.lambda-url.us-east-1.on.aws", "x-forwarded-proto": "https", "content-type": "application/json"});
    if let Some(token) = token {
        headers["authorization"] = format!("Bearer {token}").into();
    }
    json!({
        "version": "2.0",
        "routeKey": "$default",
        "rawPath": path,
        "rawQueryString": "",
        "headers": headers,
        "requestContext": {
            "accountId": "123456789012", "apiId": "abc", "domainName": "abc.lambda-url.us-east-1.on.aws",
            "domainPrefix": "abc", "requestId": "id", "routeKey": "$default", "stage": "$default",
            "time": "23/Nov/2026:00:00:00 +0000", "timeEpoch": 1795392000000u64,
            "http": {"method": method, "path": path, "protocol": "HTTP/1.1", "sourceIp": "127.0.0.1", "userAgent": "test"}
        },
        "body": body.map(ToString::to_string),
        "isBase64Encoded": false
    })
    .to_string()
}

async fn call(router: &axum::Router, event: String) -> (u16, Value) {
    let request = lambda_http::request::from_str(&event).expect("a valid Lambda event");
    let response = router.clone().oneshot(request).await.unwrap();
    let status = response.status().as_u16();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
}

#[tokio::test]
async fn lambda_events_reach_the_router() {
    let keyring = Keyring::generate();
    let token = keyring
        .mint(
            "lambda",
            &["legal/*:push".parse().unwrap()],
            Duration::from_secs(60),
        )
        .unwrap();
    let router = routes::router(AppState::new(
        backend::open("memory://").unwrap(),
        keyring,
        Limits::default(),
    ));

    let (status, body) = call(&router, event("GET", "/v1/health", None, None)).await;
    assert_eq!((status, body["status"].as_str()), (200, Some("ok")));

    let (status, body) = call(
        &router,
        event("GET", "/v1/repos/legal/contracts/resolve/v1", None, None),
    )
    .await;
    assert_eq!((status, body["code"].as_str()), (401, Some("unauthorized")));

    let digest = cartridge_schemas::Digest::of(b"chunk");
    let request = json!({"digests": [digest]});
    let (status, body) = call(
        &router,
        event(
            "POST",
            "/v1/repos/legal/contracts/blobs/missing",
            Some(&token),
            Some(&request),
        ),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(body["missing"], json!([digest]));

    let (status, body) = call(
        &router,
        event("GET", "/v1/repos/Legal/contracts", Some(&token), None),
    )
    .await;
    assert_eq!((status, body["code"].as_str()), (400, Some("bad_request")));
}
