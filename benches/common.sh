# The bench scripts' shared preamble, sourced by each (`. benches/common.sh`) after it has
# changed to the repository root. It sets
# - bin: $LOGITCACHE_BIN when given, else the release build (built here);
# - ORT_DYLIB_PATH: the ONNX Runtime `make setup` installs, unless already set;
# - work: $WORK when given (kept, created if missing), else a temporary directory removed at
#   exit.
bin=${LOGITCACHE_BIN:-}
if [ -z "$bin" ]; then
  cargo build --release --quiet
  bin=target/release/logitcache
fi
export ORT_DYLIB_PATH=${ORT_DYLIB_PATH:-$PWD/.ort/libonnxruntime.so.1.32.0}
if [ -n "${WORK:-}" ]; then
  work=$WORK
  mkdir -p "$work"
else
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
fi
