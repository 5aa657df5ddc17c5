//! The teacher stage: corpus → tokens → windows → teacher (ONNX Runtime) → top-k → Parquet
//! shards + manifest.
//!
//! Three threads joined by bounded channels: a producer tokenises the corpus and cuts it into
//! the windows of each pending shard; the caller's thread runs the teacher batch by batch; a
//! writer compresses and writes each finished shard and records it in the manifest.
//!
//! Shards are fixed ranges of `seq_id`s (`shard_size` windows each), so which process
//! computes a shard (`--worker-index/--num-workers`) and when (a resumed run) does not change
//! the cache's content.

pub mod backend;
pub mod ort_backend;
pub mod topk;

use crate::cache::lock::{CacheLock, ManifestLock};
use crate::cache::manifest::{
    CacheParams, Manifest, ModelInfo, Plan, ShardEntry, TokenizerInfo, shard_file_name,
};
use crate::cache::schema::FORMAT_VERSION;
use crate::cache::writer::{
    DEFAULT_ROW_GROUP_ROWS, DEFAULT_ZSTD_LEVEL, ShardRows, ShardWriteOptions, WindowTopK,
    write_shard,
};
use crate::progress::{Progress, ProgressMode};
use crate::tokenizer::LoadedTokenizer;
use crate::util::{failpoint, sha256_file};
use anyhow::{Context, bail};
use backend::{Batch, Device, PaddingSide, TeacherBackend, TeacherError, TopKMode};
use crate::corpus::{self, CorpusFile};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::time::Instant;

pub const DEFAULT_TOP_K: usize = 64;
pub const DEFAULT_SEQ_LEN: usize = 512;
pub const DEFAULT_BATCH_SIZE: usize = 8;
pub const DEFAULT_TEMPERATURE: f32 = 1.0;
pub const DEFAULT_TEXT_FIELD: &str = "text";
/// Windows per shard: at seq_len 512 and k 64 about 100 MB of Parquet, and the unit of
/// resumption and of work split across workers.
pub const DEFAULT_SHARD_SIZE: usize = 1024;
/// Documents tokenised per `encode_batch` call.
const TOKENIZE_CHUNK: usize = 512;

/// Everything one `logitcache teacher` run needs, validated by [`TeacherConfig::validate`].
#[derive(Debug, Clone)]
pub struct TeacherConfig {
    pub model: PathBuf,
    pub tokenizer: PathBuf,
    pub corpus: Vec<PathBuf>,
    pub out: PathBuf,
    pub top_k: usize,
    pub seq_len: usize,
    pub batch_size: usize,
    pub temperature: f32,
    pub text_field: String,
    pub skip_bad_rows: bool,
    pub device: Device,
    pub threads: usize,
    pub worker_index: usize,
    pub num_workers: usize,
    pub shard_size: usize,
    pub padding_side: PaddingSide,
    pub topk: TopKMode,
    pub ort_lib: Option<PathBuf>,
    pub progress: ProgressMode,
    pub zstd_level: i32,
}

impl Default for TeacherConfig {
    fn default() -> Self {
        TeacherConfig {
            model: PathBuf::new(),
            tokenizer: PathBuf::new(),
            corpus: Vec::new(),
            out: PathBuf::new(),
            top_k: DEFAULT_TOP_K,
            seq_len: DEFAULT_SEQ_LEN,
            batch_size: DEFAULT_BATCH_SIZE,
            temperature: DEFAULT_TEMPERATURE,
            text_field: DEFAULT_TEXT_FIELD.into(),
            skip_bad_rows: false,
            device: Device::Cpu,
            threads: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            worker_index: 0,
            num_workers: 1,
            shard_size: DEFAULT_SHARD_SIZE,
            padding_side: PaddingSide::Right,
            topk: TopKMode::Auto,
            ort_lib: None,
            progress: ProgressMode::Bar,
            zstd_level: DEFAULT_ZSTD_LEVEL,
        }
    }
}

