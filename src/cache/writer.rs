//! Writing one shard: [`ShardRows`] → one Arrow `RecordBatch` (`cache::rows`) → a zstd Parquet file,
//! written under a temporary name, fsynced, then renamed into place, with its sha256
//! computed while the bytes go out.

use super::rows::ShardRows;
use super::schema::{
    COL_INPUT_IDS, COL_SAMPLE_COUNTS, COL_SAMPLE_IDS, COL_SAMPLE_LOG_WEIGHTS, COL_SAMPLE_LOGPROBS,
    COL_SEQ_ID, COL_TAIL_LOGPROB, COL_TOPK_IDS, COL_TOPK_LOGPROB_DELTAS, COL_TOPK_LOGPROB_MAX,
    COL_TOPK_LOGPROB_STEP, COL_TOPK_LOGPROBS, shard_schema_with_metadata,
};
use crate::util::{failpoint, sync_dir};
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, Encoding, ZstdLevel};
use parquet::file::properties::{EnabledStatistics, WriterProperties};
use parquet::schema::types::ColumnPath;
use sha2::{Digest, Sha256};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// zstd level for shards: level 3 is the usual speed/size balance.
pub const DEFAULT_ZSTD_LEVEL: i32 = 3;
/// Rows (windows) per Parquet row group: small enough for a streaming reader to hold one.
pub const DEFAULT_ROW_GROUP_ROWS: usize = 128;

/// Parquet writer settings for shards.
pub fn writer_properties(zstd_level: i32, row_group_rows: usize) -> WriterProperties {
    let path = |parts: &[&str]| ColumnPath::new(parts.iter().map(|s| s.to_string()).collect());
    let list = ["list", "item"];
    let nested = ["list", "item", "list", "item"];
    // The per-position columns (Parquet leaf path and encoding). Top-k ids are in
    // probability order, not id order: deltas do not help, while split bytes give zstd the
    // (mostly constant) high bytes as runs, and the training reader copies them out of the
    // pages directly (`cache::pages`).
    //
    // Sampled ids (ascending within a position) and their counts (uint8, mostly 1) split
    // too. DELTA_BINARY_PACKED, used before, packs each miniblock of 32 values at the width
    // of its widest delta, and every position boundary is a delta as wide as the vocabulary
    // (the ids start again from a small one): with ~10-40 ids per position every miniblock
    // holds one. A one-off measurement (2026-12-04: the same 50-draw toy-teacher caches
    // re-encoded with pyarrow both ways), sample ids + counts per pair: 2.94 -> 2.63 B at
    // V = 32000 (10.4 distinct ids per position) and 3.29 -> 2.75 B at V = 131072 (13.2);
    // `cargo bench --bench e2e` reports the current encoding's `bytes_per_pair_*`.
    // float16 log-probs (top-k and sampled) are PLAIN: DuckDB reads BYTE_STREAM_SPLIT only
    // for 4- and 8-byte types, not float16 (format version 1 wrote BYTE_STREAM_SPLIT; those
    // caches still read here and in pyarrow). (Settings for columns a layout does not have are ignored.)
    //
    // q8 code deltas (uint8, INT32 in Parquet) split too: three of the four byte streams are
    // zero, and the fourth holds small numbers (the codes of log-probs in descending order
    // rise by a few steps per entry), which zstd's entropy stage packs to ~3 bits; the
    // codes themselves took ~5. The float16 scale is PLAIN, like every float16 column.
    let per_position: [(&str, &[&str], Encoding); 11] = [
        (COL_INPUT_IDS, &list, Encoding::DELTA_BINARY_PACKED),
        (COL_TOPK_IDS, &nested, Encoding::BYTE_STREAM_SPLIT),
        (COL_TOPK_LOGPROBS, &nested, Encoding::PLAIN),
        (COL_TOPK_LOGPROB_MAX, &list, Encoding::PLAIN),
        (COL_TOPK_LOGPROB_STEP, &list, Encoding::PLAIN),
        (
            COL_TOPK_LOGPROB_DELTAS,
            &nested,
            Encoding::BYTE_STREAM_SPLIT,
        ),
        (COL_TAIL_LOGPROB, &list, Encoding::BYTE_STREAM_SPLIT),
        (COL_SAMPLE_IDS, &nested, Encoding::BYTE_STREAM_SPLIT),
        (COL_SAMPLE_COUNTS, &nested, Encoding::BYTE_STREAM_SPLIT),
        (COL_SAMPLE_LOGPROBS, &nested, Encoding::PLAIN),
        (COL_SAMPLE_LOG_WEIGHTS, &nested, Encoding::BYTE_STREAM_SPLIT),
    ];
    let builder = WriterProperties::builder()
        .set_compression(Compression::ZSTD(
            ZstdLevel::try_new(zstd_level)
                .expect("zstd level validated by the caller: this is a bug"),
        ))
        .set_max_row_group_row_count(Some(row_group_rows))
        .set_dictionary_enabled(false)
        .set_column_encoding(path(&[COL_SEQ_ID]), Encoding::DELTA_BINARY_PACKED);
    per_position
        .into_iter()
        .fold(builder, |b, (column, leaf, encoding)| {
            let p = path(&[&[column][..], leaf].concat());
            // Min/max statistics of per-position values prune nothing (every page spans
            // the vocabulary and the log-prob range) and cost a compare per value: only
            // the per-window columns (`seq_id`, ...) keep them.
            b.set_column_encoding(p.clone(), encoding)
                .set_column_statistics_enabled(p, EnabledStatistics::None)
        })
        .build()
}

