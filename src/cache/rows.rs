//! One shard's rows in flat buffers ([`ShardRows`]) and their conversions to and from Arrow:
//! the one codec between the teacher's outputs and the Parquet columns of `schemas/`. The
//! writer turns rows into a `RecordBatch`, the readers (whole-file and streaming) append
//! decoded batches to rows, so every encoding of the cache has one place.
//!
//! ```
//! use logitcache::cache::rows::{ShardRows, WindowTopK};
//! let mut rows = ShardRows::new(2);
//! rows.push(&WindowTopK {
//!     seq_id: 0, doc_id: 0, window_index: 0,
//!     input_ids: &[5, 6],
//!     topk_ids: &[6, 1, 7, 1],
//!     topk_logprobs: &[-0.1, -3.0, -0.2, -2.5],
//!     tail_logprob: &[-4.0, -3.5],
//!     ..Default::default()
//! });
//! let mut both = ShardRows::new(2);
//! both.extend(&rows);
//! both.extend(&rows);
//! assert_eq!((both.rows(), both.positions()), (2, 4));
//! ```

pub use super::schema::LogprobDtype;
use super::schema::{
    COL_DOC_ID, COL_INPUT_IDS, COL_SAMPLE_COUNTS, COL_SAMPLE_IDS, COL_SAMPLE_LOG_WEIGHTS,
    COL_SAMPLE_LOGPROBS, COL_SEQ_ID, COL_TAIL_LOGPROB, COL_TOPK_IDS, COL_TOPK_LOGPROB_MAX,
    COL_TOPK_LOGPROB_STEP, COL_WINDOW_INDEX, Layout, fsl_item, item,
};
use arrow_array::cast::AsArray;
use arrow_array::types::{Float16Type, Float32Type, UInt8Type, UInt16Type, UInt32Type, UInt64Type};
use arrow_array::{
    Array, ArrayRef, FixedSizeListArray, Float16Array, Float32Array, ListArray, RecordBatch,
    UInt8Array, UInt16Array, UInt32Array, UInt64Array,
};
use arrow_buffer::{OffsetBuffer, ScalarBuffer};
use arrow_schema::DataType;
use half::f16;
use std::sync::Arc;

/// The q8 code of probability 0 (log-prob −inf).
pub const Q8_ZERO: u8 = 255;

/// Quantises one position's log-probs to 8-bit codes on the quadratic scale
/// `max − step × code²` (codes 0..=254; [`Q8_ZERO`] for −inf). `max` is the largest finite
/// value and `step` spreads the finite range over 254² (rounded up), both float16 as stored;
/// each code is the one whose value lies nearest, computed against the stored scale.
///
/// Quadratic, not linear: the scale is finest at the top, where the probability is. A value
/// `x` nats below the top is off by at most about `√(x · range) / 254` (`range / 254` at the
/// bottom, where the probability is smallest), so a probability is off by at most about
/// `0.43 · √range / 254` of the top one; a linear scale's `range / 508` at every depth costs
/// the likely ids up to ~5x more. [`ShardRows::storage_error`] measures both errors exactly.
/// Returns `(max, step)`.
pub fn q8_encode(lps: &[f32], codes: &mut [u8]) -> (f16, f16) {
    let finite = lps.iter().copied().filter(|v| v.is_finite());
    let (lo, hi) = finite.fold((f32::INFINITY, f32::NEG_INFINITY), |(l, h), v| {
        (l.min(v), h.max(v))
    });
    if hi == f32::NEG_INFINITY {
        codes.fill(Q8_ZERO);
        return (f16::ZERO, f16::ZERO);
    }
    let top = (Q8_ZERO - 1) as f32;
    // The top of the scale rounded up, so every value lies at or below it (rounded to
    // nearest, a position whose values all sit within float16's rounding of the top would
    // get a negative range).
    let mut max = f16::from_f32(hi);
    if max.to_f32() < hi {
        max = f16_next_up(max);
    }
    if !max.is_finite() {
        // Below float16's range (e^-65504): probability 0, as float16 storage has it.
        codes.fill(Q8_ZERO);
        return (f16::ZERO, f16::ZERO);
    }
    let range = (max.to_f32() - lo).max(0.0);
    let mut step = f16::from_f32(range / (top * top));
    // Rounded up, so the lowest value lies within the scale.
    while step.to_f32() * top * top < range && step < f16::MAX {
        step = f16::from_bits(step.to_bits() + 1);
    }
    for (c, &v) in codes.iter_mut().zip(lps) {
        *c = if !v.is_finite() {
            Q8_ZERO
        } else if step.to_f32() > 0.0 {
            let depth = (max.to_f32() - v).max(0.0) / step.to_f32();
            let below = (depth.sqrt().floor()).min(top) as u8;
            let above = below.saturating_add(1).min(top as u8);
            let err = |c: u8| (q8_value(max, step, c) - v).abs();
            if err(above) < err(below) {
                above
            } else {
                below
            }
        } else {
            0
        };
    }
    (max, step)
}

