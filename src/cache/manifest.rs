//! `manifest.json`: what produced a cache (provenance), the plan of shards, and the shards
//! written so far. JSON Schema: `schemas/manifest.schema.json`.
//!
//! The manifest carries a `checksum` (sha256 of its own canonical JSON with the checksum
//! blank), so a hand edit is detected; it is only ever replaced atomically.

use super::rows::LogprobDtype;
use super::schema::{CacheMode, FORMAT_VERSION, Layout, OLDEST_READABLE_VERSION, Sampling};
use crate::corpus::CorpusFile;
use crate::util::{sha256_bytes, write_atomic};
pub use crate::windows::Plan;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

pub const MANIFEST_FILE: &str = "manifest.json";
pub const FORMAT_NAME: &str = "logitcache-cache";

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error(
        "{path} is missing: {dir} is not a logitcache cache (or its teacher run never started); run `logitcache teacher --out {dir}` first"
    )]
    Missing { path: PathBuf, dir: PathBuf },
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{path} is not a valid logitcache manifest ({what}); it was damaged or edited by hand: restore it, or delete the cache directory and run the teacher again"
    )]
    Invalid { path: PathBuf, what: String },
    #[error(
        "{path} was modified after logitcache wrote it (checksum {found} != {expected}); a hand edit invalidates the cache: restore the file, or delete the cache directory and run the teacher again"
    )]
    Checksum {
        path: PathBuf,
        found: String,
        expected: String,
    },
    #[error(
        "{path} has format version {found}, this logitcache reads versions {OLDEST_READABLE_VERSION} to {FORMAT_VERSION}; use the logitcache version that wrote it ({writer}) or a newer one"
    )]
    Version {
        path: PathBuf,
        found: u32,
        writer: String,
    },
}

/// The parameters that define a cache's content. A run with other values into the same
/// directory is refused.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheParams {
    pub top_k: usize,
    pub seq_len: usize,
    pub temperature: f32,
    pub text_field: String,
    /// Windows per shard.
    pub shard_size: usize,
    pub skip_bad_rows: bool,
    /// How the top-k log-probs are stored: `float16` (`topk_logprobs`) or `q8`.
    pub logprob_dtype: LogprobDtype,
    /// What is stored per position. The sample settings below are written only when they
    /// differ from their defaults, so a `topk` manifest has the fields of format version 1
    /// (whose caches, all `topk`, still read and verify).
    #[serde(default, skip_serializing_if = "is_default")]
    pub mode: CacheMode,
    /// Draws per position in `sample`/`hybrid` mode (0 in `topk` mode).
    #[serde(default, skip_serializing_if = "is_default")]
    pub samples: usize,
    /// Temperature τ of the sampling proposal q ∝ p^(1/τ) (1: q = p).
    #[serde(default = "one_f32", skip_serializing_if = "is_one")]
    pub proposal_temperature: f32,
    /// Where the draws fall on the distribution's cumulative sum: `iid` (absent) or
    /// `systematic`.
    #[serde(default, skip_serializing_if = "is_default")]
    pub sampling: Sampling,
    /// `sample_logprobs` (the teacher's log-prob of each sampled id) is stored.
    #[serde(default, skip_serializing_if = "is_default")]
    pub store_logprobs: bool,
    /// Seed of the draws (with `seq_id` and position).
    #[serde(default, skip_serializing_if = "is_default")]
    pub seed: u64,
}

fn one_f32() -> f32 {
    1.0
}

fn is_one(v: &f32) -> bool {
    *v == 1.0
}

fn is_default<T: Default + PartialEq>(v: &T) -> bool {
    *v == T::default()
}

impl CacheParams {
    /// The shard columns these parameters make.
    pub fn layout(&self) -> Layout {
        Layout::of(self.mode, self.top_k, self.samples, self.store_logprobs)
            .with_logprobs(self.logprob_dtype)
            .with_proposal(self.proposal_temperature)
    }
}

