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

/// The real binary, started as Lambda starts a zip deployment's `bootstrap` (no arguments, the
/// Runtime API in the environment), against a stand-in Runtime API and a real S3-compatible
/// store: it takes an invocation and posts the registry's answer back.
#[tokio::test(flavor = "multi_thread")]
async fn the_binary_runs_as_a_lambda_bootstrap() {
    use axum::extract::{Path, State};
    use axum::http::HeaderMap;
    use axum::routing::{get, post};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::sync::mpsc;

    let moto = crate::moto::Moto::start();
    moto.create_bucket("lambda");
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys.json");
    Keyring::generate().save(&keys).unwrap();

    type Posted = mpsc::UnboundedSender<(String, String)>;
    let (posted, mut answers) = mpsc::unbounded_channel::<(String, String)>();
    let served = Arc::new(AtomicUsize::new(0));
    let next = |State((served, _)): State<(Arc<AtomicUsize>, Posted)>| async move {
        // One invocation, then none: a function waits on `next` for its next one.
        if served.fetch_add(1, Ordering::SeqCst) > 0 {
            std::future::pending::<()>().await;
        }
        let mut headers = HeaderMap::new();
        for (name, value) in [
            ("lambda-runtime-aws-request-id", "request-1"),
            ("lambda-runtime-deadline-ms", "4102444800000"),
            (
                "lambda-runtime-invoked-function-arn",
                "arn:aws:lambda:us-east-1:123456789012:function:registry",
            ),
            (
                "lambda-runtime-trace-id",
                "Root=1-00000000-000000000000000000000000",
            ),
        ] {
            headers.insert(name, value.parse().unwrap());
        }
        (headers, event("GET", "/v1/health", None, None))
    };
    // Answers, invocation errors and start errors alike: which one, by the path.
    let posting = |Path(path): Path<String>,
                   State((_, posted)): State<(Arc<AtomicUsize>, Posted)>,
                   body: String| async move {
        let _ = posted.send((path, body));
    };
    let runtime_api = axum::Router::new()
        .route("/2018-06-01/runtime/invocation/next", get(next))
        .route("/2018-06-01/runtime/{*path}", post(posting))
        .with_state((served, posted));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, runtime_api).await });

    let bootstrap = dir.path().join("bootstrap");
    std::fs::copy(env!("CARGO_BIN_EXE_cartridge-registry"), &bootstrap).unwrap();
    let mut function = std::process::Command::new(&bootstrap);
    function
        .env_clear()
        .env("AWS_LAMBDA_RUNTIME_API", address.to_string())
        .env("AWS_LAMBDA_FUNCTION_NAME", "registry")
        .env("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "512")
        .env("AWS_LAMBDA_FUNCTION_VERSION", "$LATEST")
        .env("AWS_LAMBDA_LOG_STREAM_NAME", "stream")
        .env("AWS_LAMBDA_LOG_GROUP_NAME", "group")
        .env("CARTRIDGE_REGISTRY_STORAGE", "s3://lambda/registry")
        .env(
            "CARTRIDGE_REGISTRY_KEYS",
            std::fs::read_to_string(&keys).unwrap(),
        )
        .envs(moto.environment())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    let mut function = function.spawn().unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(60), answers.recv()).await;
    function.kill().unwrap();
    let output = function.wait_with_output().unwrap();
    let log = String::from_utf8_lossy(&output.stderr);
    let (kind, body) = answer
        .unwrap_or_else(|_| panic!("no answer from the function in 60 s: {log}"))
        .unwrap();
    assert_eq!(kind, "invocation/request-1/response", "{body} {log}");
    let response: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(response["statusCode"], 200, "{response}");
    let health: Value = serde_json::from_str(response["body"].as_str().unwrap()).unwrap();
    assert_eq!(health["status"], "ok", "{response}");
}
