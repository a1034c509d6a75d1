//! A real S3-compatible server for tests: `moto_server` from PyPI, installed by
//! `scripts/bootstrap` into the tools virtual environment.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Moto {
    child: Child,
    pub endpoint: String,
}

fn moto_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("MOTO_SERVER") {
        return PathBuf::from(path);
    }
    // Empty counts as unset, as scripts/bootstrap reads it.
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .filter(|dir| !dir.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").expect("HOME is set")).join(".cache")
        });
    let installed = cache.join("cartridge/tools/venv/bin/moto_server");
    assert!(
        installed.exists(),
        "{} is missing: run scripts/bootstrap",
        installed.display()
    );
    installed
}

/// One HTTP/1.1 request without a client library; returns the status code.
fn http(address: &str, method: &str, path: &str) -> std::io::Result<u16> {
    let mut stream = TcpStream::connect(address)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {address}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    response
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad response: {response:.80}")))
}

impl Moto {
    /// Starts a server on a free port. The port is free when picked, not when moto binds it
    /// (its start takes a second or more): a server that exits meanwhile is started again on
    /// another, and only moto's own answer counts as up.
    pub fn start() -> Self {
        let mut failures = Vec::new();
        for _ in 0..3 {
            match Self::try_start() {
                Ok(moto) => return moto,
                Err(failure) => failures.push(failure),
            }
        }
        panic!("moto_server did not start:\n{}", failures.join("\n"));
    }

    fn try_start() -> Result<Self, String> {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let log = tempfile::NamedTempFile::new().unwrap();
        let child = Command::new(moto_binary())
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(log.reopen().unwrap())
            .spawn()
            .expect("moto_server starts");
        let address = format!("127.0.0.1:{port}");
        // Owned from here on: a failure below stops the server.
        let mut moto = Self {
            child,
            endpoint: format!("http://{address}"),
        };
        let started = Instant::now();
        loop {
            // Another test's server on a port both were given answers too: the answer
            // counts only while our server still runs.
            if http(&address, "GET", "/moto-api/").is_ok_and(|status| status == 200) {
                std::thread::sleep(Duration::from_millis(200));
                if moto.child.try_wait().ok().flatten().is_none() {
                    return Ok(moto);
                }
            }
            let exited = moto.child.try_wait().ok().flatten();
            if exited.is_some() || started.elapsed() > Duration::from_secs(60) {
                let output = std::fs::read_to_string(log.path()).unwrap_or_default();
                let tail: String = output.lines().rev().take(20).collect::<Vec<_>>().join("\n");
                return Err(format!(
                    "on {address}: {} after {:?}; its last lines, newest first:\n{tail}",
                    exited.map_or("no answer".to_owned(), |status| format!(
                        "exited ({status})"
                    )),
                    started.elapsed()
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn create_bucket(&self, bucket: &str) {
        let address = self.endpoint.trim_start_matches("http://");
        let status = http(address, "PUT", &format!("/{bucket}")).unwrap();
        assert_eq!(status, 200, "creating bucket {bucket}");
    }

    /// The AWS_* settings that point a client at this server.
    pub fn environment(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ENDPOINT_URL", self.endpoint.clone()),
            ("AWS_ALLOW_HTTP", "true".into()),
            ("AWS_VIRTUAL_HOSTED_STYLE_REQUEST", "false".into()),
            ("AWS_ACCESS_KEY_ID", "testing".into()),
            ("AWS_SECRET_ACCESS_KEY", "testing".into()),
            ("AWS_REGION", "us-east-1".into()),
        ]
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
