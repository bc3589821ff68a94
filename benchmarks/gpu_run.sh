#!/usr/bin/env bash
# One GPU session for issue #7, on a machine with a CUDA GPU, torch with CUDA and nvcc:
#   1. build the extension with the CUDA op (pip install -e ., Hopper only, 16 jobs);
#   2. probes of the value-group and the positions CUDA kernels, each in its own process: if one fails (or
#      crashes the CUDA context), the rest runs without it (LOSA_CUDA_KERNEL=rows or groups:16:2) and the
#      suite times the kernels left; likewise the delta-layout kernel (the suite skips it if it fails);
#   3. the GPU kernel tests on the real GPU ($TESTS, default tests/test_gpu_kernels.py; $PYTEST_K selects);
#   4. with SANITIZE=1, compute-sanitizer (memcheck, racecheck) on the positions and delta kernels; with NCU=1, a
#      profile of the one-token kernels (ncu.txt);
#   5. benchmarks/gpu_suite.py (checks + timings; arguments go to it).
# Before 2, the CPU ops' error path is checked once (cpu_errors.log): a CUDA op message streaming an
# integer once crashed the process on the GPU machine; the CPU ops' messages still stream integers.
# Logs and JSON go to $OUT (default ./gpu_out): device.txt, build.log, cpu_errors.log, probe_*.log, pytest.log, suite.log,
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

echo "== CPU op errors whose messages hold numbers (such a message crashed the CUDA op here once)"
timeout 60 $PY - >"$OUT/cpu_errors.log" 2>&1 <<'PY'
import torch
from losa_deploy.kernels import ops
assert ops() is not None, "the extension did not load"
values, mask = torch.zeros(4, dtype=torch.bfloat16), torch.zeros(3, 2, dtype=torch.int32)
try:  # row_ptr with the wrong length: "row_ptr has 2 entries, 3 rows need 4"
    torch.ops.losa.bitmask_linear(torch.zeros(1, 64, dtype=torch.bfloat16), values, mask,
                                  torch.zeros(2, dtype=torch.long), 64, None, "auto", 0)
    print("NO ERROR RAISED")
except RuntimeError as error:
    print("raised:", str(error).splitlines()[0])
PY
rc=$?
[ $rc -eq 0 ] || { echo "CPU OP ERROR PATH FAILED (exit $rc: a crash, not an exception)"; status=1; }
cat "$OUT/cpu_errors.log"

# probe FAMILY: the kernels of FAMILY against float64, in a process of its own (a kernel that faults takes
# its CUDA context down with it): groups: every value-group setting and "auto" above one token; positions:
# every positions setting and "auto" at one token; delta: losa::delta_linear at every launch shape. LLaMA
# shapes and ragged ones, 1-23 tokens.
probe() {
  timeout 120 $PY - "$1" >"$OUT/probe_$1.log" 2>&1 <<'PY'
import sys
import torch
from losa_deploy.kernels.dispatch import has_delta_op
from losa_deploy.kernels.formats.bitmask import BitmaskWeight
from losa_deploy.kernels.formats.delta import DeltaWeight
from losa_deploy.kernels.formats.gpu import gpu_layout
sys.path.insert(0, "benchmarks")
from gpu_suite import DELTA_CONFIGS, GROUP_KERNELS, POSITION_KERNELS, kernel_runs
family = sys.argv[1]
assert family != "delta" or has_delta_op(), "the extension has no delta_linear op"
g = torch.Generator("cuda").manual_seed(1)
worst = 0.0
shapes = ((4096, 4096, 0.7), (64, 11008, 0.5), (300, 1000, 0.9), (77, 4096, 0.0), (9001, 2101, 0.6))
for rows, cols, sparsity in shapes:
    keep = torch.rand(rows, cols, generator=g, device="cuda") >= sparsity
    w = (torch.randn(rows, cols, generator=g, device="cuda") * keep).bfloat16()
    layout = gpu_layout(BitmaskWeight.from_dense(w))
    delta = DeltaWeight.build(layout.values, layout.mask, cols) if family == "delta" else None
    for tokens in (1, 2, 3, 4, 5, 7, 8, 16, 23):
        x = torch.randn(tokens, cols, generator=g, device="cuda").bfloat16()
        ref = x.double() @ w.double().T
        if family == "delta":
            kernels = ("auto", *DELTA_CONFIGS, "1:1:1", "3:4:0", "2:1:0")
        else:
            family_kernels = GROUP_KERNELS if family == "groups" else POSITION_KERNELS
            auto = ["auto"] if (tokens == 1) == (family == "positions") else []
            kernels = (*auto, *(k for k in family_kernels if kernel_runs(k, cols, tokens, "cuda")))
        for kernel in kernels:
            if delta is not None:
                y = torch.ops.losa.delta_linear(x, delta.values, delta.deltas, delta.row_ptr, cols, None, kernel)
            else:
                y = torch.ops.losa.bitmask_linear(x, layout.values, layout.mask, layout.row_ptr, cols, None, kernel, 0)
            err = float((y.double() - ref).norm() / ref.norm())
            worst = max(worst, err)
            assert err < 1e-2, (rows, cols, sparsity, tokens, kernel, err)
torch.cuda.synchronize()
print(f"probe {family} passed, worst relative error {worst:.2e}")
PY
}

echo "== probes against float64 (LLaMA shapes and ragged ones, 1-23 tokens): value-group, positions, delta"
suite_kernels=()
if ! probe groups; then
  echo "PROBE FAILED (groups): the rest runs on the row-walk kernel"; tail -20 "$OUT/probe_groups.log"; status=1
  export LOSA_CUDA_KERNEL=rows
  suite_kernels=(--cuda-kernels rows)
