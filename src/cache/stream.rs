//! Streaming a cache for training: memory-mapped shards decoded row group by row group on a
//! background thread into padded batches, with a deterministic bounded shuffle, epochs,
//! data-parallel partitioning, a held-out split and a resumable cursor.
//!
//! Order: each epoch permutes the list of (shard, row group) units with the seed; consecutive
//! `shuffle_units` units form a *group* whose rows are permuted together (the bounded shuffle
//! buffer). Within a group, after the eval/train filter, rank `r` of `W` takes every W-th row
//! from `r`, so ranks are disjoint and together cover the split. The cursor (epoch, group,
//! rows of this rank already emitted in the group) is all a checkpoint needs to resume at the
//! same place.

use super::pages;
use super::reader::{Cache, ReadError, open_shard};
use super::rows::q8_codes_from_deltas;
use super::rows::{ShardRows, append_batch, append_per_position};
use super::schema::{
    COL_SAMPLE_COUNTS, COL_SAMPLE_IDS, COL_TOPK_IDS, Layout, check_metadata, check_schema,
};
use crate::rng::{is_eval, mix, permutation};
use bytes::Bytes;
use parquet::arrow::ProjectionMask;
use parquet::arrow::arrow_reader::{
    ArrowReaderMetadata, ArrowReaderOptions, ParquetRecordBatchReaderBuilder,
};
use parquet::data_type::Int32Type;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::thread::JoinHandle;

/// Row groups mixed by the shuffle buffer (128 windows each by default: ~1k windows).
pub const DEFAULT_SHUFFLE_UNITS: usize = 8;
/// Batches whose windows are sorted by length together (length bucketing).
pub const DEFAULT_BUCKET_BATCHES: usize = 16;
/// Batches decoded ahead of the trainer.
pub const DEFAULT_PREFETCH: usize = 4;

/// Which part of the cache a stream reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    Train,
    Eval,
    /// Every sequence.
    All,
}

/// Position in the stream; saved in checkpoints.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cursor {
    pub epoch: u64,
    pub group: u64,
    /// Rows of this rank already emitted from the group.
    pub offset: u64,
}

#[derive(Debug, Clone)]
pub struct StreamConfig {
    /// Sequences per batch.
    pub batch_size: usize,
    pub seed: u64,
    pub shuffle: bool,
    pub shuffle_units: usize,
    /// Stop after this many epochs (`None`: endless).
    pub epochs: Option<u64>,
    pub rank: usize,
    pub world_size: usize,
    pub split: Split,
    pub eval_fraction: f64,
    pub prefetch: usize,
    pub start: Cursor,
    /// With `shuffle`, batches are formed from windows of similar length within runs of
    /// this many batches (1 = no bucketing).
    pub bucket_batches: usize,
}

impl Default for StreamConfig {
    fn default() -> Self {
        StreamConfig {
            batch_size: 8,
            seed: 0,
            shuffle: true,
            shuffle_units: DEFAULT_SHUFFLE_UNITS,
            epochs: Some(1),
            rank: 0,
            world_size: 1,
            split: Split::All,
            eval_fraction: 0.0,
            prefetch: DEFAULT_PREFETCH,
            start: Cursor::default(),
            bucket_batches: DEFAULT_BUCKET_BATCHES,
        }
    }
}

/// A padded batch, row-major `[batch, len]` (and `[batch, len, k]` for the top-k).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TrainBatch {
    pub batch: usize,
    pub len: usize,
    pub k: usize,
    pub seq_ids: Vec<u64>,
    /// Tokens (0 at padding).
    pub input_ids: Vec<u32>,
    /// The next token in the window (0 where there is none).
    pub target_ids: Vec<u32>,
    /// 1 where `target_ids` is a real next token (cross-entropy positions).
    pub target_mask: Vec<f32>,
    /// 1 at every real position (distillation positions: the last one of a window has a
    /// teacher distribution but no next token inside the window).
    pub mask: Vec<f32>,
    pub topk_ids: Vec<u32>,
    pub topk_logprobs: Vec<f32>,
    /// Log of the teacher's mass outside the top-k (`-inf` possible; 0 at padding).
    /// For a `sample` or `hybrid` cache the teacher fields hold the sparse estimate of the
    /// whole distribution (see `sparse_target`): `k` is the batch's widest position, unused
    /// entries have log-prob `-inf`, and `tail_logprob` is `-inf` (no tail outcome).
    pub tail_logprob: Vec<f32>,
    /// Where the stream stands after this batch.
    pub cursor: Cursor,
}

impl TrainBatch {
    /// Real positions in the batch.
    pub fn tokens(&self) -> usize {
        self.mask.iter().filter(|&&m| m > 0.0).count()
    }
}

/// A memory-mapped shard.
pub struct MappedShard {
    path: PathBuf,
    bytes: Bytes,
    meta: ArrowReaderMetadata,
    identity: FileIdentity,
}

/// Shards this process has already hashed: (file identity, sha256). Every evaluation pass
/// starts a stream over the same shards; hashing them again each time would cost as much
/// as decoding them. A shard replaced (new inode) or rewritten (new length or mtime) is
/// hashed again.
static VERIFIED: std::sync::Mutex<Vec<(FileIdentity, String)>> = std::sync::Mutex::new(Vec::new());

/// (device, inode, length, mtime s, mtime ns) of a mapped file.
type FileIdentity = (u64, u64, u64, i64, i64);

impl MappedShard {
    /// Checks the mapped bytes against the manifest's sha256 (a flipped byte inside a
    /// compressed page could otherwise decode to wrong values silently). Done once per
    /// file and process (see [`VERIFIED`]).
    pub fn verify(&self, sha256: &str) -> Result<(), ReadError> {
        let key = (self.identity, sha256.to_string());
        if VERIFIED.lock().map(|v| v.contains(&key)).unwrap_or(false) {
            return Ok(());
        }
        let found = crate::util::sha256_bytes(&self.bytes);
        if found != sha256 {
            return Err(ReadError::Corrupt {
                path: self.path.clone(),
                what: format!("sha256 {found} does not match the manifest's {sha256}"),
            });
        }
        if let Ok(mut v) = VERIFIED.lock() {
            v.push(key);
        }
        Ok(())
    }
}

