"""Reads a `sample` or `hybrid` logitcache cache with pyarrow alone, turns every position
into a dense distribution with the recipe of schemas/README.md, and prints sums the Rust
test compares.

Usage: python pyarrow_sample_check.py CACHE_DIR
"""
import json
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

cache = Path(sys.argv[1])
manifest = json.loads((cache / "manifest.json").read_text())
params = manifest["params"]
mode, n, vocab = params["mode"], params["samples"], manifest["vocab_size"]


def topk_logprobs(row, p):
    """Position p's top-k log-probs, float16 or q8 (`params.logprob_dtype`)."""
    if params["logprob_dtype"] == "float16":
        return np.asarray(row["topk_logprobs"][p], dtype=np.float64)
    codes = np.cumsum(np.asarray(row["topk_logprob_deltas"][p], dtype=np.uint8), dtype=np.uint8)
    mx, step = np.float32(row["topk_logprob_max"][p]), np.float32(row["topk_logprob_step"][p])
    lp = mx - step * codes.astype(np.float32) ** 2
    return np.where(codes == 255, -np.inf, lp).astype(np.float64)


def dense(row, p):
    """Position p of a shard row (a dict of pyarrow's to_pylist) as a dense distribution."""
    q = np.zeros(vocab)
    tail = 1.0
    if mode == "hybrid":
        ids, lps = row["topk_ids"][p], topk_logprobs(row, p)
        out["topk_logprobs_sum"] += float(lps[np.isfinite(lps)].sum())
        q[ids] = np.exp(lps)
        tail = float(np.exp(row["tail_logprob"][p]))
    ids, counts = row["sample_ids"][p], row["sample_counts"][p]
    if "sample_log_weights" in row:  # a proposal q != p: importance weights p/q
        w = np.exp(np.asarray(row["sample_log_weights"][p], dtype=np.float64))
        q[ids] += np.asarray(counts, dtype=np.float64) / n * w
    else:
        q[ids] += tail * np.asarray(counts, dtype=np.float64) / n
    return q


out = {"positions": 0, "entries": 0, "sample_ids_sum": 0, "max_mass_error": 0.0,
       "has_logprobs": False, "topk_logprobs_sum": 0.0, "mass_sum": 0.0}
for s in sorted(manifest["shards"], key=lambda s: s["index"]):
    t = pq.read_table(cache / s["file"])
    out["has_logprobs"] |= "sample_logprobs" in t.column_names
    for row in t.to_pylist():
        for p in range(len(row["input_ids"])):
            out["positions"] += 1
            out["entries"] += len(row["sample_ids"][p])
            out["sample_ids_sum"] += int(sum(row["sample_ids"][p]))
            q = dense(row, p)
            out["mass_sum"] += float(q.sum())
            tail_empty = mode == "hybrid" and not row["sample_ids"][p]
            if not tail_empty:
                out["max_mass_error"] = max(out["max_mass_error"], abs(q.sum() - 1.0))
print(json.dumps(out))
