//! The Arrow schema of a cache shard (format version 2; version 1 is the `topk` layout),
//! documented in `schemas/shard.arrow.json` and `schemas/README.md`. Which columns a shard
//! has follows from its [`Layout`]: the cache mode, k and the sample settings.
//!
//! One row per window (a slice of one document of at most `seq_len` tokens):
//!
//! | column | type | meaning |
//! |---|---|---|
//! | `seq_id` | uint64 | global window number, deterministic for (corpus, tokenizer, seq_len) |
//! | `doc_id` | uint64 | document number in corpus order |
//! | `window_index` | uint32 | which window of the document |
//! | `input_ids` | list<uint32> | the tokens the teacher saw (length L) |
//! | `topk_ids` | list<fixed_size_list<uint32, k>> | per position, the k most likely next tokens |
//! | `topk_logprobs` | list<fixed_size_list<float16, k>> | their log-probabilities at temperature T, descending |
//! | `topk_logprob_max` | list<float16> | (`--logprob-dtype q8`, instead of `topk_logprobs`) per position, the top of the scale |
//! | `topk_logprob_step` | list<float16> | (q8) per position, the scale's unit |
//! | `topk_logprob_deltas` | list<fixed_size_list<uint8, k>> | (q8) code_j = (deltas_0 + … + deltas_j) mod 256; log-prob = max − step × code², code 255 = probability 0 |
//! | `tail_logprob` | list<float32> | per position, log of the exact mass outside the top-k |
//! | `sample_ids` | list<list<uint32>> | (`sample`, `hybrid`) per position, the distinct sampled ids, ascending |
//! | `sample_counts` | list<list<uint8 or uint16>> | their counts (sum N per position) |
//! | `sample_logprobs` | list<list<float16>> | (`--store-logprobs`) the teacher's log-prob of each sampled id |
//! | `sample_log_weights` | list<list<float32>> | (`--proposal-temperature` ≠ 1) ln p/q of each sampled id: the estimate is count/N · e^w |
//!
//! `topk` shards have the first seven columns (with the three q8 columns in place of
//! `topk_logprobs` under `--logprob-dtype q8`); `sample` shards the first four and the
//! sample columns; `hybrid` shards the top-k and the sample columns.

use arrow_schema::{DataType, Field, Schema};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::Arc;

/// Version of the shard + manifest format written. Bump on any incompatible change.
pub const FORMAT_VERSION: u32 = 2;
/// The oldest format version this build still reads (version 1: top-k caches without the
/// sample settings in the manifest).
pub const OLDEST_READABLE_VERSION: u32 = 1;

pub const COL_SEQ_ID: &str = "seq_id";
pub const COL_DOC_ID: &str = "doc_id";
pub const COL_WINDOW_INDEX: &str = "window_index";
pub const COL_INPUT_IDS: &str = "input_ids";
pub const COL_TOPK_IDS: &str = "topk_ids";
pub const COL_TOPK_LOGPROBS: &str = "topk_logprobs";
pub const COL_TOPK_LOGPROB_MAX: &str = "topk_logprob_max";
pub const COL_TOPK_LOGPROB_STEP: &str = "topk_logprob_step";
pub const COL_TOPK_LOGPROB_DELTAS: &str = "topk_logprob_deltas";
pub const COL_TAIL_LOGPROB: &str = "tail_logprob";
pub const COL_SAMPLE_IDS: &str = "sample_ids";
pub const COL_SAMPLE_COUNTS: &str = "sample_counts";
pub const COL_SAMPLE_LOGPROBS: &str = "sample_logprobs";
pub const COL_SAMPLE_LOG_WEIGHTS: &str = "sample_log_weights";

