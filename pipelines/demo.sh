#!/usr/bin/env bash
# The embedded demo: the teacher stage on the committed fortunes corpus with a small
# generated teacher, then verify and inspect the cache. Usage: demo.sh LOGITCACHE_BIN OUT_DIR
set -euo pipefail
bin=$1
out=$2
here=$(cd "$(dirname "$0")" && pwd)
corpus=$here/demo/fortunes.jsonl
mkdir -p "$out"

echo "== tokenizer: byte-level BPE trained on $(wc -l < "$corpus") fortunes"
"$bin" train-tokenizer --corpus "$corpus" --vocab-size 4096 --out "$out/tokenizer.json"

echo "== teacher: a generated toy causal LM (ONNX, vocab 4096)"
"$bin" toy-teacher --vocab 4096 --hidden 64 --seed 1 --out "$out/teacher.onnx"

echo "== logitcache teacher (resumes if $out/cache exists)"
"$bin" teacher --model "$out/teacher.onnx" --tokenizer "$out/tokenizer.json" \
    --corpus "$corpus" --out "$out/cache" --top-k 64 --seq-len 256 --batch-size 8 \
    --shard-size 512

echo "== logitcache verify"
"$bin" verify "$out/cache"

echo "== logitcache inspect"
"$bin" inspect "$out/cache"

echo "== logitcache inspect --show 0:12"
"$bin" inspect "$out/cache" --show 0:12 --tokenizer "$out/tokenizer.json" | head -14
