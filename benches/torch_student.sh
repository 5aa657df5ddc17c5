#!/usr/bin/env bash
# The PyTorch example trainer (examples/distill_torch.py) on this CPU (numbers for the closing
# note): training tokens/s of the ~5M student of benches/student.sh (vocab 32000, KD fkl) with
# 1 and 2 torchrun processes (one thread each), and KD vs a CE-only step of the same model on
# 1 process. tokens/s is the mean over the metrics lines after the first 5 steps.
# Usage: bash benches/torch_student.sh [STEPS]   (needs `make setup python`; LOGITCACHE_BIN,
# WORK: see benches/common.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
steps=${1:-30}
. benches/common.sh
py=${LOGITCACHE_PYTHON:-$PWD/.venv/bin/python}
corpus=pipelines/demo/fortunes.jsonl
v=32000
"$bin" -q train-tokenizer --corpus "$corpus" --kind word-level --vocab-size "$v" --out "$work/tok.json"
"$bin" -q toy-teacher --vocab "$v" --hidden 32 --out "$work/t.onnx"
"$bin" -q teacher --model "$work/t.onnx" --tokenizer "$work/tok.json" --corpus "$corpus" \
  --out "$work/cache" --top-k 64 --seq-len 128 --progress off --threads 2
# The ~5M student of benches/students/s5m.toml as a JSON student file.
echo '{"hidden_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 344, "tie_word_embeddings": true}' > "$work/s5m.json"

run() { # name procs extra... -> JSON result line
  local name=$1 procs=$2; shift 2
  CUDA_VISIBLE_DEVICES= OMP_NUM_THREADS=1 "$py" -m torch.distributed.run --standalone --nproc_per_node "$procs" \
    examples/distill_torch.py --cache "$work/cache" --student "$work/s5m.json" --out "$work/run-$name" \
    --steps "$steps" --batch-size 8 --warmup 5 --eval-fraction 0 --threads 1 --log-every 1 "$@" 2>/dev/null
  "$py" - "$work/run-$name/metrics.jsonl" "$name" "$procs" <<'PY'
import json, sys
lines = [json.loads(l) for l in open(sys.argv[1]) if '"tokens_per_s"' in l]
rates = [l["tokens_per_s"] for l in lines[5:]]
print(json.dumps({"run": sys.argv[2], "processes": int(sys.argv[3]), "tokens_per_s": round(sum(rates) / len(rates), 1)}))
PY
}

run kd-1proc 1 --loss fkl
run ce-1proc 1 --loss ce
run kd-2proc 2 --loss fkl
