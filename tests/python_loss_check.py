"""Compares logitcache.torch.kd_loss (value and gradient, unchunked and chunked) with the
Rust loss's golden values (spec JSON from tests/python_pkg.rs). Prints a JSON report."""

import json
import sys

import numpy as np
import torch

import logitcache as lc
from logitcache.torch import kd_loss, to_torch

spec = json.load(open(sys.argv[1]))
results = []
for case in spec["cases"]:
    c = case["conf"]
    s = lc.Stream(case["path"], c["batch_size"], split=c["split"], eval_fraction=c["eval_fraction"], seed=c["seed"],
                  rank=c["rank"], world_size=c["world_size"], shuffle=c["shuffle"], epochs=c["epochs"])
    batch = to_torch(next(s))
    logits = np.fromfile(case["logits"], dtype="<f4").reshape(batch["batch"], batch["len"], case["vocab"])
    for run in case["runs"]:
        want_grad = np.fromfile(run["grad"], dtype="<f4").reshape(logits.shape)
        out = {"case": case["name"], "loss": run["loss"], "temperature": run["temperature"]}
        for chunk, key in ((None, "grad_max_abs_diff"), (7, "grad_chunked_max_abs_diff")):
            z = torch.from_numpy(logits.copy()).requires_grad_(True)
            total, parts = kd_loss(z, batch, loss=run["loss"], temperature=run["temperature"],
                                   kd_weight=run["kd_weight"], ce_weight=run["ce_weight"], chunk=chunk)
            total.backward()
            out[key] = float(np.abs(z.grad.numpy() - want_grad).max())
            if chunk is None:
                out["total_abs_diff"] = abs(float(total) - run["total"])
                out["kd_abs_diff"] = abs(float(parts["kd"]) - run["kd"])
                out["ce_abs_diff"] = abs(float(parts["ce"]) - run["ce"])
                out["total"] = float(total)
                out["grad_max_abs"] = float(np.abs(want_grad).max())
        results.append(out)
print(json.dumps({"results": results}))
