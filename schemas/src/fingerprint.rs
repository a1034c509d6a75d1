//! Model fingerprints: what a cartridge was trained for.
//!
//! A cartridge's keys and values mean something only to the exact model that produced them: the
//! same architecture and dimensions, the same rotary embedding, the same weights. The fingerprint
//! records all of it, and [`ModelFingerprint::check_compatible`] names the first field that differs.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::digest::Digest;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelFingerprint {
    /// Architecture family, as GGUF's `general.architecture` names it (`llama`).
    pub architecture: String,
    pub layers: u32,
    pub kv_heads: u32,
    pub head_dim: u32,
    pub rope: Rope,
    /// blake3 of the weights file(s) the cartridge was trained against.
    pub weights: Digest,
}

/// Rotary position embedding settings. Cartridge keys are stored after rotation, so a model that
/// rotates differently reads them at the wrong positions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rope {
    pub theta: f64,
    /// Which channel pairs rotate together in the stored keys.
    pub layout: RopeLayout,
    /// Context-extension scaling (e.g. Llama 3's `rope_scaling`), if the model uses any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scaling: Option<serde_json::Value>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RopeLayout {
    /// Channel `i` pairs with `i + head_dim/2` (Hugging Face transformers, the reference code).
    Half,
    /// Channel `2i` pairs with `2i + 1` (llama.cpp's layout of GGUF weights).
    Interleaved,
}

impl fmt::Display for RopeLayout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Half => "half",
            Self::Interleaved => "interleaved",
        })
    }
}

/// Two fingerprints differ; `field` is the first that does.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("model mismatch: {field} differs (expected {expected}, found {found})")]
pub struct FingerprintMismatch {
    pub field: &'static str,
    pub expected: String,
    pub found: String,
}

impl ModelFingerprint {
    /// Checks that a cartridge made for `other` can be used with `self`.
    pub fn check_compatible(&self, other: &Self) -> Result<(), FingerprintMismatch> {
        fn compare<T: PartialEq + fmt::Display>(
            field: &'static str,
            expected: &T,
            found: &T,
        ) -> Result<(), FingerprintMismatch> {
            if expected == found {
                return Ok(());
            }
            Err(FingerprintMismatch {
                field,
                expected: expected.to_string(),
                found: found.to_string(),
            })
        }
        let scaling = |rope: &Rope| {
            rope.scaling
                .as_ref()
                .map_or("none".to_owned(), |v| v.to_string())
        };
        compare("architecture", &self.architecture, &other.architecture)?;
        compare("layers", &self.layers, &other.layers)?;
        compare("kv_heads", &self.kv_heads, &other.kv_heads)?;
        compare("head_dim", &self.head_dim, &other.head_dim)?;
        compare("rope.theta", &self.rope.theta, &other.rope.theta)?;
        compare("rope.layout", &self.rope.layout, &other.rope.layout)?;
        compare("rope.scaling", &scaling(&self.rope), &scaling(&other.rope))?;
        compare("weights", &self.weights, &other.weights)
    }
}

impl fmt::Display for ModelFingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} ({} layers, {} kv heads, head_dim {}, rope θ={} {}) weights {}",
            self.architecture,
            self.layers,
            self.kv_heads,
            self.head_dim,
            self.rope.theta,
            self.rope.layout,
            self.weights
        )
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn tiny() -> ModelFingerprint {
        ModelFingerprint {
            architecture: "llama".into(),
            layers: 2,
            kv_heads: 2,
            head_dim: 8,
            rope: Rope {
                theta: 10000.0,
                layout: RopeLayout::Half,
                scaling: None,
            },
            weights: Digest::of(b"weights"),
        }
    }

    #[test]
    fn compatible_with_itself() {
        tiny().check_compatible(&tiny()).unwrap();
    }

    #[test]
    fn mismatch_names_the_field() {
        let mut other = tiny();
        other.kv_heads = 3;
        let err = tiny().check_compatible(&other).unwrap_err();
        assert_eq!(
            err.to_string(),
            "model mismatch: kv_heads differs (expected 2, found 3)"
        );

        let mut other = tiny();
        other.weights = Digest::of(b"other weights");
        assert_eq!(
            tiny().check_compatible(&other).unwrap_err().field,
            "weights"
        );

        let mut other = tiny();
        other.rope.scaling = Some(serde_json::json!({"type": "llama3", "factor": 8.0}));
        assert_eq!(
            tiny().check_compatible(&other).unwrap_err().field,
            "rope.scaling"
        );
    }

    #[test]
    fn json_round_trip_refuses_unknown_fields() {
        let json = serde_json::to_string(&tiny()).unwrap();
        assert_eq!(
            serde_json::from_str::<ModelFingerprint>(&json).unwrap(),
            tiny()
        );
        let mut value: serde_json::Value = serde_json::from_str(&json).unwrap();
        value["surprise"] = 1.into();
        assert!(serde_json::from_value::<ModelFingerprint>(value).is_err());
    }
}
