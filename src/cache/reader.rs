//! Opening a cache and reading its shards back into [`ShardRows`] (used by `verify`,
//! `inspect` and the tests). The streaming, memory-mapped reader for training builds on the
//! same checks.

use super::manifest::{Manifest, ManifestError, ShardEntry};
use super::rows::{ShardRows, append_batch};
use super::schema::{Layout, check_metadata, check_schema, shard_schema_with_metadata};
use crate::util::sha256_file;
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
        "shard {path} and the manifest disagree: {what}; the shards are not what this manifest describes: restore the cache's original manifest.json, or delete the cache directory and run the teacher again (recomputing the shard would not help)"
    )]
    MetadataMismatch { path: PathBuf, what: String },
    #[error(
        "cache {dir} is incomplete ({written} of {planned} shards written); finish it by running the same `logitcache teacher` command again before reading it"
    )]
    Incomplete {
        dir: PathBuf,
        written: u64,
        planned: u64,
    },
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
        read_shard_file(
            &self.dir.join(&entry.file),
            &self.manifest.params.layout(),
            Some(&self.expected_schema(entry)),
        )
    }

    /// The schema, with its key-value metadata, that the manifest says `entry` has.
    pub fn expected_schema(&self, entry: &ShardEntry) -> arrow_schema::Schema {
        let m = &self.manifest;
        shard_schema_with_metadata(
            &m.params.layout(),
            m.vocab_size,
            &m.tokenizer.sha256,
            entry.index,
        )
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

/// Reads a shard file whole, checking its schema against `layout`.
pub fn read_shard_file(
    path: &Path,
    layout: &Layout,
    expected: Option<&arrow_schema::Schema>,
) -> Result<ShardRows, ReadError> {
    let corrupt = |what: String| ReadError::Corrupt {
        path: path.to_path_buf(),
        what,
    };
    let file = open_shard(path)?;
    let builder = ParquetRecordBatchReaderBuilder::try_new(file)
        .map_err(|e| corrupt(format!("not a readable Parquet file ({e})")))?;
    check_schema(builder.schema(), layout).map_err(corrupt)?;
    if let Some(want) = expected {
        check_metadata(builder.schema(), want).map_err(|what| ReadError::MetadataMismatch {
            path: path.to_path_buf(),
            what,
        })?;
    }
    let reader = builder
        .with_batch_size(1024)
        .build()
        .map_err(|e| corrupt(e.to_string()))?;
    let mut rows = ShardRows::with_layout(*layout);
    for batch in reader {
        let batch = batch.map_err(|e| corrupt(format!("cannot decode ({e})")))?;
        append_batch(&mut rows, &batch).map_err(corrupt)?;
    }
    Ok(rows)
}