impl MappedShard {
    /// Maps `path` and reads its footer.
    ///
    /// # Safety
    /// The file must not be truncated or modified while mapped (a cache's shards are only
    /// ever replaced by rename, which leaves a mapped file intact); truncation under a live
    /// map makes reads fault (SIGBUS).
    pub unsafe fn open(path: &Path, layout: &Layout) -> Result<Self, ReadError> {
        let corrupt = |what: String| ReadError::Corrupt {
            path: path.to_path_buf(),
            what,
        };
        let file = open_shard(path)?;
        let identity = {
            use std::os::unix::fs::MetadataExt;
            let md = file.metadata().map_err(|e| ReadError::Io {
                path: path.to_path_buf(),
                source: e,
            })?;
            (md.dev(), md.ino(), md.len(), md.mtime(), md.mtime_nsec())
        };
        // SAFETY: forwarded to the caller (see `# Safety`).
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| ReadError::Io {
            path: path.to_path_buf(),
            source: e,
        })?;
        let bytes = Bytes::from_owner(map);
        let meta = ArrowReaderMetadata::load(&bytes, ArrowReaderOptions::new())
            .map_err(|e| corrupt(format!("not a readable Parquet file ({e})")))?;
        check_schema(meta.schema(), layout).map_err(corrupt)?;
        Ok(MappedShard {
            path: path.to_path_buf(),
            bytes,
            meta,
            identity,
        })
    }

    pub fn row_groups(&self) -> usize {
        self.meta.metadata().num_row_groups()
    }

    /// Decodes one row group: the top-k columns straight from their pages and the sample
    /// columns through the column reader when they have the layout our writer produces (see
    /// `pages`), else everything through Arrow.
    pub fn decode(&self, row_group: usize, layout: &Layout) -> Result<ShardRows, ReadError> {
        self.decode_into(row_group, layout, None)
    }

    /// [`MappedShard::decode`] into `reuse`'s buffers where given: the `topk_ids` and
    /// `topk_logprobs` of rows decoded earlier and no longer needed (taken by the fast top-k
    /// path only; otherwise dropped).
    fn decode_into(
        &self,
        row_group: usize,
        layout: &Layout,
        reuse: Option<TopkBuffers>,
    ) -> Result<ShardRows, ReadError> {
        if let Some(rows) = self.decode_fast(row_group, layout, reuse)? {
            return Ok(rows);
        }
        self.decode_arrow(row_group, layout)
    }

    fn corrupt(&self, what: String) -> ReadError {
        ReadError::Corrupt {
            path: self.path.clone(),
            what,
        }
    }

    fn decode_fast(
        &self,
        row_group: usize,
        layout: &Layout,
        reuse: Option<TopkBuffers>,
    ) -> Result<Option<ShardRows>, ReadError> {
        // The sample columns take the fast path without the optional columns beside them
        // (`--store-logprobs`, a proposal τ ≠ 1), which Arrow then decodes with the rest.
        let fast_samples =
            layout.has_samples() && !layout.sample_logprobs && !layout.sample_log_weights;
        if !layout.has_topk() && !fast_samples {
            return Ok(None);
        }
        let k = layout.k;
        let md = self.meta.metadata();
        let schema = md.file_metadata().schema_descr();
        let leaf = |name: &str| {
            (0..schema.num_columns()).find(|&i| schema.column(i).path().parts()[0] == name)
        };
        let mut fast = Vec::new();
        let topk = if layout.has_topk() {
            let (Some(ids), Some(lp)) = (leaf(COL_TOPK_IDS), leaf(layout.topk_logprob_column()))
            else {
                return Ok(None);
            };
            fast.extend([ids, lp]);
            Some((ids, lp))
        } else {
            None
        };
        let sampled = if fast_samples {
            let (Some(ids), Some(counts)) = (leaf(COL_SAMPLE_IDS), leaf(COL_SAMPLE_COUNTS)) else {
                return Ok(None);
            };
            fast.extend([ids, counts]);
            Some((ids, counts))
        } else {
            None
        };
        let others = (0..schema.num_columns()).filter(|i| !fast.contains(i));
        let reader = ParquetRecordBatchReaderBuilder::new_with_metadata(
            self.bytes.clone(),
            self.meta.clone(),
        )
        .with_row_groups(vec![row_group])
        .with_projection(ProjectionMask::leaves(schema, others))
        .with_batch_size(1 << 16)
        .build()
        .map_err(|e| self.corrupt(e.to_string()))?;
        let mut rows = ShardRows::with_layout(*layout);
        for b in reader {
            let b =
                b.map_err(|e| self.corrupt(format!("cannot decode row group {row_group} ({e})")))?;
            append_per_position(&mut rows, &b, !fast_samples).map_err(|e| self.corrupt(e))?;
        }
        let rg = md.row_group(row_group);
        let n = rg.num_rows() as usize;
        let pages_err = |e: String| self.corrupt(format!("row group {row_group}: {e}"));
        if let Some((ids_leaf, counts_leaf)) = sampled {
            // Straight from PLAIN / BYTE_STREAM_SPLIT pages, else through the parquet
            // crate's column reader (DELTA_BINARY_PACKED sample columns of older caches).
            let nested = |leaf: usize| -> Result<Option<pages::NestedValues<u32>>, ReadError> {
                let chunk = rg.column(leaf);
                if let Some(v) =
                    pages::nested_leaf_values::<u32>(&self.bytes, chunk, n).map_err(pages_err)?
                {
                    return Ok(Some(v));
                }
                let v =
                    pages::nested_values::<Int32Type>(&self.bytes, chunk, n).map_err(pages_err)?;
                Ok(v.map(|(v, o)| (v.into_iter().map(|x| x as u32).collect(), o)))
            };
            let (Some((ids, offsets)), Some((counts, counts_offsets))) =
                (nested(ids_leaf)?, nested(counts_leaf)?)
            else {
                return Ok(None);
            };
            if offsets.len() != rows.positions() + 1 || counts_offsets != offsets {
                return Err(self.corrupt(format!(
                    "row group {row_group}: sample_ids, sample_counts and input_ids hold different numbers of positions or entries"
                )));
            }
            rows.sample_offsets = offsets;
            rows.sample_ids = ids;
            // Checked at once, then narrowed (both loops vectorise).
            if counts.iter().max().is_some_and(|&c| c > u16::MAX as u32) {
                return Err(self.corrupt(format!(
                    "row group {row_group}: a sample_counts value is out of range"
                )));
            }
            rows.sample_counts = counts.into_iter().map(|c| c as u16).collect();
        }
        let Some((ids_leaf, lp_leaf)) = topk else {
            return Ok(Some(rows));
        };
        let values = rows.positions() * k;
        let (spare_ids, spare_lps) = reuse.unwrap_or_default();
        let ids = pages::leaf_values::<u32>(&self.bytes, rg.column(ids_leaf), n, values, spare_ids)
            .map_err(pages_err)?;
        let Some(ids) = ids else {
            return Ok(None);
        };
        if layout.q8() {
            // uint8 deltas are INT32 in Parquet.
            let deltas =
                pages::leaf_values::<u32>(&self.bytes, rg.column(lp_leaf), n, values, Vec::new())
                    .map_err(pages_err)?;
            let Some(deltas) = deltas else {
                return Ok(None);
            };
            rows.topk_logprob_codes = q8_codes_from_deltas(&deltas, k).ok_or_else(|| {
                self.corrupt(format!(
                    "row group {row_group}: a topk_logprob_deltas value is above 255"
                ))
            })?;
            rows.topk_logprobs = spare_lps; // (decode_q8_from(0) truncates it first)
            rows.decode_q8_from(0);
        } else {
            let lps = pages::leaf_values::<half::f16>(
                &self.bytes,
                rg.column(lp_leaf),
                n,
                values,
                spare_lps,
            )
            .map_err(pages_err)?;
            let Some(lps) = lps else {
                return Ok(None);
            };
            rows.topk_logprobs = lps;
        }
        rows.topk_ids = ids;
        Ok(Some(rows))
    }

    /// Decodes one row group with the generic Arrow reader.
    fn decode_arrow(&self, row_group: usize, layout: &Layout) -> Result<ShardRows, ReadError> {
        let corrupt = |what: String| self.corrupt(what);
        let reader = ParquetRecordBatchReaderBuilder::new_with_metadata(
            self.bytes.clone(),
            self.meta.clone(),
        )
        .with_row_groups(vec![row_group])
        .with_batch_size(1 << 16)
        .build()
        .map_err(|e| corrupt(e.to_string()))?;
        let mut rows = ShardRows::with_layout(*layout);
        for b in reader {
            let b = b.map_err(|e| corrupt(format!("cannot decode row group {row_group} ({e})")))?;
            append_batch(&mut rows, &b).map_err(corrupt)?;
        }
        Ok(rows)
    }
}

