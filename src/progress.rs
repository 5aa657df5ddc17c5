//! Progress reporting for long jobs of both stages: an indicatif bar on stderr, JSON lines
//! on stdout for batch systems, or nothing ([`ProgressMode`]).
//!
//! [`Progress`] knows no stage's types: the teacher reports each finished shard with
//! [`Progress::shard_done`] and a [`ShardReport`] of plain fields, the trainer moves a step
//! bar with [`Progress::set`] and prints its metrics lines with [`Progress::json_line`].
//!
//! ```
//! use logitcache::progress::{Progress, ProgressMode};
//! let p = Progress::steps(ProgressMode::Off, "micro", 1000, 0);
//! p.set(10, "loss 5.1234".into());
//! p.json_line(r#"{"step":10}"#); // printed only in `Json` mode
//! p.finish();
//! ```

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::Write;

/// How progress is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ProgressMode {
    /// A progress bar on stderr (hidden when stderr is not a terminal).
    Bar,
    /// One JSON object per finished shard on stdout.
    Json,
    /// Nothing (logs only).
    Off,
}

/// The teacher's bar: tokens done of the estimate, throughput, ETA, shards in the message.
const SHARDS_TEMPLATE: &str =
    "{elapsed_precise} [{bar:30}] {human_pos}/{human_len} tokens  {per_sec}  ETA {eta}  {msg}";
/// The trainer's bar: the student's name, then steps.
const STEPS_TEMPLATE: &str = "{prefix} {elapsed_precise} [{bar:30}] step {pos}/{len} {msg}";

/// One finished teacher shard, as its `--progress json` line reports it.
#[derive(Debug, Clone, Copy)]
pub struct ShardReport<'a> {
    pub index: u64,
    /// Path relative to the cache directory.
    pub file: &'a str,
    pub rows: u64,
    pub tokens: u64,
    pub bytes: u64,
    pub seconds: f64,
}

/// A long job's progress display in one [`ProgressMode`].
pub struct Progress {
    mode: ProgressMode,
    bar: Option<ProgressBar>,
    start: std::time::Instant,
}

impl Progress {
    /// A job of `len` units drawn in `style`; the bar exists only in [`ProgressMode::Bar`].
    pub fn new(mode: ProgressMode, len: u64, style: ProgressStyle) -> Self {
        let bar = (mode == ProgressMode::Bar).then(|| {
            let b = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr());
            b.set_style(style);
            b
        });
        Progress {
            mode,
            bar,
            start: std::time::Instant::now(),
        }
    }

    /// The teacher's progress: `est_tokens` to compute, `done_shards` of `total_shards`
    /// already in the cache.
    pub fn shards(
        mode: ProgressMode,
        est_tokens: u64,
        total_shards: u64,
        done_shards: u64,
    ) -> Self {
        let style = ProgressStyle::with_template(SHARDS_TEMPLATE)
            .expect("progress template is valid: this is a bug")
            .progress_chars("=> ");
        let p = Progress::new(mode, est_tokens, style);
        if let Some(b) = &p.bar {
            b.set_message(format!("shards {done_shards}/{total_shards}"));
        }
        p
    }

    /// A training run's progress: student `name`, at step `done` of `total`.
    pub fn steps(mode: ProgressMode, name: &str, total: u64, done: u64) -> Self {
        let style = ProgressStyle::with_template(STEPS_TEMPLATE)
            .expect("progress template is valid: this is a bug");
        let p = Progress::new(mode, total, style);
        if let Some(b) = &p.bar {
            b.set_prefix(name.to_string());
            b.set_position(done);
        }
        p
    }

    /// Moves the bar to `pos` with message `msg` (bar mode only).
    pub fn set(&self, pos: u64, msg: String) {
        if let Some(b) = &self.bar {
            b.set_position(pos);
            b.set_message(msg);
        }
    }

    /// Prints `line` (one JSON object) on stdout in [`ProgressMode::Json`]; a closed stdout
    /// does not stop the job.
    pub fn json_line(&self, line: &str) {
        if self.mode == ProgressMode::Json {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{line}");
            let _ = out.flush();
        }
    }

    /// Reports a finished teacher shard; `done` of `total` shards are now in the cache.
    pub fn shard_done(&self, s: &ShardReport<'_>, done: u64, total: u64) {
        match self.mode {
            ProgressMode::Bar => {
                if let Some(b) = &self.bar {
                    b.inc(s.tokens);
                    b.set_message(format!("shards {done}/{total}"));
                }
            }
            ProgressMode::Json => {
                let line = serde_json::json!({
                    "event": "shard",
                    "shard": s.index,
                    "file": s.file,
                    "rows": s.rows,
                    "tokens": s.tokens,
                    "bytes": s.bytes,
                    "seconds": s.seconds,
                    "tokens_per_s": s.tokens as f64 / s.seconds.max(1e-9),
                    "shards_done": done,
                    "shards_total": total,
                    "elapsed_s": self.start.elapsed().as_secs_f64(),
                });
                self.json_line(&line.to_string());
            }
            ProgressMode::Off => {}
        }
        tracing::debug!("shard {} done ({done}/{total})", s.index);
    }

    /// Clears the bar.
    pub fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}
