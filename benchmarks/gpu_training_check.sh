#!/usr/bin/env bash
# One call on a lent GPU for the training side (issues #4 and #6), no build needed (pure Python + Triton):
#   1. masked-LoRA: issue #6's tests on CUDA; every backend against a float64 CPU reference; the
#      forward+backward benchmark with the fused column run by each backend (Triton-built panels = auto,
#      PyTorch panels, Triton tiles);
#   2. a small LoSA fine-tune of stories260K on CUDA, end to end (prune phases, training, merge, write).
# Compare 2. with the same command on a CPU (benchmarks/RESULTS.md has both).
#   OUT=/tmp/gpu LOSA_ASSETS=/path/to/assets bash benchmarks/gpu_training_check.sh
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
A=${LOSA_ASSETS:?set LOSA_ASSETS}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
python3 -c "import torch, triton; print('torch', torch.__version__, torch.cuda.get_device_name(), 'triton', triton.__version__)"
if [ -z "${SKIP_TESTS:-}" ]; then  # gpu_session.sh runs them with the kernel tests
  echo "== masked LoRA tests on CUDA (float64 gradcheck included)"
  timeout 150 python3 -m pytest -q -x -p no:cacheprovider tests/test_masked_lora.py 2>&1 | tail -15
fi
echo "== masked LoRA on CUDA, every backend, against a float64 CPU reference (ragged shape)"
python3 - <<'PY'
import torch
from losa_deploy.kernels.masked_lora import masked_lora_linear, masked_lora_linear_materialized, resolve_backend
g = torch.Generator().manual_seed(0)
d, k, r, T = 1000, 1500, 13, 77
M = torch.rand(d, k, generator=g) > 0.6
W, A, B = torch.randn(d, k, generator=g) * M, torch.randn(r, k, generator=g), torch.randn(d, r, generator=g)
x, dy = torch.randn(T, k, generator=g), torch.randn(T, d, generator=g)
def grads(fn, dev, dtype):
    xs, As, Bs = (t.detach().to(dev, dtype).requires_grad_() for t in (x, A, B))
    y = fn(xs, W.to(dev, dtype), M.to(dev), As, Bs, 0.5)
    y.backward(dy.to(dev, dtype))
    return [t.detach().cpu().double() for t in (y, xs.grad, As.grad, Bs.grad)]
ref = grads(masked_lora_linear_materialized, "cpu", torch.float64)
print("auto on CUDA runs", resolve_backend("cuda", torch.bfloat16))
for backend in ("panels", "torch", "triton"):
    for dtype in (torch.float32, torch.bfloat16):
        got = grads(lambda *a: masked_lora_linear(*a, backend=backend), "cuda", dtype)
        print(backend, dtype, "max rel err y, dx, dA, dB:",
              [f"{float((a - b).abs().max() / b.abs().max()):.2e}" for a, b in zip(got, ref)])
PY
for backend in panels torch triton; do
  echo "== masked LoRA, fused column = $backend"
  timeout 35 python3 benchmarks/masked_lora.py --device cuda --rank 16 --k 4096 11008 --tokens 256 2048 \
    --no-dropout-row --rounds 3 --backend $backend --no-progress --json "$OUT/masked_lora_$backend.json"
done
echo "== LoSA on CUDA"
timeout 60 python3 -m losa_deploy finetune "$A/models/stories260K-hf" -o /tmp/ft-cuda --device cuda \
  --method losa --sparsity 0.5 --data "$A/data/tinystories-val-a.txt" --data-slice 0:0.8 --budget-tokens 40960 \
  --max-len 128 --nsamples 16 --lr 1e-2 --eval-data "$A/data/tinystories-val-a.txt" --eval-slice 0.8:1 \
  --json "$OUT/finetune_cuda.json" --no-progress
echo "exit $?"
