//! Student architecture: a Llama-style decoder sized by a TOML file whose keys are Hugging
//! Face `LlamaConfig` names, or by a named preset.
//!
//! ```toml
//! hidden_size = 256
//! num_hidden_layers = 4
//! num_attention_heads = 4
//! num_key_value_heads = 2
//! intermediate_size = 688
//! # vocab_size = 32000        # default: the cache's vocabulary
//! tie_word_embeddings = true
//! ```

use serde::{Deserialize, Serialize};
use std::path::Path;

pub const DEFAULT_MAX_POSITION_EMBEDDINGS: usize = 2048;
pub const DEFAULT_ROPE_THETA: f64 = 10_000.0;
pub const DEFAULT_RMS_NORM_EPS: f64 = 1e-5;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read student config {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("student config {path} is not valid: {what}")]
    Parse { path: String, what: String },
    #[error("student config {name}: {what}")]
    Invalid { name: String, what: String },
    #[error("unknown student preset `{0}`; presets: {1}")]
    UnknownPreset(String, String),
}

/// The TOML file's contents (Hugging Face `LlamaConfig` keys; unknown keys are refused).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StudentFile {
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: Option<usize>,
    pub intermediate_size: usize,
    pub vocab_size: Option<usize>,
    pub max_position_embeddings: Option<usize>,
    pub rope_theta: Option<f64>,
    pub rms_norm_eps: Option<f64>,
    pub tie_word_embeddings: Option<bool>,
}

/// A resolved, validated student architecture.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StudentConfig {
    /// File stem or preset name, used for run directories.
    pub name: String,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub intermediate_size: usize,
    pub vocab_size: usize,
    pub max_position_embeddings: usize,
    pub rope_theta: f64,
    pub rms_norm_eps: f64,
    pub tie_word_embeddings: bool,
}

/// Named sizes (vocab from the cache): (name, hidden, layers, heads, kv heads, intermediate).
pub const PRESETS: &[(&str, usize, usize, usize, usize, usize)] = &[
    ("nano", 64, 2, 4, 2, 176),
    ("micro", 128, 4, 4, 2, 344),
    ("mini", 256, 4, 8, 4, 688),
    ("small", 384, 6, 6, 2, 1024),
    ("base", 512, 8, 8, 4, 1376),
];

impl StudentConfig {
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// Parameter count (embeddings included; the head counted once when tied).
    pub fn num_params(&self) -> usize {
        // In u128, so an absurd configuration saturates instead of overflowing.
        let w = |x: usize| x as u128;
        let (d, v, i) = (
            w(self.hidden_size),
            w(self.vocab_size),
            w(self.intermediate_size),
        );
        let kv = w(self.num_key_value_heads) * w(self.head_dim());
        let layer = d * d * 2 + 2 * d * kv + 3 * d * i + 2 * d;
        let n = v * d
            + w(self.num_hidden_layers) * layer
            + d
            + if self.tie_word_embeddings { 0 } else { v * d };
        n.min(usize::MAX as u128) as usize
    }

    pub fn from_file(name: &str, f: StudentFile, cache_vocab: usize) -> Result<Self, ConfigError> {
        let c = StudentConfig {
            name: name.to_string(),
            hidden_size: f.hidden_size,
            num_hidden_layers: f.num_hidden_layers,
            num_attention_heads: f.num_attention_heads,
            num_key_value_heads: f.num_key_value_heads.unwrap_or(f.num_attention_heads),
            intermediate_size: f.intermediate_size,
            vocab_size: f.vocab_size.unwrap_or(cache_vocab),
            max_position_embeddings: f
                .max_position_embeddings
                .unwrap_or(DEFAULT_MAX_POSITION_EMBEDDINGS),
            rope_theta: f.rope_theta.unwrap_or(DEFAULT_ROPE_THETA),
            rms_norm_eps: f.rms_norm_eps.unwrap_or(DEFAULT_RMS_NORM_EPS),
            tie_word_embeddings: f.tie_word_embeddings.unwrap_or(false),
        };
        c.validate()?;
        Ok(c)
    }