impl TeacherConfig {
    /// Checks the values that need no file access.
    pub fn validate(&self) -> anyhow::Result<()> {
        if self.top_k == 0 {
            bail!("--top-k must be at least 1 (got 0); 64 is a good default");
        }
        if self.seq_len < 2 {
            bail!(
                "--seq-len must be at least 2 (got {}): a window needs a token followed by another to teach anything",
                self.seq_len
            );
        }
        if !(self.temperature.is_finite() && self.temperature > 0.0) {
            bail!(
                "--temperature must be a finite number > 0 (got {}); 1.0 keeps the teacher's distribution",
                self.temperature
            );
        }
        if self.batch_size == 0 {
            bail!("--batch-size must be at least 1");
        }
        if self.shard_size == 0 {
            bail!("--shard-size must be at least 1");
        }
        if self.threads == 0 {
            bail!("--threads must be at least 1");
        }
        if self.num_workers == 0 || self.worker_index >= self.num_workers {
            bail!(
                "--worker-index {} is not below --num-workers {}; worker indices run from 0 to N-1",
                self.worker_index,
                self.num_workers
            );
        }
        if !(1..=22).contains(&self.zstd_level) {
            bail!(
                "--zstd-level must be between 1 and 22 (got {})",
                self.zstd_level
            );
        }
        if self.corpus.is_empty() {
            bail!("no corpus given; pass --corpus PATH (files or directories)");
        }
        Ok(())
    }
}

/// What a run did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RunSummary {
    pub shards_written: u64,
    pub shards_already_done: u64,
    pub shards_total: u64,
    pub tokens: u64,
    pub computed_tokens: u64,
    pub seconds: f64,
    pub tokens_per_s: f64,
    pub complete: bool,
}

/// One window of one document.
#[derive(Debug, Clone)]
pub struct Window {
    pub seq_id: u64,
    pub doc_id: u64,
    pub window_index: u32,
    pub tokens: Vec<u32>,
}

/// The windows of one shard, in `seq_id` order.
#[derive(Debug)]
pub struct ShardWork {
    pub index: u64,
    pub windows: Vec<Window>,
}

/// Tokenises documents in chunks and calls `f(doc_id, tokens)` in order.
fn tokenize_corpus(
    files: &[CorpusFile],
    cfg: &TeacherConfig,
    tok: &LoadedTokenizer,
    mut f: impl FnMut(u64, &[u32]) -> anyhow::Result<bool>,
) -> anyhow::Result<(u64, corpus::SkipCounts)> {
    let mut pending: Vec<String> = Vec::with_capacity(TOKENIZE_CHUNK);
    let mut doc_id = 0u64;
    let mut stop = false;
    let mut flush =
        |pending: &mut Vec<String>, doc_id: &mut u64, stop: &mut bool| -> anyhow::Result<()> {
            if pending.is_empty() || *stop {
                pending.clear();
                return Ok(());
            }
            let encs = tok
                .tokenizer
                .encode_batch(pending.iter().map(|s| s.as_str()).collect::<Vec<_>>(), true)
                .map_err(|e| anyhow::anyhow!("tokenizing failed: {e}"))?;
            for e in encs {
                if !f(*doc_id, e.get_ids())? {
                    *stop = true;
                    break;
                }
                *doc_id += 1;
            }
            pending.clear();
            Ok(())
        };
    let skips = corpus::for_each_document(files, &cfg.text_field, cfg.skip_bad_rows, |_, text| {
        pending.push(text);
        if pending.len() == TOKENIZE_CHUNK {
            flush(&mut pending, &mut doc_id, &mut stop)?;
        }
        Ok(())
    })?;
    flush(&mut pending, &mut doc_id, &mut stop)?;
    Ok((doc_id, skips))
}

/// Pass 1: counts documents, windows and tokens.
fn make_plan(
    files: &[CorpusFile],
    cfg: &TeacherConfig,
    tok: &LoadedTokenizer,
) -> anyhow::Result<Plan> {
    let (mut windows, mut tokens) = (0u64, 0u64);
    let (documents, skips) = tokenize_corpus(files, cfg, tok, |_, ids| {
        windows += ids.len().div_ceil(cfg.seq_len) as u64;
        tokens += ids.len() as u64;
        Ok(true)
    })?;
    if tokens == 0 {
        bail!(
            "the corpus has no text ({} files, {} empty documents, {} bad rows skipped); check --corpus and --text-field `{}`",
            files.len(),
            skips.empty_documents,
            skips.bad_rows,
            cfg.text_field
        );
    }
    Ok(Plan {
        documents,
        sequences: windows,
        tokens,
        shards: windows.div_ceil(cfg.shard_size as u64),
        empty_documents: skips.empty_documents,
        bad_rows_skipped: skips.bad_rows,
        bad_row_examples: skips.examples,
    })
}