/// One model input or output as ONNX Runtime reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IoInfo {
    pub name: String,
    pub dtype: String,
    /// Dimensions; symbolic ones by name.
    pub shape: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelInfo {
    pub path: PathBuf,
    pub sha256: String,
    pub bytes: u64,
    pub inputs: Vec<IoInfo>,
    pub outputs: Vec<IoInfo>,
    pub logits_dtype: String,
    /// Size of the logits' last dimension (may exceed the tokenizer's vocabulary).
    pub logits_vocab: usize,
    /// The external data files the model reads (its weights, for exports over 2 GB), each
    /// hashed: `sha256` above covers only the graph file. Absent when there are none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub external_data: Vec<ExternalDataFile>,
}

/// One external data file of the teacher model.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExternalDataFile {
    /// As the model names it, relative to the model's directory.
    pub location: String,
    pub sha256: String,
    pub bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenizerInfo {
    pub path: PathBuf,
    pub sha256: String,
    /// Largest token id + 1, added tokens included.
    pub vocab_size: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShardEntry {
    pub index: u64,
    /// Path relative to the cache directory.
    pub file: String,
    pub rows: u64,
    pub tokens: u64,
    /// Positions the teacher computed, padding included.
    pub computed_tokens: u64,
    pub bytes: u64,
    pub sha256: String,
    /// `worker_index/num_workers` of the process that wrote it.
    pub worker: String,
    pub device: String,
    pub batch_size: usize,
    /// The token budget of the shard's batches (`--max-batch-tokens`); absent in caches
    /// written before it existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_batch_tokens: Option<usize>,
    pub topk: String,
    /// Wall time of the shard's teacher batches and top-k, plus the writer's CPU time for it.
    pub seconds: f64,
    /// What the teacher stage measured while writing (absent in format-1 caches).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stats: Option<ShardStats>,
}

/// Fidelity figures of one shard, measured from the teacher's exact outputs as it is written.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShardStats {
    /// Largest |stored − exact| over the log-probs written (their float16 rounding, or the
    /// q8 codes' error for the top-k).
    pub max_logprob_error: f32,
    /// Largest |exp(stored) − exp(exact)| over the same values: the error a loss sees
    /// (absent in shards written before it was measured).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_prob_error: Option<f32>,
    /// Mean exact probability mass in the stored top-k (`topk`, `hybrid`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mean_topk_mass: Option<f64>,
    /// Mean distinct sampled ids per position (`sample`, `hybrid`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mean_distinct_ids: Option<f64>,
    /// Mean of the teacher's exact entropy (nats) at the cache temperature, over the whole
    /// vocabulary, at one position in 16 (`(seq_id + position) % 16 == 0`); absent in shards
    /// written before it was measured or too small to hold such a position.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mean_entropy: Option<f64>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Totals {
    pub shards: u64,
    pub sequences: u64,
    pub tokens: u64,
    pub computed_tokens: u64,
    pub bytes: u64,
    /// Every planned shard is written.
    pub complete: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format: String,
    pub format_version: u32,
    pub logitcache_version: String,
    pub params: CacheParams,
    /// Ids in the cache are < vocab_size (the tokenizer's vocabulary).
    pub vocab_size: usize,
    pub model: ModelInfo,
    pub tokenizer: TokenizerInfo,
    pub corpus: Vec<CorpusFile>,
    pub plan: Plan,
    pub shards: Vec<ShardEntry>,
    pub totals: Totals,
    pub checksum: String,
}

/// The shard file name for shard `index`, relative to the cache directory.
pub fn shard_file_name(index: u64) -> String {
    format!("shards/shard-{index:06}.parquet")
}

