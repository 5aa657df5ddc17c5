#!/usr/bin/env bash
# Peak RSS of `logitcache teacher` on a graph that computes attention unfused (numbers for
# the closing note of issue 14): a random Hugging Face `LlamaForCausalLM` (V = 4096, hidden
# 256, 2 layers, 8 heads of 32 dimensions: small, so the RSS is the attention scores') exported
# by PyTorch's own exporter (tests/torch_onnx_export.py: `torch.onnx.export(..., dynamo=True)`,
# which writes attention as MatMul → Add → Softmax → IsNaN → Where → MatMul), run at --seq-len
# 512 and 2048 with the default flags (the planner counts the scores) and with
# --max-batch-tokens 8 × seq_len (8 windows per batch: what the default was before it counted
# them). JSON lines on stdout. Needs `make setup pycheck-setup` (torch, transformers in .venv);
# LOGITCACHE_BIN=path skips the release build, WORK=dir keeps the model, HEADS=n (default 8).
set -euo pipefail
cd "$(dirname "$0")/.."
. benches/common.sh
py=${LOGITCACHE_PYTHON:-$PWD/.venv/bin/python}
demo=pipelines/demo/fortunes.jsonl
heads=${HEADS:-8}
d=$work/unfused-$heads

if [ ! -f "$d/onnx/model.onnx" ]; then
  mkdir -p "$d"
  "$py" - "$heads" "$d" "$demo" <<'PY'
import json, random, sys, torch
from transformers import LlamaConfig, LlamaForCausalLM
heads, d, demo = int(sys.argv[1]), sys.argv[2], sys.argv[3]
cfg = LlamaConfig(vocab_size=4096, hidden_size=256, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=heads, num_key_value_heads=heads,
                  max_position_embeddings=4096)
torch.manual_seed(0)
LlamaForCausalLM(cfg).eval().save_pretrained(f"{d}/hf")
json.dump({"checkpoint": f"{d}/hf", "out": f"{d}/onnx/model.onnx"}, open(f"{d}/spec.json", "w"))
words = " ".join(json.loads(l)["text"] for l in open(demo)).split()
rng = random.Random(0)
with open(f"{d}/corpus.jsonl", "w") as f:  # 12 windows of 2048 tokens, 48 of 512
    for _ in range(6):
        f.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(4200))}) + "\n")
PY
  "$py" tests/torch_onnx_export.py "$d/spec.json" > /dev/null
  "$bin" -q train-tokenizer --corpus "$demo" --kind word-level --vocab-size 4096 --out "$d/tok.json"
fi

peak() { # name seq_len extra... -> JSON line with peak RSS
  local name=$1 seq=$2; shift 2
  rm -rf "$d/cache"
  /usr/bin/time -v "$bin" teacher --model "$d/onnx/model.onnx" --tokenizer "$d/tok.json" \
    --corpus "$d/corpus.jsonl" --out "$d/cache" --top-k 64 --seq-len "$seq" --progress off \
    --threads 2 "$@" 2> "$d/time.txt" > /dev/null || { cat "$d/time.txt"; exit 1; }
  local kb wall budget
  kb=$(grep "Maximum resident set size" "$d/time.txt" | awk '{print $NF}')
  wall=$(grep "Elapsed (wall clock)" "$d/time.txt" | awk '{print $NF}')
  budget=$(python3 -c "import json; m=json.load(open('$d/cache/manifest.json')); print(m['shards'][0].get('max_batch_tokens'))")
  echo "{\"run\": \"$name\", \"heads\": $heads, \"seq_len\": $seq, \"max_batch_tokens\": $budget, \"peak_rss_mib\": $((kb / 1024)), \"wall\": \"$wall\"}"
}

for seq in 512 2048; do
  peak default "$seq"
  # Eight windows' scores (five tensors of heads × seq² × 4 bytes each) beyond 12 GiB would
  # not fit a 24 GB machine.
  scores=$((8 * 5 * heads * seq * seq * 4))
  if [ "$scores" -le $((12 << 30)) ]; then
    peak batch8 "$seq" --max-batch-tokens $((8 * seq))
  else
    echo "{\"run\": \"batch8\", \"heads\": $heads, \"seq_len\": $seq, \"skipped\": \"$((scores >> 20)) MiB of attention scores per batch\"}"
  fi
done
