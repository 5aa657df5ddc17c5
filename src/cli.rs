//! Command-line flags (clap derive; the doc comments are the `--help` text) and their
//! translation into validated configs.

use crate::cache::{inspect, verify};
use crate::device::parse_train_device;
use crate::loss::{self, KdLoss, LossConfig};
use crate::onnx::{ToyLmSpec, toy_lm};
use crate::progress::ProgressMode;
use crate::student::{self, config::TrainConfig};
use crate::teacher::backend::{Device, PaddingSide, TopKMode};
use crate::teacher::{self, TeacherConfig};
use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use std::io::Write;
use std::path::PathBuf;

#[derive(Debug, Parser)]
#[command(
    name = "logitcache",
    version,
    about = "Offline knowledge distillation: compute a teacher's top-k next-token distributions once, cache them in Parquet, reuse them for every student."
)]
pub struct Cli {
    /// Only print warnings and errors (same as RUST_LOG=warn).
    #[arg(long, short, global = true)]
    pub quiet: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run an ONNX teacher over a corpus and write its top-k distributions to a cache.
    Teacher(TeacherArgs),
    /// Check every shard of a cache (sha256, schema, counts); exit 0 only if all is well.
    Verify(VerifyArgs),
    /// Summarise a cache, or print one position's top-k as text.
    Inspect(InspectArgs),
    /// Train one or more students from a cache (one run directory per student).
    Train(TrainArgs),
    /// Evaluate a trained student on a cache (CE, perplexity, KL to the teacher, top-1
    /// agreement) or on a corpus (CE, perplexity).
    Eval(EvalArgs),
    /// Export a trained student as an ONNX model with the teacher interface (input_ids,
    /// attention_mask -> logits), so it can be a teacher itself.
    ExportOnnx(ExportOnnxArgs),
    /// Run a pipeline file end to end: tokenizer, teachers (pretrained and exported when
    /// needed), one cache per teacher (or per `[[cache_variant]]`), every student from every
    /// cache (with each `[[recipe]]` and `[train] seeds` entry) plus CE baselines, results,
    /// the law fit and report.md (with a cache-fidelity table when caches, recipes or seeds
    /// are compared). Finished steps are skipped; rerun after an interruption to continue.
    Run(RunArgs),
    /// Fit the law of capacity gap to results (results.csv or results.json from `run`):
    /// the best teacher per student size and a linear fit of optimal teacher vs student params.
    /// Results of a pipeline with cache variants or recipes are fitted on the first of each;
    /// a cell trained with several seeds counts as the mean over them.
    Law(LawArgs),
    /// Train a byte-level BPE tokenizer.json on a corpus (for demos and small experiments).
    TrainTokenizer(TrainTokenizerArgs),
    /// Write a tiny random ONNX causal LM with the teacher interface (for demos and tests).
    ToyTeacher(ToyTeacherArgs),
}

