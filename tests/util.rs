//! Shared helpers for the integration tests: fixtures made on the fly (a BPE tokenizer
//! trained on the committed demo corpus, tiny ONNX teachers from `logitcache::onnx::toy`),
//! and running the binary.

#![allow(dead_code)]

use logitcache::cache::reader::Cache;
use logitcache::cache::rows::ShardRows;
use logitcache::onnx::{ToyLmSpec, toy_lm};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

pub const BIN: &str = env!("CARGO_BIN_EXE_logitcache");
pub const ROOT: &str = env!("CARGO_MANIFEST_DIR");
/// Vocabulary of the test tokenizer.
pub const VOCAB: usize = 400;

/// The ONNX Runtime library `make setup` extracts; tests fail clearly without it.
pub fn ort_lib() -> PathBuf {
    let p = std::env::var_os("ORT_DYLIB_PATH")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(ROOT).join(".ort/libonnxruntime.so.1.32.0"));
    assert!(
        p.is_file(),
        "ONNX Runtime library {} missing: run `make setup` (or `make test`)",
        p.display()
    );
    p
}

/// A directory that lives for the whole test process (fixtures shared by tests).
/// This run's scratch directory, `target/tmp/tests-PID`. A static is never dropped, so a
/// temporary directory would outlive every run: instead each run removes the directories of
/// earlier runs whose process is gone.
pub fn shared_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let root = Path::new(env!("CARGO_TARGET_TMPDIR"));
        std::fs::create_dir_all(root).expect("target tmp dir");
        for e in std::fs::read_dir(root).expect("target tmp dir").flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(pid) = name.strip_prefix("tests-")
                && pid.parse::<u32>().is_ok()
                && !Path::new("/proc").join(pid).exists()
            {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
        let dir = root.join(format!("tests-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("test dir");
        dir
    })
}

