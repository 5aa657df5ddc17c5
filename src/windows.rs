//! From documents to windows: tokenising a corpus and cutting each document into windows of
//! at most `seq_len` tokens (no window mixes two documents), the plan of a cache (how many
//! documents, windows, tokens and shards the corpus makes), the windows of each shard, and
//! the length-bucketed order in which windows are batched.
//!
//! `seq_id`s are global window numbers in corpus order, so they depend only on (corpus,
//! tokenizer, `seq_len`): the teacher, the held-out split and `eval --corpus` all cut the
//! same windows.
//!
//! ```
//! use logitcache::windows::{cut, batch_order};
//! let ids = [1u32, 2, 3, 4, 5];
//! let w: Vec<&[u32]> = cut(&ids, 2).collect();
//! assert_eq!(w, vec![&[1, 2][..], &[3, 4], &[5]]);
//! // Longest first (stable), in batches of 2 (no token budget).
//! assert_eq!(batch_order(&[1, 3, 2, 3], 2, usize::MAX), vec![vec![1, 3], vec![2, 0]]);
//! // At most 6 padded tokens per batch: the two 3s fill one.
//! assert_eq!(batch_order(&[1, 3, 2, 3], 8, 6), vec![vec![1, 3], vec![2, 0]]);
//! ```

use crate::corpus::{self, CorpusFile, SkipCounts};
use crate::tokenizer::LoadedTokenizer;
use anyhow::bail;
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::sync::mpsc::SyncSender;

/// Documents tokenised per `encode_batch` call.
const TOKENIZE_CHUNK: usize = 512;
/// Bytes of text tokenised per `encode_batch` call at most (a call's encodings hold far more
/// than the text while they live).
const TOKENIZE_BYTES: usize = 4 << 20;

/// How a corpus becomes windows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WindowSpec {
    /// Longest window in tokens.
    pub seq_len: usize,
    /// JSON field / Parquet column holding the text.
    pub text_field: String,
    /// Skip and count bad corpus rows instead of stopping at the first.
    pub skip_bad_rows: bool,
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

/// What the corpus turns into; fixed for a given (corpus, tokenizer, seq_len, shard_size).
/// Recorded in the cache manifest.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Plan {
    pub documents: u64,
    pub sequences: u64,
    pub tokens: u64,
    pub shards: u64,
    pub empty_documents: u64,
    pub bad_rows_skipped: u64,
    pub bad_row_examples: Vec<String>,
}

/// The windows of one document's tokens: consecutive slices of at most `seq_len` tokens.
pub fn cut(ids: &[u32], seq_len: usize) -> std::slice::Chunks<'_, u32> {
    ids.chunks(seq_len)
}

/// The order in which windows of the given lengths are batched: longest first, stable in
/// index (so deterministic), so windows of similar length share a batch and little is
/// padded. A batch takes windows while it has fewer than `batch_size` and its padded size,
/// windows × its longest window, stays within `max_tokens` (`usize::MAX`: no budget); a
/// window longer than the budget goes alone.
pub fn batch_order(lengths: &[usize], batch_size: usize, max_tokens: usize) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(lengths[i]));
    let mut batches: Vec<Vec<usize>> = Vec::new();
    let mut cur: Vec<usize> = Vec::new();
    for i in order {
        // Longest first: the batch's first window sets its padded length.
        let longest = cur.first().map_or(lengths[i], |&f| lengths[f]).max(1);
        if !cur.is_empty() && (cur.len() >= batch_size || (cur.len() + 1) * longest > max_tokens) {
            batches.push(std::mem::take(&mut cur));
        }
        cur.push(i);
    }
    if !cur.is_empty() {
        batches.push(cur);
    }
    batches
}

