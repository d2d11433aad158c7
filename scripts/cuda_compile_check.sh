#!/usr/bin/env bash
# Compile-only check of the CUDA sources (csrc/cuda): no GPU needed.
#
#   bash scripts/cuda_compile_check.sh            # sm_90 only (fast, for CI)
#   CUDA_CHECK_ARCHS="80 90" bash scripts/cuda_compile_check.sh
#
# Each .cu is compiled to an object with host warnings on, and the pybind11
# bindings are syntax-checked against the CUDA headers; any compiler warning
# fails the check. Skips (exit 0) when no nvcc is found.
set -euo pipefail
cd "$(dirname "$0")/.."

nvcc="${CUDACXX:-}"
[ -n "$nvcc" ] || nvcc="$(command -v nvcc || true)"
for home in "${CUDA_HOME:-}" /usr/local/cuda; do
  [ -n "$nvcc" ] || { [ -n "$home" ] && [ -x "$home/bin/nvcc" ] && nvcc="$home/bin/nvcc"; } || true
done
if [ -z "$nvcc" ]; then
  echo "cuda_compile_check: skipped (no nvcc)"
  exit 0
fi
archs="${CUDA_CHECK_ARCHS:-90}"
python="${PYTHON:-.venv/bin/python}"
[ -x "$python" ] || python=python3
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
start=$SECONDS
echo "cuda_compile_check: $("$nvcc" --version | tail -1), archs: $archs"

gencode=()
for a in $archs; do gencode+=(-gencode "arch=compute_$a,code=sm_$a"); done

pids=()
for src in csrc/cuda/*.cu; do
  obj="$out/$(basename "$src").o"
  "$nvcc" -std=c++17 -O3 "${gencode[@]}" -Xcompiler=-Wall,-Wextra -c "$src" -o "$obj" \
    >"$obj.log" 2>&1 &
  pids+=("$!:$src:$obj.log")
  # at most two compilers at a time: CI machines have two cores
  if [ "${#pids[@]}" -ge 2 ]; then
    entry="${pids[0]}"; pids=("${pids[@]:1}")
    wait "${entry%%:*}" || { cat "${entry##*:}"; echo "FAILED: $(echo "$entry" | cut -d: -f2)"; exit 1; }
  fi
done
for entry in "${pids[@]}"; do
  wait "${entry%%:*}" || { cat "${entry##*:}"; echo "FAILED: $(echo "$entry" | cut -d: -f2)"; exit 1; }
done

pyinc="$("$python" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')"
pbinc="$("$python" -c 'import pybind11; print(pybind11.get_include())' 2>/dev/null || true)"
if [ -n "$pbinc" ]; then
  # through nvcc, which hands a .cpp to the host compiler with the CUDA include path
  "$nvcc" -std=c++17 -Xcompiler=-fPIC,-Wall,-Wextra -I"$pyinc" -I"$pbinc" \
    -DRAG_ENGINE_CUDA_ARCHS_STR='"check"' -c csrc/cuda/bindings.cpp -o "$out/bindings.o" \
    >"$out/bindings.log" 2>&1 \
    || { cat "$out/bindings.log"; echo "FAILED: csrc/cuda/bindings.cpp"; exit 1; }
else
  echo "cuda_compile_check: pybind11 not importable, bindings.cpp not checked" > "$out/bindings.log"
fi

if grep -il "warning" "$out"/*.log >/dev/null; then
  cat "$out"/*.log
  echo "FAILED: compiler warnings"
  exit 1
fi
echo "cuda_compile_check: OK ($(ls csrc/cuda/*.cu | wc -l) CUDA sources + bindings, $((SECONDS - start)) s)"
