"""Times pyarrow reading a logitcache cache into numpy (the comparison for benches/reader.rs).

Usage: python pyarrow_read.py CACHE_DIR ROUNDS   -> prints {"positions": N, "seconds": best}
"""
import json
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq

cache = Path(sys.argv[1])
rounds = int(sys.argv[2])
manifest = json.loads((cache / "manifest.json").read_text())
files = [cache / s["file"] for s in manifest["shards"]]
best = float("inf")
positions = 0
for _ in range(rounds):
    t0 = time.perf_counter()
    positions = 0
    for f in files:
        t = pq.read_table(f)
        ids = t.column("input_ids").combine_chunks().values.to_numpy()
        tk = t.column("topk_ids").combine_chunks().values.flatten().to_numpy()
        lp = t.column("topk_logprobs").combine_chunks().values.flatten().to_numpy()
        tail = t.column("tail_logprob").combine_chunks().values.to_numpy()
        positions += len(ids)
    best = min(best, time.perf_counter() - t0)
print(json.dumps({"positions": positions, "seconds": best}))