/// Tokenises documents in chunks and calls `f(doc_id, tokens)` in order until it returns
/// `false`; returns the number of documents seen and what reading skipped.
pub fn tokenize_corpus(
    files: &[CorpusFile],
    spec: &WindowSpec,
    tok: &LoadedTokenizer,
    mut f: impl FnMut(u64, &[u32]) -> anyhow::Result<bool>,
) -> anyhow::Result<(u64, SkipCounts)> {
    let mut pending: Vec<String> = Vec::with_capacity(TOKENIZE_CHUNK);
    let mut doc_id = 0u64;
    let mut stop = false;
    let mut flush = |pending: &mut Vec<String>,
                     doc_id: &mut u64,
                     stop: &mut bool|
     -> anyhow::Result<()> {
        if pending.is_empty() || *stop {
            pending.clear();
            return Ok(());
        }
        let failed = |e: tokenizers::Error| anyhow::anyhow!("tokenizing failed: {e}");
        // Long documents are tokenised alone, piece by piece where the tokenizer gives
        // the same ids that way; the others together.
        let long = |t: &String| t.len() > crate::tokenizer::LONG_DOCUMENT_BYTES;
        let short: Vec<&str> = pending
            .iter()
            .filter(|t| !long(t))
            .map(|s| s.as_str())
            .collect();
        let mut encs = tok
            .tokenizer
            .encode_batch(short, true)
            .map_err(failed)?
            .into_iter();
        for text in pending.iter() {
            let ids: Vec<u32> = if long(text) {
                match crate::tokenizer::encode_piecewise(
                    &tok.tokenizer,
                    text,
                    crate::tokenizer::LONG_DOCUMENT_BYTES,
                )
                .map_err(failed)?
                {
                    Some(ids) => ids,
                    None => {
                        tracing::warn!(
                            "document {} is {:.1} MB and is tokenised whole ({}; a 20 MB document took ~5 GB): split very long documents in the corpus to bound the memory",
                            *doc_id,
                            text.len() as f64 / 1e6,
                            crate::tokenizer::piecewise_blocker(&tok.tokenizer).unwrap_or_else(
                                || "its post-processor does more than add tokens at both ends"
                                    .into()
                            )
                        );
                        tok.tokenizer
                            .encode(text.as_str(), true)
                            .map_err(failed)?
                            .get_ids()
                            .to_vec()
                    }
                }
            } else {
                encs.next()
                    .expect("one encoding per short document: this is a bug")
                    .get_ids()
                    .to_vec()
            };
            if !f(*doc_id, &ids)? {
                *stop = true;
                break;
            }
            *doc_id += 1;
        }
        pending.clear();
        Ok(())
    };
    // Documents per `encode_batch` call, and their bytes: the encodings take ~250 bytes per
    // byte of text while they live.
    let mut pending_bytes = 0usize;
    let skips =
        corpus::for_each_document(files, &spec.text_field, spec.skip_bad_rows, |_, text| {
            pending_bytes += text.len();
            pending.push(text);
            if pending.len() == TOKENIZE_CHUNK || pending_bytes >= TOKENIZE_BYTES {
                flush(&mut pending, &mut doc_id, &mut stop)?;
                pending_bytes = 0;
            }
            Ok(())
        })?;
    flush(&mut pending, &mut doc_id, &mut stop)?;
    Ok((doc_id, skips))
}

/// Pass 1: counts documents, windows and tokens.
pub fn make_plan(
    files: &[CorpusFile],
    spec: &WindowSpec,
    shard_size: usize,
    tok: &LoadedTokenizer,
) -> anyhow::Result<Plan> {
    let (mut windows, mut tokens) = (0u64, 0u64);
    let (documents, skips) = tokenize_corpus(files, spec, tok, |_, ids| {
        windows += cut(ids, spec.seq_len).len() as u64;
        tokens += ids.len() as u64;
        Ok(true)
    })?;
    if tokens == 0 {
        bail!(
            "the corpus has no text ({} files, {} empty documents, {} bad rows skipped); check --corpus and --text-field `{}`",
            files.len(),
            skips.empty_documents,
            skips.bad_rows,
            spec.text_field
        );
    }
    Ok(Plan {
        documents,
        sequences: windows,
        tokens,
        shards: windows.div_ceil(shard_size as u64),
        empty_documents: skips.empty_documents,
        bad_rows_skipped: skips.bad_rows,
        bad_row_examples: skips.examples,
    })
}