/// Parquet key-value metadata keys written into every shard.
pub const META_FORMAT_VERSION: &str = "logitcache.format_version";
pub const META_TOP_K: &str = "logitcache.top_k";
pub const META_VOCAB_SIZE: &str = "logitcache.vocab_size";
pub const META_TOKENIZER_SHA256: &str = "logitcache.tokenizer_sha256";
pub const META_SHARD_INDEX: &str = "logitcache.shard_index";
pub const META_MODE: &str = "logitcache.mode";
pub const META_SAMPLES: &str = "logitcache.samples";
pub const META_LOGPROB_DTYPE: &str = "logitcache.logprob_dtype";

/// What a cache stores per position.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum CacheMode {
    /// The top-k ids with their log-probs and the exact tail mass (format version 1's only
    /// mode).
    #[default]
    Topk,
    /// N draws with replacement from the teacher's distribution: the distinct ids and their
    /// counts (random-sampling KD).
    Sample,
    /// The exact top-k and tail mass, plus N draws from the tail (the distribution outside
    /// the top-k, renormalised).
    Hybrid,
}

impl CacheMode {
    pub fn name(self) -> &'static str {
        match self {
            CacheMode::Topk => "topk",
            CacheMode::Sample => "sample",
            CacheMode::Hybrid => "hybrid",
        }
    }
}

impl std::fmt::Display for CacheMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// How a `sample`/`hybrid` cache places its N draws on the distribution's cumulative sum,
/// recorded in the manifest as `params.sampling` (absent: `iid`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Sampling {
    /// N independent uniforms: draws with replacement (multinomial counts).
    #[default]
    Iid,
    /// One uniform u and the N points (u + i) / N: every id's count is ⌊N·p⌋ or ⌈N·p⌉
    /// (systematic sampling). Each point is still uniform on its own, so E[count / N] = p
    /// (unbiased, as `iid`), with far less variance: an id of p ≥ 1/N is always drawn.
    Systematic,
}

impl Sampling {
    pub fn name(self) -> &'static str {
        match self {
            Sampling::Iid => "iid",
            Sampling::Systematic => "systematic",
        }
    }
}

impl std::fmt::Display for Sampling {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// How the top-k log-probabilities are stored, recorded in the manifest as
/// `params.logprob_dtype`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
pub enum LogprobDtype {
    /// IEEE half precision in `topk_logprobs` (Arrow `Float16`, Parquet
    /// FIXED_LEN_BYTE_ARRAY(2) + Float16).
    #[default]
    #[serde(rename = "float16")]
    #[value(name = "float16")]
    Float16,
    /// 8-bit codes on a per-position quadratic scale (`topk_logprob_max`,
    /// `topk_logprob_step`, and the codes as running differences in `topk_logprob_deltas`):
    /// log p = max − step × code², code 255 = probability 0. The largest errors are measured
    /// at write time (`stats.max_logprob_error`, `stats.max_prob_error`).
    #[serde(rename = "q8")]
    #[value(name = "q8")]
    Q8,
}

impl LogprobDtype {
    /// The name in the manifest, the CLI and `schemas/`.
    pub fn name(self) -> &'static str {
        match self {
            LogprobDtype::Float16 => "float16",
            LogprobDtype::Q8 => "q8",
        }
    }
}

impl std::fmt::Display for LogprobDtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The columns of a shard: mode, k (top-k columns) and the sample settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    pub mode: CacheMode,
    /// Ids per position in the top-k columns (0 in `sample` mode).
    pub k: usize,
    /// Draws per position (0 in `topk` mode).
    pub samples: usize,
    /// `sample_logprobs` is stored.
    pub sample_logprobs: bool,
    /// `sample_log_weights` is stored (the draws come from a proposal q ≠ p).
    pub sample_log_weights: bool,
    /// How the top-k log-probs are stored (`sample_logprobs` are always float16).
    pub logprobs: LogprobDtype,
}

impl Layout {
    /// A top-k layout (format version 1's).
    pub fn topk(k: usize) -> Layout {
        Layout {
            mode: CacheMode::Topk,
            k,
            samples: 0,
            sample_logprobs: false,
            sample_log_weights: false,
            logprobs: LogprobDtype::Float16,
        }
    }

