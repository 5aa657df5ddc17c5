//! Writing one shard: [`ShardRows`] → Arrow `RecordBatch`es (`cache::rows`) → a zstd Parquet
//! file, written part by part ([`ShardFile`]) under a temporary name, fsynced, then renamed
//! into place, with its sha256 computed while the bytes go out.

use super::rows::ShardRows;
use super::schema::{
    COL_INPUT_IDS, COL_SAMPLE_COUNTS, COL_SAMPLE_IDS, COL_SAMPLE_LOG_WEIGHTS, COL_SAMPLE_LOGPROBS,
    COL_SEQ_ID, COL_TAIL_LOGPROB, COL_TOPK_IDS, COL_TOPK_LOGPROB_DELTAS, COL_TOPK_LOGPROB_MAX,
    COL_TOPK_LOGPROB_STEP, COL_TOPK_LOGPROBS, Layout, shard_schema_with_metadata,
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
/// instead of being copied.
pub fn write_shard_owned(
    path: &Path,
    index: u64,
    rows: ShardRows,
    opts: &ShardWriteOptions,
) -> Result<WrittenShard, std::io::Error> {
    let mut file = ShardFile::create(path, index, &rows.layout, opts)?;
    file.write(rows)?;
    file.finish()
}

/// A shard written part by part: each [`ShardFile::write`] adds the next windows (in
/// `seq_id` order) and their row groups go to disk as they fill, so the teacher holds one
/// part's rows at a time instead of the whole shard's. The file is written under a
/// temporary name and appears under its own only on [`ShardFile::finish`] (fsync, rename,
/// fsync of the directory); dropped unfinished (an error anywhere), the temporary file is
/// removed. Parts whose lengths are multiples of the row group size give the same bytes
/// as one [`write_shard`] of all the rows.
pub struct ShardFile {
    path: PathBuf,
    tmp: PathBuf,
    layout: Layout,
    schema: Arc<arrow_schema::Schema>,
    /// `None` once finished (or failed).
    writer: Option<ArrowWriter<HashingWriter<std::io::BufWriter<std::fs::File>>>>,
    rows: u64,
    positions: u64,
    row_group_rows: usize,
}

/// Rows [`ShardFile::write`] hands parquet's writer per call: its float16 columns become one
/// `FixedLenByteArray` (~32 bytes) per value for each call, 537 MB for a row group of 128
/// windows of 2048 positions at k = 64 where 8 windows take 34 MB. A shard written in parts
/// of whole multiples of this many rows has the bytes of one write (tested).
pub const WRITE_ROWS: usize = 8;

impl ShardFile {
    /// Starts shard `index` of `layout` at `path` (written to `path.parquet.tmp-PID`).
    pub fn create(
        path: &Path,
        index: u64,
        layout: &Layout,
        opts: &ShardWriteOptions,
    ) -> Result<ShardFile, std::io::Error> {
        let tmp = path.with_extension(format!("parquet.tmp-{}", std::process::id()));
        let schema = Arc::new(shard_schema_with_metadata(
            layout,
            opts.vocab_size,
            &opts.tokenizer_sha256,
            index,
        ));
        let file = std::fs::File::create(&tmp)?;
        let hw = HashingWriter {
            inner: std::io::BufWriter::with_capacity(1 << 20, file),
            hasher: Sha256::new(),
            bytes: 0,
        };
        let props = writer_properties(opts.zstd_level, opts.row_group_rows);
        let mut shard = ShardFile {
            path: path.to_path_buf(),
            tmp,
            layout: *layout,
            schema: schema.clone(),
            writer: None,
            rows: 0,
            positions: 0,
            row_group_rows: opts.row_group_rows.max(1),
        };
        // On an error `shard` is dropped here, which removes the temporary file.
        shard.writer =
            Some(ArrowWriter::try_new(hw, schema, Some(props)).map_err(std::io::Error::other)?);
        Ok(shard)
    }

    /// Appends `rows` (the next windows of the shard, of the layout it was created with).
    pub fn write(&mut self, rows: ShardRows) -> Result<(), std::io::Error> {
        assert_eq!(
            rows.layout, self.layout,
            "a shard's parts have one layout: this is a bug"
        );
        let w = self
            .writer
            .as_mut()
            .expect("write after finish: this is a bug");
        let first = self.rows as usize;
        let n = rows.rows();
        self.rows += n as u64;
        self.positions += rows.positions() as u64;
        let batch = rows.into_record_batch(self.schema.clone());
        // At most WRITE_ROWS rows per call, the calls starting at multiples of WRITE_ROWS
        // within each row group: the column writers then see the same calls (and cut the
        // same pages) however the shard was split into parts of multiples of WRITE_ROWS rows.
        let mut at = 0;
        let mut result = Ok(());
        while at < n && result.is_ok() {
            let in_group = (first + at) % self.row_group_rows;
            let len = (WRITE_ROWS - in_group % WRITE_ROWS)
                .min(self.row_group_rows - in_group)
                .min(n - at);
            result = w
                .write(&batch.slice(at, len))
                .map_err(std::io::Error::other);
            at += len;
        }
        if result.is_err() {
            self.writer = None;
        }
        result
    }

    /// Closes the file, fsyncs it and renames it into place.
    pub fn finish(mut self) -> Result<WrittenShard, std::io::Error> {
        let w = self
            .writer
            .take()
            .expect("finish of a failed shard: this is a bug");
        let mut hw = w.into_inner().map_err(std::io::Error::other)?;
        hw.flush()?;
        let bytes = hw.bytes;
        let sha256 = hex::encode(std::mem::take(&mut hw.hasher).finalize());
        let file = hw
            .inner
            .into_inner()
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        file.sync_all()?;
        drop(file);
        failpoint("shard-written");
        std::fs::rename(&self.tmp, &self.path)?;
        let dir = self
            .path
            .parent()
            .expect("shard path has a parent: this is a bug");
        sync_dir(dir)?;
        failpoint("shard-renamed");
        Ok(WrittenShard {
            path: self.path.clone(),
            rows: self.rows,
            tokens: self.positions,
            bytes,
            sha256,
        })
    }
}

impl Drop for ShardFile {
    fn drop(&mut self) {
        // Unfinished (an error, or the teacher stopped mid-shard): nothing may look written.
        // After `finish` the temporary name no longer exists, and this does nothing.
        let _ = std::fs::remove_file(&self.tmp);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::rows::WindowTopK;
    use crate::cache::schema::CacheMode;
    use crate::rng::SplitMix;

    /// A number below `below` from the crate's test RNG.
    fn draw(rng: &mut SplitMix, below: u64) -> u64 {
        rng.next_u64() % below
    }

    /// Hybrid rows (top-4, up to 6 sampled ids per position, random lengths) of windows
    /// `from..to` of one deterministic sequence of windows.
    fn rows(from: usize, to: usize) -> ShardRows {
        let mut st = SplitMix::new(7);
        let mut rows = ShardRows::with_layout(Layout::of(CacheMode::Hybrid, 4, 20, false));
        for w in 0..to {
            let n = 1 + draw(&mut st, 11) as usize;
            let input: Vec<u32> = (0..n).map(|_| draw(&mut st, 1000) as u32).collect();
            let topk_ids: Vec<u32> = (0..4 * n).map(|_| draw(&mut st, 1000) as u32).collect();
            let topk_lps: Vec<f32> = (0..4 * n)
                .map(|i| -0.5 - (i % 4) as f32 - draw(&mut st, 100) as f32 / 1000.0)
                .collect();
            let tail: Vec<f32> = (0..n)
                .map(|_| -0.1 - draw(&mut st, 300) as f32 / 100.0)
                .collect();
            let lens: Vec<u32> = (0..n).map(|_| draw(&mut st, 7) as u32).collect();
            // Ascending distinct ids per position.
            let ids: Vec<u32> = lens
                .iter()
                .flat_map(|&l| {
                    (0..l)
                        .map(|j| 10 * j + draw(&mut st, 10) as u32)
                        .collect::<Vec<_>>()
                })
                .collect();
            let counts: Vec<u16> = ids.iter().map(|_| 1 + draw(&mut st, 3) as u16).collect();
            if w < from {
                continue;
            }
            rows.push(&WindowTopK {
                seq_id: w as u64,
                doc_id: w as u64 / 3,
                window_index: w as u32 % 3,
                input_ids: &input,
                topk_ids: &topk_ids,
                topk_logprobs: &topk_lps,
                tail_logprob: &tail,
                sample_lens: &lens,
                sample_ids: &ids,
                sample_counts: &counts,
                ..Default::default()
            });
        }
        rows
    }

    fn opts() -> ShardWriteOptions {
        ShardWriteOptions {
            vocab_size: 1100,
            tokenizer_sha256: "00".repeat(32),
            zstd_level: DEFAULT_ZSTD_LEVEL,
            row_group_rows: DEFAULT_ROW_GROUP_ROWS,
        }
    }

    #[test]
    fn a_shard_written_in_parts_of_multiples_of_write_rows_has_the_bytes_of_one_write() {
        let dir = tempfile::tempdir().unwrap();
        let all = rows(0, 600);
        let one = write_shard(&dir.path().join("one.parquet"), 3, &all, &opts()).unwrap();
        // The teacher's parts (256 windows at seq_len 512, 64 at 2048, 8 from 16384: row
        // groups are 128 rows, so parts end inside them), then the rest; and parts of
        // WRITE_ROWS.
        let eights: Vec<usize> = (0..600).step_by(WRITE_ROWS).chain([600]).collect();
        for cuts in [
            &[0, 256, 512, 600][..],
            &[0, 64, 128, 192, 256, 320, 384, 448, 512, 576, 600],
            &[0, 16, 32, 48, 176, 600],
            &eights,
            &[0, 600],
        ] {
            let path = dir.path().join(format!("parts-{}.parquet", cuts.len()));
            let mut f = ShardFile::create(&path, 3, &all.layout, &opts()).unwrap();
            for c in cuts.windows(2) {
                f.write(rows(c[0], c[1])).unwrap();
            }
            let parts = f.finish().unwrap();
            assert_eq!(
                (parts.rows, parts.tokens, parts.bytes, &parts.sha256),
                (one.rows, one.tokens, one.bytes, &one.sha256),
                "{cuts:?}"
            );
            assert_eq!(
                std::fs::read(&path).unwrap(),
                std::fs::read(&one.path).unwrap()
            );
        }
        assert_eq!(one.rows, 600);
    }

    #[test]
    fn a_shard_dropped_unfinished_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("shard-00000.parquet");
        let mut f = ShardFile::create(&path, 0, &rows(0, 1).layout, &opts()).unwrap();
        f.write(rows(0, 300)).unwrap(); // two row groups are written out
        let on_disk: Vec<_> = std::fs::read_dir(dir.path()).unwrap().flatten().collect();
        assert_eq!(on_disk.len(), 1, "the temporary file: {on_disk:?}");
        assert!(on_disk[0].file_name().to_string_lossy().contains(".tmp-"));
        drop(f);
        let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().flatten().collect();
        assert!(left.is_empty(), "{left:?}");
    }
}