/// The next float16 above a finite `x`.
fn f16_next_up(x: f16) -> f16 {
    let b = x.to_bits();
    if x == f16::ZERO || x == f16::NEG_ZERO {
        f16::from_bits(1)
    } else if b & 0x8000 == 0 {
        f16::from_bits(b + 1)
    } else {
        f16::from_bits(b - 1)
    }
}

/// The log-prob a q8 code stands for, `max − step × code²` (the decoding recipe of
/// `schemas/README.md`, in f32).
#[inline]
pub fn q8_value(max: f16, step: f16, code: u8) -> f32 {
    q8_decode(max.to_f32(), step.to_f32(), code)
}

/// [`q8_value`] with the scale already in f32 (converted once per position).
#[inline]
fn q8_decode(max: f32, step: f32, code: u8) -> f32 {
    if code == Q8_ZERO {
        f32::NEG_INFINITY
    } else {
        let c = code as f32;
        max - step * (c * c)
    }
}

/// The largest errors of stored log-probs against the exact ones they stand for.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StorageError {
    /// |stored − exact| over finite values stored finite (a log-prob below float16's range
    /// is stored as −inf, a probability below e^-65504: not an error worth recording, and
    /// JSON has no infinity).
    pub logprob: f32,
    /// |exp(stored) − exp(exact)|: the error a loss sees.
    pub prob: f32,
}

impl StorageError {
    fn add(&mut self, exact: f32, exact_p: f32, stored: f32) {
        if exact.is_finite() && stored.is_finite() {
            self.logprob = self.logprob.max((stored - exact).abs());
        }
        self.prob = self.prob.max((stored.exp() - exact_p).abs());
    }

    /// The larger of both errors.
    pub fn max(self, o: StorageError) -> StorageError {
        StorageError {
            logprob: self.logprob.max(o.logprob),
            prob: self.prob.max(o.prob),
        }
    }
}

/// The codes as stored in `topk_logprob_deltas`: per position of `k` entries, each code minus
/// the one before (the first as is), modulo 256.
pub fn q8_deltas(codes: &[u8], k: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(codes.len());
    for pos in codes.chunks_exact(k.max(1)) {
        let mut prev = 0u8;
        for &c in pos {
            out.push(c.wrapping_sub(prev));
            prev = c;
        }
    }
    out
}

/// Undoes [`q8_deltas`]: running sums modulo 256 within each position. The deltas may come
/// as a wider integer (Parquet stores uint8 as INT32): `None` if one does not fit a byte.
pub fn q8_codes_from_deltas<T: Copy>(deltas: &[T], k: usize) -> Option<Vec<u8>>
where
    u8: TryFrom<T>,
{
    let mut out = Vec::with_capacity(deltas.len());
    for pos in deltas.chunks_exact(k.max(1)) {
        let mut c = 0u8;
        for &d in pos {
            c = c.wrapping_add(u8::try_from(d).ok()?);
            out.push(c);
        }
    }
    Some(out)
}

/// One window with the teacher's outputs at each of its positions: in `topk`/`hybrid` mode
/// `k` entries per token in `topk_ids`/`topk_logprobs` and one in `tail_logprob`; in
/// `sample`/`hybrid` mode `sample_lens[p]` distinct ids per token in `sample_ids` /
/// `sample_counts` (and `sample_logprobs` when stored).
#[derive(Debug, Clone, Copy, Default)]
pub struct WindowTopK<'a> {
    pub seq_id: u64,
    pub doc_id: u64,
    pub window_index: u32,
    pub input_ids: &'a [u32],
    pub topk_ids: &'a [u32],
    pub topk_logprobs: &'a [f32],
    pub tail_logprob: &'a [f32],
    pub sample_lens: &'a [u32],
    pub sample_ids: &'a [u32],
    pub sample_counts: &'a [u16],
    pub sample_logprobs: &'a [f32],
    pub sample_log_weights: &'a [f32],
}

