//! The server loop: connections that never finish a request's head are closed, whole requests
//! are served, and the loop ends when told.

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use cartridge_registry::auth::Keyring;
use cartridge_registry::{AppState, Limits, backend, routes, server};

#[tokio::test(flavor = "multi_thread")]
async fn a_half_sent_request_loses_its_connection() {
    let state = AppState::new(
        backend::open("memory://").unwrap(),
        Keyring::generate(),
        Limits::default(),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(server::run(
        listener,
        routes::router(state),
        Duration::from_millis(300),
        async {
            let _ = stopped.await;
        },
    ));
    let answers = tokio::task::spawn_blocking(move || {
        // Half a head, then nothing: closed once the head's time is up.
        let mut slow = std::net::TcpStream::connect(address).unwrap();
        slow.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        slow.write_all(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n")
            .unwrap();
        let started = Instant::now();
        let mut rest = Vec::new();
        let closed = slow.read_to_end(&mut rest);
        let held = started.elapsed();
        // A whole request is answered.
        let mut whole = std::net::TcpStream::connect(address).unwrap();
        whole
            .write_all(b"GET /v1/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut answer = String::new();
        whole.read_to_string(&mut answer).unwrap();
        (closed.map(|_| rest), held, answer)
    })
    .await
    .unwrap();
    let (closed, held, answer) = answers;
    assert!(closed.is_ok(), "the connection was not closed: {closed:?}");
    assert!(held < Duration::from_secs(10), "{held:?}");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    stop.send(()).unwrap();
    serving.await.unwrap().unwrap();
}

/// An S3 setting the client would take and fail on later (with an error naming something
/// else) is refused at once, by name.
#[test]
fn s3_settings_that_cannot_work_are_named() {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_cartridge-registry"))
        .args(["gc", "--storage", "s3://cartridges", "--dry-run"])
        .env_clear()
        .envs([
            ("AWS_ENDPOINT_URL", "http://127.0.0.1:9"),
            ("AWS_ACCESS_KEY_ID", "key"),
            ("AWS_SECRET_ACCESS_KEY", "secret"),
            ("AWS_REGION", "us-east-1"),
        ])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let error = String::from_utf8_lossy(&output.stderr);
    assert!(error.contains("set AWS_ALLOW_HTTP=true"), "{error}");
}
