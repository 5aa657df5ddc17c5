#!/usr/bin/env bash
# Peak RSS of `logitcache teacher` (numbers for the closing note of issue 14):
# - at V ∈ {32000, 152064} and --seq-len ∈ {512, 2048} with the default flags (the batch's
#   token budget from the model's vocabulary), and with --max-batch-tokens 8×seq_len (the
#   old behaviour: always --batch-size 8 windows) for comparison, on documents long enough to
#   fill every window; and with the defaults on a teacher whose head is one MatMul
#   (`toy-teacher --plain-head`, as real exports: the toy's bias and scale make three
#   logits-sized tensors);
# - one 20 MB document against the same words as ordinary documents and a one-line corpus.
# The toy teachers are small (hidden 32: ~39 MB at V = 152064), so the RSS is the logits
# and the pipeline's, not the weights'. Usage: bash benches/teacher_memory.sh
# (needs `make setup`; LOGITCACHE_BIN=path skips the release build).
set -euo pipefail
cd "$(dirname "$0")/.."
. benches/common.sh
demo=pipelines/demo/fortunes.jsonl

# 24 documents of ~3000 words (every window of 512 or 2048 tokens is full), one of 20 MB,
# and a one-line baseline, all from the demo's words.
python3 - "$demo" "$work" <<'EOF'
import json, random, sys
words = " ".join(json.loads(l)["text"] for l in open(sys.argv[1])).split()
rng = random.Random(0)
with open(f"{sys.argv[2]}/long.jsonl", "w") as f:
    for _ in range(24):
        f.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(3000))}) + "\n")
doc, n = [], 0
while n < 20_000_000:
    w = rng.choice(words); doc.append(w); n += len(w) + 1
with open(f"{sys.argv[2]}/big.jsonl", "w") as f:
    f.write(json.dumps({"text": " ".join(doc)}) + "\n")
with open(f"{sys.argv[2]}/many.jsonl", "w") as f:  # the same words as 1500-word documents
    for i in range(0, len(doc), 1500):
        f.write(json.dumps({"text": " ".join(doc[i:i + 1500])}) + "\n")
with open(f"{sys.argv[2]}/one.jsonl", "w") as f:
    f.write(json.dumps({"text": " ".join(words[:50])}) + "\n")
EOF

teacher_for() { # vocab -> builds $work/tok$v.json, $work/t$v.onnx and $work/t${v}p.onnx
  local v=$1
  [ -f "$work/t$v.onnx" ] && return
  "$bin" -q train-tokenizer --corpus "$demo" --kind word-level --vocab-size "$v" --out "$work/tok$v.json"
  "$bin" -q toy-teacher --vocab "$v" --hidden 32 --out "$work/t$v.onnx"
  # The head as real exports have it: one MatMul (the toy's adds a bias and a scale, so its
  # graph holds three logits-sized tensors).
  "$bin" -q toy-teacher --vocab "$v" --hidden 32 --plain-head --out "$work/t${v}p.onnx"
}

peak() { # name vocab corpus seq_len extra... -> JSON line with peak RSS
  local name=$1 v=$2 corpus=$3 seq=$4; shift 4
  teacher_for "$v"
  local model="$work/t$v.onnx"
  case $name in *plain-head*) model="$work/t${v}p.onnx" ;; esac
  rm -rf "$work/cache"
  /usr/bin/time -v "$bin" -q teacher --model "$model" --tokenizer "$work/tok$v.json" \
    --corpus "$corpus" --out "$work/cache" --top-k 64 --seq-len "$seq" --progress off \
    --threads 2 "$@" 2> "$work/time.txt" > /dev/null || { cat "$work/time.txt"; exit 1; }
  local kb wall model_mb budget
  kb=$(grep "Maximum resident set size" "$work/time.txt" | awk '{print $NF}')
  wall=$(grep "Elapsed (wall clock)" "$work/time.txt" | awk '{print $NF}')
  model_mb=$(( $(stat -c %s "$model") / 1048576 ))
  budget=$(python3 -c "import json; m=json.load(open('$work/cache/manifest.json')); print(m['shards'][0].get('max_batch_tokens'))")
  echo "{\"run\": \"$name\", \"vocab\": $v, \"seq_len\": $seq, \"max_batch_tokens\": $budget, \"model_mib\": $model_mb, \"peak_rss_mib\": $((kb / 1024)), \"wall\": \"$wall\"}"
}

for v in 32000 152064; do
  for seq in 512 2048; do
    peak default "$v" "$work/long.jsonl" "$seq"
    peak default-plain-head "$v" "$work/long.jsonl" "$seq"
    # The old behaviour at V = 152064, seq_len 2048 needs 10 GB of logits per batch (three
    # such tensors in the toy graph): more than a 24 GB machine has.
    if [ $((8 * seq * v * 4)) -le $((6 << 30)) ]; then
      peak batch8 "$v" "$work/long.jsonl" "$seq" --max-batch-tokens $((8 * seq))
    else
      echo "{\"run\": \"batch8\", \"vocab\": $v, \"seq_len\": $seq, \"skipped\": \"$((8 * seq * v * 4 >> 20)) MiB of logits per batch\"}"
    fi
  done
done
# The device head (`--topk onnx`, here on the CPU provider) makes logits-sized tensors of its
# own, which the default budget does not count: 8 windows (the default at V = 32000) and 2,
# top-k and hybrid (top-64 + 42 draws), plain head.
for mbt in 4096 1024; do
  peak onnx-head-topk-plain-head 32000 "$work/long.jsonl" 512 --topk onnx --max-batch-tokens "$mbt"
  peak onnx-head-hybrid-plain-head 32000 "$work/long.jsonl" 512 --topk onnx --mode hybrid \
    --samples 42 --max-batch-tokens "$mbt"
done
peak baseline-one-line 4096 "$work/one.jsonl" 2048
peak doc-20mb 4096 "$work/big.jsonl" 2048
peak doc-20mb-plain-head 4096 "$work/big.jsonl" 2048
# The same 20 MB as ordinary documents (what the shards' buffers take, not the document's
# tokenisation), and both with shards of 256 windows instead of 1024.
peak docs-20mb-1500-words 4096 "$work/many.jsonl" 2048
peak doc-20mb-shard-256 4096 "$work/big.jsonl" 2048 --shard-size 256
peak docs-20mb-1500-words-shard-256 4096 "$work/many.jsonl" 2048 --shard-size 256