/// A running stream; batches arrive through [`Stream::next_batch`] (or the iterator).
pub struct Stream {
    rx: Option<Receiver<Result<TrainBatch, ReadError>>>,
    /// Batches the consumer is done with, back to the producer (see [`Stream::recycle`]).
    spare: SyncSender<TrainBatch>,
    handle: Option<JoinHandle<()>>,
}

impl Stream {
    /// Opens `cache` (which must be complete) and starts the background decoder.
    pub fn start(cache: &Cache, cfg: StreamConfig) -> Result<Stream, ReadError> {
        let m = &cache.manifest;
        if !m.totals.complete {
            return Err(ReadError::Incomplete {
                dir: cache.dir.clone(),
                written: m.totals.shards,
                planned: m.plan.shards,
            });
        }
        assert!(cfg.world_size >= 1 && cfg.rank < cfg.world_size && cfg.batch_size >= 1);
        let layout = m.params.layout();
        let mut shards = Vec::with_capacity(m.shards.len());
        for s in &m.shards {
            let path = cache.dir.join(&s.file);
            let len = match std::fs::metadata(&path) {
                Ok(md) => md.len(),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    return Err(ReadError::MissingShard { path });
                }
                Err(source) => return Err(ReadError::Io { path, source }),
            };
            if len != s.bytes {
                return Err(ReadError::Corrupt {
                    path,
                    what: format!(
                        "{len} bytes on disk, manifest says {} (truncated or replaced)",
                        s.bytes
                    ),
                });
            }
            // SAFETY: shards are immutable once written (replaced only by rename).
            let shard = unsafe { MappedShard::open(&path, &layout)? };
            check_metadata(shard.meta.schema(), &cache.expected_schema(s))
                .map_err(|what| ReadError::MetadataMismatch { path, what })?;
            shards.push(shard);
        }
        let units: Vec<(usize, usize)> = shards
            .iter()
            .enumerate()
            .flat_map(|(s, sh)| (0..sh.row_groups()).map(move |g| (s, g)))
            .collect();
        let (tx, rx) = sync_channel(cfg.prefetch.max(1));
        // Room for every batch that can be out at once (the `prefetch` queued, the one the
        // producer is sending, the one in the consumer's hand): more would never be taken.
        let (spare, spares) = sync_channel(cfg.prefetch.max(1) + 2);
        let shas: Vec<String> = m.shards.iter().map(|s| s.sha256.clone()).collect();
        // The decoding runs on a thread pool of the stream's own, as wide as rayon's global
        // one (which `--threads` sets), not on the global pool itself: a process forked after
        // a stream ran (PyTorch DataLoader workers) inherits the global pool's state but none
        // of its threads, and its streams would wait on them forever.
        let threads = rayon::current_num_threads();
        let handle = std::thread::Builder::new()
            .name("logitcache-reader".into())
            .spawn(move || {
                match rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .thread_name(|i| format!("logitcache-decode-{i}"))
                    .build()
                {
                    Ok(pool) => {
                        pool.install(|| produce(shards, shas, units, layout, cfg, tx, spares))
                    }
                    // No threads to be had: rayon's global pool, as before.
                    Err(_) => produce(shards, shas, units, layout, cfg, tx, spares),
                }
            })
            .expect("spawn the reader thread");
        Ok(Stream {
            rx: Some(rx),
            spare,
            handle: Some(handle),
        })
    }

    /// The next batch, or `None` at the end of the last epoch.
    pub fn next_batch(&mut self) -> Option<Result<TrainBatch, ReadError>> {
        self.rx.as_ref()?.recv().ok()
    }

    /// Hands a batch the caller is done with back to the stream, which fills a later batch
    /// into its buffers instead of allocating new ones (its contents are overwritten; what
    /// the stream yields is the same either way). Optional: a batch that is dropped instead
    /// costs fresh allocations, which with glibc's malloc means fresh pages to fault in.
    pub fn recycle(&self, batch: TrainBatch) {
        // Full (the caller recycles more than the stream can reuse) or ended: dropped.
        let _ = self.spare.try_send(batch);
    }
}

