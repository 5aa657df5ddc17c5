"""Exports a Hugging Face Llama checkpoint with PyTorch's own ONNX exporter
(`torch.onnx.export(..., dynamo=True)`: its attention, mask and rotary ops, weights as ONNX
external data), not `logitcache export-onnx`: the graph a user of torch.onnx brings to the
teacher stage. `input_ids`, `attention_mask` -> `logits`, batch and sequence axes dynamic.
Spec JSON from tests/python_pkg.rs: {"checkpoint", "out"}. Prints a JSON report."""

import contextlib
import json
import os
import sys

import torch
from transformers import LlamaForCausalLM

spec = json.load(open(sys.argv[1]))
model = LlamaForCausalLM.from_pretrained(spec["checkpoint"], dtype=torch.float32).eval()


class Logits(torch.nn.Module):
    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, input_ids, attention_mask):
        return self.m(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


ids = torch.ones((2, 16), dtype=torch.long)
batch, seq = torch.export.Dim("batch_size"), torch.export.Dim("sequence_length")
os.makedirs(os.path.dirname(spec["out"]), exist_ok=True)
# The exporter reports its progress on stdout, where this script's report goes.
with contextlib.redirect_stdout(sys.stderr):
    torch.onnx.export(
        Logits(model), (ids, torch.ones_like(ids)), spec["out"],
        input_names=["input_ids", "attention_mask"], output_names=["logits"],
        dynamic_shapes={"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}},
        dynamo=True, external_data=True,
    )
d = os.path.dirname(spec["out"])
print(json.dumps({"files": sorted(os.listdir(d))}))
