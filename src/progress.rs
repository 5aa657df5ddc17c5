//! Progress reporting for long jobs: an indicatif bar (tokens/s, ETA), one JSON line per
//! shard on stdout for batch systems, or nothing.

use crate::cache::manifest::ShardEntry;
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

pub struct Progress {
    mode: ProgressMode,
    bar: Option<ProgressBar>,
    start: std::time::Instant,
}

impl Progress {
    pub fn new(mode: ProgressMode, est_tokens: u64, total_shards: u64, done_shards: u64) -> Self {
        let bar = (mode == ProgressMode::Bar).then(|| {
            let b = ProgressBar::with_draw_target(Some(est_tokens), ProgressDrawTarget::stderr());
            b.set_style(
                ProgressStyle::with_template(
                    "{elapsed_precise} [{bar:30}] {human_pos}/{human_len} tokens  {per_sec}  ETA {eta}  {msg}",
                )
                .expect("progress template is valid: this is a bug")
                .progress_chars("=> "),
            );
            b.set_message(format!("shards {done_shards}/{total_shards}"));
            b
        });
        Progress {
            mode,
            bar,
            start: std::time::Instant::now(),
        }
    }

    /// Reports a finished shard.
    pub fn shard_done(&self, entry: &ShardEntry, done: u64, total: u64) {
        match self.mode {
            ProgressMode::Bar => {
                if let Some(b) = &self.bar {
                    b.inc(entry.tokens);
                    b.set_message(format!("shards {done}/{total}"));
                }
            }
            ProgressMode::Json => {
                let line = serde_json::json!({
                    "event": "shard",
                    "shard": entry.index,
                    "file": entry.file,
                    "rows": entry.rows,
                    "tokens": entry.tokens,
                    "bytes": entry.bytes,
                    "seconds": entry.seconds,
                    "tokens_per_s": entry.tokens as f64 / entry.seconds.max(1e-9),
                    "shards_done": done,
                    "shards_total": total,
                    "elapsed_s": self.start.elapsed().as_secs_f64(),
                });
                let mut out = std::io::stdout().lock();
                let _ = writeln!(out, "{line}");
                let _ = out.flush();
            }
            ProgressMode::Off => {}
        }
        tracing::debug!("shard {} done ({done}/{total})", entry.index);
    }

    pub fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}