/// The rows of one shard, in flat buffers (one entry per position for the per-position
/// columns, k entries per position for the top-k columns, a variable number per position
/// for the sample columns).
#[derive(Debug, Clone, PartialEq)]
pub struct ShardRows {
    pub layout: Layout,
    /// `layout.k`.
    pub k: usize,
    pub seq_ids: Vec<u64>,
    pub doc_ids: Vec<u64>,
    pub window_index: Vec<u32>,
    /// Row i's positions are `offsets[i]..offsets[i + 1]`.
    pub offsets: Vec<i32>,
    pub input_ids: Vec<u32>,
    pub topk_ids: Vec<u32>,
    /// The top-k log-probs as the readers use them (under q8, decoded from the codes).
    pub topk_logprobs: Vec<f16>,
    /// q8 only (else empty): per position the scale's `max` and `step`, and k codes (the
    /// running sums of the stored `topk_logprob_deltas`).
    pub topk_logprob_max: Vec<f16>,
    pub topk_logprob_step: Vec<f16>,
    pub topk_logprob_codes: Vec<u8>,
    pub tail_logprob: Vec<f32>,
    /// Position p's sampled entries are `sample_offsets[p]..sample_offsets[p + 1]` (only
    /// `[0]` without samples).
    pub sample_offsets: Vec<i32>,
    pub sample_ids: Vec<u32>,
    pub sample_counts: Vec<u16>,
    pub sample_logprobs: Vec<f16>,
    /// ln p/q of each sampled id (a proposal other than p; else empty).
    pub sample_log_weights: Vec<f32>,
}

impl Default for ShardRows {
    fn default() -> Self {
        ShardRows::with_layout(Layout::topk(0))
    }
}

impl ShardRows {
    /// Empty top-k rows.
    pub fn new(k: usize) -> Self {
        ShardRows::with_layout(Layout::topk(k))
    }

    /// Empty rows of `layout`.
    pub fn with_layout(layout: Layout) -> Self {
        ShardRows {
            layout,
            k: layout.k,
            seq_ids: vec![],
            doc_ids: vec![],
            window_index: vec![],
            offsets: vec![0],
            input_ids: vec![],
            topk_ids: vec![],
            topk_logprobs: vec![],
            topk_logprob_max: vec![],
            topk_logprob_step: vec![],
            topk_logprob_codes: vec![],
            tail_logprob: vec![],
            sample_offsets: vec![0],
            sample_ids: vec![],
            sample_counts: vec![],
            sample_logprobs: vec![],
            sample_log_weights: vec![],
        }
    }

    /// Empty rows with room for `rows` windows of `positions` tokens in all (no regrowth
    /// of the per-position columns while a shard is filled).
    pub fn with_capacity(layout: Layout, rows: usize, positions: usize) -> Self {
        let mut r = ShardRows::with_layout(layout);
        let k = layout.k;
        r.seq_ids.reserve(rows);
        r.doc_ids.reserve(rows);
        r.window_index.reserve(rows);
        r.offsets.reserve(rows);
        r.input_ids.reserve(positions);
        if layout.has_topk() {
            r.topk_ids.reserve(positions * k);
            r.topk_logprobs.reserve(positions * k);
            r.tail_logprob.reserve(positions);
        }
        if layout.q8() {
            r.topk_logprob_max.reserve(positions);
            r.topk_logprob_step.reserve(positions);
            r.topk_logprob_codes.reserve(positions * k);
        }
        if layout.has_samples() {
            r.sample_offsets.reserve(positions);
        }
        r
    }

    pub fn rows(&self) -> usize {
        self.seq_ids.len()
    }

    pub fn positions(&self) -> usize {
        self.input_ids.len()
    }

    /// The sampled entries of position `p`: (ids, counts).
    pub fn samples_at(&self, p: usize) -> (&[u32], &[u16]) {
        let (s, e) = (
            self.sample_offsets[p] as usize,
            self.sample_offsets[p + 1] as usize,
        );
        (&self.sample_ids[s..e], &self.sample_counts[s..e])
    }

