"""Checks a cache made from a Hugging Face Llama checkpoint exported by `logitcache
export-onnx` against transformers' own forward of that checkpoint (spec JSON from
tests/python_pkg.rs: {"cache", "checkpoint"}): for every stored window, the top-k ids are the
reference's top-k (ties allowed) and each stored log-prob is within one float16 step of the
reference `log_softmax` (computed in float64 over the tokenizer's ids, as the teacher
renormalises over them). Prints a JSON report."""

import glob
import json
import sys

import numpy as np
import pyarrow.parquet as pq
import torch
from transformers import LlamaForCausalLM

spec = json.load(open(sys.argv[1]))
manifest = json.load(open(f"{spec['cache']}/manifest.json"))
tv = manifest["tokenizer"]["vocab_size"]
model = LlamaForCausalLM.from_pretrained(spec["checkpoint"], dtype=torch.float32).eval()
out = {"rows": 0, "positions": 0, "max_abs_err": 0.0, "max_err_in_f16_steps": 0.0, "topk_set_err": 0.0,
       "top1_agree": 0}
for path in sorted(glob.glob(f"{spec['cache']}/shards/*.parquet")):
    for row in pq.read_table(path).to_pylist():
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([row["input_ids"]], dtype=torch.long)).logits[0, :, :tv]
        ref = torch.log_softmax(logits.double(), -1).numpy()
        ids = np.array(row["topk_ids"], dtype=np.int64)
        lp = np.array(row["topk_logprobs"], dtype=np.float64)
        at = np.take_along_axis(ref, ids, 1)
        err = np.abs(at - lp)
        step = np.spacing(np.abs(at).astype(np.float16)).astype(np.float64)
        best = -np.sort(-ref, axis=1)[:, : ids.shape[1]]
        out["rows"] += 1
        out["positions"] += ids.shape[0]
        out["max_abs_err"] = max(out["max_abs_err"], float(err.max()))
        out["max_err_in_f16_steps"] = max(out["max_err_in_f16_steps"], float((err / step).max()))
        out["topk_set_err"] = max(out["topk_set_err"], float(np.abs(np.sort(at, 1) - np.sort(best, 1)).max()))
        out["top1_agree"] += int((ids[:, 0] == ref.argmax(-1)).sum())
print(json.dumps(out))