else
  cat "$OUT/probe_groups.log"
  if ! probe positions; then
    echo "PROBE FAILED (positions): the rest runs without it"; tail -20 "$OUT/probe_positions.log"; status=1
    export LOSA_CUDA_KERNEL=groups:16:2
    suite_kernels=(--cuda-kernels rows groups:16:2 groups:16:2:window groups:8:2:window groups:16:4)
  else
    cat "$OUT/probe_positions.log"
  fi
fi
if probe delta; then
  cat "$OUT/probe_delta.log"
else
  echo "PROBE FAILED (delta): the suite runs without it"; tail -20 "$OUT/probe_delta.log"; status=1
  suite_kernels+=(--delta-configs)
fi

echo "== tests on the GPU"
start=$SECONDS
workers=$($PY -c "import xdist" 2>/dev/null && echo "-n 8" || echo "")
for tests in ${TESTS:-tests/test_gpu_kernels.py}; do  # one file's failure stops only itself
  timeout "${TEST_TIMEOUT:-200}" $PY -m pytest $tests -q -p no:cacheprovider $workers ${PYTEST_K:+-k "$PYTEST_K"} \
    >>"$OUT/pytest.log" 2>&1 \
    || status=1
  grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/pytest.log" | tail -8
done
echo "tests took $((SECONDS - start)) s"

if [ -n "${SANITIZE:-}" ] && command -v compute-sanitizer >/dev/null; then  # optional: positions and delta
  for tool in memcheck racecheck; do
    echo "== compute-sanitizer --tool $tool: positions and delta kernels on small ragged shapes"
    timeout 150 compute-sanitizer --tool $tool --error-exitcode 9 $PY - >"$OUT/sanitize_$tool.log" 2>&1 <<'PY'
import torch
from losa_deploy.kernels.formats.bitmask import BitmaskWeight
from losa_deploy.kernels.formats.delta import DeltaWeight
from losa_deploy.kernels.formats.gpu import gpu_layout
g = torch.Generator("cuda").manual_seed(3)
for rows, cols, sparsity in ((37, 2101, 0.7), (300, 1000, 0.9), (64, 4096, 0.5), (2000, 72, 0.6), (5, 33, 0.0)):
    keep = torch.rand(rows, cols, generator=g, device="cuda") >= sparsity
    layout = gpu_layout(BitmaskWeight.from_dense((torch.randn(rows, cols, generator=g, device="cuda") * keep).bfloat16()))
    x = torch.randn(1, cols, generator=g, device="cuda").bfloat16()
    for kernel in ("positions:3", "positions:8"):
        torch.ops.losa.bitmask_linear(x, layout.values, layout.mask, layout.row_ptr, cols, None, kernel, 0)
    if hasattr(torch.ops.losa, "delta_linear"):  # the delta-layout kernel, 1 and 3 tokens, both load orders
        d = DeltaWeight.build(layout.values, layout.mask, cols)
        for tokens, config in ((1, "3:2:1"), (1, "8:4:0"), (3, "4:1:1")):
            x = torch.randn(tokens, cols, generator=g, device="cuda").bfloat16()
            torch.ops.losa.delta_linear(x, d.values, d.deltas, d.row_ptr, cols, None, config)
torch.cuda.synchronize()
print("done")
PY
    rc=$?
    [ $rc -eq 0 ] || status=1
    echo "exit $rc"; grep -E "ERROR SUMMARY|RACECHECK SUMMARY|Invalid|Race|done" "$OUT/sanitize_$tool.log" | head -8
  done
fi

if [ -n "${NCU:-}" ] && command -v ncu >/dev/null; then  # optional: where the 1-token kernels spend their time
  echo "== ncu: 4096x4096, 1 token, 50% and 70%: positions:16, positions:16:2 and groups:16:2"
  timeout 180 ncu --clock-control none --section SpeedOfLight --section WarpStateStats --section InstructionStats \
    --section Occupancy --kernel-name regex:bitmask_gemv $PY - >"$OUT/ncu.txt" 2>&1 <<'PY'
import torch
from losa_deploy.kernels.formats.bitmask import BitmaskWeight
from losa_deploy.kernels.formats.gpu import gpu_layout
g = torch.Generator("cuda").manual_seed(2)
for sparsity in (0.5, 0.7):
    keep = torch.rand(4096, 4096, generator=g, device="cuda") >= sparsity
    layout = gpu_layout(BitmaskWeight.from_dense((torch.randn(4096, 4096, generator=g, device="cuda") * keep).bfloat16()))
    x = torch.randn(1, 4096, generator=g, device="cuda").bfloat16()
    for kernel in ("positions:16", "positions:16:2", "groups:16:2"):
        torch.ops.losa.bitmask_linear(x, layout.values, layout.mask, layout.row_ptr, 4096, None, kernel, 0)
torch.cuda.synchronize()
PY
  grep -E "bitmask_gemv|Duration|Issued Ipc Active|Warp Cycles Per Issued|DRAM Throughput|Executed Instructions  |Achieved Occupancy" "$OUT/ncu.txt" | head -80
fi

echo "== gpu_suite.py"
# the probes' exclusions come after the caller's arguments: argparse keeps the last, so a kernel that
# failed its probe is never timed, whatever the caller asked for
timeout "${SUITE_TIMEOUT:-400}" $PY benchmarks/gpu_suite.py --out "$OUT/gpu_suite.json" "$@" "${suite_kernels[@]}" 2>&1 \
  | tee "$OUT/suite.log" || status=1
exit $status
