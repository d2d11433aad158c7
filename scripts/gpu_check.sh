#!/usr/bin/env bash
# One prepared GPU run: set up, build the CUDA extension, run every GPU test
# and the GPU benchmark, and write a summary. Meant for a machine with an
# NVIDIA GPU (sm_80+); fits in about 7 minutes.
#
#   bash scripts/gpu_check.sh              # results in $OUT, else ./gpu_results
#
# Writes (7 files): summary.txt, summary.json, install.log, build.log,
# tests.log, bench.log, bench_gpu_ops-<rev>.json. Each step has its own time
# limit; a failed step is recorded and the next still runs.
# Installs only what is missing, never replacing what the machine has: from
# wheels in ./.whl when that folder exists (offline machines), else from the
# package index with short network timeouts. faiss-gpu is optional: without
# it the benchmark compares against torch (cuBLAS) alone and says so.
#
# Environment: PYTHON (interpreter to use), RAG_ENGINE_CUDA_ARCHS (default:
# the GPU's own arch), GPU_CHECK_N (benchmark corpus rows, default 10M),
# GPU_CHECK_SKIP (space-separated steps to skip: install build tests bench).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_results}"
mkdir -p "$OUT"
WORK="$(mktemp -d)"
start=$SECONDS
STEPS=()

step() {  # step NAME LIMIT_S LOG COMMAND...: run with a time limit, record rc
  local name="$1" limit="$2" log="$3"
  shift 3
  if [[ " ${GPU_CHECK_SKIP:-} " == *" $name "* ]]; then
    echo "== $name: skipped"; STEPS+=("$name skipped 0"); return 0
  fi
  local t0=$SECONDS
  echo "== $name (limit ${limit}s)"
  timeout --kill-after=10 "$limit" "$@" >>"$OUT/$log" 2>&1
  local rc=$?
  STEPS+=("$name $rc $((SECONDS - t0))")
  echo "   rc=$rc in $((SECONDS - t0))s (log: $log)"
  tail -4 "$OUT/$log" | sed 's/^/   | /'
  return $rc
}

# ---- python with a CUDA torch ------------------------------------------------
has_cuda_torch() { "$1" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; }
PY=""
for cand in "${PYTHON:-}" python3 .venv/bin/python python; do
  [ -n "$cand" ] && command -v "$cand" >/dev/null 2>&1 && has_cuda_torch "$cand" && { PY="$cand"; break; }
done
export PIP_DEFAULT_TIMEOUT=5 PIP_RETRIES=0 PIP_DISABLE_PIP_VERSION_CHECK=1
PIP_SRC=()
[ -d .whl ] && PIP_SRC=(--no-index --find-links .whl)
if [ -z "$PY" ]; then
  [ -x .venv/bin/python ] || python3 -m venv .venv
  PY=.venv/bin/python
  # the CUDA wheel (a CPU-only torch in .venv is replaced only here, on a GPU machine)
  step install-torch 300 install.log "$PY" -m pip install -q "${PIP_SRC[@]}" "torch>=2.4,<3" \
    --extra-index-url https://download.pytorch.org/whl/cu126
fi

{
  echo "python: $PY"
  "$PY" -c "import sys, torch; print('python', sys.version.split()[0], '| torch', torch.__version__, 'cuda', torch.version.cuda)"
  nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap,clocks.sm,clocks.max.sm --format=csv 2>&1
  (command -v nvcc >/dev/null && nvcc --version | tail -2) 2>&1 || echo "nvcc: not found"
  "$PY" -c "import triton; print('triton', triton.__version__)" 2>&1 | tail -1
  "$PY" -c "import faiss; print('faiss', faiss.__version__, 'gpus', faiss.get_num_gpus())" 2>&1 | tail -1
} >"$WORK/env.txt" 2>&1
cat "$WORK/env.txt"

# ---- missing packages only -------------------------------------------------------
missing=()
for spec in "numpy:numpy" "tqdm:tqdm" "ml_dtypes:ml-dtypes" "pytest:pytest" "hypothesis:hypothesis" \
            "pybind11:pybind11>=2.12" "cmake:cmake>=3.24" "ninja:ninja" "setuptools:setuptools>=68" \
            "triton:triton" "faiss:faiss-gpu-cu12"; do
  "$PY" -c "import ${spec%%:*}" 2>/dev/null || missing+=("${spec#*:}")