#[derive(Debug, Args)]
pub struct TeacherArgs {
    /// The teacher: an ONNX export with the Hugging Face Optimum text-generation interface
    /// (input_ids, attention_mask[, position_ids][, past_key_values.*] -> logits).
    #[arg(long)]
    pub model: PathBuf,
    /// The teacher's Hugging Face tokenizer.json.
    #[arg(long)]
    pub tokenizer: PathBuf,
    /// Corpus files or directories: .jsonl (text in --text-field), .parquet (a string column
    /// named --text-field) and .txt (one document per file); .jsonl and .txt may be compressed
    /// (.jsonl.gz, .jsonl.zst). Directories are searched recursively in sorted order; the files
    /// they hold that are not corpus files are listed in a warning. A file given twice is read
    /// once.
    #[arg(long, num_args = 1.., required = true)]
    pub corpus: Vec<PathBuf>,
    /// The cache directory (created if needed; an existing cache with the same parameters
    /// is resumed).
    #[arg(long)]
    pub out: PathBuf,
    /// Number of most likely next tokens stored per position (`topk` and `hybrid` modes).
    #[arg(long, default_value_t = teacher::DEFAULT_TOP_K)]
    pub top_k: usize,
    /// What the cache stores per position: topk (the top-k log-probs and the exact tail
    /// mass), sample (N draws with replacement from the teacher's distribution, stored as
    /// distinct ids and counts: an unbiased target) or hybrid (the exact top-k and tail mass
    /// plus N draws from the tail).
    #[arg(long, value_enum, default_value_t = teacher::DEFAULT_MODE)]
    pub mode: crate::cache::schema::CacheMode,
    /// Draws per position for --mode sample / hybrid (default 50).
    #[arg(long)]
    pub samples: Option<usize>,
    /// Temperature τ of the sampling proposal q ∝ p^(1/τ) (default 1: the teacher's own
    /// distribution). Other values store each draw's importance weight ln p/q
    /// (`sample_log_weights`), which keeps the estimate unbiased; τ > 1 is flatter and
    /// reaches more of the tail. On the host and in the device head alike.
    #[arg(long, allow_negative_numbers = true)]
    pub proposal_temperature: Option<f32>,
    /// Where the N draws fall on the distribution's cumulative sum: `iid` (N independent
    /// uniforms: draws with replacement) or `systematic` (one uniform u and the points
    /// (u + i) / N: each id's count is ⌊N·p⌋ or ⌈N·p⌉, unbiased like iid with far less
    /// variance). `sample` and `hybrid` modes; recorded in the manifest (`params.sampling`).
    #[arg(long, value_enum, default_value_t = crate::cache::schema::Sampling::Iid)]
    pub sampling: crate::cache::schema::Sampling,
    /// Also store the teacher's exact log-prob of each sampled id (`sample_logprobs`).
    #[arg(long)]
    pub store_logprobs: bool,
    /// How the top-k log-probs are stored: float16 (`topk_logprobs`) or q8 (an 8-bit code
    /// per entry on a per-position quadratic scale, finest at the top: ~0.72x the bytes of a
    /// float16 cache at k = 64, with the largest log-prob and probability errors measured
    /// and recorded in the manifest). `topk` and `hybrid` modes; see schemas/README.md for
    /// the decoding recipe.
    #[arg(long, value_enum, default_value_t = crate::cache::schema::LogprobDtype::Float16)]
    pub logprob_dtype: crate::cache::schema::LogprobDtype,
    /// Seed of the draws (--mode sample / hybrid); with the seq_id and position it fixes
    /// every draw, so resumed runs and many workers write the same cache.
    #[arg(long)]
    pub cache_seed: Option<u64>,
    /// Longest window in tokens; documents are cut into windows of at most this length and
    /// no window mixes two documents.
    #[arg(long, default_value_t = teacher::DEFAULT_SEQ_LEN)]
    pub seq_len: usize,
    /// Windows per teacher batch (windows of similar length are batched together).
    #[arg(long, default_value_t = teacher::DEFAULT_BATCH_SIZE)]
    pub batch_size: usize,
    /// Most tokens per teacher batch (windows × their padded length), which bounds the
    /// logits' memory (tokens × vocab × 4 bytes). Default: what keeps the logits within
    /// 512 MiB for the model's vocabulary (at least one --seq-len window), halved when the
    /// graph's head makes more than one logits-sized tensor after its projection (a bias,
    /// a scale, soft-capping: two are live at once), and lowered further when the graph
    /// computes attention unfused (as torch.onnx exports do) so that its [windows, heads,
    /// len, len] scores stay within 512 MiB too (one window per batch when the graph does not
    /// tell the heads); so --batch-size is lowered for large vocabularies and long windows;
    /// recorded per shard in the manifest. Must be ≥ --seq-len. Does not change the cache's
    /// values.
    #[arg(long)]
    pub max_batch_tokens: Option<usize>,
    /// Softmax temperature applied to the teacher's logits before storing log-probs.
    #[arg(long, allow_negative_numbers = true, default_value_t = teacher::DEFAULT_TEMPERATURE)]
    pub temperature: f32,
    /// JSON field / Parquet column holding the text.
    #[arg(long, default_value = teacher::DEFAULT_TEXT_FIELD)]
    pub text_field: String,
    /// Skip and count bad corpus rows (invalid JSON, missing field, not UTF-8) instead of
    /// stopping at the first.
    #[arg(long)]
    pub skip_bad_rows: bool,
    /// Where the teacher runs: cpu, cuda[:N] or tensorrt[:N]. A GPU device is used or the run
    /// fails; there is no silent CPU fallback.
    #[arg(long, default_value_t = Device::Cpu)]
    pub device: Device,
    /// Threads for ONNX Runtime and the top-k (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// This worker's index (0..N-1). Defaults to SLURM_ARRAY_TASK_ID, then
    /// JOB_COMPLETION_INDEX (Kubernetes), then 0.
    #[arg(long)]
    pub worker_index: Option<usize>,
    /// Number of workers sharing the cache directory. Defaults to SLURM_ARRAY_TASK_COUNT, then 1.
    #[arg(long)]
    pub num_workers: Option<usize>,
    /// Windows per shard (the unit of resumption and of work split between workers).
    #[arg(long, default_value_t = teacher::DEFAULT_SHARD_SIZE)]
    pub shard_size: usize,
    /// Side on which batches are padded (left needs a model with position_ids).
    #[arg(long, value_enum, default_value_t = PaddingSide::Right)]
    pub padding_side: PaddingSide,
    /// Where top-k (and the draws of a sample/hybrid cache) run: host (Rust, full logits
    /// copied to the host), onnx (a head on the teacher's device: only k + N values per
    /// position come back, drawn from the same uniforms as on the host), auto (host on cpu,
    /// onnx on a GPU). `--topk` is an old name of this flag.
    #[arg(long = "topk-on", alias = "topk", value_enum, default_value_t = TopKMode::Auto)]
    pub topk_on: TopKMode,
    /// zstd level of the shards (1-22).
    #[arg(long, default_value_t = crate::cache::writer::DEFAULT_ZSTD_LEVEL)]
    pub zstd_level: i32,
    /// Progress display: bar (stderr), json (one line per shard on stdout) or off.
    #[arg(long, value_enum, default_value_t = ProgressMode::Bar)]
    pub progress: ProgressMode,
    /// Path to libonnxruntime.so (≥ 1.31). Default: ORT_DYLIB_PATH, else the .ort/ folder
    /// that `make setup` fills.
    #[arg(long, env = "ORT_DYLIB_PATH")]
    pub ort_lib: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct TrainArgs {
    /// The cache written by `logitcache teacher`.
    #[arg(long)]
    pub cache: PathBuf,
    /// Student architectures: TOML files with Hugging Face LlamaConfig keys, or presets
    /// (nano, micro, mini, small, base). Several train one after another from the same cache.
    #[arg(long, num_args = 1.., required = true)]
    pub student: Vec<String>,
    /// Output directory; each student gets OUT/<name>/ (checkpoint/, metrics.jsonl).
    #[arg(long)]
    pub out: PathBuf,
    /// The students' tokenizer.json (must be the cache's; default: the path in its manifest).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Optimizer steps.
    #[arg(long, default_value_t = student::config::DEFAULT_STEPS)]
    pub steps: usize,
    /// Sequences (cache windows) per micro-batch.
    #[arg(long, default_value_t = student::config::DEFAULT_BATCH_SIZE)]
    pub batch_size: usize,
    /// Micro-batches accumulated per optimizer step.
    #[arg(long, default_value_t = student::config::DEFAULT_GRAD_ACCUM)]
    pub grad_accum: usize,
    /// Peak learning rate (AdamW).
    #[arg(long, default_value_t = student::config::DEFAULT_LR)]
    pub lr: f64,
    /// Final learning rate of the cosine schedule (default: lr / 10).
    #[arg(long)]
    pub min_lr: Option<f64>,
    /// Linear warmup steps.
    #[arg(long, default_value_t = student::config::DEFAULT_WARMUP)]
    pub warmup: usize,
    /// AdamW weight decay (PyTorch default).
    #[arg(long, default_value_t = student::config::DEFAULT_WEIGHT_DECAY)]
    pub weight_decay: f64,
    /// AdamW beta1.
    #[arg(long, default_value_t = student::config::DEFAULT_BETA1)]
    pub beta1: f64,
    /// AdamW beta2.
    #[arg(long, default_value_t = student::config::DEFAULT_BETA2)]
    pub beta2: f64,
    /// AdamW epsilon (PyTorch default).
    #[arg(long, default_value_t = student::config::DEFAULT_EPS)]
    pub eps: f64,
    /// Clip the global gradient norm to this (0 = no clipping).
    #[arg(long, default_value_t = student::config::DEFAULT_GRAD_CLIP)]
    pub grad_clip: f64,
    /// Distillation loss: fkl (KL with the tail as one outcome), fkl-topk, rkl, jsd, or ce
    /// (next-token cross-entropy only, no teacher).
    #[arg(long, value_enum, default_value_t = loss::DEFAULT_KIND)]
    pub loss: KdLoss,
    /// Weight of the distillation term (scaled by T²).
    #[arg(long, default_value_t = loss::DEFAULT_KD_WEIGHT)]
    pub kd_weight: f64,
    /// Weight of the next-token cross-entropy term.
    #[arg(long, default_value_t = loss::DEFAULT_CE_WEIGHT)]
    pub ce_weight: f64,
    /// Distillation temperature (must equal the cache's; default: the cache's).
    #[arg(long)]
    pub temperature: Option<f64>,
    /// β of the generalised JSD.
    #[arg(long, default_value_t = loss::DEFAULT_JSD_BETA)]
    pub jsd_beta: f64,
    /// Seed for the initial weights and the data order.
    #[arg(long, default_value_t = student::config::DEFAULT_SEED)]
    pub seed: u64,
    /// Evaluate on the held-out split every N steps (0 = only at the end).
    #[arg(long, default_value_t = student::config::DEFAULT_EVAL_EVERY)]
    pub eval_every: usize,
    /// Batches per evaluation.
    #[arg(long, default_value_t = student::config::DEFAULT_EVAL_BATCHES)]
    pub eval_batches: usize,
    /// Fraction of sequences held out for evaluation (chosen by seq_id hash).
    #[arg(long, default_value_t = student::config::DEFAULT_EVAL_FRACTION)]
    pub eval_fraction: f64,
    /// Save a checkpoint every N steps (0 = only at the end).
    #[arg(long, default_value_t = student::config::DEFAULT_SAVE_EVERY)]
    pub save_every: usize,
    /// Write a metrics line every N steps.
    #[arg(long, default_value_t = student::config::DEFAULT_LOG_EVERY)]
    pub log_every: usize,
    /// Positions per loss chunk, so [positions, vocab] logits never exist whole (0 = off).
    #[arg(long, default_value_t = student::config::DEFAULT_LOSS_CHUNK)]
    pub loss_chunk: usize,
    /// Continue each student's run from its checkpoint.
    #[arg(long)]
    pub resume: bool,
    /// Stop after this step with a checkpoint, as if interrupted (for time-limited jobs);
    /// `--resume` with the same flags continues exactly.
    #[arg(long)]
    pub stop_after: Option<usize>,
    /// Training device: cpu, cuda or cuda:N (GPU N; needs a build with `--features cuda`
    /// and an NVIDIA driver, checked before training starts).
    #[arg(long, default_value = "cpu", value_parser = parse_train_device)]
    pub device: Device,
    /// Threads for the CPU backend (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Progress display: bar (stderr), json (metrics lines on stdout) or off.
    #[arg(long, value_enum, default_value_t = ProgressMode::Bar)]
    pub progress: ProgressMode,
}

#[derive(Debug, Args)]
pub struct EvalArgs {
    /// A run directory written by `train` (OUT/<student>).
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// Evaluate on this cache's held-out split (the fraction the run used).
    #[arg(long, conflicts_with = "corpus")]
    pub cache: Option<PathBuf>,
    /// Or on a corpus (cross-entropy and perplexity only).
    #[arg(long, num_args = 1..)]
    pub corpus: Vec<PathBuf>,
    /// The tokenizer for --corpus (default: the checkpoint's).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// JSON field / Parquet column of --corpus.
    #[arg(long, default_value = teacher::DEFAULT_TEXT_FIELD)]
    pub text_field: String,
    /// Window length for --corpus: documents are cut into windows of at most this many
    /// tokens as the teacher stage cuts them (default: the seq_len of the cache the run was
    /// trained on, else the student's max_position_embeddings).
    #[arg(long)]
    pub seq_len: Option<usize>,
    /// Batches to evaluate.
    #[arg(long, default_value_t = 1000)]
    pub batches: usize,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct ExportOnnxArgs {
    /// A run directory written by `train` (OUT/<student>), or a Hugging Face Llama checkpoint
    /// directory as `save_pretrained` writes it (config.json + model.safetensors, or its
    /// sharded form; float32, bfloat16 or float16 weights), e.g. a student trained in PyTorch.
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// Where to write the .onnx file (its tokenizer is RUN_DIR/checkpoint/tokenizer.json, or
    /// the Hugging Face directory's tokenizer.json).
    #[arg(long)]
    pub out: PathBuf,
    /// Store the weights as float16 (half the file; computed in float32, logits float32).
    #[arg(long)]
    pub fp16: bool,
    /// Where the weights go: `auto` keeps them in the .onnx file up to 1 GiB and above that
    /// writes them to OUT.data beside it as ONNX external data (ONNX Runtime, `onnx.load`
    /// and the teacher stage read it; keep the two files together). One file cannot hold
    /// more than 2 GB (protobuf's limit), and ONNX Runtime loads external data without a
    /// second copy of the weights (measured, 1.9 GB model: peak RSS at load 3.1 -> 2.5 GiB,
    /// 30 -> 10 s). `always` / `never` force one or the other (`never` refuses a model too
    /// large for one file).
    #[arg(long, value_enum, default_value_t = ExternalData::Auto)]
    pub external_data: ExternalData,
}

pub use crate::student::export::ExternalData;

#[derive(Debug, Args)]
pub struct RunArgs {
    /// The pipeline file (see pipelines/demo.toml).
    pub pipeline: PathBuf,
    /// Output directory (overrides the file's `out`).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// ONNX Runtime library (default: ORT_DYLIB_PATH, then the folder `make setup` fills).
    #[arg(long, env = "ORT_DYLIB_PATH")]
    pub ort_lib: Option<PathBuf>,
    /// Progress display of each step: bar, json or off.
    #[arg(long, value_enum, default_value_t = ProgressMode::Off)]
    pub progress: ProgressMode,
}

#[derive(Debug, Args)]
pub struct LawArgs {
    /// results.csv or results.json written by `logitcache run`.
    pub results: PathBuf,
    /// The metric that ranks teachers: eval_loss, eval_ppl (lower is better), eval_kl, eval_top1.
    #[arg(long, default_value = "eval_loss")]
    pub metric: String,
    /// Print the predicted optimal teacher size for a student of this many parameters
    /// (e.g. 350000, 1.5M, 3B).
    #[arg(long)]
    pub predict: Option<String>,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// `1.5M` → 1 500 000; plain numbers and exponents too.
fn parse_count(s: &str) -> anyhow::Result<f64> {
    let t = s.trim();
    let (num, mult) = match t.chars().last().map(|c| c.to_ascii_uppercase()) {
        Some('K') => (&t[..t.len() - 1], 1e3),
        Some('M') => (&t[..t.len() - 1], 1e6),
        Some('B') | Some('G') => (&t[..t.len() - 1], 1e9),
        _ => (t, 1.0),
    };
    match num.parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 => Ok(v * mult),
        _ => anyhow::bail!("--predict {s}: not a parameter count; write e.g. 350000, 1.5M or 3B"),
    }
}

#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// The cache directory.
    pub cache_dir: PathBuf,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct InspectArgs {
    /// The cache directory.
    pub cache_dir: PathBuf,
    /// Print the summary as JSON.
    #[arg(long)]
    pub json: bool,
    /// Print the top-k of one position, as SEQ_ID:POS (needs --tokenizer).
    #[arg(long, requires = "tokenizer")]
    pub show: Option<String>,
    /// The tokenizer.json the cache was built with (for --show).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct TrainTokenizerArgs {
    /// Corpus files or directories (as for `teacher`).
    #[arg(long, num_args = 1.., required = true)]
    pub corpus: Vec<PathBuf>,
    /// JSON field / Parquet column holding the text.
    #[arg(long, default_value = teacher::DEFAULT_TEXT_FIELD)]
    pub text_field: String,
    /// Largest vocabulary size (special tokens included).
    #[arg(long, default_value_t = 1024)]
    pub vocab_size: usize,
    /// bpe (byte-level BPE), or word-level: exactly --vocab-size ids (frequent words, then
    /// filler ids), for benchmarks that need a real vocabulary size such as 32000.
    #[arg(long, default_value = "bpe", value_parser = ["bpe", "word-level"])]
    pub kind: String,
    /// Where to write tokenizer.json.
    #[arg(long)]
    pub out: PathBuf,
}

#[derive(Debug, Args)]
pub struct ToyTeacherArgs {
    /// Size of the logits' vocab dimension (use the tokenizer's vocab size, or more to
    /// imitate a padded vocab).
    #[arg(long)]
    pub vocab: usize,
    /// Hidden size.
    #[arg(long, default_value_t = 16)]
    pub hidden: usize,
    /// Seed for the random weights.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Emit float16 logits.
    #[arg(long)]
    pub f16: bool,
    /// Take a position_ids input.
    #[arg(long)]
    pub position_ids: bool,
    /// Residual feed-forward blocks before the head (adds compute, e.g. for benchmarks).
    #[arg(long, default_value_t = 0)]
    pub ffn_layers: usize,
    /// Make the head one MatMul, as in real exports (scale folded into the weights, no
    /// bias), so the graph holds one logits-sized tensor (for memory benchmarks).
    #[arg(long)]
    pub plain_head: bool,
    /// Where to write the .onnx file.
    #[arg(long)]
    pub out: PathBuf,
}

/// Sets up `tracing` logs on stderr (RUST_LOG overrides the default `info`).
pub fn init_tracing(quiet: bool) {
    let default = if quiet { "warn" } else { "info" };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init();
}

impl TeacherArgs {
    /// The validated config (worker slot from flags or the scheduler's environment).
    pub fn into_config(self) -> anyhow::Result<TeacherConfig> {
        let (worker_index, num_workers) =
            teacher::workers_from_env(self.worker_index, self.num_workers)?;
        let defaults = TeacherConfig::default();
        let cfg = TeacherConfig {
            model: self.model,
            tokenizer: self.tokenizer,
            corpus: self.corpus,
            out: self.out,
            top_k: self.top_k,
            seq_len: self.seq_len,
            batch_size: self.batch_size,
            max_batch_tokens: self.max_batch_tokens,
            temperature: self.temperature,
            text_field: self.text_field,
            skip_bad_rows: self.skip_bad_rows,
            device: self.device,
            threads: self.threads.unwrap_or(defaults.threads),
            worker_index,
            num_workers,
            shard_size: self.shard_size,
            padding_side: self.padding_side,
            topk_on: self.topk_on,
            mode: self.mode,
            samples: self.samples.unwrap_or(
                if self.mode == crate::cache::schema::CacheMode::Topk {
                    0
                } else {
                    teacher::DEFAULT_SAMPLES
                },
            ),
            proposal_temperature: self
                .proposal_temperature
                .unwrap_or(teacher::DEFAULT_PROPOSAL_TEMPERATURE),
            sampling_scheme: self.sampling,
            store_logprobs: self.store_logprobs,
            seed: self.cache_seed.unwrap_or(0),
            logprob_dtype: self.logprob_dtype,
            ort_lib: self.ort_lib.filter(|p| !p.as_os_str().is_empty()),
            progress: self.progress,
            zstd_level: self.zstd_level,
        };
        cfg.validate()?;
        Ok(cfg)
    }
}

/// Runs a parsed command; returns the process exit code.
pub fn run(cli: Cli) -> anyhow::Result<i32> {
    match cli.command {
        Command::Teacher(args) => {
            let cfg = args.into_config()?;
            let json = cfg.progress == ProgressMode::Json;
            let s = teacher::run(&cfg)?;
            if json {
                println!("{}", serde_json::json!({"event": "done", "summary": s}));
            }
            tracing::info!(
                "done: {} shards written ({} already there), {} of {} planned; {} tokens in {:.1} s ({:.0} tokens/s){}",
                s.shards_written,
                s.shards_already_done,
                s.shards_written + s.shards_already_done,
                s.shards_total,
                s.tokens,
                s.seconds,
                s.tokens_per_s,
                if s.complete {
                    "; the cache is complete"
                } else {
                    "; other workers' shards are still missing"
                }
            );
            Ok(0)
        }
        Command::Train(args) => run_train(args),
        Command::Eval(args) => run_eval(args),
        Command::Run(args) => {
            let p = crate::pipeline::Pipeline::load(&args.pipeline, args.out.as_deref())?;
            let report = crate::pipeline::run(
                &p,
                &crate::pipeline::RunOptions {
                    ort_lib: args.ort_lib.filter(|p| !p.as_os_str().is_empty()),
                    progress: args.progress,
                },
            )?;
            let mut out = std::io::stdout().lock();
            writeln!(out, "{}", std::fs::read_to_string(&report)?)?;
            writeln!(out, "report: {}", report.display())?;
            Ok(0)
        }
        Command::Law(args) => {
            let rows = crate::law::law_rows(&crate::law::read_results(&args.results)?);
            let f = crate::law::fit(&rows, &args.metric)?;
            let predict = args
                .predict
                .as_deref()
                .map(parse_count)
                .transpose()?
                .map(|s| (s, f.predict(s)));
            let mut out = std::io::stdout().lock();
            if args.json {
                let mut v = serde_json::to_value(&f)?;
                if let Some((s, (t, se))) = predict {
                    v["prediction"] = serde_json::json!({"student_params": s, "teacher_params": t, "stderr": se, "ci95": se * f.t95()});
                }
                writeln!(out, "{}", serde_json::to_string_pretty(&v)?)?;
            } else {
                write!(out, "{}", crate::law::describe(&f))?;
                if let Some((s, (t, se))) = predict {
                    writeln!(
                        out,
                        "predicted optimal teacher for a {} student: {} ± {} (1 s.e.; 95% interval ± {})",
                        crate::law::human(s),
                        crate::law::human(t),
                        crate::law::human(se),
                        crate::law::human(se * f.t95())
                    )?;
                }
            }
            Ok(0)
        }
        Command::ExportOnnx(args) => {
            use student::checkpoint::{HfCheckpoint, RunCheckpoint};
            // A run directory of `train`, or a Hugging Face Llama checkpoint directory.
            let (student, weights, dir) = if HfCheckpoint::is_one(&args.checkpoint) {
                let hf = HfCheckpoint::open(&args.checkpoint)?;
                let w = hf.weights()?;
                (hf.student, w, hf.dir)
            } else {
                let dir = &args.checkpoint;
                let run = RunCheckpoint::open(dir).map_err(|e| {
                    // Neither kind of directory (a damaged run keeps its own message).
                    if dir.join("checkpoint").exists() || dir.join("checkpoint.old").exists() {
                        e
                    } else {
                        e.context("--checkpoint takes a run directory of `logitcache train` or a Hugging Face Llama checkpoint directory (config.json + model.safetensors)")
                    }
                })?;
                let w = run.weights()?;
                (run.student, w, run.dir)
            };
            let model = student::export::llama_model(&student, weights, args.fp16)?;
            let written = student::export::write_onnx(model, &args.out, args.external_data)
                .with_context(|| format!("export-onnx --out {}", args.out.display()))?;
            let tokenizer = dir.join("tokenizer.json");
            tracing::info!(
                "wrote {}{} ({} parameters, {:.1} MiB); its tokenizer: {}",
                args.out.display(),
                match &written.data {
                    Some(data) => format!(" and its weights {}", data.display()),
                    None => String::new(),
                },
                student.num_params(),
                written.bytes as f64 / (1 << 20) as f64,
                if tokenizer.is_file() {
                    tokenizer.display().to_string()
                } else {
                    format!(
                        "the one the checkpoint was trained with ({} has none)",
                        dir.display()
                    )
                }
            );
            Ok(0)
        }
        Command::Verify(args) => {
            let r = verify::verify(&args.cache_dir)?;
            let mut out = std::io::stdout().lock();
            if args.json {
                writeln!(out, "{}", serde_json::to_string_pretty(&r)?)?;
            } else {
                for w in &r.warnings {
                    writeln!(out, "warning: {w}")?;
                }
                for p in &r.problems {
                    writeln!(out, "problem: {p}")?;
                }
                writeln!(
                    out,
                    "{}: {} of {} shards checked, {} sequences, {} tokens{}",
                    args.cache_dir.display(),
                    r.shards_checked,
                    r.shards_planned,
                    r.sequences,
                    r.tokens,
                    if r.ok { "; all is well" } else { "; NOT OK" }
                )?;
            }
            Ok(if r.ok { 0 } else { 1 })
        }
        Command::Inspect(args) => {
            let mut out = std::io::stdout().lock();
            if let Some(spec) = args.show {
                let (seq, pos) = spec
                    .split_once(':')
                    .and_then(|(a, b)| Some((a.parse::<u64>().ok()?, b.parse::<usize>().ok()?)))
                    .with_context(|| {
                        format!("--show {spec}: expected SEQ_ID:POS, e.g. --show 0:5")
                    })?;
                let tok = args
                    .tokenizer
                    .expect("clap requires --tokenizer with --show");
                write!(out, "{}", inspect::show(&args.cache_dir, &tok, seq, pos)?)?;
                return Ok(0);
            }
            let r = inspect::inspect(&args.cache_dir)?;
            if args.json {
                writeln!(out, "{}", serde_json::to_string_pretty(&r)?)?;
            } else {
                writeln!(out, "cache            {}", args.cache_dir.display())?;
                writeln!(out, "sequences        {}", r.sequences)?;
                writeln!(out, "tokens           {}", r.tokens)?;
                writeln!(
                    out,
                    "shards           {} of {} planned{}",
                    r.shards,
                    r.shards_planned,
                    if r.complete {
                        " (complete)"
                    } else {
                        " (incomplete)"
                    }
                )?;
                writeln!(out, "mode             {}", r.mode)?;
                if r.samples > 0 {
                    writeln!(
                        out,
                        "samples          {} per position, {:.2} distinct ids on average",
                        r.samples, r.mean_distinct_ids
                    )?;
                }
                writeln!(out, "top_k            {}", r.top_k)?;
                writeln!(out, "vocab_size       {}", r.vocab_size)?;
                writeln!(out, "seq_len          {}", r.seq_len)?;
                writeln!(out, "temperature      {}", r.temperature)?;
                writeln!(
                    out,
                    "bytes            {} ({:.1} MiB)",
                    r.bytes,
                    r.bytes as f64 / (1 << 20) as f64
                )?;
                writeln!(out, "bytes/token      {:.1}", r.bytes_per_token)?;
                writeln!(out, "mean top-k mass  {:.4}", r.mean_topk_mass)?;
                if let Some(e) = r.max_logprob_error {
                    writeln!(
                        out,
                        "max log-prob err {e:.2e} ({} storage, measured at write time)",
                        r.logprob_dtype
                    )?;
                }
                if let Some(e) = r.max_prob_error {
                    writeln!(
                        out,
                        "max prob error   {e:.2e} (|exp(stored) - exp(exact)|, at write time)"
                    )?;
                }
                if let Some(h) = r.mean_entropy {
                    writeln!(
                        out,
                        "mean entropy     {h:.4} nats (exact, measured at write time)"
                    )?;
                }
                if r.top_k > 0 {
                    writeln!(
                        out,
                        "stored entropy   {:.4} nats (tail as one outcome; ≤ {:.4} with the tail spread evenly)",
                        r.mean_entropy_estimate, r.mean_entropy_upper
                    )?;
                }
                if r.bad_rows_skipped > 0 {
                    writeln!(
                        out,
                        "bad rows skipped {} (--skip-bad-rows); first: {}",
                        r.bad_rows_skipped,
                        r.bad_row_examples.join("; ")
                    )?;
                }
                if r.empty_documents > 0 {
                    writeln!(out, "empty documents  {} (skipped)", r.empty_documents)?;
                }
                writeln!(out, "model sha256     {}", r.model_sha256)?;
                writeln!(out, "tokenizer sha256 {}", r.tokenizer_sha256)?;
            }
            Ok(0)
        }
        Command::TrainTokenizer(args) => {
            if args.vocab_size < 260 {
                anyhow::bail!(
                    "--vocab-size must be at least 260 (256 byte tokens + 4 special tokens); got {}",
                    args.vocab_size
                );
            }
            let texts = crate::corpus::read_texts(&args.corpus, &args.text_field)?;
            if texts.is_empty() {
                anyhow::bail!("the corpus has no text; check --corpus and --text-field");
            }
            if args.kind == "word-level" {
                crate::tokenizer::word_level_tokenizer(&texts, args.vocab_size, &args.out)?;
            } else {
                crate::tokenizer::train_bpe(&texts, args.vocab_size, &args.out)?;
            }
            let t = crate::tokenizer::load(&args.out)?;
            tracing::info!(
                "wrote {} ({} tokens, trained on {} documents)",
                args.out.display(),
                t.vocab_size,
                texts.len()
            );
            Ok(0)
        }
        Command::ToyTeacher(args) => {
            if args.vocab == 0 || args.hidden == 0 {
                anyhow::bail!("--vocab and --hidden must be at least 1");
            }
            let bytes = toy_lm(&ToyLmSpec {
                vocab: args.vocab,
                hidden: args.hidden,
                seed: args.seed,
                f16_logits: args.f16,
                position_ids_input: args.position_ids,
                ffn_layers: args.ffn_layers,
                plain_head: args.plain_head,
                ..Default::default()
            });
            std::fs::write(&args.out, bytes)
                .with_context(|| format!("writing {}", args.out.display()))?;
            tracing::info!("wrote {}", args.out.display());
            Ok(0)
        }
    }
}

fn run_train(args: TrainArgs) -> anyhow::Result<i32> {
    use crate::cache::reader::Cache;
    use crate::student::arch::StudentConfig;
    if args.threads == Some(0) {
        anyhow::bail!("--threads must be at least 1 (leave it out to use every core)");
    }
    if let Some(t) = args.threads {
        let _ = rayon::ThreadPoolBuilder::new()
            .num_threads(t)
            .build_global();
    }
    let cache = Cache::open(&args.cache)?;
    let m = &cache.manifest;
    let tokenizer = args
        .tokenizer
        .clone()
        .unwrap_or_else(|| m.tokenizer.path.clone());
    if !tokenizer.is_file() {
        anyhow::bail!(
            "the cache's tokenizer {} is not there; pass --tokenizer PATH (the tokenizer.json the cache was built with, sha256 {})",
            tokenizer.display(),
            m.tokenizer.sha256
        );
    }
    let students = args
        .student
        .iter()
        .map(|s| StudentConfig::load(s, m.vocab_size))
        .collect::<Result<Vec<_>, _>>()?;
    let mut names = std::collections::BTreeSet::new();
    for s in &students {
        if !names.insert(s.name.clone()) {
            anyhow::bail!(
                "two students are named `{}`; their run directories would collide: rename a TOML file",
                s.name
            );
        }
    }
    let cfg = TrainConfig {
        cache: args.cache.clone(),
        tokenizer,
        out: args.out.clone(),
        steps: args.steps,
        batch_size: args.batch_size,
        grad_accum: args.grad_accum,
        lr: args.lr,
        min_lr: args
            .min_lr
            .unwrap_or_else(|| TrainConfig::default_min_lr(args.lr)),
        warmup: args.warmup,
        weight_decay: args.weight_decay,
        beta1: args.beta1,
        beta2: args.beta2,
        eps: args.eps,
        grad_clip: args.grad_clip,
        loss: LossConfig {
            kind: args.loss,
            kd_weight: args.kd_weight,
            ce_weight: args.ce_weight,
            temperature: args.temperature.unwrap_or(m.params.temperature as f64),
            jsd_beta: args.jsd_beta,
        },
        seed: args.seed,
        eval_every: args.eval_every,
        eval_batches: args.eval_batches,
        eval_fraction: args.eval_fraction,
        save_every: args.save_every,
        log_every: args.log_every,
        loss_chunk: args.loss_chunk,
        device: args.device,
        progress: Some(args.progress),
        stop_after: args.stop_after,
    };
    cfg.validate()?;
    for s in &students {
        tracing::info!("student {}: {} parameters", s.name, s.num_params());
        let r = student::train::train_student(&cache, s, &cfg, args.resume)?;
        tracing::info!(
            "student {} done: {} steps, {} tokens, {:.0} tokens/s, final loss {:.4}{}, peak RSS {:.0} MiB -> {}",
            r.student,
            r.steps,
            r.tokens,
            r.tokens_per_s,
            r.final_loss,
            r.eval
                .as_ref()
                .map(|e| format!(
                    ", eval loss {:.4} (ppl {:.2}, KL {:.4}, top-1 {:.3})",
                    e.eval_loss, e.eval_ppl, e.eval_kl, e.eval_top1
                ))
                .unwrap_or_default(),
            r.peak_rss_mib,
            r.run_dir.display()
        );
        if args.progress == ProgressMode::Json {
            println!(
                "{}",
                serde_json::json!({"event": "student_done", "result": r})
            );
        }
    }
    Ok(0)
}

fn run_eval(args: EvalArgs) -> anyhow::Result<i32> {
    use crate::cache::reader::Cache;
    use crate::student::checkpoint::RunCheckpoint;
    let run = RunCheckpoint::open(&args.checkpoint)?;
    let ckpt = run.dir.clone();
    let tcfg = run.train.clone();
    let model = run.model::<burn::backend::Flex>(&Default::default())?;
    let metrics = if let Some(dir) = &args.cache {
        let cache = Cache::open(dir)?;
        cache.check_tokenizer(&ckpt.join("tokenizer.json"))?;
        let e = student::eval::evaluate(
            &model,
            &cache,
            tcfg.eval_fraction,
            tcfg.batch_size,
            args.batches,
            &tcfg.loss,
        )
        .with_context(|| {
            format!(
                "evaluating {} on the held-out split (--eval-fraction {} of its training run); a run on a cache too small for a held-out window trained on every window, so evaluate it with --corpus on held-out text instead",
                ckpt.display(),
                tcfg.eval_fraction
            )
        })?;
        serde_json::to_value(e)?
    } else if !args.corpus.is_empty() {
        let tok_path = args
            .tokenizer
            .clone()
            .unwrap_or_else(|| ckpt.join("tokenizer.json"));
        let own = ckpt.join("tokenizer.json");
        let hash = |p: &std::path::Path| {
            crate::util::sha256_file(p)
                .map(|(h, _)| h)
                .with_context(|| format!("reading {}", p.display()))
        };
        let (given, had) = (hash(&tok_path)?, hash(&own)?);
        if given != had {
            anyhow::bail!(
                "--tokenizer {} (sha256 {given}) is not the tokenizer the student was trained with ({}, sha256 {had}): its token ids would mean other tokens; leave --tokenizer out to use the checkpoint's",
                tok_path.display(),
                own.display()
            );
        }
        let seq_len = args.seq_len.unwrap_or_else(|| {
            Cache::open(&tcfg.cache)
                .map(|c| c.manifest.params.seq_len)
                .unwrap_or(run.student.max_position_embeddings)
        });
        let e = student::eval::evaluate_corpus(
            &model,
            &args.corpus,
            &args.text_field,
            &tok_path,
            seq_len,
            args.batches,
        )?;
        serde_json::to_value(e)?
    } else {
        anyhow::bail!("pass --cache DIR or --corpus PATH… to evaluate on");
    };
    let mut out = std::io::stdout().lock();
    if args.json {
        writeln!(out, "{}", serde_json::to_string_pretty(&metrics)?)?;
    } else {
        for (k, v) in metrics.as_object().expect("metrics object") {
            writeln!(out, "{k:<12} {v}")?;
        }
    }
    Ok(0)
}