    /// Appends one window.
    pub fn push(&mut self, w: &WindowTopK<'_>) {
        let n = w.input_ids.len();
        let l = self.layout;
        let topk_ok = if l.has_topk() {
            w.topk_ids.len() == n * self.k
                && w.topk_logprobs.len() == n * self.k
                && w.tail_logprob.len() == n
        } else {
            w.topk_ids.is_empty() && w.tail_logprob.is_empty()
        };
        let entries: usize = w.sample_lens.iter().map(|&c| c as usize).sum();
        let samples_ok = if l.has_samples() {
            w.sample_lens.len() == n
                && w.sample_ids.len() == entries
                && w.sample_counts.len() == entries
                && w.sample_logprobs.len() == if l.sample_logprobs { entries } else { 0 }
                && w.sample_log_weights.len() == if l.sample_log_weights { entries } else { 0 }
        } else {
            w.sample_lens.is_empty() && w.sample_ids.is_empty()
        };
        assert!(topk_ok && samples_ok, "shard row shapes: this is a bug");
        self.seq_ids.push(w.seq_id);
        self.doc_ids.push(w.doc_id);
        self.window_index.push(w.window_index);
        self.input_ids.extend_from_slice(w.input_ids);
        self.topk_ids.extend_from_slice(w.topk_ids);
        if l.q8() {
            let first = self.topk_logprob_max.len();
            for pos in w.topk_logprobs.chunks_exact(self.k) {
                let at = self.topk_logprob_codes.len();
                self.topk_logprob_codes.resize(at + self.k, 0);
                let (max, step) = q8_encode(pos, &mut self.topk_logprob_codes[at..]);
                self.topk_logprob_max.push(max);
                self.topk_logprob_step.push(step);
            }
            self.decode_q8_from(first);
        } else {
            self.topk_logprobs
                .extend(w.topk_logprobs.iter().map(|&v| f16::from_f32(v)));
        }
        self.tail_logprob.extend_from_slice(w.tail_logprob);
        if l.has_samples() {
            let mut at = *self.sample_offsets.last().expect("offsets start with 0");
            for &c in w.sample_lens {
                at += c as i32;
                self.sample_offsets.push(at);
            }
            self.sample_ids.extend_from_slice(w.sample_ids);
            self.sample_counts.extend_from_slice(w.sample_counts);
            self.sample_logprobs
                .extend(w.sample_logprobs.iter().map(|&v| f16::from_f32(v)));
            self.sample_log_weights
                .extend_from_slice(w.sample_log_weights);
        }
        self.offsets.push(self.input_ids.len() as i32);
    }

    /// Appends all of `other`'s rows (same layout).
    pub fn extend(&mut self, other: &ShardRows) {
        assert_eq!(
            self.layout, other.layout,
            "shard rows of different layouts: this is a bug"
        );
        let base = *self.offsets.last().expect("offsets start with 0");
        self.seq_ids.extend_from_slice(&other.seq_ids);
        self.doc_ids.extend_from_slice(&other.doc_ids);
        self.window_index.extend_from_slice(&other.window_index);
        self.offsets
            .extend(other.offsets[1..].iter().map(|o| o + base));
        self.input_ids.extend_from_slice(&other.input_ids);
        self.topk_ids.extend_from_slice(&other.topk_ids);
        self.topk_logprobs.extend_from_slice(&other.topk_logprobs);
        self.topk_logprob_max
            .extend_from_slice(&other.topk_logprob_max);
        self.topk_logprob_step
            .extend_from_slice(&other.topk_logprob_step);
        self.topk_logprob_codes
            .extend_from_slice(&other.topk_logprob_codes);
        self.tail_logprob.extend_from_slice(&other.tail_logprob);
        let sbase = *self.sample_offsets.last().expect("offsets start with 0");
        self.sample_offsets
            .extend(other.sample_offsets[1..].iter().map(|o| o + sbase));
        self.sample_ids.extend_from_slice(&other.sample_ids);
        self.sample_counts.extend_from_slice(&other.sample_counts);
        self.sample_logprobs
            .extend_from_slice(&other.sample_logprobs);
        self.sample_log_weights
            .extend_from_slice(&other.sample_log_weights);
    }

    /// Fills `topk_logprobs` from the q8 codes of positions `first..` (those whose scale and
    /// codes are already in place).
    pub(crate) fn decode_q8_from(&mut self, first: usize) {
        let k = self.k;
        let (max, step, codes) = (
            &self.topk_logprob_max,
            &self.topk_logprob_step,
            &self.topk_logprob_codes,
        );
        self.topk_logprobs.truncate(first * k);
        let start = self.topk_logprobs.len();
        self.topk_logprobs.resize(max.len() * k, f16::ZERO);
        // Decoded in f32 a position at a time, then converted with the slice conversion
        // (F16C where the CPU has it, checked at run time).
        let mut buf = vec![0f32; k];
        for (p, out) in (first..max.len()).zip(self.topk_logprobs[start..].chunks_exact_mut(k)) {
            // `q8_value` with the scale converted once per position (a float16 conversion
            // per value cost more than the rest of the decoding).
            let (m, s) = (max[p].to_f32(), step[p].to_f32());
            for (b, &c) in buf.iter_mut().zip(&codes[p * k..(p + 1) * k]) {
                *b = q8_decode(m, s, c);
            }
            half::slice::HalfFloatSliceExt::convert_from_f32_slice(out, &buf);
        }
    }