/// Pass 2: sends the windows of every shard in `wanted` (ascending) to `tx`.
fn produce_shards(
    files: &[CorpusFile],
    cfg: &TeacherConfig,
    tok: &LoadedTokenizer,
    plan: &Plan,
    wanted: &BTreeSet<u64>,
    tx: SyncSender<ShardWork>,
) -> anyhow::Result<()> {
    let shard_size = cfg.shard_size as u64;
    let last = wanted.iter().next_back().copied();
    let mut seq_id = 0u64;
    let mut current: Option<ShardWork> = None;
    let mut receiver_gone = false;
    tokenize_corpus(files, cfg, tok, |doc_id, ids| {
        for (w, chunk) in ids.chunks(cfg.seq_len).enumerate() {
            let shard = seq_id / shard_size;
            if wanted.contains(&shard) {
                let work = current.get_or_insert_with(|| ShardWork {
                    index: shard,
                    windows: Vec::with_capacity(cfg.shard_size),
                });
                work.windows.push(Window {
                    seq_id,
                    doc_id,
                    window_index: w as u32,
                    tokens: chunk.to_vec(),
                });
                let end_of_shard =
                    (seq_id + 1).is_multiple_of(shard_size) || seq_id + 1 == plan.sequences;
                if end_of_shard && tx.send(current.take().expect("shard in progress")).is_err() {
                    receiver_gone = true;
                    return Ok(false);
                }
            }
            seq_id += 1;
        }
        // Nothing after the last wanted shard is needed.
        Ok(last.is_some_and(|l| seq_id < (l + 1) * shard_size))
    })?;
    if receiver_gone {
        return Ok(());
    }
    let expected_end = last
        .map(|l| ((l + 1) * shard_size).min(plan.sequences))
        .unwrap_or(0);
    if seq_id < expected_end || current.is_some() {
        bail!(
            "the corpus produced {seq_id} windows but the cache plan has {}: the corpus files or the tokenizer changed since the cache was planned",
            plan.sequences
        );
    }
    Ok(())
}

/// Runs the teacher over one shard's windows, batching windows of similar length.
fn compute_shard(
    teacher: &mut dyn TeacherBackend,
    work: &ShardWork,
    cfg: &TeacherConfig,
    pad_id: u32,
) -> anyhow::Result<(ShardRows, u64)> {
    let k = cfg.top_k;
    let mut order: Vec<usize> = (0..work.windows.len()).collect();
    // Longest first, stable in seq_id: deterministic batches with little padding.
    order.sort_by_key(|&i| std::cmp::Reverse(work.windows[i].tokens.len()));
    // Each window's place in the batch outputs: (batch, first position, positions). The
    // rows are then written once, in seq_id order, straight from those outputs.
    let mut place: Vec<Option<(usize, usize, usize)>> = vec![None; work.windows.len()];
    let mut outputs = Vec::with_capacity(work.windows.len().div_ceil(cfg.batch_size));
    let mut computed = 0u64;
    for chunk in order.chunks(cfg.batch_size) {
        let toks: Vec<&[u32]> = chunk
            .iter()
            .map(|&i| work.windows[i].tokens.as_slice())
            .collect();
        let batch = Batch::pad(&toks, cfg.padding_side, pad_id);
        computed += (batch.batch * batch.len) as u64;
        let out = teacher.run(&batch).map_err(|e| match e {
            TeacherError::NonFinite { window, position, token, value } => {
                let w = &work.windows[chunk[window]];
                anyhow::anyhow!(
                    "the teacher produced a non-finite logit ({value}, vocab id {token}) for seq_id {} (document {}, window {}) at position {position}; the model is broken for this input (an fp16 overflow is a common cause): check the export",
                    w.seq_id,
                    w.doc_id,
                    w.window_index
                )
            }
            other => anyhow::Error::new(other),
        })?;
        let mut at = 0usize;
        for (j, &i) in chunk.iter().enumerate() {
            place[i] = Some((outputs.len(), at, batch.lengths[j]));
            at += batch.lengths[j];
        }
        outputs.push(out);
    }
    let positions: usize = work.windows.iter().map(|w| w.tokens.len()).sum();
    let mut rows = ShardRows::with_capacity(k, work.windows.len(), positions);
    for (w, p) in work.windows.iter().zip(place) {
        let (b, at, n) = p.expect("every window computed: this is a bug");
        let out = &outputs[b];
        rows.push(&WindowTopK {
            seq_id: w.seq_id,
            doc_id: w.doc_id,
            window_index: w.window_index,
            input_ids: &w.tokens,
            topk_ids: &out.ids[at * k..(at + n) * k],
            topk_logprobs: &out.logprobs[at * k..(at + n) * k],
            tail_logprob: &out.tail_logprob[at..at + n],
        });
    }
    Ok((rows, computed))
}

