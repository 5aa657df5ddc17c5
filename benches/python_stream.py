"""Times the `logitcache` Python package's stream over a cache (the comparison for
benches/reader.rs): the same stream as the Rust side there (batch 32, no shuffle, every
window), every batch's fields turned into NumPy arrays.

Usage: python python_stream.py CACHE_DIR ROUNDS   -> prints {"positions": N, "seconds": best}
"""
import json
import sys
import time

import logitcache

cache, rounds = sys.argv[1], int(sys.argv[2])
best = float("inf")
positions = 0
for _ in range(rounds):
    t0 = time.perf_counter()
    positions = 0
    for b in logitcache.Stream(cache, 32, split="all", eval_fraction=0.0, shuffle=False, epochs=1):
        positions += int(b["mask"].sum())
    best = min(best, time.perf_counter() - t0)
print(json.dumps({"positions": positions, "seconds": best}))
