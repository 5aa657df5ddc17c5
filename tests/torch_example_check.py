"""Checks runs of examples/distill_torch.py (spec JSON from tests/python_pkg.rs): each rank
trained on its Stream's batches, the ranks' first-epoch windows are disjoint and cover the
training split, the
checkpoint loads with from_pretrained and computes the saved model, a resumed run's weights
equal the uninterrupted run's. Prints a JSON report."""

import json
import sys

import torch
from safetensors.torch import load_file
from transformers import LlamaForCausalLM

import logitcache as lc

spec = json.load(open(sys.argv[1]))
out = {}
c = spec["stream"]
world = spec["world_size"]


def stream(rank, world_size):
    return lc.Stream(spec["cache"], c["batch_size"], split="train", eval_fraction=c["eval_fraction"], seed=c["seed"],
                     rank=rank, world_size=world_size, epochs=1)


split = sorted(int(s) for b in stream(0, 1) for s in b["seq_ids"])
seen = []
out["rank_matches_stream"] = True
for r in range(world):
    logged = [json.loads(line)["seq_ids"] for line in open(f"{spec['run']}/windows/rank-{r}.jsonl")]
    # The rank trained on its part of the endless training stream, batch for batch.
    endless = lc.Stream(spec["cache"], c["batch_size"], split="train", eval_fraction=c["eval_fraction"],
                        seed=c["seed"], rank=r, world_size=world, epochs=None)
    want = [[int(s) for s in next(endless)["seq_ids"]] for _ in logged]
    out["rank_matches_stream"] &= logged == want
    # Its first epoch: as many windows as the one-epoch stream has (an endless stream's last
    # batch of an epoch is filled up from the next one).
    n = sum(len(b["seq_ids"]) for b in stream(r, world))
    flat = [s for b in logged for s in b]
    out.setdefault("epoch_windows", []).append(n)
    out.setdefault("logged_windows", []).append(len(flat))
    seen.append(sorted(flat[:n]))
out["split_windows"] = len(split)
out["disjoint"] = all(not (set(seen[i]) & set(seen[j])) for i in range(world) for j in range(i + 1, world))
out["union_is_split"] = sorted(s for r in seen for s in r) == split

m = LlamaForCausalLM.from_pretrained(f"{spec['run']}/checkpoint")
saved = load_file(f"{spec['run']}/checkpoint/model.safetensors")
out["from_pretrained_equal"] = all(torch.equal(m.state_dict()[k], v) for k, v in saved.items())
ids = torch.tensor([[1, 2, 3, 4, 5]])
out["forward_finite"] = bool(torch.isfinite(m(input_ids=ids).logits).all())

a = load_file(f"{spec['run']}/checkpoint/model.safetensors")
b = load_file(f"{spec['resumed']}/checkpoint/model.safetensors")
out["resume_max_abs_diff"] = max(float((a[k] - b[k]).abs().max()) for k in a)
out["resume_same_keys"] = sorted(a) == sorted(b)
print(json.dumps(out))