    /// The error of what [`ShardRows::push`] stored from top-k entry `topk_from` and sample
    /// entry `sample_from` on, against the exact values it was given (`topk_exact`,
    /// `sample_exact`): the float16 copies the readers hold, and under q8 also the recipe's
    /// f32 value of each code.
    pub fn storage_error(
        &self,
        topk_from: usize,
        topk_exact: &[f32],
        sample_from: usize,
        sample_exact: &[f32],
    ) -> StorageError {
        let mut e = StorageError::default();
        let k = self.k.max(1);
        debug_assert_eq!(topk_from % k, 0, "whole positions");
        let end = topk_from + topk_exact.len();
        let stored = &self.topk_logprobs[topk_from..end];
        for (i, (xs, ss)) in topk_exact.chunks(k).zip(stored.chunks(k)).enumerate() {
            let p = topk_from / k + i;
            let scale = self.layout.q8().then(|| {
                let m = (self.topk_logprob_max[p], self.topk_logprob_step[p]);
                (
                    m.0.to_f32(),
                    m.1.to_f32(),
                    &self.topk_logprob_codes[p * k..(p + 1) * k],
                )
            });
            for (j, (&x, s)) in xs.iter().zip(ss).enumerate() {
                let xp = x.exp();
                e.add(x, xp, s.to_f32());
                if let Some((m, st, codes)) = scale {
                    e.add(x, xp, q8_decode(m, st, codes[j]));
                }
            }
        }
        let stored = &self.sample_logprobs[sample_from..sample_from + sample_exact.len()];
        for (&x, s) in sample_exact.iter().zip(stored) {
            e.add(x, x.exp(), s.to_f32());
        }
        e
    }

    /// The rows as a record batch with `schema` (from
    /// [`super::schema::shard_schema_with_metadata`] for this layout); copies them (see
    /// [`Self::into_record_batch`]).
    pub fn to_record_batch(&self, schema: Arc<arrow_schema::Schema>) -> RecordBatch {
        self.clone().into_record_batch(schema)
    }

    /// [`Self::to_record_batch`] without a copy: the columns take the rows' buffers (256
    /// windows of 2048 tokens at k = 64 are ~0.2 GB).
    pub fn into_record_batch(mut self, schema: Arc<arrow_schema::Schema>) -> RecordBatch {
        let (k, l) = (self.k, self.layout);
        let offs = OffsetBuffer::new(ScalarBuffer::from(std::mem::take(&mut self.offsets)));
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
        let soffs = OffsetBuffer::new(ScalarBuffer::from(std::mem::take(&mut self.sample_offsets)));
        let list_list = |dt: DataType, values: ArrayRef| -> ArrayRef {
            let inner = ListArray::new(item(dt.clone()), soffs.clone(), values, None);
            Arc::new(ListArray::new(
                item(DataType::List(item(dt))),
                offs.clone(),
                Arc::new(inner),
                None,
            ))
        };
        let mut columns: Vec<ArrayRef> = vec![
            Arc::new(UInt64Array::from(std::mem::take(&mut self.seq_ids))),
            Arc::new(UInt64Array::from(std::mem::take(&mut self.doc_ids))),
            Arc::new(UInt32Array::from(std::mem::take(&mut self.window_index))),
            list(
                DataType::UInt32,
                Arc::new(UInt32Array::from(std::mem::take(&mut self.input_ids))),
            ),
        ];
        if l.has_topk() {
            columns.push(fsl_list(
                DataType::UInt32,
                Arc::new(UInt32Array::from(std::mem::take(&mut self.topk_ids))),
            ));
            let f16_list = |v: Vec<f16>| list(DataType::Float16, Arc::new(Float16Array::from(v)));
            if l.q8() {
                columns.extend([
                    f16_list(std::mem::take(&mut self.topk_logprob_max)),
                    f16_list(std::mem::take(&mut self.topk_logprob_step)),
                    fsl_list(
                        DataType::UInt8,
                        Arc::new(UInt8Array::from(q8_deltas(&self.topk_logprob_codes, k))),
                    ),
                ]);
            } else {
                columns.push(fsl_list(
                    DataType::Float16,
                    Arc::new(Float16Array::from(std::mem::take(&mut self.topk_logprobs))),
                ));
            }
            columns.push(list(
                DataType::Float32,
                Arc::new(Float32Array::from(std::mem::take(&mut self.tail_logprob))),
            ));
        }
        if l.has_samples() {
            columns.push(list_list(
                DataType::UInt32,
                Arc::new(UInt32Array::from(std::mem::take(&mut self.sample_ids))),
            ));
            let counts: ArrayRef = match l.count_type() {
                DataType::UInt8 => Arc::new(UInt8Array::from_iter_values(
                    self.sample_counts.iter().map(|&c| c as u8),
                )),
                _ => Arc::new(UInt16Array::from(std::mem::take(&mut self.sample_counts))),
            };
            columns.push(list_list(l.count_type(), counts));
            if l.sample_logprobs {
                columns.push(list_list(
                    DataType::Float16,
                    Arc::new(Float16Array::from(std::mem::take(
                        &mut self.sample_logprobs,
                    ))),
                ));
            }
            if l.sample_log_weights {
                columns.push(list_list(
                    DataType::Float32,
                    Arc::new(Float32Array::from(std::mem::take(
                        &mut self.sample_log_weights,
                    ))),
                ));
            }
        }
        RecordBatch::try_new(schema, columns)
            .expect("shard columns match the schema: this is a bug")
    }
}

