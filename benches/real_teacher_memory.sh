#!/usr/bin/env bash
# Peak RSS of `logitcache teacher` on teachers the size of real ones (numbers for the closing
# note of issue 14; benches/teacher_memory.sh measures the logits' share on toy teachers):
# random-initialised Hugging Face `LlamaForCausalLM`s shaped like
# - Qwen2.5-0.5B (V = 151936, hidden 896, 24 layers, 14 heads / 2 KV heads, MLP 4864, tied
#   head: 494M parameters, 1.98 GB float32), and
# - TinyLlama-1.1B (V = 32000, hidden 2048, 22 layers, 32 / 4 heads, MLP 5632, untied:
#   1.1B parameters, 4.4 GB),
# (both over 1 GiB, so `export-onnx` writes their weights as external data),
# saved by transformers (`save_pretrained`), exported by `logitcache export-onnx`, run by
# `teacher` with the default flags at --seq-len 512 and 2048 on a corpus of a few full
# windows. Goal: peak RSS <= model size + 2 GB. Each run also compares the cache's first
# window with transformers' own forward of the checkpoint (max |Δ log-prob| over the top-k,
# and whether the top-1 ids agree), so the numbers are those of a teacher that computes the
# right thing. JSON lines on stdout.
# Needs `make setup pycheck-setup` (torch, transformers in .venv), ~12 GB of disk and
# ~20 minutes on 2 cores; LOGITCACHE_BIN=path skips the release build, SHAPES="qwen05"
# picks shapes, WORK=dir keeps the models between runs.
set -euo pipefail
cd "$(dirname "$0")/.."
. benches/common.sh
py=${LOGITCACHE_PYTHON:-$PWD/.venv/bin/python}
demo=pipelines/demo/fortunes.jsonl

# Two documents of 4200 of the demo's words: two full windows of 2048 tokens each, eight of 512.
"$py" - "$demo" "$work" <<'EOF'
import json, random, sys
words = " ".join(json.loads(l)["text"] for l in open(sys.argv[1])).split()
rng = random.Random(0)
with open(f"{sys.argv[2]}/corpus.jsonl", "w") as f:
    for _ in range(2):
        f.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(4200))}) + "\n")
EOF

make_model() { # shape -> $work/$shape/hf (checkpoint), $work/$shape/m.onnx[.data], tok.json
  local shape=$1 d=$work/$1
  [ -f "$d/m.onnx" ] && return
  mkdir -p "$d"
  "$py" - "$shape" "$d/hf" <<'EOF'
import sys, torch
from transformers import LlamaConfig, LlamaForCausalLM
shape, out = sys.argv[1:]
cfg = {
    "qwen05": dict(vocab_size=151936, hidden_size=896, num_hidden_layers=24, num_attention_heads=14,
                   num_key_value_heads=2, intermediate_size=4864, tie_word_embeddings=True,
                   rope_theta=1_000_000.0, rms_norm_eps=1e-6, max_position_embeddings=4096),
    "tinyllama": dict(vocab_size=32000, hidden_size=2048, num_hidden_layers=22, num_attention_heads=32,
                      num_key_value_heads=4, intermediate_size=5632, tie_word_embeddings=False,
                      rope_theta=10_000.0, rms_norm_eps=1e-5, max_position_embeddings=4096),
}[shape]
torch.manual_seed(0)
m = LlamaForCausalLM(LlamaConfig(**cfg, bos_token_id=1, eos_token_id=2)).float()
m.save_pretrained(out)
print(f"{shape}: {sum(p.numel() for p in m.parameters())} parameters", file=sys.stderr)
EOF
  local v
  v=$("$py" -c "import json; print(json.load(open('$d/hf/config.json'))['vocab_size'])")
  "$bin" -q train-tokenizer --corpus "$demo" --kind word-level --vocab-size "$v" --out "$d/tok.json"
  /usr/bin/time -v "$bin" -q export-onnx --checkpoint "$d/hf" --out "$d/m.onnx" 2> "$d/export-time.txt" \
    || { cat "$d/export-time.txt"; exit 1; }
}

peak() { # shape seq_len -> JSON line
  local shape=$1 seq=$2 d=$work/$1
  make_model "$shape"
  rm -rf "$d/cache"
  /usr/bin/time -v "$bin" -q teacher --model "$d/m.onnx" --tokenizer "$d/tok.json" \
    --corpus "$work/corpus.jsonl" --out "$d/cache" --top-k 64 --seq-len "$seq" --progress off \
    --threads 2 2> "$d/time.txt" > /dev/null || { cat "$d/time.txt"; exit 1; }
  "$py" - "$shape" "$seq" "$d" <<'EOF'
import glob, json, os, re, sys
import numpy as np, pyarrow.parquet as pq, torch
from tokenizers import Tokenizer
from transformers import LlamaForCausalLM
shape, seq, d = sys.argv[1], int(sys.argv[2]), sys.argv[3]
t = open(f"{d}/time.txt").read()
rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", t).group(1)) // 1024
wall = re.search(r"Elapsed \(wall clock\) time.*: (\S+)", t).group(1)
model = sum(os.path.getsize(p) for p in glob.glob(f"{d}/m.onnx*"))
m = json.load(open(f"{d}/cache/manifest.json"))
# The first window against transformers' forward of the same checkpoint (the tokenizer's
# ids only: the teacher renormalises over them when the model's vocabulary is larger).
row = pq.read_table(sorted(glob.glob(f"{d}/cache/shards/*.parquet"))[0]).slice(0, 1).to_pylist()[0]
tv = Tokenizer.from_file(f"{d}/tok.json").get_vocab_size()
hf = LlamaForCausalLM.from_pretrained(f"{d}/hf", dtype=torch.float32)
torch.set_num_threads(2)
with torch.no_grad():
    logits = hf(input_ids=torch.tensor([row["input_ids"]], dtype=torch.long)).logits[0, :, :tv]
ref = torch.log_softmax(logits.double(), -1).numpy()
ids = np.array(row["topk_ids"], dtype=np.int64)
lp = np.array(row["topk_logprobs"], dtype=np.float64)
err = float(np.abs(np.take_along_axis(ref, ids, 1) - lp).max())
top1 = float((ids[:, 0] == ref.argmax(-1)).mean())
print(json.dumps({
    "shape": shape, "vocab": m["model"]["logits_vocab"], "tokenizer_vocab": tv,
    "seq_len": seq, "windows": sum(s["rows"] for s in m["shards"]),
    "max_batch_tokens": m["shards"][0].get("max_batch_tokens"),
    "model_mib": model >> 20, "external_data": len(m["model"].get("external_data", [])),
    "peak_rss_mib": rss, "goal_mib": (model >> 20) + 2048, "wall": wall,
    "vs_transformers_max_abs_logprob": err, "vs_transformers_top1_agree": top1,
}))
EOF
}

for shape in ${SHAPES:-qwen05 tinyllama}; do
  for seq in 512 2048; do
    peak "$shape" "$seq"
  done
  d=$work/$shape
  echo "{\"shape\": \"$shape\", \"export_peak_rss_mib\": $(( $(grep 'Maximum resident' "$d/export-time.txt" | awk '{print $NF}') / 1024 ))}"
done
