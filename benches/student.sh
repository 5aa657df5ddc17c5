#!/usr/bin/env bash
# Student-stage benchmarks on 2 threads (numbers for the closing note):
# - training tokens/s and peak RSS of a ~5M and a ~30M student (vocab 32000, KD fkl);
# - KD vs CE-only step time on the ~5M student;
# - peak RSS of the loss chunked vs unchunked at vocab 49152.
# Usage: bash benches/student.sh [STEPS]   (needs `make setup`; LOGITCACHE_BIN, WORK: see
# benches/common.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
steps=${1:-30}
. benches/common.sh
corpus=pipelines/demo/fortunes.jsonl

cache_for() { # vocab -> cache dir
  local v=$1
  "$bin" -q train-tokenizer --corpus "$corpus" --kind word-level --vocab-size "$v" --out "$work/tok$v.json"
  "$bin" -q toy-teacher --vocab "$v" --hidden 32 --out "$work/t$v.onnx"
  "$bin" -q teacher --model "$work/t$v.onnx" --tokenizer "$work/tok$v.json" --corpus "$corpus" \
    --out "$work/cache$v" --top-k 64 --seq-len 128 --progress off --threads 2
}

train() { # name vocab student extra... -> JSON result line
  local name=$1 v=$2 s=$3; shift 3
  "$bin" -q train --cache "$work/cache$v" --student "$s" --out "$work/runs-$name" --steps "$steps" \
    --batch-size 8 --warmup 5 --eval-fraction 0 --threads 2 --progress json "$@" \
    | grep '"student_done"' | python3 -c "import json,sys; r=json.load(sys.stdin)['result']; print(json.dumps({'run': '$name', 'params': r['params'], 'tokens_per_s': round(r['tokens_per_s'], 1), 'peak_rss_mib': round(r['peak_rss_mib'], 1)}))"
}

cache_for 32000
train kd-5m 32000 benches/students/s5m.toml --loss fkl
train ce-5m 32000 benches/students/s5m.toml --loss ce
train kd-30m 32000 benches/students/s30m.toml --loss fkl
cache_for 49152
train chunked-49k 49152 benches/students/s5m.toml --loss fkl --loss-chunk 256
train unchunked-49k 49152 benches/students/s5m.toml --loss fkl --loss-chunk 0
