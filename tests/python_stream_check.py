"""Checks the `logitcache` Python package against batches the Rust stream produced (spec
JSON from tests/python_pkg.rs): every batch byte for byte, resume from state_dict, ranks
disjoint, metadata, and the exceptions of bad inputs. Prints a JSON report."""

import hashlib
import json
import os
import shutil
import sys

import logitcache as lc

spec = json.load(open(sys.argv[1]))
FIELDS = ["seq_ids", "input_ids", "target_ids", "target_mask", "mask", "topk_ids", "topk_logprobs", "tail_logprob"]


def stream(path, c, **over):
    kw = dict(split=c["split"], eval_fraction=c["eval_fraction"], seed=c["seed"], rank=c["rank"],
              world_size=c["world_size"], shuffle=c["shuffle"], epochs=c["epochs"])
    kw.update(over)
    return lc.Stream(path, c["batch_size"], **kw)


def take(s, n):
    out = []
    for b in s:
        out.append(b)
        if len(out) == n:
            break
    return out


def same(b, want):
    got = {f: hashlib.sha256(b[f].tobytes()).hexdigest() for f in FIELDS}
    bad = [f for f in FIELDS if got[f] != want["sha256"][f]]
    if [b["batch"], b["len"], b["k"]] != want["shape"]:
        bad.append("shape")
    if list(b.cursor) != want["cursor"]:
        bad.append("cursor")
    return bad


report = {"mismatches": [], "compared": 0, "batches": 0, "errors": {}}
resumed_ok = True
for cache in spec["caches"]:
    for i, c in enumerate(cache["confs"]):
        want = c["batches"]
        got = take(stream(cache["path"], c), len(want))
        report["compared"] += 1
        if len(got) != len(want):
            report["mismatches"].append(f"{cache['name']} conf {i}: {len(got)} batches, rust {len(want)}")
        for j, (b, w) in enumerate(zip(got, want)):
            report["batches"] += 1
            bad = same(b, w)
            if bad:
                report["mismatches"].append(f"{cache['name']} conf {i} batch {j}: {bad}")
        # Resume after batch 2 in a new stream: the rest is the same.
        if len(want) > 3:
            s = stream(cache["path"], c)
            take(s, 2)
            state = json.loads(json.dumps(s.state_dict()))
            r = stream(cache["path"], c)
            r.load_state_dict(state)
            rest = take(r, len(want) - 2)
            resumed_ok &= len(rest) == len(want) - 2 and all(not same(b, w) for b, w in zip(rest, want[2:]))

# Two ranks of one epoch: disjoint, and together the whole split.
hy = spec["caches"][2]["path"]
c = dict(split="train", eval_fraction=0.25, seed=7, rank=0, world_size=1, batch_size=3, shuffle=True, epochs=1)
ids = lambda s: [int(x) for b in s for x in b["seq_ids"]]
whole = ids(stream(hy, c))
r0, r1 = ids(stream(hy, c, rank=0, world_size=2)), ids(stream(hy, c, rank=1, world_size=2))
report["ranks_disjoint_and_cover"] = not (set(r0) & set(r1)) and sorted(r0 + r1) == sorted(whole) and len(set(whole)) == len(whole)
report["resumed_equal"] = bool(resumed_ok)

m = lc.Cache(hy)
report["metadata"] = {"mode": m.mode, "k": m.k, "samples": m.samples, "vocab": m.vocab_size,
                      "sequences": m.sequences, "tokens": m.tokens, "verify_ok": m.verify()["ok"]}
m.check_tokenizer(spec["tokenizer"])


def error(name, f):
    try:
        f()
    except Exception as e:  # noqa: BLE001 - the type is what is checked
        report["errors"][name] = {"type": type(e).__name__, "message": str(e)}
    else:
        report["errors"][name] = {"type": None, "message": ""}


scratch = spec["scratch"]


def copy(name):
    d = os.path.join(scratch, f"pycheck-{name}-{os.getpid()}")
    shutil.rmtree(d, ignore_errors=True)
    shutil.copytree(spec["caches"][0]["path"], d)
    return d


top = spec["caches"][0]["path"]
error("rank_ge_world", lambda: lc.Stream(top, 2, rank=2, world_size=2))
error("empty_split", lambda: list(lc.Stream(top, 2, split="eval", eval_fraction=1e-6)))
tok_other = os.path.join(scratch, f"pycheck-tok-{os.getpid()}.json")
open(tok_other, "w").write("{}")
error("tokenizer", lambda: lc.Cache(top).check_tokenizer(tok_other))
d = copy("missing")
first = lc.Cache(d).manifest["shards"][0]["file"]
os.remove(os.path.join(d, first))
error("missing_shard", lambda: list(lc.Stream(d, 2, split="all", eval_fraction=0.0)))
d = copy("corrupt")
p = os.path.join(d, lc.Cache(d).manifest["shards"][0]["file"])
data = bytearray(open(p, "rb").read())
data[len(data) // 2] ^= 0xFF
open(p, "wb").write(bytes(data))


def corrupt():
    r = lc.Cache(d).verify()
    if not r["ok"]:
        raise lc.CacheError("; ".join(r["problems"]))


error("corrupt_shard", corrupt)
d = copy("edited")
mp = os.path.join(d, "manifest.json")
mj = json.load(open(mp))
mj["params"]["top_k"] = 3
json.dump(mj, open(mp, "w"))
error("edited_manifest", lambda: lc.Cache(d))
error("not_a_cache", lambda: lc.Cache(scratch))
s = lc.Stream(top, 2, seed=1)
error("other_stream_state", lambda: lc.Stream(top, 2, seed=2).load_state_dict(s.state_dict()))
error("bad_split", lambda: lc.Stream(top, 2, split="test"))
print(json.dumps(report))
