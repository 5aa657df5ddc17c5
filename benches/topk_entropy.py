"""How small a q8 top-k cache could get with other id orders: measured entropies of what it
stores (the figures behind issue 12's "top-k ≤ 0.65x today's bytes" analysis).

For a q8 top-k cache (`logitcache teacher --logprob-dtype q8`) this reads every position's ids
and 8-bit codes and prints, in bits per stored (id, code) entry:
- what the shards spend on `topk_ids` and `topk_logprob_deltas` today;
- the empirical order-0 entropy of the ids as stored (most likely first), overall and given
  the rank, and of the code deltas: an ideal per-rank entropy coder of today's layout;
- the same with the ids sorted within each position (gaps between sorted ids, then the codes
  in id order, where they no longer rise along the position);
and the B/token each would give with the other columns as they are. These are order-0
estimates over the cache itself (Miller-Madow corrected), not strict lower bounds: zstd also
finds repeated contexts (the same token's top-k recurring), which pays most on small corpora;
and over fewer positions than a few times the vocabulary the per-rank estimate is biased low
(the output says so).

Usage: python benches/topk_entropy.py CACHE_DIR   (pyarrow + numpy; prints JSON)
"""
import json
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

cache = Path(sys.argv[1])
m = json.loads((cache / "manifest.json").read_text())
prm = m["params"]
if prm.get("logprob_dtype") != "q8" or prm.get("mode", "topk") != "topk":
    sys.exit(f"{cache}: needs a q8 top-k cache (logitcache teacher --logprob-dtype q8), not "
             f"mode {prm.get('mode', 'topk')} / log-probs {prm.get('logprob_dtype')}")
k = prm["top_k"]


def leaves(col):
    a = col.combine_chunks()
    while pa.types.is_list(a.type) or pa.types.is_fixed_size_list(a.type):
        a = a.flatten()
    return a.to_numpy()


ids, deltas, column_bytes = [], [], {}
for s in m["shards"]:
    f = pq.ParquetFile(cache / s["file"])
    for rg in range(f.metadata.num_row_groups):
        for ci in range(f.metadata.num_columns):
            c = f.metadata.row_group(rg).column(ci)
            name = c.path_in_schema.split(".")[0]
            column_bytes[name] = column_bytes.get(name, 0) + c.total_compressed_size
    t = f.read(columns=["topk_ids", "topk_logprob_deltas"])
    ids.append(leaves(t.column("topk_ids")))
    deltas.append(leaves(t.column("topk_logprob_deltas")))
ids = np.concatenate(ids).astype(np.int64).reshape(-1, k)
deltas = np.concatenate(deltas).astype(np.int64).reshape(-1, k)
codes = np.cumsum(deltas, axis=1) % 256  # running differences along a position, mod 256
positions = ids.shape[0]
tokens = m["totals"]["tokens"]


def entropy(x):
    """Plug-in entropy in bits with the Miller-Madow correction (+ (K - 1) / 2N nats)."""
    _, n = np.unique(x, return_counts=True)
    p = n / n.sum()
    return float(-(p * np.log2(p)).sum() + (len(n) - 1) / (2 * n.sum() * np.log(2)))


assert positions == tokens, f"{positions} positions read, the manifest says {tokens} tokens"
per_entry = 8.0 / (positions * k)  # bytes -> bits per stored entry
ids_now = column_bytes["topk_ids"] * per_entry
codes_now = column_bytes["topk_logprob_deltas"] * per_entry
other = (m["totals"]["bytes"] - column_bytes["topk_ids"] - column_bytes["topk_logprob_deltas"]) / tokens
by_rank = float(np.mean([entropy(ids[:, j]) for j in range(k)]))
code_deltas = entropy(deltas.ravel())
sorted_ids = np.sort(ids, axis=1)
gaps = np.diff(sorted_ids, axis=1, prepend=-1)
codes_by_id = np.take_along_axis(codes, np.argsort(ids, axis=1), axis=1)
codes_in_id_order = entropy(codes_by_id.ravel())


def bytes_per_token(bits):
    return round(other + bits * k / 8.0, 1)


report = {
    "cache": str(cache), "positions": positions, "k": k, "vocab": m["vocab_size"],
    "bytes_per_token": round(m["totals"]["bytes"] / tokens, 1),
    "other_columns_bytes_per_token": round(other, 2),
    "bits_per_entry": {
        "ids_stored": round(ids_now, 2), "codes_stored": round(codes_now, 2),
        "ids_uniform": round(float(np.log2(m["vocab_size"])), 2),
        "ids_order0": round(entropy(ids.ravel()), 2), "ids_given_rank": round(by_rank, 2),
        "code_deltas_order0": round(code_deltas, 2),
        "sorted_id_gaps_order0": round(entropy(gaps.ravel()), 2),
        "codes_in_id_order_order0": round(codes_in_id_order, 2),
    },
    "bytes_per_token_if": {
        "today_layout_ideal_coder": bytes_per_token(by_rank + code_deltas),
        "sorted_ids_ideal_coder": bytes_per_token(entropy(gaps.ravel()) + codes_in_id_order),
    },
}
if positions < 4 * m["vocab_size"]:
    report["warning"] = (f"{positions} positions for a vocabulary of {m['vocab_size']}: the per-rank id "
                         "entropy (ids_given_rank, today_layout_ideal_coder) is biased low; use a larger corpus")
print(json.dumps(report, indent=1))