impl Manifest {
    /// The token-weighted mean over the shards of a per-shard statistic (`None` when a
    /// shard did not record it).
    pub fn token_mean(&self, stat: impl Fn(&ShardStats) -> Option<f64>) -> Option<f64> {
        self.shards
            .iter()
            .map(|s| {
                s.stats
                    .as_ref()
                    .and_then(&stat)
                    .map(|v| v * s.tokens as f64)
            })
            .sum::<Option<f64>>()
            .map(|v| v / self.totals.tokens.max(1) as f64)
    }

    /// A manifest for a new cache of this format version: no plan yet, no shards. The
    /// teacher fills in the plan, then [`Manifest::store`] seals it.
    pub fn new(
        params: CacheParams,
        model: ModelInfo,
        tokenizer: TokenizerInfo,
        corpus: Vec<CorpusFile>,
    ) -> Manifest {
        Manifest {
            format: FORMAT_NAME.into(),
            format_version: FORMAT_VERSION,
            logitcache_version: env!("CARGO_PKG_VERSION").into(),
            params,
            vocab_size: tokenizer.vocab_size,
            model,
            tokenizer,
            corpus,
            plan: Plan::default(),
            shards: vec![],
            totals: Totals::default(),
            checksum: String::new(),
        }
    }

    fn canonical_checksum(&self) -> String {
        let mut m = self.clone();
        m.checksum = String::new();
        sha256_bytes(&serde_json::to_vec(&m).expect("manifest serialises: this is a bug"))
    }

    /// Recomputes totals and the checksum after a change.
    pub fn seal(&mut self) {
        self.shards.sort_by_key(|s| s.index);
        self.totals = Totals {
            shards: self.shards.len() as u64,
            sequences: self.shards.iter().map(|s| s.rows).sum(),
            tokens: self.shards.iter().map(|s| s.tokens).sum(),
            computed_tokens: self.shards.iter().map(|s| s.computed_tokens).sum(),
            bytes: self.shards.iter().map(|s| s.bytes).sum(),
            complete: self.shards.len() as u64 == self.plan.shards,
        };
        self.checksum = self.canonical_checksum();
    }