/// Pass 2: sends the windows of every shard in `wanted` (ascending) to `tx`.
pub fn produce_shards(
    files: &[CorpusFile],
    spec: &WindowSpec,
    shard_size: usize,
    tok: &LoadedTokenizer,
    plan: &Plan,
    wanted: &BTreeSet<u64>,
    tx: SyncSender<ShardWork>,
) -> anyhow::Result<()> {
    let per_shard = shard_size as u64;
    let last = wanted.iter().next_back().copied();
    let mut seq_id = 0u64;
    let mut current: Option<ShardWork> = None;
    let mut receiver_gone = false;
    tokenize_corpus(files, spec, tok, |doc_id, ids| {
        for (w, chunk) in cut(ids, spec.seq_len).enumerate() {
            let shard = seq_id / per_shard;
            if wanted.contains(&shard) {
                let work = current.get_or_insert_with(|| ShardWork {
                    index: shard,
                    windows: Vec::with_capacity(shard_size),
                });
                work.windows.push(Window {
                    seq_id,
                    doc_id,
                    window_index: w as u32,
                    tokens: chunk.to_vec(),
                });
                let end_of_shard =
                    (seq_id + 1).is_multiple_of(per_shard) || seq_id + 1 == plan.sequences;
                if end_of_shard && tx.send(current.take().expect("shard in progress")).is_err() {
                    receiver_gone = true;
                    return Ok(false);
                }
            }
            seq_id += 1;
        }
        // Nothing after the last wanted shard is needed.
        Ok(last.is_some_and(|l| seq_id < (l + 1) * per_shard))
    })?;
    if receiver_gone {
        return Ok(());
    }
    let expected_end = last
        .map(|l| ((l + 1) * per_shard).min(plan.sequences))
        .unwrap_or(0);
    if seq_id < expected_end || current.is_some() {
        bail!(
            "the corpus produced {seq_id} windows but the cache plan has {}: the corpus files or the tokenizer changed since the cache was planned",
            plan.sequences
        );
    }
    Ok(())
}

/// The first windows of a corpus, in `seq_id` order, until `f` returns `false` (for
/// evaluating on a corpus with the teacher's windows).
pub fn for_each_window(
    files: &[CorpusFile],
    spec: &WindowSpec,
    tok: &LoadedTokenizer,
    mut f: impl FnMut(Window) -> anyhow::Result<bool>,
) -> anyhow::Result<()> {
    let mut seq_id = 0u64;
    tokenize_corpus(files, spec, tok, |doc_id, ids| {
        for (w, chunk) in cut(ids, spec.seq_len).enumerate() {
            let go = f(Window {
                seq_id,
                doc_id,
                window_index: w as u32,
                tokens: chunk.to_vec(),
            })?;
            seq_id += 1;
            if !go {
                return Ok(false);
            }
        }
        Ok(true)
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_budget_bounds_every_batch_and_keeps_every_window() {
        let lengths: Vec<usize> = (0..200).map(|i| 1 + (i * 37) % 64).collect();
        // No budget: the sorted order cut into chunks of 8 (written out independently).
        let mut sorted: Vec<usize> = (0..lengths.len()).collect();
        sorted.sort_by_key(|&i| std::cmp::Reverse(lengths[i]));
        let chunks: Vec<Vec<usize>> = sorted.chunks(8).map(|c| c.to_vec()).collect();
        assert_eq!(batch_order(&lengths, 8, usize::MAX), chunks);
        for (batch, budget) in [(8, 64), (8, 100), (3, 1000), (16, 128), (4, 1)] {
            let b = batch_order(&lengths, batch, budget);
            let mut seen: Vec<usize> = b.iter().flatten().copied().collect();
            seen.sort_unstable();
            assert_eq!(seen, (0..lengths.len()).collect::<Vec<_>>());
            for c in &b {
                let longest = c.iter().map(|&i| lengths[i]).max().unwrap();
                assert!(c.len() <= batch && !c.is_empty());
                assert!(
                    c.len() == 1 || c.len() * longest <= budget,
                    "{batch}/{budget}: {c:?}"
                );
                // Longest first, so the first window is the longest.
                assert_eq!(lengths[c[0]], longest);
            }
        }
        // Hand-worked: budget 10 over lengths 5, 5, 4, 3, 2 gives [5,5], [4,3], [2].
        assert_eq!(
            batch_order(&[2, 5, 3, 5, 4], 8, 10),
            vec![vec![1, 3], vec![4, 2], vec![0]]
        );
        // A window longer than the budget goes alone.
        assert_eq!(batch_order(&[20, 3], 8, 10), vec![vec![0], vec![1]]);
    }
}