/// Workers' environment variables, used when `--worker-index/--num-workers` are absent:
/// Slurm job arrays, then Kubernetes indexed jobs (which need `--num-workers`).
pub fn workers_from_env(
    index: Option<usize>,
    count: Option<usize>,
) -> anyhow::Result<(usize, usize)> {
    let var = |n: &str| std::env::var(n).ok().filter(|s| !s.is_empty());
    let parse = |n: &str, v: String| -> anyhow::Result<usize> {
        v.trim()
            .parse()
            .with_context(|| format!("environment variable {n}={v} is not a number"))
    };
    match (index, count) {
        (Some(i), Some(n)) => Ok((i, n)),
        (None, None) if var("SLURM_ARRAY_TASK_ID").is_some() => {
            let i = parse("SLURM_ARRAY_TASK_ID", var("SLURM_ARRAY_TASK_ID").unwrap())?;
            let n = var("SLURM_ARRAY_TASK_COUNT")
                .context("SLURM_ARRAY_TASK_ID is set but SLURM_ARRAY_TASK_COUNT is not; pass --num-workers N")
                .and_then(|v| parse("SLURM_ARRAY_TASK_COUNT", v))?;
            let min = var("SLURM_ARRAY_TASK_MIN")
                .map(|v| parse("SLURM_ARRAY_TASK_MIN", v))
                .transpose()?
                .unwrap_or(0);
            Ok((
                i.checked_sub(min)
                    .context("SLURM_ARRAY_TASK_ID is below SLURM_ARRAY_TASK_MIN")?,
                n,
            ))
        }
        (None, n) if var("JOB_COMPLETION_INDEX").is_some() => {
            let i = parse("JOB_COMPLETION_INDEX", var("JOB_COMPLETION_INDEX").unwrap())?;
            let n = n.context("JOB_COMPLETION_INDEX is set (Kubernetes indexed job): pass --num-workers N (the job's completions)")?;
            Ok((i, n))
        }
        (None, None) => Ok((0, 1)),
        (Some(_), None) => bail!("--worker-index needs --num-workers"),
        (None, Some(1)) => Ok((0, 1)),
        (None, Some(_)) => bail!(
            "--num-workers needs --worker-index (or SLURM_ARRAY_TASK_ID / JOB_COMPLETION_INDEX in the environment)"
        ),
    }
}

fn prepare_out_dir(out: &Path) -> anyhow::Result<()> {
    if out.exists() && !out.is_dir() {
        bail!(
            "--out {} exists and is not a directory; choose a directory for the cache",
            out.display()
        );
    }
    std::fs::create_dir_all(out.join("shards")).with_context(|| {
        format!(
            "cannot create the cache directory {}; choose a writable --out",
            out.display()
        )
    })?;
    Ok(())
}

