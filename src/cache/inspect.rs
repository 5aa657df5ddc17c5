//! `logitcache inspect`: what a cache holds and what it costs, and one position's top-k
//! (and draws) as text. For a `sample` cache the top-k mass and entropy fields are 0 (it
//! stores draws, not probabilities).

use super::reader::{Cache, ReadError};
use std::path::Path;

/// Summary of a cache (the `--json` output of `inspect`).
#[derive(Debug, Clone, serde::Serialize)]
pub struct InspectReport {
    pub sequences: u64,
    pub tokens: u64,
    pub shards: u64,
    pub shards_planned: u64,
    pub complete: bool,
    pub top_k: usize,
    pub vocab_size: usize,
    pub seq_len: usize,
    pub temperature: f32,
    pub bytes: u64,
    pub bytes_per_token: f64,
    /// Mean over positions of the probability mass in the stored top-k.
    pub mean_topk_mass: f64,
    /// Mean teacher entropy (nats), counting the tail as one outcome: a lower bound.
    pub mean_entropy_estimate: f64,
    /// The same with the tail spread evenly over the other V − k ids: an upper bound.
    pub mean_entropy_upper: f64,
    pub model_sha256: String,
    pub tokenizer_sha256: String,
    /// `topk`, `sample` or `hybrid`.
    pub mode: String,
    /// Draws per position (0 in `topk` mode).
    pub samples: usize,
    /// How the top-k log-probs are stored: `float16` or `q8`.
    pub logprob_dtype: String,
    /// Mean over positions of the distinct sampled ids (0 in `topk` mode).
    pub mean_distinct_ids: f64,
    /// Largest |stored − exact| log-prob the teacher stage measured while writing (float16
    /// rounding, or the q8 codes' error for the top-k), over the shards that recorded it
    /// (`null` for format-1 caches).
    pub max_logprob_error: Option<f32>,
    /// Largest |exp(stored) − exp(exact)| over the same values (`null` when a shard did not
    /// record it).
    pub max_prob_error: Option<f32>,
    /// The teacher's exact mean entropy (nats, over the whole vocabulary at the cache
    /// temperature), measured while writing at one position in 16; `null` when a shard did
    /// not record it.
    pub mean_entropy: Option<f64>,
    /// Corpus rows that were not valid and were skipped (`--skip-bad-rows`; 0 otherwise).
    pub bad_rows_skipped: u64,
    /// The first few of them, as `path:line: problem`.
    pub bad_row_examples: Vec<String>,
    /// Documents with empty text (skipped).
    pub empty_documents: u64,
}

/// Reads every shard of `dir` and summarises it.
pub fn inspect(dir: &Path) -> Result<InspectReport, ReadError> {
    let cache = Cache::open(dir)?;
    let m = &cache.manifest;
    let k = m.params.top_k;
    let rest = (m.vocab_size - k) as f64;
    let (mut mass, mut h_lo, mut h_hi, mut n) = (0f64, 0f64, 0f64, 0u64);
    let mut distinct = 0u64;
    for s in &m.shards {
        let rows = cache.read_shard(s)?;
        distinct += rows.sample_ids.len() as u64;
        if k == 0 {
            n += rows.positions() as u64;
            continue;
        }
        for (lps, &tail) in rows.topk_logprobs.chunks(k).zip(&rows.tail_logprob) {
            let mut h = 0f64;
            let mut sum = 0f64;
            for lp in lps {
                let lp = lp.to_f32() as f64;
                let p = lp.exp();
                sum += p;
                h -= p * lp;
            }
            let (pt, lt) = ((tail as f64).exp(), tail as f64);
            let tail_h = if pt > 0.0 { -pt * lt } else { 0.0 };
            mass += sum;
            h_lo += h + tail_h;
            h_hi += h
                + tail_h
                + if pt > 0.0 && rest > 0.0 {
                    pt * rest.ln()
                } else {
                    0.0
                };
            n += 1;
        }
    }
    let nn = n.max(1) as f64;
    let bytes = m.totals.bytes;
    Ok(InspectReport {
        sequences: m.totals.sequences,
        tokens: m.totals.tokens,
        shards: m.totals.shards,
        shards_planned: m.plan.shards,
        complete: m.totals.complete,
        top_k: k,
        vocab_size: m.vocab_size,
        seq_len: m.params.seq_len,
        temperature: m.params.temperature,
        bytes,
        bytes_per_token: bytes as f64 / m.totals.tokens.max(1) as f64,
        mean_topk_mass: mass / nn,
        mean_entropy_estimate: h_lo / nn,
        mean_entropy_upper: h_hi / nn,
        model_sha256: m.model.sha256.clone(),
        tokenizer_sha256: m.tokenizer.sha256.clone(),
        mode: m.params.mode.name().into(),
        samples: m.params.samples,
        logprob_dtype: m.params.logprob_dtype.name().into(),
        mean_distinct_ids: distinct as f64 / nn,
        max_logprob_error: m
            .shards
            .iter()
            .filter_map(|s| s.stats.as_ref().map(|t| t.max_logprob_error))
            .reduce(f32::max),
        max_prob_error: m
            .shards
            .iter()
            .map(|s| s.stats.as_ref().and_then(|t| t.max_prob_error))
            .collect::<Option<Vec<f32>>>()
            .and_then(|v| v.into_iter().reduce(f32::max)),
        mean_entropy: m.token_mean(|t| t.mean_entropy),
        bad_rows_skipped: m.plan.bad_rows_skipped,
        bad_row_examples: m.plan.bad_row_examples.clone(),
        empty_documents: m.plan.empty_documents,
    })
}

