//! Evaluating a student: on a cache's held-out split ([`evaluate`]: cross-entropy,
//! perplexity, KL to the teacher, top-1 agreement) or on a plain corpus
//! ([`evaluate_corpus`]: cross-entropy and perplexity).
//!
//! ```no_run
//! use logitcache::cache::reader::Cache;
//! use logitcache::student::{checkpoint::RunCheckpoint, eval::evaluate};
//! # fn main() -> anyhow::Result<()> {
//! let run = RunCheckpoint::open("runs/micro".as_ref())?;
//! let model = run.model::<burn::backend::Flex>(&Default::default())?;
//! let cache = Cache::open("cache/".as_ref())?;
//! let t = &run.train;
//! let m = evaluate(&model, &cache, t.eval_fraction, t.batch_size, 50, &t.loss)?;
//! println!("held-out loss {:.4}, top-1 {:.3}", m.eval_loss, m.eval_top1);
//! # Ok(())
//! # }
//! ```

use super::data::{inputs, targets};
use super::model::Llama;
use crate::cache::reader::Cache;
use crate::cache::stream::{Cursor, Split, Stream, StreamConfig, collate};
use crate::loss::{Divergence, LossConfig, divergence};
use crate::windows::{Window, WindowSpec, for_each_window};
use anyhow::bail;
use burn::prelude::*;
use serde::{Deserialize, Deserializer, Serialize};
use std::path::{Path, PathBuf};

/// Metrics of an evaluation pass (the `eval_*` fields of `metrics.jsonl`'s eval lines).
///
/// A non-finite value is written as `null` (serde_json's way); it reads back as NaN.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EvalMetrics {
    #[serde(deserialize_with = "nan_if_null")]
    pub eval_loss: f64,
    #[serde(deserialize_with = "nan_if_null")]
    pub eval_ppl: f64,
    #[serde(deserialize_with = "nan_if_null")]
    pub eval_kl: f64,
    #[serde(deserialize_with = "nan_if_null")]
    pub eval_top1: f64,
    pub eval_tokens: u64,
}

/// Reads a number, or `null` (how serde_json writes NaN and infinities) as NaN.
pub(crate) fn nan_if_null<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

/// Evaluates `model` on up to `max_batches` batches of the eval split.
pub fn evaluate<B: Backend>(
    model: &Llama<B>,
    cache: &Cache,
    eval_fraction: f64,
    batch_size: usize,
    max_batches: usize,
    loss_cfg: &LossConfig,
) -> anyhow::Result<EvalMetrics> {
    let dev = model.embed_tokens.device();
    let (split, frac) = if eval_fraction > 0.0 {
        (Split::Eval, eval_fraction)
    } else {
        (Split::All, 0.0)
    };
    let mut stream = Stream::start(
        cache,
        StreamConfig {
            batch_size,
            shuffle: false,
            split,
            eval_fraction: frac,
            ..Default::default()
        },
    )?;
    let (mut ce, mut kl, mut top1, mut n_ce, mut n_kd) = (0.0, 0.0, 0.0, 0.0, 0.0);
    for _ in 0..max_batches.max(1) {
        let Some(b) = stream.next_batch() else {
            break;
        };
        let b = b?;
        let (ids, mask) = inputs::<B>(&b, &dev);
        let t = targets::<B>(&b, &dev);
        let n = b.batch * b.len;
        let logits = model.forward(ids, mask).reshape([n, model.vocab_size()]);
        let ce_rows = crate::loss::cross_entropy(logits.clone(), t.target_ids.clone()).reshape([n]);
        ce += (ce_rows * t.target_mask.clone())
            .sum()
            .into_scalar()
            .elem::<f64>();
        let d = divergence(logits.clone(), &t, Divergence::Fkl, loss_cfg.temperature).reshape([n]);
        kl += (d * t.mask.clone()).sum().into_scalar().elem::<f64>();
        let arg: Vec<i64> = logits
            .argmax(1)
            .into_data()
            .convert::<i64>()
            .into_vec()
            .expect("int data");
        for (i, &a) in arg.iter().enumerate() {
            if b.mask[i] > 0.0 {
                top1 += (a as u32 == b.topk_ids[i * b.k]) as u64 as f64;
            }
        }
        n_ce += b.target_mask.iter().map(|&m| m as f64).sum::<f64>();
        n_kd += b.mask.iter().map(|&m| m as f64).sum::<f64>();
        stream.recycle(b);
    }
    if n_kd == 0.0 {
        bail!("the eval split is empty; raise --eval-fraction or use a larger cache");
    }
    let eval_loss = ce / n_ce.max(1.0);
    Ok(EvalMetrics {
        eval_loss,
        eval_ppl: eval_loss.exp(),
        eval_kl: kl / n_kd,
        eval_top1: top1 / n_kd,
        eval_tokens: n_kd as u64,
    })
}

/// Cross-entropy metrics of a corpus (no teacher).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CorpusEval {
    pub eval_loss: f64,
    pub eval_ppl: f64,
    pub eval_tokens: u64,
}

/// Windows per batch of [`evaluate_corpus`].
pub const CORPUS_EVAL_BATCH: usize = 8;

/// Evaluates next-token cross-entropy on a corpus, cut into windows of at most `seq_len`
/// tokens exactly as the teacher stage cuts them ([`crate::windows`]), `CORPUS_EVAL_BATCH`
/// windows a batch, for at most `max_batches` batches.
pub fn evaluate_corpus<B: Backend>(
    model: &Llama<B>,
    corpus: &[PathBuf],
    text_field: &str,
    tokenizer: &Path,
    seq_len: usize,
    max_batches: usize,
) -> anyhow::Result<CorpusEval> {
    let tok = crate::tokenizer::load(tokenizer)?;
    if tok.vocab_size > model.vocab_size() {
        bail!(
            "tokenizer {} has {} tokens, the student only {}",
            tokenizer.display(),
            tok.vocab_size,
            model.vocab_size()
        );
    }
    if seq_len < 2 {
        bail!("--seq-len must be at least 2 (got {seq_len})");
    }
    let files = crate::corpus::discover(corpus)?;
    let spec = WindowSpec {
        seq_len,
        text_field: text_field.to_string(),
        skip_bad_rows: false,
    };
    let need = max_batches.max(1) * CORPUS_EVAL_BATCH;
    let mut windows: Vec<Window> = Vec::with_capacity(need);
    for_each_window(&files, &spec, &tok, |w| {
        windows.push(w);
        Ok(windows.len() < need)
    })?;
    if windows.is_empty() {
        bail!("the corpus has no text to evaluate on");
    }
    let dev = model.embed_tokens.device();
    let (mut ce, mut n) = (0.0, 0.0);
    for chunk in windows.chunks(CORPUS_EVAL_BATCH) {
        let refs: Vec<(u64, &[u32])> = chunk.iter().map(|w| (w.seq_id, &w.tokens[..])).collect();
        let b = collate(&refs, 1, Cursor::default());
        let (ids, mask) = inputs::<B>(&b, &dev);
        let t = targets::<B>(&b, &dev);
        let rows = b.batch * b.len;
        let logits = model.forward(ids, mask).reshape([rows, model.vocab_size()]);
        ce += (crate::loss::cross_entropy(logits, t.target_ids).reshape([rows]) * t.target_mask)
            .sum()
            .into_scalar()
            .elem::<f64>();
        n += b.target_mask.iter().map(|&m| m as f64).sum::<f64>();
    }
    let l = ce / n.max(1.0);
    Ok(CorpusEval {
        eval_loss: l,
        eval_ppl: l.exp(),
        eval_tokens: n as u64,
    })
}
