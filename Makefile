# logitcache — set-up, tests, benchmarks and the demo.
# `make demo` and `make test` each install what they need on a fresh machine.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c

PYTHON ?= python3
CARGO ?= cargo

# ONNX Runtime: the plain C-API library from the PyPI `onnxruntime` wheel (see shared/DESIGN.md).
ORT_VERSION := 1.32.0
ORT_WHEEL := onnxruntime-$(ORT_VERSION)-cp312-cp312-manylinux_2_28_x86_64.whl
ORT_WHEEL_SHA256 := 99e1074c4b2197accd5073052a465361be17b89c093b8ffb6e6bd8f986c52df8
ORT_DIR := .ort
ORT_LIB := $(ORT_DIR)/libonnxruntime.so.$(ORT_VERSION)

# Python used only by the interoperability checks (pyarrow, DuckDB, Polars and Hugging Face
# datasets read our shards).
VENV := .venv
PYARROW_VERSION := 26.0.1
DUCKDB_VERSION := 2.0.1
POLARS_VERSION := 2.1.0
DATASETS_VERSION := 5.2.0
# The Python package's tests (python/, tests/python_pkg.rs): torch for the KD losses, maturin to
# build the package, transformers for the torchrun example (examples/distill_torch.py). torch's
# wheel is large (with its CUDA libraries ~5 GB installed), so the venv is made once and reused;
# the stamp's name changes when a pin does.
TORCH_VERSION := 2.15.0
MATURIN_VERSION := 1.16.0
TRANSFORMERS_VERSION := 5.25.0
# onnx + onnxscript: torch.onnx's exporter, for the test that a graph it exports is a teacher.
ONNX_VERSION := 1.23.2
ONNXSCRIPT_VERSION := 0.7.2
VENV_STAMP := $(VENV)/.pyarrow-$(PYARROW_VERSION)-duckdb-$(DUCKDB_VERSION)-polars-$(POLARS_VERSION)-datasets-$(DATASETS_VERSION)-torch-$(TORCH_VERSION)-maturin-$(MATURIN_VERSION)-transformers-$(TRANSFORMERS_VERSION)-onnx-$(ONNX_VERSION)-onnxscript-$(ONNXSCRIPT_VERSION)

export ORT_DYLIB_PATH := $(abspath $(ORT_LIB))

.PHONY: setup test lint bench demo clean-demo pycheck-setup python fidelity

setup: $(ORT_LIB)

$(ORT_LIB):
	@mkdir -p $(ORT_DIR)/wheel
	@if [ ! -f $(ORT_DIR)/wheel/$(ORT_WHEEL) ]; then \
	  echo "fetching $(ORT_WHEEL) from PyPI"; \
	  $(PYTHON) -m pip download --quiet --no-deps --only-binary=:all: \
	    --platform manylinux_2_28_x86_64 --python-version 3.12 \
	    onnxruntime==$(ORT_VERSION) -d $(ORT_DIR)/wheel; \
	fi
	@echo "$(ORT_WHEEL_SHA256)  $(ORT_DIR)/wheel/$(ORT_WHEEL)" | sha256sum --check --quiet \
	  || { echo "sha256 mismatch for $(ORT_WHEEL); delete $(ORT_DIR)/wheel and retry" >&2; exit 1; }
	@$(PYTHON) -c 'import sys, zipfile; z = zipfile.ZipFile(sys.argv[1]); n = "onnxruntime/capi/libonnxruntime.so." + sys.argv[2]; open(sys.argv[3] + ".part", "wb").write(z.read(n))' \
	  $(ORT_DIR)/wheel/$(ORT_WHEEL) $(ORT_VERSION) $(ORT_LIB)
	@mv $(ORT_LIB).part $(ORT_LIB)
	@echo "ONNX Runtime $(ORT_VERSION) ready at $(ORT_LIB)"

$(VENV_STAMP):
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet "pyarrow==$(PYARROW_VERSION)" "numpy<3" \
	  "duckdb==$(DUCKDB_VERSION)" "polars==$(POLARS_VERSION)" "datasets==$(DATASETS_VERSION)" \
	  "torch==$(TORCH_VERSION)" "maturin==$(MATURIN_VERSION)" "transformers==$(TRANSFORMERS_VERSION)" \
	  "onnx==$(ONNX_VERSION)" "onnxscript==$(ONNXSCRIPT_VERSION)"
	@touch $@

pycheck-setup: $(VENV_STAMP)

# The `logitcache` Python package (python/), built from this tree and installed into the venv.
# Always rebuilt (cargo makes an unchanged rebuild cheap), so tests never see a stale package.
python: $(VENV_STAMP)
	PATH="$(abspath $(VENV))/bin:$$PATH" $(VENV)/bin/pip install --quiet --no-build-isolation --force-reinstall --no-deps ./python

test: setup pycheck-setup python
	LOGITCACHE_PYTHON=$(abspath $(VENV))/bin/python $(CARGO) test --all-targets
	$(CARGO) test --doc
	$(MAKE) --no-print-directory lint

lint:
	$(CARGO) fmt --all --check
	$(CARGO) clippy --all-targets -- -D warnings -D clippy::undocumented_unsafe_blocks
	$(CARGO) clippy -p logitcache-python -- -D warnings -D clippy::undocumented_unsafe_blocks
	$(CARGO) clippy --all-targets --features cuda,tensorrt -- -D warnings -D clippy::undocumented_unsafe_blocks

bench: setup pycheck-setup python
	$(CARGO) bench --bench topk --bench shard_write --bench e2e
	LOGITCACHE_PYTHON=$(abspath $(VENV))/bin/python $(CARGO) bench --bench reader
	bash benches/student.sh
	bash benches/torch_student.sh
	$(VENV)/bin/python benches/fsdp_resume_memory.py

DEMO_OUT := demo-out
demo: setup
	$(CARGO) build --release
	target/release/logitcache run pipelines/demo.toml --out $(DEMO_OUT)

clean-demo:
	rm -rf $(DEMO_OUT)

# Cache fidelity against full-logit KD (a benchmark: ~25 minutes on 2 cores after the build).
FIDELITY_OUT := fidelity-out
fidelity: setup
	$(CARGO) build --release
	target/release/logitcache run pipelines/fidelity.toml --out $(FIDELITY_OUT)
