"""Reads a logitcache cache with DuckDB and with Polars (no logitcache code) and prints the
sums the Rust test compares with its own reader: rows, positions, and the sums of the token,
top-k and sampled ids and counts each engine decodes.

Usage: python interop_check.py CACHE_DIR
"""
import json
import sys
from pathlib import Path

import duckdb
import polars as pl

cache = Path(sys.argv[1])
glob = str(cache / "shards" / "*.parquet")
cols = set(pl.read_parquet_schema(sorted((cache / "shards").glob("*.parquet"))[0]))

# DuckDB: SQL over the shard files, nested lists flattened with unnest.
con = duckdb.connect()
q = lambda sql: con.execute(sql.replace("SHARDS", f"'{glob}'")).fetchone()[0]
out = {"duckdb": {}, "polars": {}}
d = out["duckdb"]
d["rows"] = q("select count(*) from SHARDS")
d["positions"] = q("select sum(len(input_ids)) from SHARDS")
d["input_ids_sum"] = q("select sum(x) from (select unnest(input_ids) as x from SHARDS)")
if "topk_ids" in cols:
    d["topk_ids_sum"] = q("select sum(x) from (select unnest(flatten(topk_ids)) as x from SHARDS)")
if "topk_logprobs" in cols:
    d["topk_logprobs_sum"] = q(
        "select sum(x::double) from (select unnest(flatten(topk_logprobs)) as x from SHARDS)")
if "topk_logprob_deltas" in cols:  # q8: the code deltas and their per-position scale
    d["topk_logprob_deltas_sum"] = q(
        "select sum(x) from (select unnest(flatten(topk_logprob_deltas)) as x from SHARDS)")
    for c in ["topk_logprob_max", "topk_logprob_step"]:
        d[f"{c}_sum"] = q(f"select sum(x::double) from (select unnest({c}) as x from SHARDS)")
if "sample_ids" in cols:
    d["sample_ids_sum"] = q("select sum(x) from (select unnest(flatten(sample_ids)) as x from SHARDS)")
    d["sample_counts_sum"] = q(
        "select sum(x) from (select unnest(flatten(sample_counts)) as x from SHARDS)")

# Polars: the same from DataFrames.
df = pl.read_parquet(glob)
p = out["polars"]
p["rows"] = df.height
p["positions"] = int(df["input_ids"].list.len().sum())
p["input_ids_sum"] = int(df["input_ids"].explode().cast(pl.UInt64).sum())
for c in ["topk_ids", "sample_ids", "sample_counts"]:
    if c in cols:
        p[f"{c}_sum"] = int(df[c].explode().explode().drop_nulls().cast(pl.UInt64).sum())
if "topk_logprob_deltas" in cols:
    p["topk_logprob_deltas_sum"] = int(
        df["topk_logprob_deltas"].explode().explode().cast(pl.UInt64).sum())
    for c in ["topk_logprob_max", "topk_logprob_step"]:
        p[f"{c}_sum"] = float(df[c].explode().cast(pl.Float64).sum())
if "topk_logprobs" in cols:
    p["topk_logprobs_sum"] = float(df["topk_logprobs"].explode().explode().cast(pl.Float64).sum())
print(json.dumps(out))
