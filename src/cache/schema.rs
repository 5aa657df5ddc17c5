//! The Arrow schema of a cache shard (format version 1), documented in
//! `schemas/shard.arrow.json` and `schemas/README.md`.
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
//! | `tail_logprob` | list<float32> | per position, log of the exact mass outside the top-k |

use arrow_schema::{DataType, Field, Schema};
use std::collections::HashMap;
use std::sync::Arc;

/// Version of the shard + manifest format. Bump on any incompatible change.
pub const FORMAT_VERSION: u32 = 1;

pub const COL_SEQ_ID: &str = "seq_id";
pub const COL_DOC_ID: &str = "doc_id";
pub const COL_WINDOW_INDEX: &str = "window_index";
pub const COL_INPUT_IDS: &str = "input_ids";
pub const COL_TOPK_IDS: &str = "topk_ids";
pub const COL_TOPK_LOGPROBS: &str = "topk_logprobs";
pub const COL_TAIL_LOGPROB: &str = "tail_logprob";

/// Parquet key-value metadata keys written into every shard.
pub const META_FORMAT_VERSION: &str = "logitcache.format_version";
pub const META_TOP_K: &str = "logitcache.top_k";
pub const META_VOCAB_SIZE: &str = "logitcache.vocab_size";
pub const META_TOKENIZER_SHA256: &str = "logitcache.tokenizer_sha256";
pub const META_SHARD_INDEX: &str = "logitcache.shard_index";

pub(crate) fn item(dt: DataType) -> Arc<Field> {
    Arc::new(Field::new_list_field(dt, false))
}

pub(crate) fn fsl_item(dt: DataType, k: usize) -> Arc<Field> {
    item(DataType::FixedSizeList(item(dt), k as i32))
}

/// The shard schema for top-k `k`, without metadata.
pub fn shard_schema(k: usize) -> Schema {
    Schema::new(vec![
        Field::new(COL_SEQ_ID, DataType::UInt64, false),
        Field::new(COL_DOC_ID, DataType::UInt64, false),
        Field::new(COL_WINDOW_INDEX, DataType::UInt32, false),
        Field::new(COL_INPUT_IDS, DataType::List(item(DataType::UInt32)), false),
        Field::new(
            COL_TOPK_IDS,
            DataType::List(fsl_item(DataType::UInt32, k)),
            false,
        ),
        Field::new(
            COL_TOPK_LOGPROBS,
            DataType::List(fsl_item(DataType::Float16, k)),
            false,
        ),
        Field::new(
            COL_TAIL_LOGPROB,
            DataType::List(item(DataType::Float32)),
            false,
        ),
    ])
}

/// The shard schema with the key-value metadata every shard carries.
pub fn shard_schema_with_metadata(
    k: usize,
    vocab_size: usize,
    tokenizer_sha256: &str,
    shard_index: u64,
) -> Schema {
    let meta: HashMap<String, String> = [
        (META_FORMAT_VERSION, FORMAT_VERSION.to_string()),
        (META_TOP_K, k.to_string()),
        (META_VOCAB_SIZE, vocab_size.to_string()),
        (META_TOKENIZER_SHA256, tokenizer_sha256.to_string()),
        (META_SHARD_INDEX, shard_index.to_string()),
    ]
    .into_iter()
    .map(|(a, b)| (a.to_string(), b))
    .collect();
    shard_schema(k).with_metadata(meta)
}

/// Compares a file's schema with the expected one for `k`, ignoring metadata. Returns a
/// description of the first difference.
pub fn check_schema(found: &Schema, k: usize) -> Result<(), String> {
    let want = shard_schema(k);
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