/// Appends a decoded batch of the shard schema to `rows`, checking lengths and nulls.
pub(crate) fn append_batch(rows: &mut ShardRows, b: &RecordBatch) -> Result<(), String> {
    let k = rows.k;
    if rows.layout.has_topk() {
        let list = |name: &str| {
            b.column_by_name(name)
                .map(|c| c.as_list::<i32>())
                .ok_or_else(|| format!("no column {name}"))
        };
        let (ids, tk, tl) = (
            list(COL_INPUT_IDS)?,
            list(COL_TOPK_IDS)?,
            list(rows.layout.topk_logprob_column())?,
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
        let first = rows.positions();
        append_per_position(rows, b, true)?;
        rows.topk_ids
            .extend_from_slice(topk_values::<UInt32Type>(tk, k));
        if rows.layout.q8() {
            rows.topk_logprob_codes.extend(
                q8_codes_from_deltas(topk_values::<UInt8Type>(tl, k), k)
                    .expect("uint8 deltas fit a byte"),
            );
            rows.decode_q8_from(first);
        } else {
            rows.topk_logprobs
                .extend_from_slice(topk_values::<Float16Type>(tl, k));
        }
    } else {
        append_per_position(rows, b, true)?;
    }
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

/// The positions' inner lists of a `list<list<T>>` column: (inner offsets of this batch's
/// positions, values), checked against the per-position offsets `positions`.
fn nested<'a>(
    b: &'a RecordBatch,
    name: &str,
    positions: &[i32],
) -> Result<(&'a [i32], &'a dyn Array), String> {
    let outer = b
        .column_by_name(name)
        .ok_or_else(|| format!("no column {name}"))?
        .as_list::<i32>();
    if outer.null_count() > 0 {
        return Err(format!("unexpected nulls in {name}"));
    }
    let rel = |o: &[i32]| o.iter().map(|&x| x - o[0]).collect::<Vec<_>>();
    if rel(outer.value_offsets()) != rel(positions) {
        return Err(format!("{name} has other lengths than input_ids"));
    }
    let inner = outer.values().as_list::<i32>();
    if inner.null_count() > 0 {
        return Err(format!("unexpected nulls in {name}"));
    }
    let o = outer.value_offsets();
    let offs = &inner.value_offsets()[o[0] as usize..=o[o.len() - 1] as usize];
    Ok((offs, inner.values().as_ref()))
}

/// Appends the sample columns of `b` (see [`nested`]).
fn append_samples(rows: &mut ShardRows, b: &RecordBatch, positions: &[i32]) -> Result<(), String> {
    let l = rows.layout;
    let (offs, ids) = nested(b, COL_SAMPLE_IDS, positions)?;
    let (coffs, counts) = nested(b, COL_SAMPLE_COUNTS, positions)?;
    if offs != coffs {
        return Err("sample_ids and sample_counts have different lengths".into());
    }
    let (s, e) = (offs[0] as usize, offs[offs.len() - 1] as usize);
    let base = *rows.sample_offsets.last().expect("offsets start with 0") - offs[0];
    rows.sample_offsets
        .extend(offs[1..].iter().map(|&o| o + base));
    rows.sample_ids
        .extend_from_slice(&ids.as_primitive::<UInt32Type>().values()[s..e]);
    match counts.data_type() {
        DataType::UInt8 => rows.sample_counts.extend(
            counts.as_primitive::<UInt8Type>().values()[s..e]
                .iter()
                .map(|&c| c as u16),
        ),
        DataType::UInt16 => rows
            .sample_counts
            .extend_from_slice(&counts.as_primitive::<UInt16Type>().values()[s..e]),
        other => return Err(format!("sample_counts has type {other}")),
    }
    // A column with one value per sampled id, checked against `sample_ids`.
    fn beside<'a, T: arrow_array::ArrowPrimitiveType>(
        b: &'a RecordBatch,
        name: &str,
        positions: &[i32],
        offs: &[i32],
    ) -> Result<&'a [T::Native], String> {
        let (o, values) = nested(b, name, positions)?;
        if o != offs {
            return Err(format!("{name} and sample_ids have different lengths"));
        }
        Ok(&values.as_primitive::<T>().values()[o[0] as usize..o[o.len() - 1] as usize])
    }
    if l.sample_logprobs {
        rows.sample_logprobs
            .extend_from_slice(beside::<Float16Type>(
                b,
                COL_SAMPLE_LOGPROBS,
                positions,
                offs,
            )?);
    }
    if l.sample_log_weights {
        rows.sample_log_weights
            .extend_from_slice(beside::<Float32Type>(
                b,
                COL_SAMPLE_LOG_WEIGHTS,
                positions,
                offs,
            )?);
    }
    Ok(())
}

