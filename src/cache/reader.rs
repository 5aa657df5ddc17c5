//! Opening a cache and reading its shards back into [`ShardRows`] (used by `verify`,
//! `inspect` and the tests). The streaming, memory-mapped reader for training builds on the
//! same checks.

use super::manifest::{Manifest, ManifestError, ShardEntry};
use super::schema::{
    COL_DOC_ID, COL_INPUT_IDS, COL_SEQ_ID, COL_TAIL_LOGPROB, COL_TOPK_IDS, COL_TOPK_LOGPROBS,
    COL_WINDOW_INDEX, check_schema,
};
use super::writer::ShardRows;
use crate::util::sha256_file;
use arrow_array::cast::AsArray;
use arrow_array::types::{Float16Type, Float32Type, UInt32Type, UInt64Type};
use arrow_array::{Array, RecordBatch};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error(
        "the {0} holds no sequences; use a larger cache, a smaller --eval-fraction or fewer ranks"
    )]
    EmptySplit(String),
    #[error(
        "shard {path} is missing; run the teacher again with the same arguments to recompute it"
    )]
    MissingShard { path: PathBuf },
    #[error(
        "shard {path} is damaged: {what}; delete it and run the teacher again with the same arguments to recompute it"
    )]
    Corrupt { path: PathBuf, what: String },
    #[error(
        "the cache in {dir} was built with tokenizer sha256 {cache} ({cache_path}), but the tokenizer given ({given_path}) has sha256 {given}; pass the tokenizer the cache was built with"
    )]
    TokenizerMismatch {
        dir: PathBuf,
        cache: String,
        cache_path: PathBuf,
        given: String,
        given_path: PathBuf,
    },
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// An opened cache: its directory and validated manifest.
#[derive(Debug, Clone)]
pub struct Cache {
    pub dir: PathBuf,
    pub manifest: Manifest,
}

impl Cache {
    /// Opens the cache in `dir` (validates the manifest and its checksum).
    pub fn open(dir: &Path) -> Result<Cache, ReadError> {
        Ok(Cache {
            dir: dir.to_path_buf(),
            manifest: Manifest::load(dir)?,
        })
    }

    /// Refuses a tokenizer other than the one the cache was built with.
    pub fn check_tokenizer(&self, tokenizer: &Path) -> Result<(), ReadError> {
        let (given, _) = sha256_file(tokenizer).map_err(|e| ReadError::Io {
            path: tokenizer.to_path_buf(),
            source: e,
        })?;
        if given != self.manifest.tokenizer.sha256 {
            return Err(ReadError::TokenizerMismatch {
                dir: self.dir.clone(),
                cache: self.manifest.tokenizer.sha256.clone(),
                cache_path: self.manifest.tokenizer.path.clone(),
                given,
                given_path: tokenizer.to_path_buf(),
            });
        }
        Ok(())
    }

    /// The shard entry holding `seq_id`, if written.
    pub fn shard_of(&self, seq_id: u64) -> Option<&ShardEntry> {
        let index = seq_id / self.manifest.params.shard_size as u64;
        self.manifest.shards.iter().find(|s| s.index == index)
    }

    /// Reads a shard whole, checking its schema and top-k.
    pub fn read_shard(&self, entry: &ShardEntry) -> Result<ShardRows, ReadError> {
        read_shard_file(&self.dir.join(&entry.file), self.manifest.params.top_k)
    }
}

/// Opens a shard file; a missing one is `MissingShard`.
pub fn open_shard(path: &Path) -> Result<std::fs::File, ReadError> {
    std::fs::File::open(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            ReadError::MissingShard {
                path: path.to_path_buf(),
            }
        } else {
            ReadError::Io {
                path: path.to_path_buf(),
                source: e,
            }
        }
    })
}

