#!/usr/bin/env bash
# One GPU session for issue #7, on a machine with a CUDA GPU, torch with CUDA and nvcc:
#   1. build the extension with the CUDA op (pip install -e ., Hopper only, 16 jobs);
#   2. a probe of the value-group CUDA kernel in its own process: if it fails (or crashes the CUDA
#      context), the rest runs with LOSA_CUDA_KERNEL=rows and the suite times the row-walk kernel only;
#   3. the GPU kernel tests on the real GPU ($TESTS, default tests/test_gpu_kernels.py);
#   4. benchmarks/gpu_suite.py (checks + timings; arguments go to it).
# Logs and JSON go to $OUT (default ./gpu_out): device.txt, build.log, probe.log, pytest.log, suite.log,
# gpu_suite.json. A failing step is reported and the next one still runs; BUILD_TIMEOUT, TEST_TIMEOUT
# and SUITE_TIMEOUT (seconds) bound the steps.
#
#   OUT=/tmp/gpu bash benchmarks/gpu_run.sh --no-lora --sweep-budget 0
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
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

echo "== probe: value-group kernel against float64 (LLaMA shapes, 1-23 tokens, every group setting)"
suite_kernels=()
if ! timeout 120 $PY - >"$OUT/probe.log" 2>&1 <<'PY'
import sys
import torch
from losa_deploy.kernels.formats.bitmask import BitmaskWeight
from losa_deploy.kernels.formats.gpu import gpu_layout
sys.path.insert(0, "benchmarks")
from gpu_suite import GROUP_KERNELS, kernel_runs
g = torch.Generator("cuda").manual_seed(1)
worst = 0.0
for rows, cols, sparsity in ((4096, 4096, 0.7), (64, 11008, 0.5), (300, 1000, 0.9), (77, 4096, 0.0)):
    keep = torch.rand(rows, cols, generator=g, device="cuda") >= sparsity
    w = (torch.randn(rows, cols, generator=g, device="cuda") * keep).bfloat16()
    layout = gpu_layout(BitmaskWeight.from_dense(w))
    for tokens in (1, 2, 5, 8, 16, 23):
        x = torch.randn(tokens, cols, generator=g, device="cuda").bfloat16()
        ref = x.double() @ w.double().T
        for kernel in ("auto", *(k for k in GROUP_KERNELS if kernel_runs(k, cols, tokens, "cuda"))):
            y = torch.ops.losa.bitmask_linear(x, layout.values, layout.mask, layout.row_ptr, cols, None, kernel, 0)
            err = float((y.double() - ref).norm() / ref.norm())
            worst = max(worst, err)
            assert err < 1e-2, (rows, cols, sparsity, tokens, kernel, err)
torch.cuda.synchronize()
print(f"probe passed, worst relative error {worst:.2e}")
PY
then
  echo "PROBE FAILED: the rest runs on the row-walk kernel"; tail -20 "$OUT/probe.log"; status=1
  export LOSA_CUDA_KERNEL=rows
  suite_kernels=(--cuda-kernels rows)
else
  cat "$OUT/probe.log"
fi

echo "== tests on the GPU"
start=$SECONDS
workers=$($PY -c "import xdist" 2>/dev/null && echo "-n 8" || echo "")
for tests in ${TESTS:-tests/test_gpu_kernels.py}; do  # one file's failure stops only itself
  timeout "${TEST_TIMEOUT:-200}" $PY -m pytest $tests -q -p no:cacheprovider $workers >>"$OUT/pytest.log" 2>&1 \
    || status=1
  grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/pytest.log" | tail -8
done
echo "tests took $((SECONDS - start)) s"

echo "== gpu_suite.py"
timeout "${SUITE_TIMEOUT:-400}" $PY benchmarks/gpu_suite.py --out "$OUT/gpu_suite.json" "${suite_kernels[@]}" "$@" 2>&1 \
  | tee "$OUT/suite.log" || status=1
exit $status