/// [`append_batch`] for a batch without the top-k id and log-prob columns (the fast reader
/// fills `topk_ids`/`topk_logprobs` from the pages, see `cache::pages`); the sample columns
/// are appended here too unless `samples` is false (the fast reader decodes them as well).
pub(crate) fn append_per_position(
    rows: &mut ShardRows,
    b: &RecordBatch,
    samples: bool,
) -> Result<(), String> {
    let col = |name: &str| {
        b.column_by_name(name)
            .ok_or_else(|| format!("no column {name}"))
    };
    let seq = col(COL_SEQ_ID)?.as_primitive::<UInt64Type>();
    let doc = col(COL_DOC_ID)?.as_primitive::<UInt64Type>();
    let win = col(COL_WINDOW_INDEX)?.as_primitive::<UInt32Type>();
    let ids = col(COL_INPUT_IDS)?.as_list::<i32>();
    for a in [ids as &dyn Array, seq, doc, win] {
        if a.null_count() > 0 {
            return Err("unexpected nulls".into());
        }
    }
    let (s, e) = (
        ids.value_offsets()[0] as usize,
        ids.value_offsets()[b.num_rows()] as usize,
    );
    if rows.layout.has_topk() {
        let tail = col(COL_TAIL_LOGPROB)?.as_list::<i32>();
        if tail.null_count() > 0 {
            return Err("unexpected nulls".into());
        }
        if ids.value_offsets() != tail.value_offsets() {
            return Err("per-position columns have different lengths".into());
        }
        rows.tail_logprob
            .extend_from_slice(&tail.values().as_primitive::<Float32Type>().values()[s..e]);
        if rows.layout.q8() {
            for (name, out) in [
                (COL_TOPK_LOGPROB_MAX, &mut rows.topk_logprob_max),
                (COL_TOPK_LOGPROB_STEP, &mut rows.topk_logprob_step),
            ] {
                let c = col(name)?.as_list::<i32>();
                if c.null_count() > 0 || c.value_offsets() != ids.value_offsets() {
                    return Err(format!("{name} has other lengths than input_ids"));
                }
                out.extend_from_slice(&c.values().as_primitive::<Float16Type>().values()[s..e]);
            }
        }
    }
    if samples && rows.layout.has_samples() {
        append_samples(rows, b, ids.value_offsets())?;
    }
    let base = rows.input_ids.len() as i32 - ids.value_offsets()[0];
    rows.seq_ids.extend_from_slice(seq.values());
    rows.doc_ids.extend_from_slice(doc.values());
    rows.window_index.extend_from_slice(win.values());
    rows.input_ids
        .extend_from_slice(&ids.values().as_primitive::<UInt32Type>().values()[s..e]);
    rows.offsets
        .extend(ids.value_offsets()[1..].iter().map(|&o| o + base));
    Ok(())
}