/// `shared_dir()/name`, emptied (removed if it exists; not created).
pub fn fresh_dir(name: &str) -> PathBuf {
    let d = shared_dir().join(name);
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// A number no other call in this process gets (for temporary file names).
pub fn unique() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// The first `n` documents of the committed demo corpus, as a JSONL file.
pub fn corpus(n: usize) -> PathBuf {
    let path = shared_dir().join(format!("corpus-{n}.jsonl"));
    if !path.exists() {
        let text =
            std::fs::read_to_string(Path::new(ROOT).join("pipelines/demo/fortunes.jsonl")).unwrap();
        let lines: Vec<&str> = text.lines().take(n).collect();
        // Tests run in parallel threads: each writes its own temporary file, and the
        // renames (same content) replace each other atomically.
        let tmp = path.with_extension(format!("part-{}", unique()));
        std::fs::write(&tmp, lines.join("\n") + "\n").unwrap();
        std::fs::rename(tmp, &path).unwrap();
    }
    path
}

/// A byte-level BPE tokenizer.json with `VOCAB` tokens (trained once per test process).
pub fn tokenizer() -> PathBuf {
    static TOK: OnceLock<PathBuf> = OnceLock::new();
    TOK.get_or_init(|| {
        let path = shared_dir().join("tokenizer.json");
        let texts = logitcache::corpus::read_texts(&[corpus(800)], "text").unwrap();
        logitcache::tokenizer::train_bpe(&texts, VOCAB, &path).unwrap();
        assert_eq!(
            logitcache::tokenizer::load(&path).unwrap().vocab_size,
            VOCAB
        );
        path
    })
    .clone()
}

/// Writes a toy teacher built from `spec` under `name` in the shared dir.
pub fn model(name: &str, spec: &ToyLmSpec) -> PathBuf {
    let path = shared_dir().join(format!("{name}.onnx"));
    if !path.exists() {
        let tmp = path.with_extension(format!("part-{}", unique()));
        std::fs::write(&tmp, toy_lm(spec)).unwrap();
        std::fs::rename(tmp, &path).unwrap();
    }
    path
}

/// The plain f32 toy teacher over the test vocabulary.
pub fn plain_model() -> PathBuf {
    model(
        "plain",
        &ToyLmSpec {
            vocab: VOCAB,
            ..Default::default()
        },
    )
}

/// `logitcache ARGS` with the ONNX Runtime library set.
pub fn run(args: &[&str]) -> Output {
    run_env(args, &[])
}

/// Variables of the test's own environment that change what logitcache does: a worker
/// index from a batch scheduler, or a failpoint. Children never inherit them.
const LEAKY_ENV: [&str; 5] = [
    "SLURM_ARRAY_TASK_ID",
    "SLURM_ARRAY_TASK_COUNT",
    "SLURM_ARRAY_TASK_MIN",
    "JOB_COMPLETION_INDEX",
    "LOGITCACHE_FAILPOINT",
];

/// A `logitcache` command with the ONNX Runtime library set, warnings logged, and none of
/// [`LEAKY_ENV`] inherited.
pub fn command() -> Command {
    let mut c = Command::new(BIN);
    c.env("ORT_DYLIB_PATH", ort_lib()).env("RUST_LOG", "warn");
    for v in LEAKY_ENV {
        c.env_remove(v);
    }
    c
}

pub fn run_env(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = command();
    c.args(args);
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().expect("run logitcache")
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Asserts the command failed (exit 2) with an error containing every fragment.
#[track_caller]
pub fn assert_fails(o: &Output, fragments: &[&str]) {
    let err = stderr(o);
    assert_eq!(
        o.status.code(),
        Some(2),
        "expected exit 2, got {:?}; stderr:\n{err}\nstdout:\n{}",
        o.status,
        stdout(o)
    );
    for f in fragments {
        assert!(err.contains(f), "stderr lacks {f:?}:\n{err}");
    }
}

#[track_caller]
pub fn assert_ok(o: &Output) {
    assert!(
        o.status.success(),
        "command failed: {:?}\nstderr:\n{}\nstdout:\n{}",
        o.status,
        stderr(o),
        stdout(o)
    );
}

/// Teacher arguments for a small cache of `docs` documents in `out`.
pub fn teacher_args(model: &Path, out: &Path, docs: usize) -> Vec<String> {
    [
        "teacher",
        "--model",
        model.to_str().unwrap(),
        "--tokenizer",
        tokenizer().to_str().unwrap(),
        "--corpus",
        corpus(docs).to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--top-k",
        "8",
        "--seq-len",
        "24",
        "--batch-size",
        "4",
        "--shard-size",
        "16",
        "--threads",
        "2",
        "--progress",
        "off",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

pub fn run_strings(args: &[String]) -> Output {
    let refs: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    run(&refs)
}

/// All rows of a cache, concatenated in shard order.
pub fn all_rows(dir: &Path) -> ShardRows {
    let cache = Cache::open(dir).unwrap();
    let mut all = ShardRows::with_layout(cache.manifest.params.layout());
    for s in &cache.manifest.shards {
        all.extend(&cache.read_shard(s).unwrap());
    }
    all
}

/// Runs `tests/SCRIPT CACHE_DIR` with the test Python (`LOGITCACHE_PYTHON`, else the `.venv/`
/// `make` creates, with pyarrow, DuckDB and Polars) and returns its JSON output.
pub fn python_check(script: &str, cache: &Path) -> serde_json::Value {
    let python = std::env::var("LOGITCACHE_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|_| Path::new(ROOT).join(".venv/bin/python"));
    assert!(
        python.is_file(),
        "{} missing: run `make pycheck-setup` (make test does) or set LOGITCACHE_PYTHON to a Python with pyarrow, duckdb, polars and datasets",
        python.display()
    );
    let o = Command::new(&python)
        .arg(Path::new(ROOT).join("tests").join(script))
        .arg(cache)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "{script} failed on {}:\n{}",
        cache.display(),
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout).unwrap()
}

/// Copies the directory tree `from` to `to` (replacing `to`).
pub fn copy_tree(from: &Path, to: &Path) {
    let _ = std::fs::remove_dir_all(to);
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        let dst = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_tree(&e.path(), &dst);
        } else {
            std::fs::copy(e.path(), dst).unwrap();
        }
    }
}

/// `model` on ONNX Runtime's CPU provider, one thread, the top-k (`k`, at `temperature`) on
/// the host, no sampling: the reference teacher the tests compare caches and logits with.
pub fn host_teacher(
    model: &Path,
    k: usize,
    temperature: f32,
    vocab: usize,
) -> logitcache::teacher::ort_backend::OrtTeacher {
    use logitcache::teacher::backend::{Device, TopKMode};
    use logitcache::teacher::ort_backend::{OrtOptions, OrtTeacher};
    OrtTeacher::open(
        model,
        OrtOptions {
            library: ort_lib(),
            device: Device::Cpu,
            threads: 1,
            topk_on: TopKMode::Host,
            sampling: None,
            k,
            temperature,
            vocab,
        },
    )
    .unwrap()
}
