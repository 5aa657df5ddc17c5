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
//! });
//! let mut both = ShardRows::new(2);
//! both.extend(&rows);
//! both.extend(&rows);
//! assert_eq!((both.rows(), both.positions()), (2, 4));
//! ```

use super::schema::{
    COL_DOC_ID, COL_INPUT_IDS, COL_SEQ_ID, COL_TAIL_LOGPROB, COL_TOPK_IDS, COL_TOPK_LOGPROBS,
    COL_WINDOW_INDEX, fsl_item, item,
};
use arrow_array::cast::AsArray;
use arrow_array::types::{Float16Type, Float32Type, UInt32Type, UInt64Type};
use arrow_array::{
    Array, ArrayRef, FixedSizeListArray, Float16Array, Float32Array, ListArray, RecordBatch,
    UInt32Array, UInt64Array,
};
use arrow_buffer::{OffsetBuffer, ScalarBuffer};
use arrow_schema::DataType;
use half::f16;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// Element type of the stored log-probabilities (`topk_logprobs`), recorded in the manifest
/// as `params.logprob_dtype`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum LogprobDtype {
    /// IEEE half precision (Arrow `Float16`, Parquet FIXED_LEN_BYTE_ARRAY(2) + Float16).
    #[serde(rename = "float16")]
    Float16,
}

impl LogprobDtype {
    /// The name in the manifest and in `schemas/`.
    pub fn name(self) -> &'static str {
        match self {
            LogprobDtype::Float16 => "float16",
        }
    }

    /// The Arrow type of one stored value.
    pub fn arrow_type(self) -> DataType {
        match self {
            LogprobDtype::Float16 => DataType::Float16,
        }
    }
}

impl std::fmt::Display for LogprobDtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

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

    /// Appends all of `other`'s rows (same k).
    pub fn extend(&mut self, other: &ShardRows) {
        assert_eq!(self.k, other.k, "shard rows of different k: this is a bug");
        let base = *self.offsets.last().expect("offsets start with 0");
        self.seq_ids.extend_from_slice(&other.seq_ids);
        self.doc_ids.extend_from_slice(&other.doc_ids);
        self.window_index.extend_from_slice(&other.window_index);
        self.offsets
            .extend(other.offsets[1..].iter().map(|o| o + base));
        self.input_ids.extend_from_slice(&other.input_ids);
        self.topk_ids.extend_from_slice(&other.topk_ids);
        self.topk_logprobs.extend_from_slice(&other.topk_logprobs);
        self.tail_logprob.extend_from_slice(&other.tail_logprob);
    }

    /// The rows as a record batch with `schema` (from
    /// [`super::schema::shard_schema_with_metadata`]).
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

/// Appends a decoded batch of the shard schema to `rows`, checking lengths and nulls.
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
/// `topk_ids`/`topk_logprobs` from the pages, see `cache::pages`).
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