/// A shard on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WrittenShard {
    pub path: PathBuf,
    pub rows: u64,
    pub tokens: u64,
    pub bytes: u64,
    pub sha256: String,
}

struct HashingWriter<W: Write> {
    inner: W,
    hasher: Sha256,
    bytes: u64,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Settings for [`write_shard`].
#[derive(Debug, Clone)]
pub struct ShardWriteOptions {
    pub vocab_size: usize,
    pub tokenizer_sha256: String,
    pub zstd_level: i32,
    pub row_group_rows: usize,
}

/// Writes `rows` as shard `index` to `path` durably (temporary file, fsync, rename, fsync
/// of the directory).
pub fn write_shard(
    path: &Path,
    index: u64,
    rows: &ShardRows,
    opts: &ShardWriteOptions,
) -> Result<WrittenShard, std::io::Error> {
    write_shard_owned(path, index, rows.clone(), opts)
}

/// [`write_shard`] of rows it may consume: their buffers become the Parquet writer's input
/// instead of being copied (the teacher's writer holds one shard's rows, not two).
pub fn write_shard_owned(
    path: &Path,
    index: u64,
    rows: ShardRows,
    opts: &ShardWriteOptions,
) -> Result<WrittenShard, std::io::Error> {
    let dir = path
        .parent()
        .expect("shard path has a parent: this is a bug");
    let tmp = path.with_extension(format!("parquet.tmp-{}", std::process::id()));
    let schema = Arc::new(shard_schema_with_metadata(
        &rows.layout,
        opts.vocab_size,
        &opts.tokenizer_sha256,
        index,
    ));
    let (n_rows, positions) = (rows.rows() as u64, rows.positions() as u64);
    let batch = rows.into_record_batch(schema.clone());
    let file = std::fs::File::create(&tmp)?;
    let hw = HashingWriter {
        inner: std::io::BufWriter::with_capacity(1 << 20, file),
        hasher: Sha256::new(),
        bytes: 0,
    };
    let props = writer_properties(opts.zstd_level, opts.row_group_rows);
    let result = (|| -> parquet::errors::Result<HashingWriter<_>> {
        let mut w = ArrowWriter::try_new(hw, schema, Some(props))?;
        w.write(&batch)?;
        w.into_inner()
    })();
    let mut hw = match result {
        Ok(hw) => hw,
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(std::io::Error::other(e));
        }
    };
    hw.flush()?;
    let file = hw
        .inner
        .into_inner()
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    file.sync_all()?;
    drop(file);
    failpoint("shard-written");
    std::fs::rename(&tmp, path)?;
    sync_dir(dir)?;
    failpoint("shard-renamed");
    Ok(WrittenShard {
        path: path.to_path_buf(),
        rows: n_rows,
        tokens: positions,
        bytes: hw.bytes,
        sha256: hex::encode(hw.hasher.finalize()),
    })
}
