#!/usr/bin/env bash
# Everything a lent GPU should check, in one device call of about 8 minutes (the call limit is 10):
#   1. benchmarks/gpu_run.sh: build with the CUDA op, probes, tests/test_gpu_kernels.py,
#      tests/test_masked_lora.py and the delta op's GPU tests on the GPU, then gpu_suite.py at 1-512 tokens
#      (issue #7; no Triton sweep; five launch shapes of the delta-layout kernel);
#   2. benchmarks/gpu_training_check.sh without its pytest step (issue #6: masked LoRA per backend, LoSA);
#   3. everything under $OUT packed into $OUT/all.tgz (a device call brings back only a few files).
# Assets (the stories260K model and text) must travel with the tree: copy them into an ignored folder and
# carry it, e.g. carry ["_assets"] and LOSA_ASSETS=$PWD/_assets.
#   OUT=$OUT LOSA_ASSETS=$PWD/_assets bash benchmarks/gpu_session.sh
set -u -o pipefail
cd "$(dirname "$0")/.."
ROOT_OUT=${OUT:?set OUT}
mkdir -p "$ROOT_OUT/kernels" "$ROOT_OUT/training"
start=$SECONDS
# Inner limits: build 120 s, probes 3 x 120 s, each test file 110 s, suite 100 s; typically about 280 s in
# all. The outer limits guard the 600 s call: if everything ran long, the suite (last) is what is cut.
DELTA_TESTS="tests/test_delta_layout.py::test_cuda_delta_op_matches_float64"
DELTA_TESTS+=" tests/test_delta_layout.py::test_sparse_linear_runs_the_delta_layout"
OUT=$ROOT_OUT/kernels TESTS="tests/test_gpu_kernels.py tests/test_masked_lora.py $DELTA_TESTS" BUILD_TIMEOUT=120 \
  TEST_TIMEOUT=110 SUITE_TIMEOUT=100 \
  timeout 380 bash benchmarks/gpu_run.sh --no-lora --sweep-budget 0 --tokens 1 8 16 32 128 512 \
  --delta-configs 8:2:1 8:2:0 4:2:1 8:4:0 16:2:0
echo "== kernels: exit $? after $((SECONDS - start)) s"
OUT=$ROOT_OUT/training SKIP_TESTS=1 timeout 200 bash benchmarks/gpu_training_check.sh
echo "== training: exit $? after $((SECONDS - start)) s"
tar -czf "$ROOT_OUT/all.tgz" -C "$ROOT_OUT" kernels training
echo "packed $ROOT_OUT/all.tgz"
