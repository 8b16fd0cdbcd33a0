#!/usr/bin/env bash
# One-shot check of dlmc's CUDA path on a GPU machine (written for an H100/H200; about 8 minutes at most):
#   1. installs the CUDA extras that are missing (onnxruntime-gpu; torch-tensorrt when
#      DLMC_GPU_TRT=1, as it must match the installed torch); an install that fails is reported and the
#      tests that need it skip;
#   2. runs the gpu-marked tests (pytest -m gpu: every backend's exact recipe against the reference
#      decoder on CUDA, cuda:N, the cache manager, the quantized operators, TensorRT when present);
#   3. runs the CUDA-graph and Triton-kernel step tests (tests/runtime/test_cuda_graph.py): token identity
#      of the graphed fused loop with the plain one, and of a triton_kernels step with the plain step;
#   4. runs benchmarks/gpu_floor.py (8B-shaped LLaDA: ms/step against this GPU's floors).
# Usage: scripts/gpu_check.sh [output dir, default ./gpu_check]   (in an environment with dlmc installed
# and a CUDA build of torch). Prints one summary at the end; exits non-zero if a stage failed.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-gpu_check}
mkdir -p "$out"
status=0
summary=()
stage() {  # stage <label> <seconds> <command...>: runs it under a time limit, logs to $out/<label>.log
  local label=$1 limit=$2; shift 2
  local begin=$SECONDS
  timeout "$limit" "$@" >"$out/$label.log" 2>&1
  local rc=$?
  local last
  last=$(grep -v '^\s*$' "$out/$label.log" | tail -n 1)
  [ $rc -eq 124 ] && last="timed out after ${limit}s"
  summary+=("$label: rc $rc in $((SECONDS - begin))s: $last")
  [ $rc -eq 0 ] || status=1
}

if ! python -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "gpu_check: torch sees no CUDA device; nothing to check here" >&2
  exit 2
fi
python -c 'import onnxruntime as o, sys; sys.exit(0 if "CUDAExecutionProvider" in o.get_available_providers() else 1)' \
  2>/dev/null || stage install-onnxruntime-gpu 120 python -m pip install -q onnxruntime-gpu
if [ "${DLMC_GPU_TRT:-0}" = 1 ]; then
  stage install-trt 150 python -m pip install -q --extra-index-url https://pypi.nvidia.com -e '.[trt]'
fi
stage gpu-tests 300 python -m pytest -m gpu -q -p no:cacheprovider -rs --ignore=tests/runtime/test_cuda_graph.py tests
# CUDA graphs of the fused loop and the triton_kernels pass (the kernels inside an AOTInductor package)
stage gpu-graphs-kernels 150 python -m pytest -m gpu -q -p no:cacheprovider -rs tests/runtime/test_cuda_graph.py
stage gpu-floor 150 python benchmarks/gpu_floor.py --json "$out/gpu_floor.json" --calls 5

echo "== dlmc gpu check: $(python -c 'import torch; print(torch.cuda.get_device_name(), "torch", torch.__version__)')"
for line in "${summary[@]}"; do echo "$line"; done
grep -hE '^(FAILED|ERROR) ' "$out/gpu-tests.log" "$out/gpu-graphs-kernels.log" | sed 's/^/    /'
grep -E 'ms/step' "$out/gpu-floor.log" | sed 's/^/    /'
exit $status
