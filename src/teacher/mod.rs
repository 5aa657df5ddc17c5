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
pub mod head;
pub mod host_topk;
pub mod ort_backend;
pub mod sample;
pub mod topk;

use crate::cache::lock::{CacheLock, ManifestLock};
use crate::cache::manifest::{
    CacheParams, Manifest, ModelInfo, ShardEntry, ShardStats, TokenizerInfo, shard_file_name,
};
use crate::cache::rows::{LogprobDtype, ShardRows, StorageError, WindowTopK};
use crate::cache::schema::{CacheMode, Layout, Sampling};
use crate::cache::writer::{
    DEFAULT_ROW_GROUP_ROWS, DEFAULT_ZSTD_LEVEL, ShardFile, ShardWriteOptions, WRITE_ROWS,
};
use crate::progress::{Progress, ProgressMode};
use crate::util::{failpoint, sha256_file};
use crate::windows::{ShardWork, WindowSpec, batch_order, make_plan, produce_shards};
use anyhow::{Context, bail};
use backend::{Batch, Device, PaddingSide, TeacherBackend, TeacherError, TopKMode};
use host_topk::SampleOptions;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::time::Instant;

pub const DEFAULT_TOP_K: usize = 64;
pub const DEFAULT_SEQ_LEN: usize = 512;
pub const DEFAULT_BATCH_SIZE: usize = 8;
/// What the teacher's logits-sized tensors of one batch (batch × tokens × V × 4 bytes each)
/// may take together when `--max-batch-tokens` is not given, and likewise the attention
/// scores of a graph that computes attention unfused: with a plain head (one such tensor),
/// 512 MiB keeps the default batch of 8 windows of 512 tokens at V = 32000, and 2 windows of
/// 512 tokens (or one of 2048) at V = 152064.
pub const LOGITS_BUDGET_BYTES: usize = 512 << 20;

/// The default token budget of a batch for a model whose logits have `vocab` entries per
/// position and whose graph holds `live` logits-sized tensors at once
/// ([`crate::onnx::logits_chain::live_logits_tensors`]; 1 for a plain head), and whose
/// unfused attention scores take `attention_per_token` bytes per token of a `seq_len` window
/// ([`crate::onnx::attention::AttentionScores::bytes_per_window`] / `seq_len`; 0 without
/// such attention, `u64::MAX` when their size is unknown): what keeps the logits, and
/// separately the scores (a layer's scores are gone before the head runs), within
/// [`LOGITS_BUDGET_BYTES`], and at least one window.
pub fn default_max_batch_tokens(
    vocab: usize,
    seq_len: usize,
    live: usize,
    attention_per_token: u64,
) -> usize {
    let logits = (4 * vocab.max(1) * live.max(1)) as u64;
    let per_token = logits.max(attention_per_token);
    ((LOGITS_BUDGET_BYTES as u64 / per_token) as usize).max(seq_len)
}
pub const DEFAULT_TEMPERATURE: f32 = 1.0;
pub const DEFAULT_TEXT_FIELD: &str = "text";
/// What a cache stores per position.
pub const DEFAULT_MODE: CacheMode = CacheMode::Topk;
/// Draws per position of a `sample` cache: ~12 distinct ids per position on large trained
/// teachers ("Sparse Logit Sampling", N = 50).
pub const DEFAULT_SAMPLES: usize = 50;
/// Temperature of the sampling proposal (1: draw from the teacher's own distribution).
pub const DEFAULT_PROPOSAL_TEMPERATURE: f32 = 1.0;
/// Most draws per position (counts are stored in 16 bits at most).
pub const MAX_SAMPLES: usize = u16::MAX as usize;
/// Windows per shard: at seq_len 512 and k 64 about 100 MB of Parquet, and the unit of
/// resumption and of work split across workers.
pub const DEFAULT_SHARD_SIZE: usize = 1024;
/// The smallest teacher temperature. The logits are divided by it: at 1e-30 they overflow
/// float32 (−inf and NaN log-probs, as a run once wrote), while at 1e-3 logits up to ~3e35
/// stay finite; no temperature this low is used for distillation (the distribution is
/// already one-hot).
pub const MIN_TEMPERATURE: f32 = 1e-3;
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
    /// Most tokens (windows × their padded length) per teacher batch (`--max-batch-tokens`);
    /// `None` until [`run`] sets it from the model's vocabulary ([`default_max_batch_tokens`]).
    pub max_batch_tokens: Option<usize>,
    pub temperature: f32,
    pub text_field: String,
    pub skip_bad_rows: bool,
    pub device: Device,
    pub threads: usize,
    pub worker_index: usize,
    pub num_workers: usize,
    pub shard_size: usize,
    pub padding_side: PaddingSide,
    /// Where top-k runs (`--topk-on`).
    pub topk_on: TopKMode,
    /// `topk`, `sample` or `hybrid`.
    pub mode: CacheMode,
    /// Draws per position (`sample`/`hybrid`; 0 in `topk` mode).
    pub samples: usize,
    /// τ of the proposal q ∝ p^(1/τ).
    pub proposal_temperature: f32,
    /// Where the draws fall on the cumulative sum (`--sampling`).
    pub sampling_scheme: Sampling,
    /// Store the teacher's log-prob of each sampled id.
    pub store_logprobs: bool,
    /// Seed of the draws.
    pub seed: u64,
    /// How the top-k log-probs are stored (`--logprob-dtype`).
    pub logprob_dtype: LogprobDtype,
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
            max_batch_tokens: None,
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
            topk_on: TopKMode::Auto,
            mode: DEFAULT_MODE,
            samples: 0,
            proposal_temperature: DEFAULT_PROPOSAL_TEMPERATURE,
            sampling_scheme: Sampling::Iid,
            store_logprobs: false,
            seed: 0,
            logprob_dtype: LogprobDtype::Float16,
            ort_lib: None,
            progress: ProgressMode::Bar,
            zstd_level: DEFAULT_ZSTD_LEVEL,
        }
    }
}

