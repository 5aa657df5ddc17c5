"""Times pyarrow reading a logitcache cache into numpy (the comparison for benches/reader.rs):
every column a position has (top-k, q8, sampled), nested lists flattened to their values.

Usage: python pyarrow_read.py CACHE_DIR ROUNDS   -> prints {"positions": N, "seconds": best}
"""
import json
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

cache = Path(sys.argv[1])
rounds = int(sys.argv[2])
manifest = json.loads((cache / "manifest.json").read_text())
files = [cache / s["file"] for s in manifest["shards"]]
PER_POSITION = ["topk_ids", "topk_logprobs", "topk_logprob_max", "topk_logprob_step",
                "topk_logprob_deltas", "tail_logprob", "sample_ids", "sample_counts",
                "sample_logprobs", "sample_log_weights"]


def values(col):
    """The leaf values of a (nested) list column as numpy."""
    a = col.combine_chunks()
    while pa.types.is_list(a.type) or pa.types.is_fixed_size_list(a.type):
        a = a.flatten()
    return a.to_numpy()


best = float("inf")
positions = 0
for _ in range(rounds):
    t0 = time.perf_counter()
    positions = 0
    for f in files:
        t = pq.read_table(f)
        ids = t.column("input_ids").combine_chunks().values.to_numpy()
        for c in PER_POSITION:
            if c in t.column_names:
                values(t.column(c))
        positions += len(ids)
    best = min(best, time.perf_counter() - t0)
print(json.dumps({"positions": positions, "seconds": best}))
