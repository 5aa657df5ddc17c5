//! `logitcache._native`: the cache reader of the `logitcache` crate for Python.
//!
//! Thin: the manifest, `verify`, the tokenizer check and the training stream are the crate's
//! own code, so a Python stream yields exactly the batches the Rust trainer sees. Batches
//! cross as `bytearray`s of little-endian values (one copy each), which the Python side views
//! as NumPy arrays without another copy. The pure-Python package (`logitcache/`) holds the
//! public API.

use logitcache::cache::reader::{Cache, ReadError};
use logitcache::cache::stream::{Cursor, Split, Stream, StreamConfig, TrainBatch};
use pyo3::create_exception;
use pyo3::exceptions::{PyException, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyByteArray, PyDict};
use std::path::PathBuf;

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

fn bytes_of<'py, T: Copy>(py: Python<'py>, v: &[T]) -> Bound<'py, PyByteArray> {
    // SAFETY: T is one of u32, u64, f32 (plain values without padding), so its slice is
    // `size_of_val(v)` initialised bytes.
    let raw = unsafe { std::slice::from_raw_parts(v.as_ptr().cast::<u8>(), size_of_val(v)) };
    PyByteArray::new(py, raw)
}

fn batch_dict<'py>(py: Python<'py>, b: &TrainBatch) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("batch", b.batch)?;
    d.set_item("len", b.len)?;
    d.set_item("k", b.k)?;
    d.set_item("seq_ids", bytes_of(py, &b.seq_ids))?;
    d.set_item("input_ids", bytes_of(py, &b.input_ids))?;
    d.set_item("target_ids", bytes_of(py, &b.target_ids))?;
    d.set_item("target_mask", bytes_of(py, &b.target_mask))?;
    d.set_item("mask", bytes_of(py, &b.mask))?;
    d.set_item("topk_ids", bytes_of(py, &b.topk_ids))?;
    d.set_item("topk_logprobs", bytes_of(py, &b.topk_logprobs))?;
    d.set_item("tail_logprob", bytes_of(py, &b.tail_logprob))?;
    d.set_item("cursor", (b.cursor.epoch, b.cursor.group, b.cursor.offset))?;
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

    /// The next batch as a dict of `bytearray`s and sizes; `None` at the end.
    fn __next__<'py>(&mut self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyDict>>> {
        let inner = self
            .inner
            .get_mut()
            .map_err(|_| CacheError::new_err("the stream failed earlier; start a new one"))?;
        match py.allow_threads(|| inner.next_batch()) {
            None => Ok(None),
            Some(Err(e)) => Err(cache_error(e)),
            Some(Ok(b)) => batch_dict(py, &b).map(Some),
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
    Ok(())
}
