"""Reads a logitcache cache with pyarrow alone and prints sums and every row, which the Rust
test compares with its own reader.

Usage: python pyarrow_check.py CACHE_DIR
"""
import json
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

cache = Path(sys.argv[1])
manifest = json.loads((cache / "manifest.json").read_text())
tables = [pq.read_table(cache / s["file"]) for s in sorted(manifest["shards"], key=lambda s: s["index"])]
out = {"rows": 0, "positions": 0, "seq_id_sum": 0, "input_ids_sum": 0, "topk_ids_sum": 0,
       "topk_logprobs_sum": 0.0, "tail_logprob_sum": 0.0}
for t in tables:
    out["rows"] += t.num_rows
    ids = t.column("input_ids").combine_chunks()
    out["positions"] += len(ids.values)
    out["seq_id_sum"] += int(t.column("seq_id").to_numpy().astype(np.uint64).sum())
    out["input_ids_sum"] += int(ids.values.to_numpy().astype(np.uint64).sum())
    tk = t.column("topk_ids").combine_chunks().values.flatten().to_numpy()
    out["topk_ids_sum"] += int(tk.astype(np.uint64).sum())
    lp = t.column("topk_logprobs").combine_chunks().values.flatten().to_numpy()
    out["topk_logprobs_sum"] += float(lp.astype(np.float64).sum())
    tail = t.column("tail_logprob").combine_chunks().values.to_numpy().astype(np.float64)
    out["tail_logprob_sum"] += float(tail[np.isfinite(tail)].sum())
first = tables[0]
out["topk_logprobs_type"] = str(first.schema.field("topk_logprobs").type)
out["first_position"] = {
    "ids": first.column("topk_ids")[0].as_py()[0],
    "logprobs": [float(x) for x in first.column("topk_logprobs")[0].as_py()[0]],
}
# Every row, in shard order: ids, list lengths and order, and each value.
out["rows_full"] = []
for t in tables:
    for r in t.to_pylist():
        out["rows_full"].append({
            "seq_id": r["seq_id"], "doc_id": r["doc_id"], "window_index": r["window_index"],
            "input_ids": r["input_ids"], "topk_ids": r["topk_ids"],
            "topk_logprobs": [[float(x) for x in p] for p in r["topk_logprobs"]],
            "tail_logprob": [None if not np.isfinite(x) else float(x) for x in r["tail_logprob"]],
        })
print(json.dumps(out))
