#!/usr/bin/env bash
# One GPU session for issue #7, on a machine with a CUDA GPU, torch with CUDA and nvcc:
#   1. build the extension with the CUDA op (pip install -e ., Hopper only, 16 jobs);
#   2. the GPU kernel and masked-LoRA tests on the real GPU;
#   3. benchmarks/gpu_suite.py (checks + timings + the masked-LoRA GPU benchmark).
# Logs and JSON go to $OUT (default ./gpu_out): device.txt, build.log, pytest.log, suite.log,
# gpu_suite.json, gpu_suite_masked_lora.json. A failing step is reported and the next one still runs;
# BUILD_TIMEOUT and TEST_TIMEOUT (seconds) bound the first two; arguments go to gpu_suite.py.
#
#   OUT=/tmp/gpu bash benchmarks/gpu_run.sh [--sweep-budget 100]
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
status=0

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,clocks.mem --format=csv \
  >"$OUT/device.txt" 2>&1
$PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" \
  >>"$OUT/device.txt" 2>&1
nvcc --version | tail -1 >>"$OUT/device.txt" 2>&1
cat "$OUT/device.txt"

echo "== build (pip install -e ., CUDA op for sm_90)"
start=$SECONDS
if MAX_JOBS=16 TORCH_CUDA_ARCH_LIST=9.0 timeout "${BUILD_TIMEOUT:-300}" $PY -m pip install --no-deps --no-build-isolation -e . >"$OUT/build.log" 2>&1; then
  echo "built in $((SECONDS - start)) s"
else
  echo "BUILD FAILED after $((SECONDS - start)) s (Triton kernels still run):"; tail -40 "$OUT/build.log"; status=1
fi
$PY -c "import losa_deploy.kernels as k; from losa_deploy.kernels.dispatch import has_cuda_op; \
print('extension loaded:', k.has_extension(), k.extension_error() or '', '| CUDA op:', has_cuda_op())"

echo "== tests on the GPU"
start=$SECONDS
workers=$($PY -c "import xdist" 2>/dev/null && echo "-n 8" || echo "")
for tests in tests/test_gpu_kernels.py "tests/test_masked_lora*.py"; do  # one file's failure stops only itself
  timeout "${TEST_TIMEOUT:-200}" $PY -m pytest $tests -x -q -p no:cacheprovider $workers >>"$OUT/pytest.log" 2>&1 \
    || status=1
  grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/pytest.log" | tail -4
done
echo "tests took $((SECONDS - start)) s"

echo "== gpu_suite.py"
$PY benchmarks/gpu_suite.py --out "$OUT/gpu_suite.json" "$@" 2>&1 | tee "$OUT/suite.log" || status=1
exit $status