    /// The layout a cache of `mode` with these settings writes (`top_k` is ignored in
    /// `sample` mode, which stores no top-k).
    pub fn of(mode: CacheMode, top_k: usize, samples: usize, store_logprobs: bool) -> Layout {
        Layout {
            mode,
            k: if mode == CacheMode::Sample { 0 } else { top_k },
            samples,
            sample_logprobs: store_logprobs,
            sample_log_weights: false,
            logprobs: LogprobDtype::Float16,
        }
    }

    /// This layout with importance weights when the proposal temperature is not 1.
    pub fn with_proposal(self, proposal_temperature: f32) -> Layout {
        Layout {
            sample_log_weights: self.has_samples() && proposal_temperature != 1.0,
            ..self
        }
    }

    /// This layout with the top-k log-probs stored as `logprobs`.
    pub fn with_logprobs(self, logprobs: LogprobDtype) -> Layout {
        Layout { logprobs, ..self }
    }

    /// The column holding the top-k log-probs: `topk_logprobs`, or under q8
    /// `topk_logprob_deltas` (beside its per-position scale).
    pub fn topk_logprob_column(&self) -> &'static str {
        if self.q8() {
            COL_TOPK_LOGPROB_DELTAS
        } else {
            COL_TOPK_LOGPROBS
        }
    }

    /// Whether the top-k log-probs are stored as 8-bit codes (`topk_logprob_deltas` and its
    /// per-position scale) instead of `topk_logprobs`.
    pub fn q8(&self) -> bool {
        self.has_topk() && self.logprobs == LogprobDtype::Q8
    }

    /// Whether the top-k columns (`topk_ids`, `topk_logprobs`, `tail_logprob`) are stored.
    pub fn has_topk(&self) -> bool {
        self.mode != CacheMode::Sample
    }

    /// Whether the sample columns are stored.
    pub fn has_samples(&self) -> bool {
        self.mode != CacheMode::Topk
    }

    /// The narrowest unsigned type that holds a count of up to `samples`.
    pub fn count_type(&self) -> DataType {
        if self.samples <= u8::MAX as usize {
            DataType::UInt8
        } else {
            DataType::UInt16
        }
    }
}

pub(crate) fn item(dt: DataType) -> Arc<Field> {
    Arc::new(Field::new_list_field(dt, false))
}

pub(crate) fn fsl_item(dt: DataType, k: usize) -> Arc<Field> {
    item(DataType::FixedSizeList(item(dt), k as i32))
}

fn list_of_lists(dt: DataType) -> DataType {
    DataType::List(item(DataType::List(item(dt))))
}

/// The shard schema of `layout`, without metadata.
pub fn shard_schema(layout: &Layout) -> Schema {
    let k = layout.k;
    let mut fields = vec![
        Field::new(COL_SEQ_ID, DataType::UInt64, false),
        Field::new(COL_DOC_ID, DataType::UInt64, false),
        Field::new(COL_WINDOW_INDEX, DataType::UInt32, false),
        Field::new(COL_INPUT_IDS, DataType::List(item(DataType::UInt32)), false),
    ];
    if layout.has_topk() {
        fields.push(Field::new(
            COL_TOPK_IDS,
            DataType::List(fsl_item(DataType::UInt32, k)),
            false,
        ));
        let per_position =
            |name: &str, dt: DataType| Field::new(name, DataType::List(item(dt)), false);
        match layout.logprobs {
            LogprobDtype::Float16 => fields.push(Field::new(
                COL_TOPK_LOGPROBS,
                DataType::List(fsl_item(DataType::Float16, k)),
                false,
            )),
            LogprobDtype::Q8 => fields.extend([
                per_position(COL_TOPK_LOGPROB_MAX, DataType::Float16),
                per_position(COL_TOPK_LOGPROB_STEP, DataType::Float16),
                Field::new(
                    COL_TOPK_LOGPROB_DELTAS,
                    DataType::List(fsl_item(DataType::UInt8, k)),
                    false,
                ),
            ]),
        }
        fields.push(per_position(COL_TAIL_LOGPROB, DataType::Float32));
    }
    if layout.has_samples() {
        fields.push(Field::new(
            COL_SAMPLE_IDS,
            list_of_lists(DataType::UInt32),
            false,
        ));
        fields.push(Field::new(
            COL_SAMPLE_COUNTS,
            list_of_lists(layout.count_type()),
            false,
        ));
        if layout.sample_logprobs {
            fields.push(Field::new(
                COL_SAMPLE_LOGPROBS,
                list_of_lists(DataType::Float16),
                false,
            ));
        }
        if layout.sample_log_weights {
            fields.push(Field::new(
                COL_SAMPLE_LOG_WEIGHTS,
                list_of_lists(DataType::Float32),
                false,
            ));
        }
    }
    Schema::new(fields)
}

