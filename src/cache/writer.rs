//! Writing one shard: rows in flat buffers → one Arrow `RecordBatch` → a zstd Parquet file,
//! written under a temporary name, fsynced, then renamed into place, with its sha256
//! computed while the bytes go out.

use super::schema::{
    COL_INPUT_IDS, COL_SEQ_ID, COL_TAIL_LOGPROB, COL_TOPK_IDS, COL_TOPK_LOGPROBS, fsl_item, item,
    shard_schema_with_metadata,
};
use crate::util::{failpoint, sync_dir};
use arrow_array::{
    ArrayRef, FixedSizeListArray, Float16Array, Float32Array, ListArray, RecordBatch, UInt32Array,
    UInt64Array,
};
use arrow_buffer::{OffsetBuffer, ScalarBuffer};
use arrow_schema::DataType;
use half::f16;
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

/// One window with the teacher's top-k at each of its positions (`k` entries per token in
/// `topk_ids`/`topk_logprobs`, one per token in `tail_logprob`).
#[derive(Debug, Clone, Copy)]
pub struct WindowTopK<'a> {
    pub seq_id: u64,
    pub doc_id: u64,
    pub window_index: u32,
    pub input_ids: &'a [u32],
    pub topk_ids: &'a [u32],
    pub topk_logprobs: &'a [f32],
    pub tail_logprob: &'a [f32],
}

/// The rows of one shard, in flat buffers (one entry per position for the per-position
/// columns, k entries per position for the top-k columns).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ShardRows {
    pub k: usize,
    pub seq_ids: Vec<u64>,
    pub doc_ids: Vec<u64>,
    pub window_index: Vec<u32>,
    /// Row i's positions are `offsets[i]..offsets[i + 1]`.
    pub offsets: Vec<i32>,
    pub input_ids: Vec<u32>,
    pub topk_ids: Vec<u32>,
    pub topk_logprobs: Vec<f16>,
    pub tail_logprob: Vec<f32>,
}

impl ShardRows {
    pub fn new(k: usize) -> Self {
        ShardRows {
            k,
            offsets: vec![0],
            ..Default::default()
        }
    }

    /// Empty rows with room for `rows` windows of `positions` tokens in all (no regrowth
    /// while a shard is filled).
    pub fn with_capacity(k: usize, rows: usize, positions: usize) -> Self {
        let mut offsets = Vec::with_capacity(rows + 1);
        offsets.push(0);
        ShardRows {
            k,
            seq_ids: Vec::with_capacity(rows),
            doc_ids: Vec::with_capacity(rows),
            window_index: Vec::with_capacity(rows),
            offsets,
            input_ids: Vec::with_capacity(positions),
            topk_ids: Vec::with_capacity(positions * k),
            topk_logprobs: Vec::with_capacity(positions * k),
            tail_logprob: Vec::with_capacity(positions),
        }
    }

    pub fn rows(&self) -> usize {
        self.seq_ids.len()
    }

    pub fn positions(&self) -> usize {
        self.input_ids.len()
    }

    /// Appends one window.
    pub fn push(&mut self, w: &WindowTopK<'_>) {
        let n = w.input_ids.len();
        assert!(
            w.topk_ids.len() == n * self.k
                && w.topk_logprobs.len() == n * self.k
                && w.tail_logprob.len() == n,
            "shard row shapes: this is a bug"
        );
        self.seq_ids.push(w.seq_id);
        self.doc_ids.push(w.doc_id);
        self.window_index.push(w.window_index);
        self.input_ids.extend_from_slice(w.input_ids);
        self.topk_ids.extend_from_slice(w.topk_ids);
        self.topk_logprobs
            .extend(w.topk_logprobs.iter().map(|&v| f16::from_f32(v)));
        self.tail_logprob.extend_from_slice(w.tail_logprob);
        self.offsets.push(self.input_ids.len() as i32);
    }

    /// The rows as a record batch with `schema` (from [`shard_schema_with_metadata`]).
    pub fn to_record_batch(&self, schema: Arc<arrow_schema::Schema>) -> RecordBatch {
        let k = self.k;
        let offs = OffsetBuffer::new(ScalarBuffer::from(self.offsets.clone()));
        let list = |dt: DataType, values: ArrayRef| -> ArrayRef {
            Arc::new(ListArray::new(item(dt), offs.clone(), values, None))
        };
        let fsl_list = |dt: DataType, values: ArrayRef| -> ArrayRef {
            let fsl = FixedSizeListArray::new(item(dt.clone()), k as i32, values, None);
            Arc::new(ListArray::new(
                fsl_item(dt, k),
                offs.clone(),
                Arc::new(fsl),
                None,
            ))
        };
        let columns: Vec<ArrayRef> = vec![
            Arc::new(UInt64Array::from(self.seq_ids.clone())),
            Arc::new(UInt64Array::from(self.doc_ids.clone())),
            Arc::new(UInt32Array::from(self.window_index.clone())),
            list(
                DataType::UInt32,
                Arc::new(UInt32Array::from(self.input_ids.clone())),
            ),
            fsl_list(
                DataType::UInt32,
                Arc::new(UInt32Array::from(self.topk_ids.clone())),
            ),
            fsl_list(
                DataType::Float16,
                Arc::new(Float16Array::from(self.topk_logprobs.clone())),
            ),
            list(
                DataType::Float32,
                Arc::new(Float32Array::from(self.tail_logprob.clone())),
            ),
        ];
        RecordBatch::try_new(schema, columns)
            .expect("shard columns match the schema: this is a bug")
    }
}

/// Parquet writer settings for shards.
pub fn writer_properties(zstd_level: i32, row_group_rows: usize) -> WriterProperties {
    let path = |parts: &[&str]| ColumnPath::new(parts.iter().map(|s| s.to_string()).collect());
    let list = ["list", "item"];
    let nested = ["list", "item", "list", "item"];
    // The per-position columns (Parquet leaf path and encoding). Top-k ids are in
    // probability order, not id order: deltas do not help, while split bytes give zstd the
    // (mostly constant) high bytes as runs, and the training reader copies them out of the
    // pages directly (`cache::pages`).
    let per_position: [(&str, &[&str], Encoding); 4] = [
        (COL_INPUT_IDS, &list, Encoding::DELTA_BINARY_PACKED),
        (COL_TOPK_IDS, &nested, Encoding::BYTE_STREAM_SPLIT),
        (COL_TOPK_LOGPROBS, &nested, Encoding::BYTE_STREAM_SPLIT),
        (COL_TAIL_LOGPROB, &list, Encoding::BYTE_STREAM_SPLIT),
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
    let dir = path
        .parent()
        .expect("shard path has a parent: this is a bug");
    let tmp = path.with_extension(format!("parquet.tmp-{}", std::process::id()));
    let schema = Arc::new(shard_schema_with_metadata(
        rows.k,
        opts.vocab_size,
        &opts.tokenizer_sha256,
        index,
    ));
    let batch = rows.to_record_batch(schema.clone());
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
        rows: rows.rows() as u64,
        tokens: rows.positions() as u64,
        bytes: hw.bytes,
        sha256: hex::encode(hw.hasher.finalize()),
    })
}
