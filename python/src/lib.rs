//! `logitcache._native`: the cache reader of the `logitcache` crate for Python.
//!
//! Thin: the manifest, `verify`, the tokenizer check and the training stream are the crate's
//! own code, so a Python stream yields exactly the batches the Rust trainer sees. Batches
//! cross without a copy: each field's values stay in the Rust vector, which NumPy views
//! through the array interface. The pure-Python package (`logitcache/`) holds the
//! public API.

use logitcache::cache::reader::{Cache, ReadError};
use logitcache::cache::stream::{Cursor, Split, Stream, StreamConfig, TrainBatch};
use pyo3::create_exception;
use pyo3::exceptions::{PyException, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyDict;
use std::path::PathBuf;

/// Every allocation of the extension (the crate's stream included): with glibc's malloc each
/// batch's vectors were mapped and page-faulted afresh (the stream ran at 0.6-0.8x the Rust
/// trainer's; see benches/reader.rs).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

create_exception!(
    _native,
    CacheError,
    PyException,
    "A cache that cannot be read as asked: missing, incomplete, damaged or edited files, a different tokenizer, an empty split. The message names the problem and the fix."
);

fn cache_error(e: impl std::fmt::Display) -> PyErr {
    CacheError::new_err(e.to_string())
}

fn open(path: &str) -> PyResult<Cache> {
    Cache::open(&PathBuf::from(path)).map_err(cache_error)
}

/// The manifest of the cache in `path` as JSON (validated, checksum checked).
#[pyfunction]
fn manifest_json(path: &str) -> PyResult<String> {
    let cache = open(path)?;
    serde_json::to_string(&cache.manifest).map_err(cache_error)
}

/// Checks every shard of the cache in `path` (sha256, schema, values) and returns the report
/// as JSON: `ok`, `problems`, `warnings` and counts, as `logitcache verify --json` prints.
#[pyfunction]
fn verify_json(py: Python<'_>, path: &str) -> PyResult<String> {
    let dir = PathBuf::from(path);
    let report = py
        .allow_threads(|| logitcache::cache::verify::verify(&dir))
        .map_err(cache_error)?;
    serde_json::to_string(&report).map_err(cache_error)
}

/// Refuses a tokenizer file whose sha256 differs from the one the cache was built with.
#[pyfunction]
fn check_tokenizer(path: &str, tokenizer: &str) -> PyResult<()> {
    open(path)?
        .check_tokenizer(&PathBuf::from(tokenizer))
        .map_err(cache_error)
}

/// The crate's training stream over one cache.
#[pyclass(module = "logitcache._native")]
struct NativeStream {
    /// Python may hand the object between threads; only `&mut self` reaches the stream.
    inner: std::sync::Mutex<Stream>,
}

fn split_of(name: &str) -> PyResult<Split> {
    match name {
        "train" => Ok(Split::Train),
        "eval" => Ok(Split::Eval),
        "all" => Ok(Split::All),
        _ => Err(PyValueError::new_err(format!(
            "split must be \"train\", \"eval\" or \"all\", not {name:?}"
        ))),
    }
}

/// A batch field's values, owned here and shown to NumPy through `__array_interface__`
/// (`numpy.asarray(field)` is an array over this memory, keeping the object alive as its
/// base): the batch crosses to Python without a copy. (abi3 before 3.11 has no buffer
/// protocol, so this protocol, which NumPy reads from any Python object.)
#[pyclass(module = "logitcache._native")]
struct Field {
    data: FieldData,
}

enum FieldData {
    U32(Vec<u32>),
    U64(Vec<u64>),
    F32(Vec<f32>),
}

#[pymethods]
impl Field {
    /// NumPy's array interface (version 3): one dimension, little-endian, writable.
    #[getter]
    fn __array_interface__<'py>(
        mut slf: PyRefMut<'py, Self>,
        py: Python<'py>,
    ) -> PyResult<Bound<'py, PyDict>> {
        // The pointer is taken from `&mut`: after this only NumPy touches the values (Rust
        // reads them never again and frees them when the last array over them is gone).
        let (ptr, len, typestr) = match &mut slf.data {
            FieldData::U32(v) => (v.as_mut_ptr() as usize, v.len(), "<u4"),
            FieldData::U64(v) => (v.as_mut_ptr() as usize, v.len(), "<u8"),
            FieldData::F32(v) => (v.as_mut_ptr() as usize, v.len(), "<f4"),
        };
        let d = PyDict::new(py);
        d.set_item("shape", (len,))?;
        d.set_item("typestr", typestr)?;
        d.set_item("data", (ptr, false))?;
        d.set_item("version", 3)?;
        Ok(d)
    }
}