/// One position's top-k, decoded with `tokenizer` (which must be the cache's).
pub fn show(dir: &Path, tokenizer: &Path, seq_id: u64, pos: usize) -> anyhow::Result<String> {
    let cache = Cache::open(dir)?;
    cache.check_tokenizer(tokenizer)?;
    let tok = crate::tokenizer::load(tokenizer)?;
    let entry = cache.shard_of(seq_id).ok_or_else(|| {
        anyhow::anyhow!(
            "seq_id {seq_id} is not in the cache ({} sequences planned, shard {} {})",
            cache.manifest.plan.sequences,
            seq_id / cache.manifest.params.shard_size as u64,
            if seq_id < cache.manifest.plan.sequences {
                "is not written yet"
            } else {
                "does not exist"
            }
        )
    })?;
    let rows = cache.read_shard(entry)?;
    let r = rows
        .seq_ids
        .iter()
        .position(|&s| s == seq_id)
        .ok_or_else(|| {
            anyhow::anyhow!(
                "seq_id {seq_id} missing from {}; run `logitcache verify`",
                entry.file
            )
        })?;
    let (s, e) = (rows.offsets[r] as usize, rows.offsets[r + 1] as usize);
    if pos >= e - s {
        anyhow::bail!(
            "position {pos} is outside seq_id {seq_id}, which has {} positions (0..{})",
            e - s,
            e - s
        );
    }
    let k = rows.k;
    let dec = |ids: &[u32]| {
        tok.tokenizer
            .decode(ids, false)
            .unwrap_or_else(|_| "<?>".into())
    };
    let ctx_start = pos.saturating_sub(16);
    let mut out = String::new();
    out.push_str(&format!(
        "seq_id {seq_id} (document {}, window {}), position {pos} of {}\ncontext: {:?}\ncurrent token: {} {:?}\nnext token in the window: {}\n",
        rows.doc_ids[r],
        rows.window_index[r],
        e - s,
        dec(&rows.input_ids[s + ctx_start..=s + pos]),
        rows.input_ids[s + pos],
        dec(&rows.input_ids[s + pos..=s + pos]),
        if pos + 1 < e - s {
            format!("{} {:?}", rows.input_ids[s + pos + 1], dec(&rows.input_ids[s + pos + 1..=s + pos + 1]))
        } else {
            "(end of window)".into()
        }
    ));
    out.push_str(&format!(
        "{:>4}  {:>7}  {:>9}  {:>8}  token\n",
        "rank", "id", "logprob", "prob"
    ));
    let at = (s + pos) * k;
    if rows.layout.has_samples() {
        let (ids, counts) = rows.samples_at(s + pos);
        out.push_str(&format!(
            "{} of {} draws ({} distinct ids){}:\n",
            counts.iter().map(|&c| c as u64).sum::<u64>(),
            rows.layout.samples,
            ids.len(),
            if k > 0 { " from the tail" } else { "" }
        ));
        for (&id, &c) in ids.iter().zip(counts) {
            out.push_str(&format!("  {:>7}  x{:<5} {:?}\n", id, c, dec(&[id])));
        }
        if k == 0 {
            return Ok(out);
        }
    }
    for j in 0..k {
        let id = rows.topk_ids[at + j];
        let lp = rows.topk_logprobs[at + j].to_f32();
        out.push_str(&format!(
            "{:>4}  {:>7}  {:>9.4}  {:>8.5}  {:?}\n",
            j + 1,
            id,
            lp,
            lp.exp(),
            dec(&[id])
        ));
    }
    let tail = rows.tail_logprob[s + pos];
    out.push_str(&format!(
        "tail (all other ids): logprob {:.4}, prob {:.6}\n",
        tail,
        tail.exp()
    ));
    Ok(out)
}
