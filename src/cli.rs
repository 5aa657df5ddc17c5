//! Command-line flags (clap derive; the doc comments are the `--help` text) and their
//! translation into validated configs.

use crate::cache::{inspect, verify};
use crate::onnx::{ToyLmSpec, toy_lm};
use crate::progress::ProgressMode;
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
    /// named --text-field) and .txt (one document per file). Directories are searched
    /// recursively in sorted order.
    #[arg(long, num_args = 1.., required = true)]
    pub corpus: Vec<PathBuf>,
    /// The cache directory (created if needed; an existing cache with the same parameters
    /// is resumed).
    #[arg(long)]
    pub out: PathBuf,
    /// Number of most likely next tokens stored per position.
    #[arg(long, default_value_t = teacher::DEFAULT_TOP_K)]
    pub top_k: usize,
    /// Longest window in tokens; documents are cut into windows of at most this length and
    /// no window mixes two documents.
    #[arg(long, default_value_t = teacher::DEFAULT_SEQ_LEN)]
    pub seq_len: usize,
    /// Windows per teacher batch (windows of similar length are batched together).
    #[arg(long, default_value_t = teacher::DEFAULT_BATCH_SIZE)]
    pub batch_size: usize,
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
    #[arg(long, default_value = "cpu")]
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
    /// Where top-k runs: host (Rust, full logits copied to the host), onnx (a top-k head on
    /// the teacher's device), auto (host on cpu, onnx on a GPU).
    #[arg(long, value_enum, default_value_t = TopKMode::Auto)]
    pub topk: TopKMode,
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
            temperature: self.temperature,
            text_field: self.text_field,
            skip_bad_rows: self.skip_bad_rows,
            device: self.device,
            threads: self.threads.unwrap_or(defaults.threads),
            worker_index,
            num_workers,
            shard_size: self.shard_size,
            padding_side: self.padding_side,
            topk: self.topk,
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
                writeln!(
                    out,
                    "mean entropy     {:.4} nats (tail as one outcome; ≤ {:.4} with the tail spread evenly)",
                    r.mean_entropy_estimate, r.mean_entropy_upper
                )?;
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
            let files = teacher::corpus::discover(&args.corpus)?;
            let mut texts = Vec::new();
            teacher::corpus::for_each_document(&files, &args.text_field, false, |_, t| {
                texts.push(t);
                Ok(())
            })?;
            if texts.is_empty() {
                anyhow::bail!("the corpus has no text; check --corpus and --text-field");
            }
            crate::tokenizer::train_bpe(&texts, args.vocab_size, &args.out)?;
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
                ..Default::default()
            });
            std::fs::write(&args.out, bytes)
                .with_context(|| format!("writing {}", args.out.display()))?;
            tracing::info!("wrote {}", args.out.display());
            Ok(0)
        }
    }
}
