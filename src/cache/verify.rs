//! `logitcache verify`: every shard's sha256, schema and contents against the manifest.

use super::reader::{Cache, ReadError};
use super::schema::CacheMode;
use crate::util::sha256_file;
use std::collections::BTreeSet;
use std::path::Path;

/// The outcome of a verification: `ok` only when there are no problems.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct VerifyReport {
    pub ok: bool,
    pub shards_checked: u64,
    pub shards_planned: u64,
    pub sequences: u64,
    pub tokens: u64,
    pub problems: Vec<String>,
    pub warnings: Vec<String>,
}

/// Verifies the cache in `dir`. A manifest that cannot be trusted is an `Err`; everything
/// else found wrong is listed in the report's `problems`.
pub fn verify(dir: &Path) -> Result<VerifyReport, ReadError> {
    let cache = Cache::open(dir)?;
    let m = &cache.manifest;
    let p = &m.params;
    let mut r = VerifyReport {
        shards_planned: m.plan.shards,
        ..Default::default()
    };
    let mut seen = BTreeSet::new();
    for s in &m.shards {
        let path = dir.join(&s.file);
        let name = &s.file;
        if !seen.insert(s.index) {
            r.problems
                .push(format!("shard {} is listed twice in the manifest", s.index));
            continue;
        }
        match sha256_file(&path) {
            Err(e) => {
                r.problems.push(format!("{name}: cannot read ({e})"));
                continue;
            }
            Ok((sha, bytes)) => {
                if bytes != s.bytes {
                    r.problems.push(format!(
                        "{name}: {bytes} bytes on disk, manifest says {} (truncated or replaced)",
                        s.bytes
                    ));
                    continue;
                }
                if sha != s.sha256 {
                    r.problems.push(format!("{name}: sha256 {sha} does not match the manifest's {} (the file is damaged)", s.sha256));
                    continue;
                }
            }
        }
        let rows = match cache.read_shard(s) {
            Ok(rows) => rows,
            Err(e) => {
                r.problems.push(e.to_string());
                continue;
            }
        };
        r.shards_checked += 1;
        r.sequences += rows.rows() as u64;
        r.tokens += rows.positions() as u64;
        if rows.rows() as u64 != s.rows || rows.positions() as u64 != s.tokens {
            r.problems.push(format!(
                "{name}: holds {} rows / {} tokens, manifest says {} / {}",
                rows.rows(),
                rows.positions(),
                s.rows,
                s.tokens
            ));
        }
        let first = s.index * p.shard_size as u64;
        let last = ((s.index + 1) * p.shard_size as u64).min(m.plan.sequences);
        let expected: Vec<u64> = (first..last).collect();
        if rows.seq_ids != expected {
            r.problems.push(format!(
                "{name}: seq_ids are not the range {first}..{last} the plan assigns to shard {}",
                s.index
            ));
        }
        let v = m.vocab_size as u32;
        if let Some(bad) = rows
            .input_ids
            .iter()
            .chain(&rows.topk_ids)
            .find(|&&t| t >= v)
        {
            r.problems.push(format!(
                "{name}: token id {bad} is outside the vocabulary ({v})"
            ));
        }
        if rows
            .offsets
            .windows(2)
            .any(|w| (w[1] - w[0]) as usize > p.seq_len || w[1] == w[0])
        {
            r.problems.push(format!(
                "{name}: a window is empty or longer than seq_len {}",
                p.seq_len
            ));
        }
        if let Some(bad) = rows.sample_ids.iter().find(|&&t| t >= v) {
            r.problems.push(format!(
                "{name}: sampled token id {bad} is outside the vocabulary ({v})"
            ));
        }
        if p.mode != CacheMode::Topk {
            let bad = (0..rows.positions()).find(|&q| {
                let (ids, counts) = rows.samples_at(q);
                let n: usize = counts.iter().map(|&c| c as usize).sum();
                // A hybrid position whose tail has no mass draws nothing.
                let n_ok = n == p.samples || (p.mode == CacheMode::Hybrid && n == 0);
                !n_ok || ids.windows(2).any(|w| w[0] >= w[1]) || counts.contains(&0)
            });
            if let Some(q) = bad {
                r.problems.push(format!(
                    "{name}: position {q}: the draws are not {} counts ≥ 1 over ascending ids",
                    p.samples
                ));
            }
        }
        let k = p.layout().k.max(1);
        let bad_order = rows.topk_logprobs.chunks(k).position(|c| {
            c.iter().any(|x| x.to_f32().is_nan() || x.to_f32() > 0.0)
                || c.windows(2).any(|w| w[0] < w[1])
        });
        if let Some(pos) = bad_order {
            r.problems.push(format!(
                "{name}: position {pos}: top-k log-probs are not ≤ 0 and descending"
            ));
        }
        if let Some(pos) = rows
            .tail_logprob
            .iter()
            .position(|t| t.is_nan() || *t > 0.0)
        {
            r.problems.push(format!(
                "{name}: position {pos}: tail log-prob is NaN or > 0"
            ));
        }
    }
    // Totals are comparable only when every listed shard could be read (a damaged shard is
    // already reported above).
    if r.shards_checked as usize == m.shards.len()
        && (r.sequences != m.totals.sequences || r.tokens != m.totals.tokens)
    {
        r.problems.push(format!(
            "manifest totals ({} sequences, {} tokens) do not match the shards ({} sequences, {} tokens)",
            m.totals.sequences, m.totals.tokens, r.sequences, r.tokens
        ));
    }
    let missing: Vec<u64> = (0..m.plan.shards).filter(|i| !seen.contains(i)).collect();
    if !missing.is_empty() {
        let list: Vec<String> = missing.iter().take(20).map(|i| i.to_string()).collect();
        r.problems.push(format!(
            "incomplete: {} of {} planned shards are not written (shards {}{}); run the teacher again with the same arguments to finish",
            missing.len(),
            m.plan.shards,
            list.join(", "),
            if missing.len() > 20 { ", …" } else { "" }
        ));
    }
    if let Ok(entries) = std::fs::read_dir(dir.join("shards")) {
        let listed: BTreeSet<String> = m.shards.iter().map(|s| s.file.clone()).collect();
        for e in entries.flatten() {
            let rel = format!("shards/{}", e.file_name().to_string_lossy());
            if !listed.contains(&rel) {
                r.warnings.push(format!("{rel} is not in the manifest (left by an interrupted run; the next teacher run replaces or removes it)"));
            }
        }
    }
    r.ok = r.problems.is_empty();
    Ok(r)
}
