#!/usr/bin/env bash
# Everything a lent GPU should check, in one device call of about 8 minutes (the call limit is 10):
#   1. benchmarks/gpu_run.sh: build with the CUDA op, probes, tests/test_gpu_kernels.py and
#      tests/test_masked_lora.py on the GPU, then gpu_suite.py at 1-512 tokens (issue #7; no Triton sweep);
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
# Inner limits: build 120 s, probes 2 x 120 s, each test file 110 s, suite 90 s (typically about 250 s in
# all); the outer ones only guard the 600 s call.
OUT=$ROOT_OUT/kernels TESTS="tests/test_gpu_kernels.py tests/test_masked_lora.py" BUILD_TIMEOUT=120 \
  TEST_TIMEOUT=110 SUITE_TIMEOUT=90 \
  timeout 360 bash benchmarks/gpu_run.sh --no-lora --sweep-budget 0 --tokens 1 8 16 32 128 512
echo "== kernels: exit $? after $((SECONDS - start)) s"
OUT=$ROOT_OUT/training SKIP_TESTS=1 timeout 200 bash benchmarks/gpu_training_check.sh
echo "== training: exit $? after $((SECONDS - start)) s"
tar -czf "$ROOT_OUT/all.tgz" -C "$ROOT_OUT" kernels training
echo "packed $ROOT_OUT/all.tgz"