fn field(py: Python<'_>, data: FieldData) -> PyResult<Bound<'_, Field>> {
    Bound::new(py, Field { data })
}

fn batch_dict(py: Python<'_>, b: TrainBatch) -> PyResult<Bound<'_, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("batch", b.batch)?;
    d.set_item("len", b.len)?;
    d.set_item("k", b.k)?;
    d.set_item("cursor", (b.cursor.epoch, b.cursor.group, b.cursor.offset))?;
    d.set_item("seq_ids", field(py, FieldData::U64(b.seq_ids))?)?;
    d.set_item("input_ids", field(py, FieldData::U32(b.input_ids))?)?;
    d.set_item("target_ids", field(py, FieldData::U32(b.target_ids))?)?;
    d.set_item("target_mask", field(py, FieldData::F32(b.target_mask))?)?;
    d.set_item("mask", field(py, FieldData::F32(b.mask))?)?;
    d.set_item("topk_ids", field(py, FieldData::U32(b.topk_ids))?)?;
    d.set_item("topk_logprobs", field(py, FieldData::F32(b.topk_logprobs))?)?;
    d.set_item("tail_logprob", field(py, FieldData::F32(b.tail_logprob))?)?;
    Ok(d)
}

#[pymethods]
impl NativeStream {
    /// Arguments are checked by the Python wrapper; the ones the crate would assert on are
    /// checked again here.
    #[new]
    #[pyo3(signature = (path, batch_size, seed, shuffle, epochs, rank, world_size, split, eval_fraction, cursor))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        path: &str,
        batch_size: usize,
        seed: u64,
        shuffle: bool,
        epochs: Option<u64>,
        rank: usize,
        world_size: usize,
        split: &str,
        eval_fraction: f64,
        cursor: (u64, u64, u64),
    ) -> PyResult<Self> {
        if batch_size == 0 {
            return Err(PyValueError::new_err("batch_size must be at least 1"));
        }
        if world_size == 0 || rank >= world_size {
            return Err(PyValueError::new_err(format!(
                "rank {rank} is not below world_size {world_size}: ranks are 0 .. world_size - 1"
            )));
        }
        if !(0.0..1.0).contains(&eval_fraction) {
            return Err(PyValueError::new_err(format!(
                "eval_fraction must be in [0, 1), not {eval_fraction}"
            )));
        }
        let split = split_of(split)?;
        if split != Split::All && eval_fraction == 0.0 {
            return Err(cache_error(ReadError::EmptySplit(format!(
                "{split:?} split with eval_fraction 0 (use split=\"all\", or an eval_fraction > 0)"
            ))));
        }
        let cache = open(path)?;
        let cfg = StreamConfig {
            batch_size,
            seed,
            shuffle,
            epochs,
            rank,
            world_size,
            split,
            eval_fraction,
            start: Cursor {
                epoch: cursor.0,
                group: cursor.1,
                offset: cursor.2,
            },
            ..Default::default()
        };
        let inner = Stream::start(&cache, cfg).map_err(cache_error)?;
        Ok(NativeStream {
            inner: std::sync::Mutex::new(inner),
        })
    }

    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    /// The next batch as a dict of [`Field`]s and sizes; `None` at the end.
    fn __next__<'py>(&mut self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyDict>>> {
        let inner = self
            .inner
            .get_mut()
            .map_err(|_| CacheError::new_err("the stream failed earlier; start a new one"))?;
        match py.allow_threads(|| inner.next_batch()) {
            None => Ok(None),
            Some(Err(e)) => Err(cache_error(e)),
            Some(Ok(b)) => batch_dict(py, b).map(Some),
        }
    }
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("CacheError", m.py().get_type::<CacheError>())?;
    m.add_function(wrap_pyfunction!(manifest_json, m)?)?;
    m.add_function(wrap_pyfunction!(verify_json, m)?)?;
    m.add_function(wrap_pyfunction!(check_tokenizer, m)?)?;
    m.add_class::<NativeStream>()?;
    m.add_class::<Field>()?;
    Ok(())
}