/// Runs the teacher stage.
pub fn run(cfg: &TeacherConfig) -> anyhow::Result<RunSummary> {
    cfg.validate()?;
    let started = Instant::now();
    let tok = crate::tokenizer::load(&cfg.tokenizer)?;
    if cfg.top_k > tok.vocab_size {
        bail!(
            "--top-k {} exceeds the vocabulary ({} tokens in {}); choose k ≤ {}",
            cfg.top_k,
            tok.vocab_size,
            cfg.tokenizer.display(),
            tok.vocab_size
        );
    }
    if !cfg.model.is_file() {
        bail!(
            "teacher model {} does not exist; pass --model PATH to an ONNX file",
            cfg.model.display()
        );
    }
    let files = corpus::discover(&cfg.corpus)?;
    prepare_out_dir(&cfg.out)?;
    let _lock = CacheLock::acquire(&cfg.out, cfg.worker_index, cfg.num_workers)?;

    let library = ort_backend::resolve_library(cfg.ort_lib.as_deref())?;
    // The model and tokenizer are hashed (for the manifest) on a second thread while ONNX
    // Runtime loads the model: both read the same file, and the session's set-up is
    // mostly single-threaded.
    let t_session = Instant::now();
    let (opened, hashed) = std::thread::scope(|scope| {
        let hashing = scope.spawn(|| -> anyhow::Result<_> {
            let t = Instant::now();
            let model = sha256_file(&cfg.model)
                .with_context(|| format!("reading {}", cfg.model.display()))?;
            let tok = sha256_file(&cfg.tokenizer)
                .with_context(|| format!("reading {}", cfg.tokenizer.display()))?;
            Ok((model, tok, t.elapsed().as_secs_f64()))
        });
        let opened = ort_backend::OrtTeacher::open(
            &cfg.model,
            ort_backend::OrtOptions {
                library,
                device: cfg.device,
                threads: cfg.threads,
                topk: cfg.topk,
                k: cfg.top_k,
                temperature: cfg.temperature,
                vocab: tok.vocab_size,
            },
        );
        let hashed = hashing
            .join()
            .expect("hashing thread panicked: this is a bug");
        (opened, hashed)
    });
    let mut teacher = opened?;
    let ((model_sha, model_bytes), (tok_sha, _), hash_s) = hashed?;
    let session_s = t_session.elapsed().as_secs_f64();
    let iface = teacher.interface().clone();
    if let Some(v) = iface.logits_vocab {
        if v < tok.vocab_size {
            bail!(
                "model vocab {v} (logits of {}) is smaller than the tokenizer vocab {} ({}): the tokenizer does not belong to this model; pass the teacher's own tokenizer.json",
                cfg.model.display(),
                tok.vocab_size,
                cfg.tokenizer.display()
            );
        }
        if v > tok.vocab_size {
            tracing::info!(
                "model vocab {v} > tokenizer vocab {}: the {} padding ids are dropped, and the distribution is renormalised over the tokenizer's ids",
                tok.vocab_size,
                v - tok.vocab_size
            );
        }
    }
    if cfg.padding_side == PaddingSide::Left && !iface.has_position_ids {
        bail!(
            "--padding-side left needs a model with a `position_ids` input (this one derives positions itself); use --padding-side right"
        );
    }

    let t_plan = Instant::now();
    let mut fresh = Manifest {
        format: crate::cache::manifest::FORMAT_NAME.into(),
        format_version: FORMAT_VERSION,
        logitcache_version: env!("CARGO_PKG_VERSION").into(),
        params: CacheParams {
            top_k: cfg.top_k,
            seq_len: cfg.seq_len,
            temperature: cfg.temperature,
            text_field: cfg.text_field.clone(),
            shard_size: cfg.shard_size,
            skip_bad_rows: cfg.skip_bad_rows,
            logprob_dtype: "float16".into(),
        },
        vocab_size: tok.vocab_size,
        model: ModelInfo {
            path: cfg.model.clone(),
            sha256: model_sha,
            bytes: model_bytes,
            inputs: iface.inputs.clone(),
            outputs: iface.outputs.clone(),
            logits_dtype: if iface.logits_f16 {
                "float16"
            } else {
                "float32"
            }
            .into(),
            logits_vocab: iface.logits_vocab.unwrap_or(tok.vocab_size),
        },
        tokenizer: TokenizerInfo {
            path: cfg.tokenizer.clone(),
            sha256: tok_sha,
            vocab_size: tok.vocab_size,
        },
        corpus: files.clone(),
        plan: Plan {
            documents: 0,
            sequences: 0,
            tokens: 0,
            shards: 0,
            empty_documents: 0,
            bad_rows_skipped: 0,
            bad_row_examples: vec![],
        },
        shards: vec![],
        totals: crate::cache::manifest::Totals {
            shards: 0,
            sequences: 0,
            tokens: 0,
            computed_tokens: 0,
            bytes: 0,
            complete: false,
        },
        checksum: String::new(),
    };

    // Create or check the manifest under the directory-wide lock.
    let existing = {
        let _m = ManifestLock::acquire(&cfg.out)?;
        match Manifest::load(&cfg.out) {
            Ok(m) => {
                if let Some((name, old, new)) = m.identity_difference(&fresh) {
                    bail!(
                        "{} already holds a cache made with a different {name}: cache has {old}, this run has {new}; use another --out, or delete {} to rebuild",
                        cfg.out.display(),
                        cfg.out.display()
                    );
                }
                Some(m)
            }
            Err(crate::cache::manifest::ManifestError::Missing { .. }) => {
                let stray = std::fs::read_dir(cfg.out.join("shards"))?
                    .filter_map(|e| e.ok())
                    .any(|e| e.path().extension().is_some_and(|x| x == "parquet"));
                if stray {
                    bail!(
                        "{} has shard files but no manifest.json; it is not a cache this run can resume: use an empty --out",
                        cfg.out.display()
                    );
                }
                fresh.plan = make_plan(&files, cfg, &tok)?;
                fresh
                    .store(&cfg.out)
                    .with_context(|| format!("writing the manifest in {}", cfg.out.display()))?;
                None
            }
            Err(e) => return Err(e.into()),
        }
    };
    let manifest = existing.unwrap_or(fresh);
    let plan = manifest.plan.clone();

    // Which shards this worker owns and still has to compute.
    let mut done = BTreeSet::new();
    for s in &manifest.shards {
        let p = cfg.out.join(&s.file);
        match sha256_file(&p) {
            Ok((sha, n)) if sha == s.sha256 && n == s.bytes => {
                done.insert(s.index);
            }
            _ => tracing::warn!("shard {} is missing or damaged; computing it again", s.file),
        }
    }
    let owned: Vec<u64> = (0..plan.shards)
        .filter(|s| *s as usize % cfg.num_workers == cfg.worker_index)
        .collect();
    let wanted: BTreeSet<u64> = owned
        .iter()
        .copied()
        .filter(|s| !done.contains(s))
        .collect();
    for &s in &wanted {
        // Temporary files of ours from a killed run.
        let target = cfg.out.join(shard_file_name(s));
        let prefix = format!("{}.tmp-", target.file_name().unwrap().to_string_lossy());
        for e in std::fs::read_dir(cfg.out.join("shards"))?.flatten() {
            if e.file_name().to_string_lossy().starts_with(&prefix) {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    let already = owned.len() as u64 - wanted.len() as u64;
    tracing::info!(
        "start-up: {:.2} s (session {session_s:.2} s, with the model and tokenizer hashed beside it in {hash_s:.2} s; plan and shard check {:.2} s)",
        started.elapsed().as_secs_f64(),
        t_plan.elapsed().as_secs_f64()
    );
    tracing::info!(
        "plan: {} documents, {} windows, {} tokens in {} shards; worker {}/{} owns {}, {} already done",
        plan.documents,
        plan.sequences,
        plan.tokens,
        plan.shards,
        cfg.worker_index,
        cfg.num_workers,
        owned.len(),
        already
    );
    let est_tokens = (plan.tokens * wanted.len() as u64)
        .checked_div(plan.shards)
        .unwrap_or(0);
    let progress = Progress::shards(cfg.progress, est_tokens, plan.shards, already);

    let mut summary = RunSummary {
        shards_written: 0,
        shards_already_done: already,
        shards_total: plan.shards,
        tokens: 0,
        computed_tokens: 0,
        seconds: 0.0,
        tokens_per_s: 0.0,
        complete: false,
    };
    if !wanted.is_empty() {
        let (work_tx, work_rx) = sync_channel::<ShardWork>(2);
        let (write_tx, write_rx) = sync_channel::<(ShardRows, u64, u64, f64)>(2);
        let write_opts = ShardWriteOptions {
            vocab_size: tok.vocab_size,
            tokenizer_sha256: manifest.tokenizer.sha256.clone(),
            zstd_level: cfg.zstd_level,
            row_group_rows: DEFAULT_ROW_GROUP_ROWS,
        };
        let worker_name = format!("{}/{}", cfg.worker_index, cfg.num_workers);
        let result = std::thread::scope(|scope| -> anyhow::Result<()> {
            let producer = scope.spawn(|| {
                crate::util::lower_thread_priority();
                produce_shards(&files, cfg, &tok, &plan, &wanted, work_tx)
            });
            let writer = scope.spawn(|| {
                crate::util::lower_thread_priority();
                write_loop(
                    write_rx,
                    &cfg.out,
                    &write_opts,
                    cfg,
                    &worker_name,
                    cfg.topk.name(cfg.device),
                    &progress,
                )
            });
            let compute = compute_loop(
                &mut teacher,
                work_rx,
                cfg,
                tok.pad_id,
                write_tx,
                &mut summary,
            );
            let produced = producer
                .join()
                .expect("producer thread panicked: this is a bug");
            let written = writer
                .join()
                .expect("writer thread panicked: this is a bug");
            // The first real error wins: a failed writer or producer makes the others stop
            // with a closed-channel error that says less.
            written?;
            produced?;
            compute
        });
        result?;
    }
    progress.finish();
    if let Some((model_s, topk_s)) = teacher.timing() {
        tracing::info!(
            "teacher time: {model_s:.2} s in the model, {topk_s:.2} s in top-k + log-softmax ({:.1}% of the model time; {} kernel)",
            100.0 * topk_s / model_s.max(1e-9),
            topk::Kernel::best().name()
        );
    }
    let final_manifest = Manifest::load(&cfg.out)?;
    summary.complete = final_manifest.totals.complete;
    summary.seconds = started.elapsed().as_secs_f64();
    summary.tokens_per_s = summary.tokens as f64 / summary.seconds.max(1e-9);
    if summary.computed_tokens > 0 {
        tracing::info!(
            "padding: {:.2}% of computed positions ({} computed for {} tokens)",
            100.0 * (summary.computed_tokens - summary.tokens) as f64
                / summary.computed_tokens as f64,
            summary.computed_tokens,
            summary.tokens
        );
    }
    Ok(summary)
}

fn compute_loop(
    teacher: &mut dyn TeacherBackend,
    rx: Receiver<ShardWork>,
    cfg: &TeacherConfig,
    pad_id: u32,
    tx: SyncSender<(ShardRows, u64, u64, f64)>,
    summary: &mut RunSummary,
) -> anyhow::Result<()> {
    for work in rx {
        let t0 = Instant::now();
        let (rows, computed) = compute_shard(teacher, &work, cfg, pad_id)?;
        summary.tokens += rows.positions() as u64;
        summary.computed_tokens += computed;
        summary.shards_written += 1;
        if tx
            .send((rows, work.index, computed, t0.elapsed().as_secs_f64()))
            .is_err()
        {
            break; // the writer failed; its error is reported
        }
    }
    Ok(())
}

fn write_loop(
    rx: Receiver<(ShardRows, u64, u64, f64)>,
    out: &Path,
    opts: &ShardWriteOptions,
    cfg: &TeacherConfig,
    worker: &str,
    topk: &str,
    progress: &Progress,
) -> anyhow::Result<()> {
    for (rows, index, computed, seconds) in rx {
        // The writer runs at a lower priority and may wait for the cores: its share of the
        // shard's time is the CPU it used, not the wall time.
        let cpu0 = crate::util::thread_cpu_seconds();
        let rel = shard_file_name(index);
        let written = write_shard(&out.join(&rel), index, &rows, opts).with_context(|| {
            format!(
                "writing shard {} in {}; check free space and permissions",
                rel,
                out.display()
            )
        })?;
        let entry = ShardEntry {
            index,
            file: rel,
            rows: written.rows,
            tokens: written.tokens,
            computed_tokens: computed,
            bytes: written.bytes,
            sha256: written.sha256,
            worker: worker.to_string(),
            device: cfg.device.to_string(),
            batch_size: cfg.batch_size,
            topk: topk.to_string(),
            seconds: seconds + (crate::util::thread_cpu_seconds() - cpu0),
        };
        let (done, total) = {
            let _m = ManifestLock::acquire(out)?;
            let mut m = Manifest::load(out)?;
            m.shards.retain(|s| s.index != index);
            m.shards.push(entry.clone());
            m.store(out)
                .with_context(|| format!("updating the manifest in {}", out.display()))?;
            (m.shards.len() as u64, m.plan.shards)
        };
        failpoint("manifest-updated");
        progress.shard_done(
            &crate::progress::ShardReport {
                index: entry.index,
                file: &entry.file,
                rows: entry.rows,
                tokens: entry.tokens,
                bytes: entry.bytes,
                seconds: entry.seconds,
            },
            done,
            total,
        );
    }
    Ok(())
}