    /// Reads and validates `dir/manifest.json`.
    pub fn load(dir: &Path) -> Result<Manifest, ManifestError> {
        let path = dir.join(MANIFEST_FILE);
        let bytes = std::fs::read(&path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                ManifestError::Missing {
                    path: path.clone(),
                    dir: dir.to_path_buf(),
                }
            } else {
                ManifestError::Io {
                    path: path.clone(),
                    source: e,
                }
            }
        })?;
        // Check the version first so an old or new format gets the right message.
        let value: serde_json::Value =
            serde_json::from_slice(&bytes).map_err(|e| ManifestError::Invalid {
                path: path.clone(),
                what: e.to_string(),
            })?;
        if value.get("format").and_then(|v| v.as_str()) != Some(FORMAT_NAME) {
            return Err(ManifestError::Invalid {
                path,
                what: format!("`format` is not \"{FORMAT_NAME}\""),
            });
        }
        if let Some(v) = value.get("format_version").and_then(|v| v.as_u64())
            && !(OLDEST_READABLE_VERSION as u64..=FORMAT_VERSION as u64).contains(&v)
        {
            return Err(ManifestError::Version {
                path,
                found: v as u32,
                writer: value
                    .get("logitcache_version")
                    .and_then(|v| v.as_str())
                    .unwrap_or("unknown")
                    .to_string(),
            });
        }
        let m: Manifest = serde_json::from_value(value).map_err(|e| ManifestError::Invalid {
            path: path.clone(),
            what: e.to_string(),
        })?;
        let expected = m.canonical_checksum();
        if m.checksum != expected {
            return Err(ManifestError::Checksum {
                path,
                found: m.checksum.clone(),
                expected,
            });
        }
        // Shards are read from `dir/<file>`: a path that leaves the cache directory (absolute,
        // or through `..`) would make `verify` vouch for files that are not the cache's.
        for s in &m.shards {
            let p = Path::new(&s.file);
            if s.file.is_empty()
                || !p
                    .components()
                    .all(|c| matches!(c, std::path::Component::Normal(_)))
            {
                return Err(ManifestError::Invalid {
                    path,
                    what: format!(
                        "shard {} has file `{}`, outside the cache directory (shard files are relative paths inside it, e.g. shards/shard-000000.parquet)",
                        s.index, s.file
                    ),
                });
            }
        }
        Ok(m)
    }

    /// Seals and atomically replaces `dir/manifest.json`.
    pub fn store(&mut self, dir: &Path) -> std::io::Result<()> {
        self.seal();
        let mut bytes =
            serde_json::to_vec_pretty(self).expect("manifest serialises: this is a bug");
        bytes.push(b'\n');
        write_atomic(&dir.join(MANIFEST_FILE), &bytes)
    }

    /// The first parameter that differs between this cache and a new run, as
    /// `(name, cache value, run value)`.
    pub fn identity_difference(&self, other: &Manifest) -> Option<(String, String, String)> {
        let a = &self.params;
        let b = &other.params;
        macro_rules! cmp {
            ($name:expr, $x:expr, $y:expr) => {
                if $x != $y {
                    return Some(($name.to_string(), format!("{:?}", $x), format!("{:?}", $y)));
                }
            };
        }
        cmp!("--mode", a.mode, b.mode);
        cmp!("--top-k", a.top_k, b.top_k);
        cmp!("--seq-len", a.seq_len, b.seq_len);
        cmp!("--temperature", a.temperature, b.temperature);
        cmp!("--text-field", a.text_field, b.text_field);
        cmp!("--shard-size", a.shard_size, b.shard_size);
        cmp!("--skip-bad-rows", a.skip_bad_rows, b.skip_bad_rows);
        cmp!("--logprob-dtype", a.logprob_dtype, b.logprob_dtype);
        cmp!("--samples", a.samples, b.samples);
        cmp!(
            "--proposal-temperature",
            a.proposal_temperature,
            b.proposal_temperature
        );
        cmp!("--sampling", a.sampling, b.sampling);
        cmp!("--store-logprobs", a.store_logprobs, b.store_logprobs);
        cmp!("--cache-seed", a.seed, b.seed);
        cmp!("--model (sha256)", self.model.sha256, other.model.sha256);
        let ext = |m: &Manifest| {
            m.model
                .external_data
                .iter()
                .map(|e| format!("{} {}", e.location, e.sha256))
                .collect::<Vec<_>>()
        };
        // A cache written before external data was hashed records none: its weights cannot
        // be compared (they were not recorded), so only the graph file's sha256 decides.
        if !self.model.external_data.is_empty() {
            cmp!("--model (external data sha256)", ext(self), ext(other));
        }
        cmp!(
            "--tokenizer (sha256)",
            self.tokenizer.sha256,
            other.tokenizer.sha256
        );
        let corpus = |m: &Manifest| {
            m.corpus
                .iter()
                .map(|c| {
                    format!(
                        "{} ({})",
                        c.path.display(),
                        &c.sha256[..12.min(c.sha256.len())]
                    )
                })
                .collect::<Vec<_>>()
        };
        let (ca, cb) = (corpus(self), corpus(other));
        let hashes = |m: &Manifest| {
            m.corpus
                .iter()
                .map(|c| c.sha256.clone())
                .collect::<Vec<_>>()
        };
        if hashes(self) != hashes(other) {
            // A cache written before a file given twice was read once lists (and holds) it
            // twice: the same files then, but not the same documents.
            let mut seen = std::collections::HashSet::new();
            let twice = self.corpus.iter().find(|c| !seen.insert(&c.path));
            let note = match twice {
                Some(c) => format!(
                    " (it lists {} twice: it was written when a file given twice was read twice, so it holds those documents twice)",
                    c.path.display()
                ),
                None => String::new(),
            };
            return Some((
                "--corpus (files and their sha256)".into(),
                ca.join(", ") + &note,
                cb.join(", "),
            ));
        }
        None
    }
}
