"""Reads a logitcache cache with DuckDB, Polars and Hugging Face `datasets` (no logitcache
code) and prints the sums the Rust test compares with its own reader: rows, positions, and
the sums of the token, top-k and sampled ids and counts each engine decodes.

Usage: python interop_check.py CACHE_DIR
"""
import json
import os
import sys
import tempfile
from pathlib import Path

# `datasets` offline, with its Arrow cache in a throw-away directory (not ~/.cache).
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] = "1"

import datasets
import duckdb
import polars as pl

cache = Path(sys.argv[1])
glob = str(cache / "shards" / "*.parquet")
cols = set(pl.read_parquet_schema(sorted((cache / "shards").glob("*.parquet"))[0]))

# DuckDB: SQL over the shard files, nested lists flattened with unnest.
con = duckdb.connect()
q = lambda sql: con.execute(sql.replace("SHARDS", f"'{glob}'")).fetchone()[0]
out = {"duckdb": {}, "polars": {}, "datasets": {}}
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
# Hugging Face datasets: the shards as a dataset (load_dataset("parquet", ...)), values read
# back as Python lists.
def flat(x):
    if isinstance(x, list):
        for v in x:
            yield from flat(v)
    else:
        yield x


with tempfile.TemporaryDirectory() as hf_cache:
    ds = datasets.load_dataset("parquet", data_files=glob, split="train", cache_dir=hf_cache)
    h = out["datasets"]
    h["rows"] = ds.num_rows
    column = lambda c: list(ds[c])  # a column as Python values (datasets 5: a lazy Column)
    h["positions"] = sum(len(x) for x in column("input_ids"))
    h["input_ids_sum"] = sum(flat(column("input_ids")))
    for c in ["topk_ids", "sample_ids", "sample_counts", "topk_logprob_deltas"]:
        if c in cols:
            h[f"{c}_sum"] = int(sum(flat(column(c))))
    for c in ["topk_logprob_max", "topk_logprob_step", "topk_logprobs"]:
        if c in cols:
            h[f"{c}_sum"] = float(sum(float(v) for v in flat(column(c))))
print(json.dumps(out))