/// Reads a shard file whole, checking its schema against top-k `k`.
pub fn read_shard_file(path: &Path, k: usize) -> Result<ShardRows, ReadError> {
    let corrupt = |what: String| ReadError::Corrupt {
        path: path.to_path_buf(),
        what,
    };
    let file = open_shard(path)?;
    let builder = ParquetRecordBatchReaderBuilder::try_new(file)
        .map_err(|e| corrupt(format!("not a readable Parquet file ({e})")))?;
    check_schema(builder.schema(), k).map_err(corrupt)?;
    let reader = builder
        .with_batch_size(1024)
        .build()
        .map_err(|e| corrupt(e.to_string()))?;
    let mut rows = ShardRows::new(k);
    for batch in reader {
        let batch = batch.map_err(|e| corrupt(format!("cannot decode ({e})")))?;
        append_batch(&mut rows, &batch).map_err(corrupt)?;
    }
    Ok(rows)
}

pub(crate) fn append_batch(rows: &mut ShardRows, b: &RecordBatch) -> Result<(), String> {
    let k = rows.k;
    let list = |name: &str| {
        b.column_by_name(name)
            .map(|c| c.as_list::<i32>())
            .ok_or_else(|| format!("no column {name}"))
    };
    let (ids, tk, tl) = (
        list(COL_INPUT_IDS)?,
        list(COL_TOPK_IDS)?,
        list(COL_TOPK_LOGPROBS)?,
    );
    if tk.null_count() > 0 || tl.null_count() > 0 {
        return Err("unexpected nulls".into());
    }
    let lengths = |l: &arrow_array::ListArray| {
        let o = l.value_offsets();
        o.windows(2).map(|w| w[1] - w[0]).collect::<Vec<_>>()
    };
    let positions = lengths(ids);
    if lengths(tk) != positions || lengths(tl) != positions {
        return Err("per-position columns have different lengths".into());
    }
    append_per_position(rows, b)?;
    rows.topk_ids
        .extend_from_slice(topk_values::<UInt32Type>(tk, k));
    rows.topk_logprobs
        .extend_from_slice(topk_values::<Float16Type>(tl, k));
    Ok(())
}

/// The values of a `list<fixed_size_list<T, k>>` column's rows, flattened.
fn topk_values<T: arrow_array::ArrowPrimitiveType>(
    l: &arrow_array::ListArray,
    k: usize,
) -> &[T::Native] {
    let o = l.value_offsets();
    let (s, e) = (o[0] as usize * k, o[o.len() - 1] as usize * k);
    &l.values()
        .as_fixed_size_list()
        .values()
        .as_primitive::<T>()
        .values()[s..e]
}

/// [`append_batch`] for a batch without the top-k columns (the fast reader fills
/// `topk_ids`/`topk_logprobs` from the pages, see `pages`).
pub(crate) fn append_per_position(rows: &mut ShardRows, b: &RecordBatch) -> Result<(), String> {
    let col = |name: &str| {
        b.column_by_name(name)
            .ok_or_else(|| format!("no column {name}"))
    };
    let seq = col(COL_SEQ_ID)?.as_primitive::<UInt64Type>();
    let doc = col(COL_DOC_ID)?.as_primitive::<UInt64Type>();
    let win = col(COL_WINDOW_INDEX)?.as_primitive::<UInt32Type>();
    let ids = col(COL_INPUT_IDS)?.as_list::<i32>();
    let tail = col(COL_TAIL_LOGPROB)?.as_list::<i32>();
    for a in [ids as &dyn Array, tail, seq, doc, win] {
        if a.null_count() > 0 {
            return Err("unexpected nulls".into());
        }
    }
    if ids.value_offsets() != tail.value_offsets() {
        return Err("per-position columns have different lengths".into());
    }
    let (s, e) = (
        ids.value_offsets()[0] as usize,
        ids.value_offsets()[b.num_rows()] as usize,
    );
    let base = rows.input_ids.len() as i32 - ids.value_offsets()[0];
    rows.seq_ids.extend_from_slice(seq.values());
    rows.doc_ids.extend_from_slice(doc.values());
    rows.window_index.extend_from_slice(win.values());
    rows.input_ids
        .extend_from_slice(&ids.values().as_primitive::<UInt32Type>().values()[s..e]);
    rows.tail_logprob
        .extend_from_slice(&tail.values().as_primitive::<Float32Type>().values()[s..e]);
    rows.offsets
        .extend(ids.value_offsets()[1..].iter().map(|&o| o + base));
    Ok(())
}