#[cfg(test)]
mod q8_tests {
    use super::*;

    /// One position of `lps` pushed into q8 rows: the error of what was stored.
    fn q8_error(lps: &[f32]) -> StorageError {
        let layout = Layout::topk(lps.len()).with_logprobs(LogprobDtype::Q8);
        let mut rows = ShardRows::with_layout(layout);
        let ids: Vec<u32> = (0..lps.len() as u32).collect();
        rows.push(&WindowTopK {
            input_ids: &[0],
            topk_ids: &ids,
            topk_logprobs: lps,
            tail_logprob: &[f32::NEG_INFINITY],
            ..Default::default()
        });
        rows.storage_error(0, lps, 0, &[])
    }

    #[test]
    fn q8_codes_are_nearest_on_the_quadratic_scale_and_deltas_round_trip() {
        let lps = [-0.01f32, -0.5, -2.25, -7.0, -30.0, f32::NEG_INFINITY];
        let mut codes = [0u8; 6];
        let (max, step) = q8_encode(&lps, &mut codes);
        assert_eq!((codes[0], codes[4], codes[5]), (0, 254, Q8_ZERO));
        // The scale covers the finite range, rounded up to a float16 step.
        let s = step.to_f32();
        assert!(s * 254.0 * 254.0 >= max.to_f32() + 30.0);
        for (&v, &c) in lps.iter().zip(&codes).take(5) {
            // Nearest code: within half the gap to each neighbour.
            let d = q8_value(max, step, c);
            for n in [c.saturating_sub(1), (c + 1).min(254)] {
                assert!((d - v).abs() <= (q8_value(max, step, n) - v).abs() + 1e-6);
            }
            // So within half the gap s·(2c + 1) to the next code: finer near the top.
            let bound = s * (2.0 * c as f32 + 1.0) / 2.0 + 1e-4;
            assert!((d - v).abs() <= bound, "{v}: {} > {bound}", (d - v).abs());
        }
        assert_eq!(q8_value(max, step, codes[5]), f32::NEG_INFINITY);
        let StorageError {
            logprob: e,
            prob: ep,
        } = q8_error(&lps);
        assert!(e > 0.0 && e <= 30.0 / 254.0 + 1e-3, "{e}");
        // A probability is off by at most ~0.43·√range / 254 (here 0.0093).
        assert!(ep > 0.0 && ep < 0.0095, "{ep}");
        // Any order: the deltas wrap modulo 256 and sum back to the codes.
        let codes = [200u8, 3, 255, 0, 17, 17, 9, 250];
        let d = q8_deltas(&codes, 4);
        assert_eq!(q8_codes_from_deltas(&d, 4).unwrap(), codes);
        assert_eq!(q8_codes_from_deltas(&[1u32, 256], 2), None);
        // Descending log-probs give small deltas (what zstd packs).
        assert_eq!(q8_deltas(&[0, 3, 7, 7], 4), [0, 3, 4, 0]);
        // All equal, below the float16 nearest to them (a uniform top-8 of V = 50257): the
        // top rounds up, the range is float16's rounding, and the values decode without NaN.
        let flat = [-(50257f32.ln()); 8];
        let mut c8 = [7u8; 8];
        let (m, s) = q8_encode(&flat, &mut c8);
        assert!(m.to_f32() >= flat[0] && s.to_f32() >= 0.0, "{m} {s}");
        for &c in &c8 {
            assert!((q8_value(m, s, c) - flat[0]).abs() < 1e-3, "code {c}");
        }
        let StorageError {
            logprob: e,
            prob: ep,
        } = q8_error(&flat);
        assert!(e.is_finite() && e < 0.01 && ep < 1e-5, "{e} {ep}");
        let near = [-10.8125f32, -10.8126, -10.81255];
        let mut c3 = [0u8; 3];
        let (m, s) = q8_encode(&near, &mut c3);
        for (&v, &c) in near.iter().zip(&c3) {
            assert!((q8_value(m, s, c) - v).abs() < 0.01, "{v}");
        }
        // One value, all equal, and no finite value at all.
        let mut one = [9u8; 1];
        let (m, s) = q8_encode(&[-1.5], &mut one);
        assert_eq!((one[0], q8_value(m, s, 0)), (0, -1.5));
        let mut none = [0u8; 2];
        q8_encode(&[f32::NEG_INFINITY; 2], &mut none);
        assert_eq!(none, [Q8_ZERO; 2]);
    }
}
