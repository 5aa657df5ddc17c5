"""Checks logitcache.torch.CacheDataset under a DataLoader (spec JSON from tests/python_pkg.rs):
with W DataLoader workers on each of R ranks, one epoch's windows are disjoint across every
(rank, worker) and together are the split; batches arrive as tensors; a dataset resumed from
a batch's state (num_workers=0) continues with the batches that followed it; resuming with
workers is refused. Prints a JSON report."""

import json
import sys

import torch

import logitcache as lc
from logitcache.torch import CacheDataset

spec = json.load(open(sys.argv[1]))
path, bs, seed, frac = spec["cache"], spec["batch_size"], spec["seed"], spec["eval_fraction"]
out = {}
split = sorted(int(s) for b in lc.Stream(path, bs, eval_fraction=frac, seed=seed, epochs=1) for s in b["seq_ids"])
out["split_windows"] = len(split)

for ranks, workers in ((1, 2), (2, 2), (3, 0)):
    seen = []
    types = set()
    for r in range(ranks):
        ds = CacheDataset(path, bs, eval_fraction=frac, seed=seed, rank=r, world_size=ranks, epochs=1)
        # Workers are forked after this process ran streams (above): a worker that hangs
        # (e.g. on the parent's thread pool) fails the check after the timeout.
        dl = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers, timeout=120 if workers else 0)
        mine = []
        for b in dl:
            types.add(type(b["input_ids"]).__name__ + ":" + str(b["input_ids"].dtype))
            mine.extend(int(s) for s in b["seq_ids"])
        seen.append(mine)
    flat = [s for m in seen for s in m]
    key = f"ranks{ranks}_workers{workers}"
    out[key] = {
        "no_repeats": len(flat) == len(set(flat)),
        "union_is_split": sorted(flat) == split,
        "every_rank_got_windows": all(seen),
        "types": sorted(types),
    }

# Resume: the state of batch 2 of a rank continues with batch 3 onwards.
ds = CacheDataset(path, bs, eval_fraction=frac, seed=seed, rank=1, world_size=2, epochs=2)
full = list(torch.utils.data.DataLoader(ds, batch_size=None, num_workers=0))
again = CacheDataset(path, bs, eval_fraction=frac, seed=seed, rank=1, world_size=2, epochs=2)
again.load_state_dict(full[2]["state"])
rest = list(torch.utils.data.DataLoader(again, batch_size=None, num_workers=0))
out["resume_equal"] = [b["seq_ids"].tolist() for b in rest] == [b["seq_ids"].tolist() for b in full[3:]] and all(
    torch.equal(a["topk_logprobs"], b["topk_logprobs"]) for a, b in zip(rest, full[3:]))
out["resume_batches"] = len(rest)
try:
    list(torch.utils.data.DataLoader(again, batch_size=None, num_workers=2, timeout=120))
    out["resume_with_workers_refused"] = False
except ValueError as e:
    out["resume_with_workers_refused"] = "num_workers=0" in str(e)
try:
    CacheDataset(path, bs, rank=2, world_size=2)
    out["bad_rank_refused"] = False
except ValueError as e:
    out["bad_rank_refused"] = "not below world_size" in str(e)
print(json.dumps(out))
