#!/usr/bin/env bash
# One prepared GPU run: set up, build the CUDA extension, run every GPU test
# and the GPU benchmark, and write a summary. Meant for a machine with an
# NVIDIA GPU (sm_80+); fits in about 8 minutes.
#
#   bash scripts/gpu_check.sh              # results in $OUT, else ./gpu_results
#
# Writes: summary.json, summary.txt, env.txt, install.log, build.log,
# tests.log, tests.xml, bench.log, bench_gpu_ops-<rev>.json. Each step has
# its own time limit; a failed step is recorded and the next still runs.
# The installs are best effort (the machine may be offline): what is already
# there is used, and summary.json says what was missing.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_results}"
mkdir -p "$OUT"
start=$SECONDS
declare -A status

step() {  # step NAME LIMIT_S LOG COMMAND...: run with a time limit, record rc
  local name="$1" limit="$2" log="$3"
  shift 3
  local t0=$SECONDS
  echo "== $name (limit ${limit}s)"
  timeout --kill-after=10 "$limit" "$@" >"$OUT/$log" 2>&1
  local rc=$?
  status[$name]="$rc $((SECONDS - t0))"
  echo "   rc=$rc in $((SECONDS - t0))s (log: $log)"
  tail -3 "$OUT/$log" | sed 's/^/   | /'
  return $rc
}

# ---- python with a CUDA torch ------------------------------------------------
has_cuda_torch() { "$1" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; }
PY=""
for cand in "${PYTHON:-}" .venv/bin/python python3 python; do
  [ -n "$cand" ] && command -v "$cand" >/dev/null 2>&1 && has_cuda_torch "$cand" && { PY="$cand"; break; }
done
if [ -z "$PY" ]; then
  [ -x .venv/bin/python ] || python3 -m venv .venv
  PY=.venv/bin/python
  # the CUDA wheel (a CPU-only torch in .venv is replaced only here, on a GPU machine)
  step install-torch 150 install-torch.log "$PY" -m pip install -q torch --index-url https://download.pytorch.org/whl/cu124
fi

{
  echo "python: $PY"; "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
  nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv 2>&1
  (command -v nvcc && nvcc --version | tail -2) 2>&1 || echo "nvcc: not found"
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

step install 120 install.log "$PY" -m pip install -q "setuptools>=68" wheel "pybind11>=2.12" "cmake>=3.24" ninja \
  numpy tqdm ml-dtypes pytest hypothesis triton faiss-gpu-cu12

# ---- build: only the device's own arch, so the build is quick ----------------
arch="$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d ' .')"
export RAG_ENGINE_BUILD_CUDA=1 RAG_ENGINE_CUDA_ARCHS="${RAG_ENGINE_CUDA_ARCHS:-${arch:-90}}" MAX_JOBS="${MAX_JOBS:-16}"
step build 240 build.log "$PY" -m pip install --no-build-isolation --no-deps -e .
"$PY" -c "import rag_engine._C_cuda as m; print('built', m.built_archs, m.device_info())" >>"$OUT/build.log" 2>&1

# ---- tests and benchmark -------------------------------------------------------
step tests 180 tests.log "$PY" -m pytest tests/test_gpu_ops.py tests/test_triton_kernels.py -q -rs \
  --junitxml="$OUT/tests.xml"
step bench 240 bench.log env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE \
  "$PY" benchmarks/bench_gpu_ops.py --out "$OUT"

# ---- summary -------------------------------------------------------------------
{
  for k in "${!status[@]}"; do echo "$k ${status[$k]}"; done
} >"$OUT/steps.txt"
"$PY" - "$OUT" "$((SECONDS - start))" <<'EOF'
import json, pathlib, sys
out, total = pathlib.Path(sys.argv[1]), int(sys.argv[2])
steps = {}
for line in (out / "steps.txt").read_text().splitlines():
    name, rc, secs = line.split()
    steps[name] = {"rc": int(rc), "seconds": int(secs), "ok": rc == "0"}
bench = sorted(out.glob("bench_gpu_ops-*.json"))
rows = json.loads(bench[-1].read_text())["rows"] if bench else []
summary = {"total_seconds": total, "steps": steps, "env": (out / "env.txt").read_text(), "bench_rows": rows}
(out / "summary.json").write_text(json.dumps(summary, indent=2))
lines = [f"gpu_check: {total} s"] + [f"  {k:15s} {'ok' if v['ok'] else 'FAILED rc=%d' % v['rc']} ({v['seconds']} s)"
                                      for k, v in steps.items()]
tail = (out / "tests.log").read_text().strip().splitlines()[-1:] if (out / "tests.log").exists() else []
lines += [f"  tests: {t}" for t in tail]
bl = (out / "bench.log")
lines += ["", bl.read_text()] if bl.exists() else []
(out / "summary.txt").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
EOF