/// The shard schema with the key-value metadata every shard carries.
pub fn shard_schema_with_metadata(
    layout: &Layout,
    vocab_size: usize,
    tokenizer_sha256: &str,
    shard_index: u64,
) -> Schema {
    let meta: HashMap<String, String> = [
        (META_FORMAT_VERSION, FORMAT_VERSION.to_string()),
        (META_TOP_K, layout.k.to_string()),
        (META_VOCAB_SIZE, vocab_size.to_string()),
        (META_TOKENIZER_SHA256, tokenizer_sha256.to_string()),
        (META_SHARD_INDEX, shard_index.to_string()),
        (META_MODE, layout.mode.name().to_string()),
        (META_SAMPLES, layout.samples.to_string()),
        (META_LOGPROB_DTYPE, layout.logprobs.name().to_string()),
    ]
    .into_iter()
    .map(|(a, b)| (a.to_string(), b))
    .collect();
    shard_schema(layout).with_metadata(meta)
}

/// Compares a shard's key-value metadata with what its manifest says of it (`expected`, from
/// [`shard_schema_with_metadata`]'s keys): a manifest edited to another vocabulary, top-k,
/// mode or tokenizer (with its checksum recomputed) is caught here, before a student is built
/// for the wrong vocabulary. Keys a shard lacks (older writers) are not compared. Returns the
/// first difference.
pub fn check_metadata(found: &Schema, expected: &Schema) -> Result<(), String> {
    let mut keys: Vec<&String> = expected.metadata().keys().collect();
    keys.sort();
    for key in keys {
        if key == META_FORMAT_VERSION {
            continue; // a v1 shard in a cache read by this version says 1
        }
        if let Some(got) = found.metadata().get(key)
            && *got != expected.metadata()[key]
        {
            return Err(format!(
                "its metadata says {key} = {got} but the manifest says {}",
                expected.metadata()[key]
            ));
        }
    }
    Ok(())
}

/// Compares a file's schema with the expected one for `layout`, ignoring metadata. Returns a
/// description of the first difference.
pub fn check_schema(found: &Schema, layout: &Layout) -> Result<(), String> {
    let want = shard_schema(layout);
    if found.fields().len() != want.fields().len() {
        return Err(format!(
            "expected {} columns ({}), found {} ({})",
            want.fields().len(),
            names(&want),
            found.fields().len(),
            names(found)
        ));
    }
    for (w, f) in want.fields().iter().zip(found.fields()) {
        if w.name() != f.name() || !w.data_type().equals_datatype(f.data_type()) {
            return Err(format!(
                "column `{}` should be `{}: {}`, found `{}: {}`",
                w.name(),
                w.name(),
                w.data_type(),
                f.name(),
                f.data_type()
            ));
        }
    }
    Ok(())
}

fn names(s: &Schema) -> String {
    s.fields()
        .iter()
        .map(|f| f.name().as_str())
        .collect::<Vec<_>>()
        .join(", ")
}