impl Iterator for Stream {
    type Item = Result<TrainBatch, ReadError>;
    fn next(&mut self) -> Option<Self::Item> {
        self.next_batch()
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        drop(self.rx.take()); // the producer's next send fails and it returns
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

fn produce(
    shards: Vec<MappedShard>,
    shas: Vec<String>,
    units: Vec<(usize, usize)>,
    layout: Layout,
    cfg: StreamConfig,
    tx: SyncSender<Result<TrainBatch, ReadError>>,
    spares: Receiver<TrainBatch>,
) {
    let group_size = cfg.shuffle_units.max(1);
    let n_groups = units.len().div_ceil(group_size) as u64;
    let mut cursor = cfg.start;
    let mut verified = vec![false; shards.len()];
    let mut emitted_any = false;
    // Rows selected for the next batch: (decoded row group, row).
    let mut pending: Vec<(Arc<ShardRows>, usize)> = Vec::with_capacity(cfg.batch_size);
    // Decoded row groups of earlier groups, and the top-k buffers of those no pending batch
    // row refers to any more: the next row groups are decoded into them.
    let mut spent: Vec<Arc<ShardRows>> = Vec::new();
    let mut pool: Vec<TopkBuffers> = Vec::new();
    loop {
        if cfg.epochs.is_some_and(|e| cursor.epoch >= e) {
            break;
        }
        let from_start = cursor.group == 0 && cursor.offset == 0;
        let order = if cfg.shuffle {
            permutation(units.len(), mix(cfg.seed, cursor.epoch, 0x0a11))
        } else {
            (0..units.len()).collect()
        };
        while cursor.group < n_groups {
            let g = cursor.group as usize;
            let members = &order[g * group_size..((g + 1) * group_size).min(units.len())];
            // Decode the group's row groups (in unit order), then order its rows.
            // Verify (once per shard) and decode the group's row groups in parallel.
            let fresh: Vec<usize> = {
                let mut f: Vec<usize> = members
                    .iter()
                    .map(|&u| units[u].0)
                    .filter(|&s| !verified[s])
                    .collect();
                f.sort_unstable();
                f.dedup();
                f
            };
            let checked: Result<Vec<()>, ReadError> = fresh
                .par_iter()
                .map(|&s| shards[s].verify(&shas[s]))
                .collect();
            if let Err(e) = checked {
                let _ = tx.send(Err(e));
                return;
            }
            for s in fresh {
                verified[s] = true;
            }
            reclaim(&mut spent, &mut pool);
            // No more than a group takes (rows held across many groups by a pending batch of
            // a sparse split would otherwise stay pooled for good).
            pool.truncate(group_size);
            let reuse: Vec<Option<TopkBuffers>> = members.iter().map(|_| pool.pop()).collect();
            let decoded: Result<Vec<Arc<ShardRows>>, ReadError> = members
                .par_iter()
                .zip(reuse)
                .map(|(&u, reuse)| {
                    let (s, rg) = units[u];
                    shards[s].decode_into(rg, &layout, reuse).map(Arc::new)
                })
                .collect();
            let decoded = match decoded {
                Ok(d) => d,
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            };
            let mut rows: Vec<(usize, usize)> = Vec::new();
            for (d, r) in decoded.iter().enumerate() {
                for (i, &seq_id) in r.seq_ids.iter().enumerate() {
                    let keep = match cfg.split {
                        Split::All => true,
                        Split::Train => !is_eval(seq_id, cfg.eval_fraction),
                        Split::Eval => is_eval(seq_id, cfg.eval_fraction),
                    };
                    if keep {
                        rows.push((d, i));
                    }
                }
            }
            if cfg.shuffle {
                let p = permutation(rows.len(), mix(cfg.seed, cursor.epoch, cursor.group + 1));
                rows = p.into_iter().map(|i| rows[i]).collect();
            }
            let mut mine: Vec<(usize, usize)> = rows
                .into_iter()
                .enumerate()
                .filter(|(i, _)| i % cfg.world_size == cfg.rank)
                .map(|(_, r)| r)
                .collect();
            if cfg.shuffle && cfg.bucket_batches > 1 {
                // Length bucketing: within runs of `bucket_batches` batches, sort by length
                // and shuffle the resulting batches, so a batch holds windows of similar
                // length (less padding) while the order stays seeded and resumable.
                let bs = cfg.batch_size;
                let len =
                    |&(d, i): &(usize, usize)| decoded[d].offsets[i + 1] - decoded[d].offsets[i];
                for (c, run) in mine.chunks_mut(bs * cfg.bucket_batches).enumerate() {
                    run.sort_by_key(|r| std::cmp::Reverse(len(r)));
                    let batches: Vec<Vec<(usize, usize)>> =
                        run.chunks(bs).map(|b| b.to_vec()).collect();
                    let order = permutation(
                        batches.len(),
                        mix(
                            cfg.seed ^ 0xb0c4,
                            cursor.epoch,
                            (cursor.group << 20) + c as u64,
                        ),
                    );
                    let flat: Vec<(usize, usize)> =
                        order.into_iter().flat_map(|b| batches[b].clone()).collect();
                    run.copy_from_slice(&flat);
                }
            }
            emitted_any |= mine.len() > cursor.offset as usize;
            for (n, &(d, i)) in mine.iter().enumerate().skip(cursor.offset as usize) {
                pending.push((decoded[d].clone(), i));
                let end_of_group = n + 1 == mine.len();
                let after = if end_of_group {
                    Cursor {
                        epoch: cursor.epoch,
                        group: cursor.group + 1,
                        offset: 0,
                    }
                } else {
                    Cursor {
                        offset: n as u64 + 1,
                        ..cursor
                    }
                };
                if pending.len() == cfg.batch_size {
                    let b = assemble(&pending, &layout, after, spares.try_recv().ok());
                    pending.clear();
                    if tx.send(Ok(b)).is_err() {
                        return;
                    }
                }
            }
            if layout.has_topk() {
                spent.extend(decoded);
            }
            cursor.group += 1;
            cursor.offset = 0;
        }
        if from_start && !emitted_any {
            // A whole epoch gave this rank nothing: an endless stream would never yield.
            let _ = tx.send(Err(ReadError::EmptySplit(format!(
                "{:?} split of rank {} of {} (eval fraction {})",
                cfg.split, cfg.rank, cfg.world_size, cfg.eval_fraction
            ))));
            return;
        }
        emitted_any = false;
        cursor.epoch += 1;
        cursor.group = 0;
    }
    if !pending.is_empty() {
        let b = assemble(&pending, &layout, cursor, spares.try_recv().ok());
        let _ = tx.send(Ok(b));
    }
}

/// A decoded row group's `topk_ids` and `topk_logprobs`, to decode another into.
type TopkBuffers = (Vec<u32>, Vec<half::f16>);

/// Moves the top-k buffers of the rows of `spent` that nothing else holds (no pending batch
/// row) into `pool`; their other fields are freed.
fn reclaim(spent: &mut Vec<Arc<ShardRows>>, pool: &mut Vec<TopkBuffers>) {
    let mut kept = Vec::with_capacity(spent.len());
    for rows in spent.drain(..) {
        match Arc::try_unwrap(rows) {
            Ok(rows) => pool.push((rows.topk_ids, rows.topk_logprobs)),
            Err(shared) => kept.push(shared),
        }
    }
    *spent = kept;
}

/// Pads token windows into a batch: `input_ids`, `target_ids` (the next token), the masks
/// and `seq_ids`, with room for `k` teacher entries per position (left at 0). The one
/// collation of the trainer, the evaluator and `eval --corpus`.
pub fn collate(windows: &[(u64, &[u32])], k: usize, cursor: Cursor) -> TrainBatch {
    collate_into(windows, k, cursor, None)
}

/// [`collate`] into the buffers of `reuse` where given (a batch the consumer is done with;
/// every field is overwritten).
fn collate_into(
    windows: &[(u64, &[u32])],
    k: usize,
    cursor: Cursor,
    reuse: Option<TrainBatch>,
) -> TrainBatch {
    let b = windows.len();
    let len = windows.iter().map(|(_, w)| w.len()).max().unwrap_or(0);
    // A buffer too small is replaced by zeroed memory (`vec!` of zeros asks the allocator
    // for zeroed pages), not grown: growing would copy its stale values first.
    fn zeroed<T: Clone>(mut v: Vec<T>, n: usize, zero: T) -> Vec<T> {
        if v.capacity() < n {
            return vec![zero; n];
        }
        v.clear();
        v.resize(n, zero);
        v
    }
    let old = reuse.unwrap_or_default();
    let mut seq_ids = old.seq_ids;
    seq_ids.clear();
    let mut out = TrainBatch {
        batch: b,
        len,
        k,
        seq_ids,
        input_ids: zeroed(old.input_ids, b * len, 0),
        target_ids: zeroed(old.target_ids, b * len, 0),
        target_mask: zeroed(old.target_mask, b * len, 0.0),
        mask: zeroed(old.mask, b * len, 0.0),
        topk_ids: zeroed(old.topk_ids, b * len * k, 0),
        topk_logprobs: zeroed(old.topk_logprobs, b * len * k, 0.0),
        tail_logprob: zeroed(old.tail_logprob, b * len, 0.0),
        cursor,
    };
    for (bi, (seq_id, ids)) in windows.iter().enumerate() {
        let n = ids.len();
        let o = bi * len;
        out.seq_ids.push(*seq_id);
        out.input_ids[o..o + n].copy_from_slice(ids);
        if n > 1 {
            out.target_ids[o..o + n - 1].copy_from_slice(&ids[1..]);
            out.target_mask[o..o + n - 1].fill(1.0);
        }
        out.mask[o..o + n].fill(1.0);
    }
    out
}

fn assemble(
    rows: &[(Arc<ShardRows>, usize)],
    layout: &Layout,
    cursor: Cursor,
    reuse: Option<TrainBatch>,
) -> TrainBatch {
    let span = |r: &ShardRows, i: usize| (r.offsets[i] as usize, r.offsets[i + 1] as usize);
    let windows: Vec<(u64, &[u32])> = rows
        .iter()
        .map(|(r, i)| {
            let (s, e) = span(r, *i);
            (r.seq_ids[*i], &r.input_ids[s..e])
        })
        .collect();
    if layout.has_samples() {
        return assemble_sampled(rows, &windows, layout, cursor, reuse);
    }
    let k = layout.k;
    let mut out = collate_into(&windows, k, cursor, reuse);
    debug_assert!(
        k > 0,
        "a top-k layout has k >= 1 (the teacher refuses --top-k 0)"
    );
    // The copies and the float16 conversion, one window per task.
    par_windows(&mut out, rows, |ids, lps, tail, r, i| {
        let (s, e) = span(r, i);
        let n = e - s;
        ids[..n * k].copy_from_slice(&r.topk_ids[s * k..e * k]);
        half::slice::HalfFloatSliceExt::convert_to_f32_slice(
            &r.topk_logprobs[s * k..e * k],
            &mut lps[..n * k],
        );
        tail[..n].copy_from_slice(&r.tail_logprob[s..e]);
    });
    out
}

/// A sampled (or hybrid) position's estimate of the teacher's distribution as sparse
/// `(id, log p̂)` entries, the most likely first (the rest in no particular order): `sample`
/// mode p̂(v) = count/N; `hybrid` the exact top-k log-probs, then tail mass × count/N for the
/// sampled tail ids. The entries sum to 1 (up to f16 rounding of the head), so there is no
/// tail outcome. Draws from a proposal q ≠ p (`sample_log_weights`) are importance-weighted
/// instead: p̂(v) = count/N · p(v)/q(v), which sums to 1 only in expectation (the loss is
/// unbiased all the same).
pub fn sparse_target(r: &ShardRows, p: usize, layout: &Layout, out: &mut Vec<(u32, f32)>) {
    let n = sparse_width(r, p, layout);
    let (mut ids, mut lps) = (vec![0u32; n], vec![0f32; n]);
    let n = write_sparse_target(
        r,
        p,
        layout,
        &CountLogs::new(layout.samples),
        &mut ids,
        &mut lps,
    );
    out.clear();
    out.extend(ids.into_iter().zip(lps).take(n));
}

/// The entries of a position's sparse target: the top-k (if the layout has one) and the
/// distinct sampled ids.
fn sparse_width(r: &ShardRows, p: usize, layout: &Layout) -> usize {
    let head = if layout.has_topk() { layout.k } else { 0 };
    head + (r.sample_offsets[p + 1] - r.sample_offsets[p]) as usize
}

/// ln(count/N) for every count 0..=N: one logarithm per possible count instead of one per
/// stored entry (a position of a sample-50 cache holds ~36; the logarithms were the largest
/// cost of assembling a sampled batch).
struct CountLogs {
    n: f32,
    table: Vec<f32>,
}

impl CountLogs {
    fn new(samples: usize) -> Self {
        let n = samples.max(1) as f32;
        let table = (0..=samples).map(|c| (c as f32 / n).ln()).collect();
        CountLogs { n, table }
    }

    /// ln(c/N), the same value as computing it (counts above N, which a valid cache does
    /// not hold, are computed).
    fn get(&self, c: u16) -> f32 {
        match self.table.get(c as usize) {
            Some(&v) => v,
            None => (c as f32 / self.n).ln(),
        }
    }
}

/// Writes [`sparse_target`]'s entries of position `p` into `ids` and `lps` (each at least
/// [`sparse_width`] long) and returns how many it wrote: straight into a batch's rows, with
/// the count logarithms computed once ([`CountLogs::new`] of the layout's `samples`).
fn write_sparse_target(
    r: &ShardRows,
    p: usize,
    layout: &Layout,
    logs: &CountLogs,
    ids: &mut [u32],
    lps: &mut [f32],
) -> usize {
    let mut head = 0;
    let mut tail_log = 0.0f32;
    if layout.has_topk() {
        let k = layout.k;
        ids[..k].copy_from_slice(&r.topk_ids[p * k..(p + 1) * k]);
        half::slice::HalfFloatSliceExt::convert_to_f32_slice(
            &r.topk_logprobs[p * k..(p + 1) * k],
            &mut lps[..k],
        );
        tail_log = r.tail_logprob[p];
        head = k;
    }
    let (sampled, counts) = r.samples_at(p);
    let m = sampled.len();
    ids[head..head + m].copy_from_slice(sampled);
    // log p̂ = ln(count/N) + each id's ln p/q, or the tail mass for draws from p itself.
    let est = &mut lps[head..head + m];
    if layout.sample_log_weights {
        let s = r.sample_offsets[p] as usize;
        let weights = &r.sample_log_weights[s..s + m];
        for ((lp, &c), &w) in est.iter_mut().zip(counts).zip(weights) {
            *lp = w + logs.get(c);
        }
    } else if head == 0 {
        // A sample cache drawn from p itself: the most drawn id is the most likely one, found
        // on the counts in the same pass (below, for weighted draws, on the log-probs).
        let (mut best, mut most, mut id) = (0usize, 0u16, u32::MAX);
        for (j, ((lp, &c), &v)) in est.iter_mut().zip(counts).zip(sampled).enumerate() {
            *lp = logs.get(c);
            if c > most || (c == most && v < id) {
                (best, most, id) = (j, c, v);
            }
        }
        if m > 1 {
            ids.swap(0, best);
            lps.swap(0, best);
        }
        return m;
    } else {
        for (lp, &c) in est.iter_mut().zip(counts) {
            *lp = tail_log + logs.get(c);
        }
    }
    // Entry 0 is the estimate's most likely id (eval's top-1; ties by the smaller id): in a
    // hybrid the exact top-1 already is; in a sample cache of importance-weighted draws the
    // largest weighted estimate is swapped to the front (a full sort per position cost more
    // than decoding it).
    if head == 0 && m > 1 {
        let mut best = 0;
        for j in 1..m {
            let order = lps[j].total_cmp(&lps[best]).then(ids[best].cmp(&ids[j]));
            if order == std::cmp::Ordering::Greater {
                best = j;
            }
        }
        ids.swap(0, best);
        lps.swap(0, best);
    }
    head + m
}

fn assemble_sampled(
    rows: &[(Arc<ShardRows>, usize)],
    windows: &[(u64, &[u32])],
    layout: &Layout,
    cursor: Cursor,
    reuse: Option<TrainBatch>,
) -> TrainBatch {
    // Width: the most entries any position of the batch has.
    let mut width = 1;
    for (r, i) in rows {
        for p in r.offsets[*i] as usize..r.offsets[*i + 1] as usize {
            let e = r.sample_offsets[p + 1] - r.sample_offsets[p];
            width = width.max(layout.k + e as usize);
        }
    }
    // Padding positions keep the log-prob 0 entries of id 0 and the tail 0 that `collate`
    // made: their mask is 0, so they count nowhere.
    let mut out = collate_into(windows, width, cursor, reuse);
    let logs = CountLogs::new(layout.samples);
    // Written in place (unused entries: id 0, log-prob -inf).
    par_windows(&mut out, rows, |ids, lps, tail, r, i| {
        let s = r.offsets[i] as usize;
        let n = r.offsets[i + 1] as usize - s;
        for j in 0..n {
            let o = j * width;
            let (ids, lps) = (&mut ids[o..o + width], &mut lps[o..o + width]);
            let e = write_sparse_target(r, s + j, layout, &logs, ids, lps);
            lps[e..].fill(f32::NEG_INFINITY);
        }
        tail[..n].fill(f32::NEG_INFINITY);
    });
    out
}

/// Runs `f` on each window of `out` (its rows of `topk_ids`, `topk_logprobs` and
/// `tail_logprob`, and the decoded row it comes from), one window per task on the stream's
/// pool. Nothing to do in an empty batch or one without teacher entries.
fn par_windows<F>(out: &mut TrainBatch, rows: &[(Arc<ShardRows>, usize)], f: F)
where
    F: Fn(&mut [u32], &mut [f32], &mut [f32], &ShardRows, usize) + Sync,
{
    let (len, k) = (out.len, out.k);
    if len == 0 || k == 0 {
        return;
    }
    out.topk_ids
        .par_chunks_mut(len * k)
        .zip(out.topk_logprobs.par_chunks_mut(len * k))
        .zip(out.tail_logprob.par_chunks_mut(len))
        .zip(rows.par_iter())
        .for_each(|(((ids, lps), tail), (r, i))| f(ids, lps, tail, r, *i));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::rows::WindowTopK;
    use crate::cache::schema::CacheMode;
    use crate::cache::schema::shard_schema_with_metadata;
    use crate::cache::writer::writer_properties;
    use crate::rng::SplitMix;
    use parquet::arrow::ArrowWriter;
    use parquet::basic::Encoding;
    use parquet::file::properties::{WriterProperties, WriterVersion};
    use parquet::schema::types::ColumnPath;

    /// Windows of 1..=40 positions with arbitrary ids and log-probs, k = 5.
    fn rows() -> ShardRows {
        rows_of(Layout::topk(5))
    }

    fn rows_of(layout: Layout) -> ShardRows {
        let k = layout.k;
        let mut rng = SplitMix::new(7);
        let mut rows = ShardRows::with_layout(layout);
        for w in 0..300u64 {
            let n = 1 + (rng.next_u64() % 40) as usize;
            let ids: Vec<u32> = (0..n).map(|_| (rng.next_u64() % 70_000) as u32).collect();
            let topk: Vec<u32> = (0..n * k)
                .map(|_| (rng.next_u64() % 70_000) as u32)
                .collect();
            let mut lps: Vec<f32> = (0..n * k)
                .map(|_| -((rng.next_u64() % 10_000) as f32) / 500.0)
                .collect();
            if w == 5 {
                lps[k - 1] = f32::NEG_INFINITY; // probability 0 (q8 code 255)
            }
            let tail: Vec<f32> = (0..n).map(|i| -(i as f32) - 0.5).collect();
            rows.push(&WindowTopK {
                seq_id: w,
                doc_id: w / 3,
                window_index: (w % 3) as u32,
                input_ids: &ids,
                topk_ids: &topk,
                topk_logprobs: &lps,
                tail_logprob: &tail,
                ..Default::default()
            });
        }
        rows
    }

    fn write(path: &Path, rows: &ShardRows, props: WriterProperties) -> MappedShard {
        let schema = Arc::new(shard_schema_with_metadata(&rows.layout, 70_000, "x", 0));
        let mut w = ArrowWriter::try_new(
            std::fs::File::create(path).unwrap(),
            schema.clone(),
            Some(props),
        )
        .unwrap();
        w.write(&rows.to_record_batch(schema)).unwrap();
        w.close().unwrap();
        // SAFETY: the test's own file, not modified while mapped.
        unsafe { MappedShard::open(path, &rows.layout).unwrap() }
    }

    /// The encodings of a column's leaf chunks in a shard file.
    fn leaf_encodings(path: &Path, column: &str) -> Vec<Encoding> {
        use parquet::file::reader::{FileReader, SerializedFileReader};
        let f = SerializedFileReader::new(std::fs::File::open(path).unwrap()).unwrap();
        let md = f.metadata();
        (0..md.num_row_groups())
            .flat_map(|g| md.row_group(g).columns().to_vec())
            .filter(|c| c.column_path().parts()[0] == column)
            .flat_map(|c| c.encodings().collect::<Vec<_>>())
            .collect()
    }

    /// The row groups of a shard decoded one by one, concatenated.
    fn concat(k: usize, parts: impl Iterator<Item = ShardRows>) -> ShardRows {
        let mut parts = parts.peekable();
        let layout = parts.peek().map_or(Layout::topk(k), |r| r.layout);
        let mut all = ShardRows::with_layout(layout);
        for r in parts {
            all.extend(&r);
        }
        all
    }

    #[test]
    fn fast_page_decoding_equals_the_arrow_reader() {
        let dir = tempfile::tempdir().unwrap();
        let want = rows();
        let k = want.k;
        // Our writer's settings (data pages v1), and the same with v2 pages and small
        // pages (rows spanning page boundaries).
        let v2 = writer_properties(3, 64)
            .into_builder()
            .set_writer_version(WriterVersion::PARQUET_2_0)
            .set_data_page_row_count_limit(7)
            .set_data_page_size_limit(1000)
            .build();
        // Format 1 wrote the float16 log-probs BYTE_STREAM_SPLIT (format 2: PLAIN).
        let bss = writer_properties(3, 64)
            .into_builder()
            .set_column_encoding(
                ColumnPath::new(
                    ["topk_logprobs", "list", "item", "list", "item"]
                        .iter()
                        .map(|s| s.to_string())
                        .collect(),
                ),
                Encoding::BYTE_STREAM_SPLIT,
            )
            .build();
        for (name, props) in [
            ("v1", writer_properties(3, 64)),
            ("v2", v2),
            ("bss-logprobs", bss),
        ] {
            let shard = write(&dir.path().join(name), &want, props);
            let groups = 0..shard.row_groups();
            assert!(groups.len() > 1, "{name}");
            let fast = groups.clone().map(|g| {
                let r = shard.decode_fast(g, &Layout::topk(k), None).unwrap();
                let r = r.expect("the fast path takes this layout");
                // Into the buffers of rows decoded before (larger, other values): the same.
                let dirty = (want.topk_ids.clone(), want.topk_logprobs.clone());
                let reused = shard.decode_fast(g, &Layout::topk(k), Some(dirty));
                assert_eq!(reused.unwrap().as_ref(), Some(&r), "{name}");
                r
            });
            assert_eq!(concat(k, fast), want, "{name}");
            let arrow = groups.map(|g| shard.decode_arrow(g, &Layout::topk(k)).unwrap());
            assert_eq!(concat(k, arrow), want, "{name}");
        }
        // q8 log-probs: the codes come from the pages, their scale through Arrow, and both
        // paths decode the same log-probs as the rows written (-inf included).
        let layout = Layout::topk(k).with_logprobs(crate::cache::schema::LogprobDtype::Q8);
        let want = rows_of(layout);
        assert!(
            want.topk_logprobs
                .iter()
                .any(|v| v.to_f32() == f32::NEG_INFINITY)
        );
        let shard = write(&dir.path().join("q8"), &want, writer_properties(3, 64));
        let groups = 0..shard.row_groups();
        let fast = groups.clone().map(|g| {
            let r = shard
                .decode_fast(g, &layout, None)
                .unwrap()
                .expect("fast path");
            let dirty = (want.topk_ids.clone(), want.topk_logprobs.clone());
            let reused = shard.decode_fast(g, &layout, Some(dirty)).unwrap();
            assert_eq!(reused.as_ref(), Some(&r));
            r
        });
        assert_eq!(concat(k, fast), want);
        let arrow = groups.map(|g| shard.decode_arrow(g, &layout).unwrap());
        assert_eq!(concat(k, arrow), want);
    }

    /// Windows of 1..=30 positions in `layout`, each position with 1..=12 sampled entries
    /// (0..=12 with `empty`: a hybrid whose top-k held all the mass has no tail draws).
    fn sampled_rows(layout: Layout, empty: bool) -> ShardRows {
        let k = layout.k;
        let mut rng = SplitMix::new(11);
        let mut rows = ShardRows::with_layout(layout);
        let max_count = layout.samples as u64;
        for w in 0..200u64 {
            let n = 1 + (rng.next_u64() % 30) as usize;
            let ids: Vec<u32> = (0..n).map(|_| (rng.next_u64() % 70_000) as u32).collect();
            let topk: Vec<u32> = (0..n * k)
                .map(|_| (rng.next_u64() % 70_000) as u32)
                .collect();
            let lps: Vec<f32> = (0..n * k)
                .map(|_| -((rng.next_u64() % 10_000) as f32) / 500.0)
                .collect();
            let tail: Vec<f32> = (0..n).map(|i| -(i as f32) - 0.5).collect();
            let lens: Vec<u32> = (0..n)
                .map(|_| (rng.next_u64() % 13) as u32)
                .map(|l| if empty { l } else { l.max(1) })
                .collect();
            let total = lens.iter().sum::<u32>() as usize;
            let mut sids = Vec::with_capacity(total);
            for &l in &lens {
                let mut v: Vec<u32> = (0..l).map(|_| (rng.next_u64() % 70_000) as u32).collect();
                v.sort_unstable();
                sids.extend(v);
            }
            let counts: Vec<u16> = (0..total)
                .map(|_| 1 + (rng.next_u64() % max_count) as u16)
                .collect();
            let slps: Vec<f32> = if layout.sample_logprobs {
                (0..total).map(|i| -(i as f32) / 7.0).collect()
            } else {
                vec![]
            };
            let weights: Vec<f32> = if layout.sample_log_weights {
                (0..total).map(|i| (i % 5) as f32 / 3.0 - 0.6).collect()
            } else {
                vec![]
            };
            rows.push(&WindowTopK {
                seq_id: w,
                doc_id: w / 3,
                window_index: (w % 3) as u32,
                input_ids: &ids,
                topk_ids: if k > 0 { &topk } else { &[] },
                topk_logprobs: if k > 0 { &lps } else { &[] },
                tail_logprob: if k > 0 { &tail } else { &[] },
                sample_lens: &lens,
                sample_ids: &sids,
                sample_counts: &counts,
                sample_logprobs: &slps,
                sample_log_weights: &weights,
            });
        }
        rows
    }

    /// A batch as a consumer hands it back: larger than the next ones, every field dirty.
    fn used_batch() -> TrainBatch {
        let n = 64 * 64;
        TrainBatch {
            batch: 64,
            len: 64,
            k: 9,
            seq_ids: vec![3; 64],
            input_ids: vec![5; n],
            target_ids: vec![6; n],
            target_mask: vec![1.0; n],
            mask: vec![1.0; n],
            topk_ids: vec![7; n * 9],
            topk_logprobs: vec![-2.5; n * 9],
            tail_logprob: vec![-1.0; n],
            cursor: Cursor {
                epoch: 4,
                group: 5,
                offset: 6,
            },
        }
    }

    #[test]
    fn only_rows_nothing_holds_are_reclaimed() {
        let (held, free) = (Arc::new(rows()), Arc::new(rows()));
        let pending = held.clone();
        let mut spent = vec![held, free];
        let mut pool = Vec::new();
        reclaim(&mut spent, &mut pool);
        assert_eq!(pool.len(), 1);
        assert_eq!(pool[0].0, rows().topk_ids);
        assert!(spent.len() == 1 && Arc::ptr_eq(&spent[0], &pending));
        drop(pending);
        reclaim(&mut spent, &mut pool);
        assert!(spent.is_empty() && pool.len() == 2);
    }

    #[test]
    fn topk_batches_fill_recycled_buffers_as_fresh_ones() {
        let layout = Layout::topk(5);
        let rows = Arc::new(rows());
        let picked: Vec<(Arc<ShardRows>, usize)> = [7usize, 0, 31, 5]
            .iter()
            .map(|&i| (rows.clone(), i))
            .collect();
        let cursor = Cursor {
            epoch: 1,
            group: 2,
            offset: 3,
        };
        let fresh = assemble(&picked, &layout, cursor, None);
        assert!(
            fresh.len > 1 && fresh.tokens() < fresh.batch * fresh.len,
            "padding"
        );
        assert_eq!(
            assemble(&picked, &layout, cursor, Some(used_batch())),
            fresh
        );
        // A used batch too small to hold the new one: the same.
        let small = TrainBatch {
            topk_ids: vec![7; 3],
            topk_logprobs: vec![-2.5; 3],
            ..used_batch()
        };
        assert_eq!(assemble(&picked, &layout, cursor, Some(small)), fresh);
    }

    /// Every position of an assembled sampled batch, against its estimate computed here
    /// from the stored fields (a map id -> p̂): the entries are that map, the most likely
    /// first (ties by the smaller id), unused entries id 0 with log-prob -inf, no tail
    /// outcome; padding positions all 0 and masked out.
    #[test]
    fn sampled_batches_hold_each_positions_estimate() {
        let sample = Layout::of(CacheMode::Sample, 0, 50, false);
        for layout in [
            sample,
            sample.with_proposal(1.5),
            Layout::of(CacheMode::Hybrid, 3, 20, false),
            Layout::of(CacheMode::Hybrid, 3, 20, false).with_proposal(0.7),
        ] {
            for empty in [false, true] {
                // With `empty`, some positions drew no tail id (hybrid) or hold no entry at all.
                let rows = Arc::new(sampled_rows(layout, empty));
                // Windows of different lengths in one batch (padding), in a shuffled order.
                let picked: Vec<(Arc<ShardRows>, usize)> = [7usize, 0, 31, 5, 19]
                    .iter()
                    .map(|&i| (rows.clone(), i))
                    .collect();
                let cursor = Cursor::default();
                let b = assemble(&picked, &layout, cursor, None);
                // Into a recycled batch's buffers: the same batch.
                assert_eq!(
                    assemble(&picked, &layout, cursor, Some(used_batch())),
                    b,
                    "{layout:?}"
                );
                let (len, w) = (b.len, b.k);
                let mut widest = 0;
                for (bi, (r, i)) in picked.iter().enumerate() {
                    let s = r.offsets[*i] as usize;
                    let n = r.offsets[*i + 1] as usize - s;
                    assert_eq!(b.seq_ids[bi], r.seq_ids[*i]);
                    for j in 0..len {
                        let o = (bi * len + j) * w;
                        let (ids, lps) = (&b.topk_ids[o..o + w], &b.topk_logprobs[o..o + w]);
                        if j >= n {
                            assert_eq!(b.mask[bi * len + j], 0.0);
                            assert!(ids.iter().all(|&x| x == 0) && lps.iter().all(|&x| x == 0.0));
                            assert_eq!(b.tail_logprob[bi * len + j], 0.0);
                            continue;
                        }
                        let p = s + j;
                        let mut want: Vec<(u32, f32)> = Vec::new();
                        let mut tail = 0.0f32;
                        if layout.has_topk() {
                            let k = layout.k;
                            for q in 0..k {
                                let lp = r.topk_logprobs[p * k + q].to_f32();
                                want.push((r.topk_ids[p * k + q], lp));
                            }
                            tail = r.tail_logprob[p];
                        }
                        let (a, e) = (
                            r.sample_offsets[p] as usize,
                            r.sample_offsets[p + 1] as usize,
                        );
                        for x in a..e {
                            let c = r.sample_counts[x] as f32 / layout.samples as f32;
                            let base = if layout.sample_log_weights {
                                r.sample_log_weights[x]
                            } else {
                                tail
                            };
                            want.push((r.sample_ids[x], base + c.ln()));
                        }
                        widest = widest.max(want.len());
                        let m = want.len();
                        if !layout.has_topk() && m > 0 {
                            let top = want
                                .iter()
                                .copied()
                                .reduce(|x, y| {
                                    if y.1 > x.1 || (y.1 == x.1 && y.0 < x.0) {
                                        y
                                    } else {
                                        x
                                    }
                                })
                                .unwrap();
                            assert_eq!((ids[0], lps[0]), top, "{layout:?} row {i} position {j}");
                        } else {
                            assert_eq!(
                                &ids[..layout.k],
                                &r.topk_ids[p * layout.k..(p + 1) * layout.k]
                            );
                        }
                        let mut got: Vec<(u32, f32)> = ids[..m]
                            .iter()
                            .copied()
                            .zip(lps[..m].iter().copied())
                            .collect();
                        let key = |v: &(u32, f32)| (v.0, v.1.to_bits());
                        got.sort_by_key(key);
                        want.sort_by_key(key);
                        for (g, x) in got.iter().zip(&want) {
                            assert_eq!(g.0, x.0, "{layout:?} row {i} position {j}");
                            assert!(
                                (g.1 - x.1).abs() <= 1e-6,
                                "{layout:?} row {i} position {j}: {g:?} vs {x:?}"
                            );
                        }
                        assert!(ids[m..].iter().all(|&x| x == 0));
                        assert!(lps[m..].iter().all(|&x| x == f32::NEG_INFINITY));
                        assert_eq!(b.tail_logprob[bi * len + j], f32::NEG_INFINITY);
                        assert_eq!(b.mask[bi * len + j], 1.0);
                    }
                }
                assert_eq!(
                    w,
                    widest.max(1),
                    "{layout:?}: the batch is as wide as its widest position"
                );
            }
        }
    }

    #[test]
    fn sample_columns_take_the_fast_path_and_equal_the_arrow_reader() {
        use crate::cache::schema::{CacheMode, LogprobDtype};
        let dir = tempfile::tempdir().unwrap();
        let small_pages = || {
            writer_properties(3, 64)
                .into_builder()
                .set_writer_version(WriterVersion::PARQUET_2_0)
                .set_data_page_row_count_limit(7)
                .set_data_page_size_limit(500)
                .build()
        };
        // (layout, empty lists, whether the sample columns take the fast path)
        let cases = [
            (
                "sample",
                Layout::of(CacheMode::Sample, 0, 50, false),
                false,
                true,
            ),
            (
                "sample-u16",
                Layout::of(CacheMode::Sample, 0, 300, false),
                false,
                true,
            ),
            (
                "hybrid",
                Layout::of(CacheMode::Hybrid, 5, 40, false),
                false,
                true,
            ),
            (
                "hybrid-q8",
                Layout::of(CacheMode::Hybrid, 5, 40, false).with_logprobs(LogprobDtype::Q8),
                false,
                true,
            ),
            // Arrow decodes the sample columns when stored log-probs sit beside them, and
            // the whole row group when a position has no entries.
            (
                "hybrid-logprobs",
                Layout::of(CacheMode::Hybrid, 5, 40, true),
                false,
                false,
            ),
            (
                "sample-logprobs",
                Layout::of(CacheMode::Sample, 0, 50, true),
                false,
                false,
            ),
            (
                "hybrid-empty",
                Layout::of(CacheMode::Hybrid, 5, 40, false),
                true,
                false,
            ),
        ];
        // Sample caches written before the sample columns were split (2026-12-04) stored
        // them DELTA_BINARY_PACKED: they read the same, on both paths.
        let delta_samples = || {
            let path = |c: &str| {
                ColumnPath::new(
                    [c, "list", "item", "list", "item"]
                        .map(String::from)
                        .to_vec(),
                )
            };
            writer_properties(3, 64)
                .into_builder()
                .set_column_encoding(path("sample_ids"), Encoding::DELTA_BINARY_PACKED)
                .set_column_encoding(path("sample_counts"), Encoding::DELTA_BINARY_PACKED)
                .build()
        };
        for (name, layout, empty, fast_samples) in cases {
            let want = sampled_rows(layout, empty);
            for (pages, props) in [
                ("v1", writer_properties(3, 64)),
                ("small-v2", small_pages()),
                ("delta-samples", delta_samples()),
            ] {
                let what = format!("{name} {pages}");
                let shard = write(&dir.path().join(&what), &want, props);
                let split = if pages == "delta-samples" {
                    Encoding::DELTA_BINARY_PACKED
                } else {
                    Encoding::BYTE_STREAM_SPLIT
                };
                let md = shard.meta.metadata();
                let schema = md.file_metadata().schema_descr();
                for column in ["sample_ids", "sample_counts"] {
                    assert!(
                        leaf_encodings(&dir.path().join(&what), column).contains(&split),
                        "{what} {column}"
                    );
                    // Split pages are decoded straight from the pages (delta ones by the
                    // parquet crate's column reader), unless a list is empty.
                    let leaf = (0..schema.num_columns())
                        .find(|&i| schema.column(i).path().parts()[0] == column)
                        .unwrap();
                    for g in 0..md.num_row_groups() {
                        let rg = md.row_group(g);
                        let n = rg.num_rows() as usize;
                        let direct = crate::cache::pages::nested_leaf_values::<u32>(
                            &shard.bytes,
                            rg.column(leaf),
                            n,
                        )
                        .unwrap();
                        assert_eq!(
                            direct.is_some(),
                            pages != "delta-samples" && !empty,
                            "{what} {column} row group {g}"
                        );
                    }
                }
                let groups = 0..shard.row_groups();
                assert!(groups.len() > 1, "{what}");
                let fast: Vec<Option<ShardRows>> = groups
                    .clone()
                    .map(|g| shard.decode_fast(g, &layout, None).unwrap())
                    .collect();
                let took = fast.iter().all(|r| r.is_some());
                // Without the fast sample columns, a sample layout has nothing fast left.
                let expect_fast = fast_samples || (layout.has_topk() && !empty);
                assert_eq!(took, expect_fast, "{what}");
                if took {
                    assert_eq!(
                        concat(0, fast.into_iter().map(Option::unwrap)),
                        want,
                        "{what}"
                    );
                }
                let arrow = groups
                    .clone()
                    .map(|g| shard.decode_arrow(g, &layout).unwrap());
                assert_eq!(concat(0, arrow), want, "{what}");
                let any = groups.map(|g| shard.decode(g, &layout).unwrap());
                assert_eq!(concat(0, any), want, "{what}");
            }
        }
    }

    #[test]
    fn other_encodings_fall_back_to_the_arrow_reader() {
        let dir = tempfile::tempdir().unwrap();
        let want = rows();
        let k = want.k;
        let path = |p: &[&str]| ColumnPath::new(p.iter().map(|s| s.to_string()).collect());
        // Caches written before BYTE_STREAM_SPLIT ids (DELTA_BINARY_PACKED), and one with
        // dictionary pages.
        let delta = writer_properties(3, 64)
            .into_builder()
            .set_column_encoding(
                path(&["topk_ids", "list", "item", "list", "item"]),
                Encoding::DELTA_BINARY_PACKED,
            )
            .build();
        let dict = writer_properties(3, 64)
            .into_builder()
            .set_dictionary_enabled(true)
            .build();
        for (name, props) in [("delta", delta), ("dict", dict)] {
            let shard = write(&dir.path().join(name), &want, props);
            assert!(
                shard
                    .decode_fast(0, &Layout::topk(k), None)
                    .unwrap()
                    .is_none(),
                "{name}"
            );
            let got = (0..shard.row_groups()).map(|g| shard.decode(g, &Layout::topk(k)).unwrap());
            assert_eq!(concat(k, got), want, "{name}");
        }
    }
}