    /// Checks the architecture is buildable.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |what: String| {
            Err(ConfigError::Invalid {
                name: self.name.clone(),
                what,
            })
        };
        for (k, v) in [
            ("hidden_size", self.hidden_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("intermediate_size", self.intermediate_size),
            ("vocab_size", self.vocab_size),
            ("max_position_embeddings", self.max_position_embeddings),
        ] {
            if v == 0 {
                return bad(format!("{k} must be at least 1"));
            }
        }
        if !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return bad(format!(
                "hidden_size {} is not divisible by num_attention_heads {}; choose heads that divide it",
                self.hidden_size, self.num_attention_heads
            ));
        }
        if !self
            .num_attention_heads
            .is_multiple_of(self.num_key_value_heads)
        {
            return bad(format!(
                "num_attention_heads {} is not divisible by num_key_value_heads {}",
                self.num_attention_heads, self.num_key_value_heads
            ));
        }
        if !self.head_dim().is_multiple_of(2) {
            return bad(format!(
                "head dimension {} (hidden_size / num_attention_heads) must be even for rotary embeddings",
                self.head_dim()
            ));
        }
        if !(self.rope_theta > 0.0 && self.rms_norm_eps > 0.0) {
            return bad("rope_theta and rms_norm_eps must be > 0".into());
        }
        Ok(())
    }

    /// Loads `spec`: a TOML path, or `preset:NAME` / a bare preset name.
    pub fn load(spec: &str, cache_vocab: usize) -> Result<Self, ConfigError> {
        let preset = spec.strip_prefix("preset:").unwrap_or(spec);
        if let Some(&(name, d, l, h, kv, i)) = PRESETS.iter().find(|p| p.0 == preset) {
            return Self::from_file(
                name,
                StudentFile {
                    hidden_size: d,
                    num_hidden_layers: l,
                    num_attention_heads: h,
                    num_key_value_heads: Some(kv),
                    intermediate_size: i,
                    vocab_size: None,
                    max_position_embeddings: None,
                    rope_theta: None,
                    rms_norm_eps: None,
                    tie_word_embeddings: Some(true),
                },
                cache_vocab,
            );
        }
        let path = Path::new(spec);
        if spec.starts_with("preset:") || (!path.exists() && !spec.ends_with(".toml")) {
            return Err(ConfigError::UnknownPreset(
                preset.to_string(),
                PRESETS.iter().map(|p| p.0).collect::<Vec<_>>().join(", "),
            ));
        }
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Io {
            path: spec.to_string(),
            source: e,
        })?;
        let f: StudentFile = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: spec.to_string(),
            what: e.to_string(),
        })?;
        let name = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "student".into());
        Self::from_file(&name, f, cache_vocab)
    }

    /// The architecture of a Hugging Face `LlamaForCausalLM` `config.json` (as
    /// `save_pretrained` writes it; the run's name is its directory's). What the student model
    /// and the export do not compute is refused by key: another `model_type`, `hidden_act`
    /// other than `silu`, attention or MLP biases, scaled rotary embeddings (`rope_scaling`, or
    /// transformers 5's `rope_parameters`, other than the default type), a `head_dim` other
    /// than `hidden_size / num_attention_heads`. Missing keys take transformers' defaults
    /// (`tie_word_embeddings` false, `rms_norm_eps` 1e-6).
    pub fn from_hf_config(path: &Path) -> Result<Self, ConfigError> {
        let spec = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Io {
            path: spec.clone(),
            source: e,
        })?;
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| ConfigError::Parse {
            path: spec.clone(),
            what: e.to_string(),
        })?;
        let name = path
            .parent()
            .and_then(|d| d.file_name())
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "student".into());
        let bad = |what: String| ConfigError::Invalid {
            name: spec.clone(),
            what,
        };
        let model_type = v["model_type"].as_str().unwrap_or("(none)");
        if model_type != "llama" {
            return Err(bad(format!(
                "model_type is {model_type:?}; export-onnx takes Llama checkpoints (model_type \"llama\", LlamaForCausalLM)"
            )));
        }
        let unsupported = |key: &str, what: &str| bad(format!("{key} is {}: {what}", v[key]));
        if !matches!(v["hidden_act"].as_str(), None | Some("silu")) {
            return Err(unsupported(
                "hidden_act",
                "the student model computes SwiGLU (silu) only",
            ));
        }
        for key in ["attention_bias", "mlp_bias"] {
            if v[key].as_bool() == Some(true) {
                return Err(unsupported(key, "the student model has no biases"));
            }
        }
        // Rotary embeddings: `rope_theta` and `rope_scaling` at the top level (transformers 4),
        // or one `rope_parameters` object (transformers 5). Only plain RoPE is computed.
        let plain_rope = |x: &serde_json::Value| {
            x.is_null()
                || x.as_object().is_some_and(|o| {
                    o.iter().all(|(k, v)| match k.as_str() {
                        "rope_type" | "type" => v == "default",
                        "rope_theta" => true,
                        _ => false,
                    })
                })
        };
        for key in ["rope_scaling", "rope_parameters"] {
            if !plain_rope(&v[key]) {
                return Err(unsupported(
                    key,
                    "only plain rotary embeddings (rope_theta) are exported, not scaled ones",
                ));
            }
        }
        let count = |key: &str| -> Result<Option<usize>, ConfigError> {
            match &v[key] {
                serde_json::Value::Null => Ok(None),
                x => x
                    .as_u64()
                    .map(|n| Some(n as usize))
                    .ok_or_else(|| bad(format!("{key} is {x}, not a whole number"))),
            }
        };
        let need = |key: &str| {
            count(key)?.ok_or_else(|| bad(format!("it has no {key}: not a Llama config.json")))
        };
        let real = |key: &str| -> Result<Option<f64>, ConfigError> {
            match &v[key] {
                serde_json::Value::Null => Ok(None),
                x => x
                    .as_f64()
                    .map(Some)
                    .ok_or_else(|| bad(format!("{key} is {x}, not a number"))),
            }
        };
        let nested_theta =
            match &v["rope_parameters"]["rope_theta"] {
                serde_json::Value::Null => None,
                x => Some(x.as_f64().ok_or_else(|| {
                    bad(format!("rope_parameters.rope_theta is {x}, not a number"))
                })?),
            };
        let rope_theta = match (real("rope_theta")?, nested_theta) {
            (Some(a), Some(b)) if a != b => {
                return Err(bad(format!(
                    "rope_theta is {a} but rope_parameters.rope_theta is {b}"
                )));
            }
            (a, b) => a.or(b),
        };
        let f = StudentFile {
            hidden_size: need("hidden_size")?,
            num_hidden_layers: need("num_hidden_layers")?,
            num_attention_heads: need("num_attention_heads")?,
            num_key_value_heads: count("num_key_value_heads")?,
            intermediate_size: need("intermediate_size")?,
            vocab_size: Some(need("vocab_size")?),
            max_position_embeddings: count("max_position_embeddings")?,
            rope_theta,
            // transformers' LlamaConfig defaults (for keys a config.json leaves out).
            rms_norm_eps: Some(real("rms_norm_eps")?.unwrap_or(1e-6)),
            tie_word_embeddings: Some(v["tie_word_embeddings"].as_bool().unwrap_or(false)),
        };
        let c = Self::from_file(&name, f, 0)?;
        if let Some(hd) = count("head_dim")?
            && hd != c.head_dim()
        {
            return Err(bad(format!(
                "head_dim is {hd}, not hidden_size / num_attention_heads = {}: the student model derives it",
                c.head_dim()
            )));
        }
        Ok(c)
    }

    /// The Hugging Face `config.json` of a `LlamaForCausalLM` with this architecture.
    pub fn hf_config_json(&self, bos: Option<u32>, eos: Option<u32>) -> serde_json::Value {
        serde_json::json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "intermediate_size": self.intermediate_size,
            "vocab_size": self.vocab_size,
            "max_position_embeddings": self.max_position_embeddings,
            "rope_theta": self.rope_theta,
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
            "attention_bias": false,
            "mlp_bias": false,
            "head_dim": self.head_dim(),
            "initializer_range": 0.02,
            "bos_token_id": bos,
            "eos_token_id": eos,
            "torch_dtype": "float32",
            "use_cache": true,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(text: &str) -> tempfile::NamedTempFile {
        let mut f = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
        std::io::Write::write_all(&mut f, text.as_bytes()).unwrap();
        f
    }

    #[test]
    fn presets_and_files_load_and_count_params() {
        let c = StudentConfig::load("micro", 1000).unwrap();
        assert_eq!(
            (c.hidden_size, c.vocab_size, c.num_key_value_heads),
            (128, 1000, 2)
        );
        // 1000*128 + 4*(2*128*128 + 2*128*64 + 3*128*344 + 256) + 128
        assert_eq!(
            c.num_params(),
            128_000 + 4 * (32_768 + 16_384 + 132_096 + 256) + 128
        );
        let f = write(
            "hidden_size = 64\nnum_hidden_layers = 2\nnum_attention_heads = 4\nintermediate_size = 128\nvocab_size = 500\n",
        );
        let c = StudentConfig::load(f.path().to_str().unwrap(), 1000).unwrap();
        assert_eq!(
            (c.vocab_size, c.num_key_value_heads, c.tie_word_embeddings),
            (500, 4, false)
        );
    }

    #[test]
    fn bad_configs_say_what_is_wrong() {
        let f = write(
            "hidden_size = 64\nnum_hidden_layers = 2\nnum_attention_heads = 4\nintermediate_size = 128\nhiden = 3\n",
        );
        let e = StudentConfig::load(f.path().to_str().unwrap(), 10)
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown field `hiden`"), "{e}");
        let f = write(
            "hidden_size = 100\nnum_hidden_layers = 2\nnum_attention_heads = 3\nintermediate_size = 128\n",
        );
        let e = StudentConfig::load(f.path().to_str().unwrap(), 10)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("hidden_size 100 is not divisible by num_attention_heads 3"),
            "{e}"
        );
        let f = write(
            "hidden_size = 64\nnum_hidden_layers = 2\nnum_attention_heads = 4\nnum_key_value_heads = 3\nintermediate_size = 128\n",
        );
        let e = StudentConfig::load(f.path().to_str().unwrap(), 10)
            .unwrap_err()
            .to_string();
        assert!(e.contains("not divisible by num_key_value_heads 3"), "{e}");
        let e = StudentConfig::load("huge", 10).unwrap_err().to_string();
        assert!(
            e.contains("unknown student preset `huge`") && e.contains("micro"),
            "{e}"
        );
    }
}