done
echo "missing python packages: ${missing[*]:-none}" | tee -a "$OUT/install.log"
for pkg in "${missing[@]}"; do  # one at a time: an unavailable optional one must not block the rest
  step "install-$pkg" 90 install.log "$PY" -m pip install -q "${PIP_SRC[@]}" "$pkg"
done

# ---- build: only the device's own arch, so the build is quick ----------------
arch="$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d ' .')"
export RAG_ENGINE_BUILD_CUDA=1 RAG_ENGINE_CUDA_ARCHS="${RAG_ENGINE_CUDA_ARCHS:-${arch:-90}}"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}" CMAKE_BUILD_PARALLEL_LEVEL="${MAX_JOBS:-$(nproc)}"
built() { "$PY" -c "import rag_engine._C, rag_engine._C_cuda as m, rag_engine.kernels" >/dev/null 2>&1; }
step build 240 build.log "$PY" -m pip install --no-build-isolation --no-deps -v -e .
if [[ " ${GPU_CHECK_SKIP:-} " != *" build "* ]] && ! built; then  # fall back to CMake into the source tree
  echo "pip editable build did not give an importable extension; building with CMake" >>"$OUT/build.log"
  pyexe="$("$PY" -c 'import sys; print(sys.executable)')"
  step build-cmake 240 build.log bash -c "cmake -S . -B build/gpu -G Ninja -DCMAKE_BUILD_TYPE=Release \
      -DPython_EXECUTABLE=$pyexe -DRAG_ENGINE_OUTPUT_DIR=$PWD/rag_engine \
      -DRAG_ENGINE_BUILD_CUDA=ON -DRAG_ENGINE_CUDA_ARCHS=$RAG_ENGINE_CUDA_ARCHS && cmake --build build/gpu"
  [ -e rag_engine/kernels ] || ln -s ../kernels rag_engine/kernels
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
"$PY" -c "import rag_engine._C_cuda as m; print('built', m.built_archs, m.device_info())" >>"$OUT/build.log" 2>&1
tail -1 "$OUT/build.log"

# ---- tests and benchmark -------------------------------------------------------
# Each test's verdict is printed as it ends (-v), so a run cut off by its limit
# still says what passed; a per-test limit keeps one slow compile from eating it.
pyt=(-m pytest -v -rfEs --tb=short --durations=10 -p no:cacheprovider -p no:randomly)
"$PY" -c "import xdist" 2>/dev/null && pyt+=(-n 4)
"$PY" -c "import pytest_timeout" 2>/dev/null && pyt+=(--timeout=120)
step tests 150 tests.log "$PY" "${pyt[@]}" tests/test_gpu_ops.py -k "not triton"
step bench 200 bench.log env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE PYTHONUNBUFFERED=1 \
  "$PY" benchmarks/bench_gpu_ops.py --n "${GPU_CHECK_N:-10000000}" --profile --out "$OUT"
step tests-triton 180 tests.log "$PY" "${pyt[@]}" tests/test_gpu_ops.py -k "triton"

# ---- summary -------------------------------------------------------------------
printf '%s\n' "${STEPS[@]}" >"$WORK/steps.txt"
"$PY" - "$OUT" "$WORK" "$((SECONDS - start))" <<'EOF'
import json, pathlib, sys
out, work, total = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]), int(sys.argv[3])
steps = {}
for line in (work / "steps.txt").read_text().splitlines():
    name, rc, secs = line.split()
    steps[name] = {"rc": rc, "seconds": int(secs), "ok": rc in ("0", "skipped")}
bench = sorted(out.glob("bench_gpu_ops-*.json"))
rows = json.loads(bench[-1].read_text())["rows"] if bench else []
env = (work / "env.txt").read_text()
summary = {"total_seconds": total, "steps": steps, "env": env, "bench_rows": rows}
(out / "summary.json").write_text(json.dumps(summary, indent=2))
lines = [f"gpu_check: {total} s", env.rstrip()]
lines += [f"  {k:22s} {'ok' if v['ok'] else 'FAILED rc=' + v['rc']} ({v['seconds']} s)" for k, v in steps.items()]
tests = out / "tests.log"
if tests.exists():
    t = tests.read_text().strip().splitlines()
    lines += ["  tests: " + s for s in t if s.startswith("=") and (" passed" in s or " failed" in s)]
    lines += ["  " + s for s in t if s.startswith(("FAILED", "ERROR"))][:40]
bl = out / "bench.log"
lines += ["", bl.read_text()] if bl.exists() else []
(out / "summary.txt").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
EOF
rm -rf "$WORK"
