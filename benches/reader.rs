//! Reader throughput: positions/s decoded into training batches (warm page cache) by the
//! memory-mapped stream, and pyarrow reading the same files into numpy in the same run, for
//! a k = 64 top-k cache (float16 and q8 log-probs), a sample (N = 50) and a hybrid (top-8 +
//! 42) cache of the same windows; and the `logitcache` Python package's stream (the same
//! stream, as NumPy arrays: `python_*` keys).
//! Run: `cargo bench --bench reader` (needs `make setup`, `make pycheck-setup` and `make python`).
//! Knobs: READER_DOCS (default 4584 = the whole demo corpus), READER_ROUNDS (3),
//! READER_CACHES (a comma list of the caches to run, e.g. `sample50,hybrid8_42`).

use logitcache::cache::reader::Cache;
use logitcache::cache::schema::{CacheMode, LogprobDtype};
use logitcache::cache::stream::{Stream, StreamConfig};
use logitcache::onnx::{ToyLmSpec, toy_lm};
use logitcache::progress::ProgressMode;
use logitcache::teacher::{TeacherConfig, run};
use std::path::{Path, PathBuf};
use std::time::Instant;

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let lib = std::env::var_os("ORT_DYLIB_PATH")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join(".ort/libonnxruntime.so.1.32.0"));
    // `cargo test --all-targets` runs this without `--bench`: a small smoke run then.
    let smoke = !std::env::args().any(|a| a == "--bench");
    let knob = |n: &str, d: usize| {
        std::env::var(n)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let (docs, rounds) = if smoke {
        (100, 1)
    } else {
        (knob("READER_DOCS", 4584), knob("READER_ROUNDS", 3))
    };
    let dir = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(root.join("pipelines/demo/fortunes.jsonl")).unwrap();
    let lines: Vec<&str> = text.lines().take(docs).collect();
    let all: Vec<String> =
        logitcache::corpus::read_texts(&[root.join("pipelines/demo/fortunes.jsonl")], "text")
            .unwrap()
            .into_iter()
            .take(docs)
            .collect();
    let corpus = dir.path().join("c.jsonl");
    std::fs::write(&corpus, lines.join("\n")).unwrap();
    let tok = dir.path().join("tok.json");
    logitcache::tokenizer::train_bpe(&all, 8000, &tok).unwrap();
    let vocab = logitcache::tokenizer::load(&tok).unwrap().vocab_size;
    let model = dir.path().join("t.onnx");
    std::fs::write(
        &model,
        toy_lm(&ToyLmSpec {
            vocab,
            hidden: 16,
            ..Default::default()
        }),
    )
    .unwrap();
    // The demo's k = 64 top-k cache, and the other layouts on the same windows: q8 log-probs,
    // a sampled (N = 50) and a hybrid (top-8 + 42) cache.
    let mut results = Vec::new();
    for (name, mode, k, n, dtype) in [
        ("topk64", CacheMode::Topk, 64, 0usize, LogprobDtype::Float16),
        ("topk64_q8", CacheMode::Topk, 64, 0, LogprobDtype::Q8),
        ("sample50", CacheMode::Sample, 1, 50, LogprobDtype::Float16),
        (
            "hybrid8_42",
            CacheMode::Hybrid,
            8,
            42,
            LogprobDtype::Float16,
        ),
    ] {
        if smoke && name != "topk64" && name != "topk64_q8" {
            continue;
        }
        if let Ok(only) = std::env::var("READER_CACHES")
            && !only.split(',').any(|c| c == name)
        {
            continue;
        }
        let out = dir.path().join(name);
        run(&TeacherConfig {
            model: model.clone(),
            tokenizer: tok.clone(),
            corpus: vec![corpus.clone()],
            out: out.clone(),
            top_k: k,
            mode,
            samples: n,
            logprob_dtype: dtype,
            seq_len: 256,
            shard_size: 256,
            ort_lib: Some(lib.clone()),
            progress: ProgressMode::Off,
            ..Default::default()
        })
        .unwrap();
        let cache = Cache::open(&out).unwrap();
        // The first pass also hashes every shard (sha256 against the manifest, once per file
        // and process); later passes, like every evaluation pass of a training run, only
        // decode.
        let mut best = f64::INFINITY;
        let mut first = f64::NAN;
        let mut positions = 0usize;
        for _ in 0..rounds + 1 {
            let t0 = Instant::now();
            positions = 0;
            let mut s = Stream::start(
                &cache,
                StreamConfig {
                    batch_size: 32,
                    shuffle: false,
                    ..Default::default()
                },
            )
            .unwrap();
            // As the trainer does: each batch's buffers go back to the stream once used.
            while let Some(b) = s.next_batch() {
                let b = b.unwrap();
                positions += b.tokens();
                s.recycle(b);
            }
            let secs = t0.elapsed().as_secs_f64();
            if first.is_nan() {
                first = secs;
            } else {
                best = best.min(secs);
            }
        }
        let python = std::env::var("LOGITCACHE_PYTHON")
            .map(PathBuf::from)
            .unwrap_or_else(|_| root.join(".venv/bin/python"));
        let script_rate = |script: &str| -> (f64, f64) {
            let o = std::process::Command::new(&python)
                .arg(root.join("benches").join(script))
                .arg(&out)
                .arg(rounds.to_string())
                .output()
                .expect("run python (make pycheck-setup python)");
            assert!(
                o.status.success(),
                "{script}: {}",
                String::from_utf8_lossy(&o.stderr)
            );
            let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
            let n = v["positions"].as_f64().unwrap();
            (n, n / v["seconds"].as_f64().unwrap())
        };
        let (_, py_rate) = script_rate("pyarrow_read.py");
        // The Python package's stream (the same stream as here, into NumPy arrays).
        let (pkg_positions, pkg_rate) = script_rate("python_stream.py");
        assert_eq!(
            pkg_positions as usize, positions,
            "{name}: python stream positions"
        );
        let rate = positions as f64 / best;
        results.push(serde_json::json!({
            "cache": name, "positions": positions, "bytes": cache.manifest.totals.bytes,
            "stream_positions_per_s": rate,
            "stream_first_pass_positions_per_s": positions as f64 / first,
            "pyarrow_positions_per_s": py_rate, "ratio_vs_pyarrow": rate / py_rate,
            "python_stream_positions_per_s": pkg_rate,
            "python_ratio_vs_pyarrow": pkg_rate / py_rate,
            "python_ratio_vs_stream": pkg_rate / rate,
        }));
    }
    println!(
        "{}",
        serde_json::json!({"bench": "reader", "caches": results})
    );
}