impl TeacherConfig {
    /// How this run cuts the corpus into windows.
    pub fn window_spec(&self) -> WindowSpec {
        WindowSpec {
            seq_len: self.seq_len,
            text_field: self.text_field.clone(),
            skip_bad_rows: self.skip_bad_rows,
        }
    }

    /// The shard columns of this run.
    pub fn layout(&self) -> Layout {
        Layout::of(self.mode, self.top_k, self.samples, self.store_logprobs)
            .with_logprobs(self.logprob_dtype)
            .with_proposal(self.proposal_temperature)
    }

    /// The draws of a `sample`/`hybrid` run (`None` in `topk` mode).
    pub fn sampling(&self) -> Option<SampleOptions> {
        (self.mode != CacheMode::Topk).then_some(SampleOptions {
            mode: self.mode,
            samples: self.samples,
            seed: self.seed,
            store_logprobs: self.store_logprobs,
            proposal_temperature: self.proposal_temperature,
            scheme: self.sampling_scheme,
        })
    }

    /// Checks the values that need no file access.
    pub fn validate(&self) -> anyhow::Result<()> {
        if self.mode == CacheMode::Sample && self.logprob_dtype == LogprobDtype::Q8 {
            bail!(
                "--logprob-dtype q8 (pipelines: [cache] logprob_dtype) needs --mode topk or --mode hybrid: it encodes the top-k log-probs, and a sample cache stores counts (its --store-logprobs values stay float16)"
            );
        }
        if self.mode != CacheMode::Sample && self.top_k == 0 {
            bail!("--top-k must be at least 1 (got 0); 64 is a good default");
        }
        match self.mode {
            CacheMode::Topk => {
                if self.samples != 0 {
                    bail!(
                        "--samples {} needs --mode sample or --mode hybrid (this run is --mode topk, which stores no draws)",
                        self.samples
                    );
                }
                if self.store_logprobs {
                    bail!(
                        "--store-logprobs needs --mode sample or --mode hybrid (a top-k cache stores its log-probs anyway)"
                    );
                }
                if self.seed != 0 {
                    bail!(
                        "--cache-seed needs --mode sample or --mode hybrid (a top-k cache draws nothing)"
                    );
                }
                if self.proposal_temperature != DEFAULT_PROPOSAL_TEMPERATURE {
                    bail!(
                        "--proposal-temperature needs --mode sample or --mode hybrid (a top-k cache draws nothing)"
                    );
                }
                if self.sampling_scheme != Sampling::Iid {
                    bail!(
                        "--sampling {} needs --mode sample or --mode hybrid (a top-k cache draws nothing)",
                        self.sampling_scheme
                    );
                }
            }
            CacheMode::Sample | CacheMode::Hybrid => {
                if self.samples == 0 {
                    bail!(
                        "--samples must be at least 1 with --mode {} (got 0); {DEFAULT_SAMPLES} is a good default",
                        self.mode
                    );
                }
                if self.samples > MAX_SAMPLES {
                    bail!(
                        "--samples {} is above the most a cache stores per position ({MAX_SAMPLES})",
                        self.samples
                    );
                }
                if !(self.proposal_temperature.is_finite() && self.proposal_temperature > 0.0) {
                    bail!(
                        "--proposal-temperature must be a finite number > 0 (got {}); 1 draws from the teacher's own distribution",
                        self.proposal_temperature
                    );
                }
            }
        }
        if self.seq_len < 2 {
            bail!(
                "--seq-len must be at least 2 (got {}): a window needs a token followed by another to teach anything",
                self.seq_len
            );
        }
        if !(self.temperature.is_finite() && self.temperature >= MIN_TEMPERATURE) {
            bail!(
                "--temperature must be a finite number ≥ {MIN_TEMPERATURE} (got {}): the logits are divided by it, and tiny values overflow float32 (1e-30 wrote −inf log-probs) while any value this low already gives a one-hot distribution; 1.0 keeps the teacher's distribution",
                self.temperature
            );
        }
        if self.batch_size == 0 {
            bail!("--batch-size must be at least 1");
        }
        if let Some(m) = self.max_batch_tokens
            && m < self.seq_len
        {
            bail!(
                "--max-batch-tokens {m} is below --seq-len {}: a window of {} tokens is never split across batches, so it could not fit; pass at least {} (or a smaller --seq-len)",
                self.seq_len,
                self.seq_len,
                self.seq_len
            );
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

/// Bytes per token of `scores` (as [`default_max_batch_tokens`] takes them), saying what
/// the planner found: `u64::MAX` (one window per batch) when the graph does not tell the
/// number of heads.
fn attention_budget(
    scores: Option<&crate::onnx::attention::AttentionScores>,
    seq_len: usize,
) -> u64 {
    let Some(s) = scores else { return 0 };
    let chain = s.ops.join(" → ");
    let Some(window) = s.bytes_per_window(seq_len) else {
        tracing::warn!(
            "the model computes attention unfused ({} layers: {chain}) but neither its graph's shapes nor a config.json beside it give the number of heads, so the size of its [windows, heads, len, len] scores is unknown: one window per batch (pass --max-batch-tokens to batch more)",
            s.sites
        );
        return u64::MAX;
    };
    let mib = window as f64 / (1u64 << 20) as f64;
    tracing::info!(
        "the model computes attention unfused ({} layers: {chain}; {} heads from {}): {} score-sized tensors of {}-byte values, {mib:.0} MiB per {seq_len}-token window, counted in the batch budget",
        s.sites,
        s.heads.unwrap_or(0),
        s.heads_from,
        s.ops.len(),
        s.elem_bytes
    );
    if window > 2 * LOGITS_BUDGET_BYTES as u64 {
        tracing::warn!(
            "one {seq_len}-token window's attention scores take {mib:.0} MiB at once (unfused attention: [windows, heads, len, len] per layer): a shorter --seq-len, or an export with fused attention, needs less memory"
        );
    }
    window / seq_len.max(1) as u64
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

/// Positions batched together at most: a shard is computed in groups of about this many
/// positions' worth of consecutive windows (`WINDOW_GROUP_POSITIONS / seq_len`, rounded up to
/// a multiple of the writer's `WRITE_ROWS`, batched by length within a group), so only one
/// group's teacher outputs and rows are held at once (at seq_len 2048 and k = 64, a whole
/// shard's outputs were ~1 GB beside its rows). 256 windows of 512 tokens, 64 of 2048.
const WINDOW_GROUP_POSITIONS: usize = 256 * 512;

/// What a shard's computation adds up to, sent with its last part.
struct ShardDone {
    /// Positions the teacher computed, padding included.
    computed: u64,
    seconds: f64,
    stats: ShardStats,
}

/// Runs the teacher over one shard's windows, batching windows of similar length, and hands
/// each group's rows to `emit` as soon as they are made (the last part with the shard's
/// totals), so no more than one group's rows exist here. `emit` returns false when the
/// writer is gone (its error is reported); then this stops and returns `Ok(false)`.
fn compute_shard(
    teacher: &mut dyn TeacherBackend,
    work: &ShardWork,
    cfg: &TeacherConfig,
    pad_id: u32,
    emit: &mut dyn FnMut(ShardRows, Option<ShardDone>) -> bool,
) -> anyhow::Result<bool> {
    let t0 = Instant::now();
    let layout = cfg.layout();
    let k = layout.k;
    // What the float16 or q8 storage rounds away, from what `push` stored.
    let mut error = StorageError::default();
    let mut computed = 0u64;
    let (mut mass, mut entropy, mut entropy_n) = (0f64, 0f64, 0u64);
    let (mut positions, mut sample_ids) = (0usize, 0usize);
    let mut blocked = 0f64;
    let max_tokens = cfg.max_batch_tokens.unwrap_or(usize::MAX);
    // Parts of whole multiples of WRITE_ROWS windows give the same bytes as one write of the
    // shard (the writer's row groups and pages do not depend on where such a part ends).
    // Rounding to whole row groups instead held 128 windows at seq_len 2048.
    let group_len = (WINDOW_GROUP_POSITIONS / cfg.seq_len.max(1))
        .max(cfg.batch_size)
        .next_multiple_of(WRITE_ROWS);
    let groups = work.windows.len().div_ceil(group_len);
    if groups == 0 {
        // A shard without windows (the plan makes none): one empty part, so it is written.
        let done = ShardDone {
            computed: 0,
            seconds: 0.0,
            stats: ShardStats::default(),
        };
        return Ok(emit(ShardRows::with_layout(layout), Some(done)));
    }
    for (g, group) in work.windows.chunks(group_len).enumerate() {
        let group_positions: usize = group.iter().map(|w| w.tokens.len()).sum();
        let mut rows = ShardRows::with_capacity(layout, group.len(), group_positions);
        let lengths: Vec<usize> = group.iter().map(|w| w.tokens.len()).collect();
        // Each window's place in the batch outputs: (batch, first position, positions).
        // The group's rows are then written once, in seq_id order, from those outputs.
        let mut place: Vec<Option<(usize, usize, usize)>> = vec![None; group.len()];
        let mut outputs = Vec::with_capacity(group.len().div_ceil(cfg.batch_size));
        for chunk in &batch_order(&lengths, cfg.batch_size, max_tokens) {
            let toks: Vec<&[u32]> = chunk.iter().map(|&i| group[i].tokens.as_slice()).collect();
            let mut batch = Batch::pad(&toks, cfg.padding_side, pad_id);
            batch.seq_ids = chunk.iter().map(|&i| group[i].seq_id).collect();
            computed += (batch.batch * batch.len) as u64;
            let out = teacher.run(&batch).map_err(|e| match e {
                TeacherError::NonFinite { window, position, token, value } => {
                    let w = &group[chunk[window]];
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
        // Where each position's draws start in its batch's sample outputs.
        let sample_starts: Vec<Vec<usize>> = outputs
            .iter()
            .map(|o| {
                let mut at = 0usize;
                let mut v = Vec::with_capacity(o.sample_lens.len() + 1);
                v.push(0);
                for &c in &o.sample_lens {
                    at += c as usize;
                    v.push(at);
                }
                v
            })
            .collect();
        for (w, p) in group.iter().zip(place) {
            let (b, at, n) = p.unwrap_or_else(|| {
                panic!(
                    "window {} of group {g} not computed: this is a bug",
                    w.seq_id
                )
            });
            let out = &outputs[b];
            let mut window = WindowTopK {
                seq_id: w.seq_id,
                doc_id: w.doc_id,
                window_index: w.window_index,
                input_ids: &w.tokens,
                ..Default::default()
            };
            if layout.has_topk() {
                window.topk_ids = &out.ids[at * k..(at + n) * k];
                window.topk_logprobs = &out.logprobs[at * k..(at + n) * k];
                window.tail_logprob = &out.tail_logprob[at..at + n];
            }
            if layout.has_samples() {
                let (s, e) = (sample_starts[b][at], sample_starts[b][at + n]);
                window.sample_lens = &out.sample_lens[at..at + n];
                window.sample_ids = &out.sample_ids[s..e];
                window.sample_counts = &out.sample_counts[s..e];
                if layout.sample_logprobs {
                    window.sample_logprobs = &out.sample_logprobs[s..e];
                }
                if layout.sample_log_weights {
                    window.sample_log_weights = &out.sample_log_weights[s..e];
                }
            }
            let (topk_from, sample_from) = (rows.topk_logprobs.len(), rows.sample_logprobs.len());
            rows.push(&window);
            error = error.max(rows.storage_error(
                topk_from,
                window.topk_logprobs,
                sample_from,
                window.sample_logprobs,
            ));
        }
        // Measured from the exact f32 outputs: the top-k's mass and the entropy (at the
        // positions where it was measured, one in 16; NaN elsewhere).
        for o in &outputs {
            mass += o.logprobs.iter().map(|&v| (v as f64).exp()).sum::<f64>();
            for h in o.entropy.iter().filter(|h| !h.is_nan()) {
                entropy += *h as f64;
                entropy_n += 1;
            }
        }
        drop(outputs);
        positions += rows.positions();
        sample_ids += rows.sample_ids.len();
        let done = (g + 1 == groups).then(|| {
            let n = positions.max(1) as f64;
            ShardDone {
                computed,
                // The teacher's time: not the waits for the writer to take a part.
                seconds: t0.elapsed().as_secs_f64() - blocked,
                stats: ShardStats {
                    max_logprob_error: error.logprob,
                    max_prob_error: Some(error.prob),
                    mean_topk_mass: layout.has_topk().then(|| mass / n),
                    mean_distinct_ids: layout.has_samples().then(|| sample_ids as f64 / n),
                    mean_entropy: (entropy_n > 0).then(|| entropy / entropy_n as f64),
                },
            }
        });
        let t = Instant::now();
        let sent = emit(rows, done);
        blocked += t.elapsed().as_secs_f64();
        if !sent {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Part of a shard on its way to the writer: the next windows' rows, in `seq_id` order;
/// the last part carries the shard's totals.
struct Computed {
    index: u64,
    rows: ShardRows,
    done: Option<ShardDone>,
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

/// Runs the teacher stage.
pub fn run(cfg: &TeacherConfig) -> anyhow::Result<RunSummary> {
    cfg.validate()?;
    let started = Instant::now();
    let tok = crate::tokenizer::load(&cfg.tokenizer)?;
    if cfg.mode != CacheMode::Sample && cfg.top_k > tok.vocab_size {
        bail!(
            "--top-k {} exceeds the vocabulary ({} tokens in {}); choose k ≤ {}",
            cfg.top_k,
            tok.vocab_size,
            cfg.tokenizer.display(),
            tok.vocab_size
        );
    }
    if cfg.mode == CacheMode::Hybrid && cfg.top_k >= tok.vocab_size {
        bail!(
            "--top-k {} with --mode hybrid leaves no tail to sample (the vocabulary of {} has {} tokens); choose k < {}, or --mode topk to store the whole distribution",
            cfg.top_k,
            cfg.tokenizer.display(),
            tok.vocab_size,
            tok.vocab_size
        );
    }
    if cfg.model.is_dir() {
        let inside: Vec<String> = std::fs::read_dir(&cfg.model)
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.ends_with(".onnx"))
                    .collect()
            })
            .unwrap_or_default();
        bail!(
            "teacher model {} is a directory; pass --model PATH to the .onnx file ({})",
            cfg.model.display(),
            if inside.is_empty() {
                "it holds none: export one with `optimum-cli export onnx` or `logitcache export-onnx`".to_string()
            } else {
                format!("it holds {}", inside.join(", "))
            }
        );
    }
    if !cfg.model.is_file() {
        bail!(
            "teacher model {} does not exist; pass --model PATH to an ONNX file",
            cfg.model.display()
        );
    }
    // External data files (weights beside the .onnx) are checked before anything is
    // written, and hashed into the manifest with the graph file. A file that does not
    // decode is left to ONNX Runtime, whose error says more.
    let external = match crate::onnx::external::references(&cfg.model) {
        Err(crate::onnx::external::ExternalError::Decode { .. }) => Vec::new(),
        other => other?,
    };
    let files = crate::corpus::discover(&cfg.corpus)?;
    crate::cache::dir::prepare(&cfg.out)?;
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
            let external = crate::onnx::external::hash_files(&cfg.model, &external)?;
            let tok = sha256_file(&cfg.tokenizer)
                .with_context(|| format!("reading {}", cfg.tokenizer.display()))?;
            Ok(((model, external), tok, t.elapsed().as_secs_f64()))
        });
        let opened = ort_backend::OrtTeacher::open(
            &cfg.model,
            ort_backend::OrtOptions {
                library,
                device: cfg.device,
                threads: cfg.threads,
                topk_on: cfg.topk_on,
                k: cfg.layout().k,
                temperature: cfg.temperature,
                vocab: tok.vocab_size,
                sampling: cfg.sampling(),
            },
        );
        let hashed = hashing
            .join()
            .expect("hashing thread panicked: this is a bug");
        (opened, hashed)
    });
    let mut teacher = opened?;
    let (((model_sha, model_bytes), external_data), (tok_sha, _), hash_s) = hashed?;
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
    // The batches' token budget, from the model's own vocabulary and the logits-sized
    // tensors its head holds at once, unless given.
    let logits_vocab = iface.logits_vocab.unwrap_or(tok.vocab_size);
    let budget = match cfg.max_batch_tokens {
        Some(m) => m,
        None => {
            // One decode of the graph's structure (weights skipped) for both walks.
            let structure = crate::onnx::structure::ModelStructure::load(&cfg.model)?;
            let chain = crate::onnx::logits_chain::logits_chain(&structure);
            let live = crate::onnx::logits_chain::live_logits_tensors(&chain);
            if live > 1 {
                tracing::info!(
                    "the model's head makes {} logits-sized tensors ({}), {live} of them live at once: the batch budget is divided by {live}",
                    chain.len(),
                    chain.join(" → ")
                );
            }
            let attention = crate::onnx::attention::attention_scores(&structure);
            default_max_batch_tokens(
                logits_vocab,
                cfg.seq_len,
                live,
                attention_budget(attention.as_ref(), cfg.seq_len),
            )
        }
    };
    let resolved = TeacherConfig {
        max_batch_tokens: Some(budget),
        ..cfg.clone()
    };
    let cfg = &resolved;
    let windows_per_batch = (budget / cfg.seq_len).max(1);
    if windows_per_batch < cfg.batch_size {
        tracing::info!(
            "batches of at most {budget} tokens (--max-batch-tokens; {:.0} MiB of logits at vocab {logits_vocab}): {} window(s) of {} tokens per batch, not --batch-size {}",
            (budget * 4 * logits_vocab) as f64 / (1u64 << 20) as f64,
            windows_per_batch,
            cfg.seq_len,
            cfg.batch_size
        );
    }
    if cfg.padding_side == PaddingSide::Left && !iface.has_position_ids {
        bail!(
            "--padding-side left needs a model with a `position_ids` input (this one derives positions itself); use --padding-side right"
        );
    }

    let t_plan = Instant::now();
    let mut fresh = Manifest::new(
        CacheParams {
            top_k: cfg.layout().k,
            seq_len: cfg.seq_len,
            temperature: cfg.temperature,
            text_field: cfg.text_field.clone(),
            shard_size: cfg.shard_size,
            skip_bad_rows: cfg.skip_bad_rows,
            logprob_dtype: cfg.logprob_dtype,
            mode: cfg.mode,
            samples: cfg.samples,
            proposal_temperature: cfg.proposal_temperature,
            sampling: cfg.sampling_scheme,
            store_logprobs: cfg.store_logprobs,
            seed: cfg.seed,
        },
        // Paths are recorded absolute, so they resolve from wherever the cache is read.
        ModelInfo {
            path: absolute(&cfg.model),
            sha256: model_sha,
            bytes: model_bytes,
            inputs: iface.inputs.clone(),
            outputs: iface.outputs.clone(),
            logits_dtype: iface.logits.name().into(),
            logits_vocab: iface.logits_vocab.unwrap_or(tok.vocab_size),
            external_data,
        },
        TokenizerInfo {
            path: absolute(&cfg.tokenizer),
            sha256: tok_sha,
            vocab_size: tok.vocab_size,
        },
        files
            .iter()
            .map(|f| crate::corpus::CorpusFile {
                path: absolute(&f.path),
                ..f.clone()
            })
            .collect(),
    );

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
                crate::cache::dir::refuse_stray_shards(&cfg.out)?;
                fresh.plan = make_plan(&files, &cfg.window_spec(), cfg.shard_size, &tok)?;
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
    if plan.bad_rows_skipped > 0 {
        tracing::warn!(
            "--skip-bad-rows: skipped {} bad corpus rows (listed by `logitcache inspect`); the first: {}",
            plan.bad_rows_skipped,
            plan.bad_row_examples
                .iter()
                .take(3)
                .cloned()
                .collect::<Vec<_>>()
                .join("; ")
        );
    }

    // Which shards this worker owns and still has to compute.
    let done = crate::cache::dir::finished_shards(&cfg.out, &manifest);
    let owned: Vec<u64> = (0..plan.shards)
        .filter(|s| *s as usize % cfg.num_workers == cfg.worker_index)
        .collect();
    let wanted: BTreeSet<u64> = owned
        .iter()
        .copied()
        .filter(|s| !done.contains(s))
        .collect();
    for &s in &wanted {
        crate::cache::dir::remove_temporaries(&cfg.out, s)?;
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
        // At most one computed part (a group of windows' rows, not a shard's) waits for the
        // writer: the teacher computes the next group while the writer writes one, and
        // blocks rather than queue more.
        let (write_tx, write_rx) = sync_channel::<Computed>(0);
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
                produce_shards(
                    &files,
                    &cfg.window_spec(),
                    cfg.shard_size,
                    &tok,
                    &plan,
                    &wanted,
                    work_tx,
                )
            });
            let writer = scope.spawn(|| {
                crate::util::lower_thread_priority();
                write_loop(
                    write_rx,
                    &cfg.out,
                    &write_opts,
                    cfg,
                    &worker_name,
                    cfg.topk_on.name(cfg.device),
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
    tx: SyncSender<Computed>,
    summary: &mut RunSummary,
) -> anyhow::Result<()> {
    for work in rx {
        let index = work.index;
        let mut send = |rows: ShardRows, done: Option<ShardDone>| {
            summary.tokens += rows.positions() as u64;
            if let Some(d) = &done {
                summary.computed_tokens += d.computed;
                summary.shards_written += 1;
            }
            tx.send(Computed { index, rows, done }).is_ok()
        };
        if !compute_shard(teacher, &work, cfg, pad_id, &mut send)? {
            break; // the writer failed; its error is reported
        }
    }
    Ok(())
}

fn write_loop(
    rx: Receiver<Computed>,
    out: &Path,
    opts: &ShardWriteOptions,
    cfg: &TeacherConfig,
    worker: &str,
    topk: &str,
    progress: &Progress,
) -> anyhow::Result<()> {
    // The shard being written, with the CPU seconds its parts took here. Dropped unfinished
    // (the teacher failed mid-shard and closed the channel), it removes its temporary file.
    let mut open: Option<(ShardFile, f64)> = None;
    for Computed { index, rows, done } in rx {
        // The writer runs at a lower priority and may wait for the cores: its share of the
        // shard's time is the CPU it used, not the wall time.
        let cpu0 = crate::util::thread_cpu_seconds();
        let rel = shard_file_name(index);
        let context = || {
            format!(
                "writing shard {} in {}; check free space and permissions",
                rel,
                out.display()
            )
        };
        let (mut file, cpu) = match open.take() {
            Some(f) => f,
            None => (
                ShardFile::create(&out.join(&rel), index, &rows.layout, opts)
                    .with_context(context)?,
                0.0,
            ),
        };
        file.write(rows).with_context(context)?;
        let Some(ShardDone {
            computed,
            seconds,
            stats,
        }) = done
        else {
            open = Some((file, cpu + (crate::util::thread_cpu_seconds() - cpu0)));
            continue;
        };
        let written = file.finish().with_context(context)?;
        let cpu = cpu + (crate::util::thread_cpu_seconds() - cpu0);
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
            max_batch_tokens: cfg.max_batch_tokens,
            topk: topk.to_string(),
            seconds: seconds + cpu,
            stats: Some(stats),
        };
        let (done, total) = {
            let _m = ManifestLock::acquire(out)?;
            let mut m = Manifest::load(out)?;
            m.shards.retain(|s| s.index != index);
            // Shards written now are format 2 (PLAIN float16, stats): a format-1 cache
            // resumed by this version becomes a format-2 one (which still reads its old shards).
            m.format_version = crate::cache::schema::FORMAT_VERSION;
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

/// `p` made absolute against the working directory (unchanged if that fails).
fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}
