"""GPU sparse-linear kernels: the Triton decode and dot paths (on a GPU, or under TRITON_INTERPRET=1 on
small ragged shapes), the CUDA decode op where it was built, the GPU layouts' offset tables, dispatch,
``SparseLinear`` on a real model, bad input, and the CUDA sources compiling with nvcc for sm_80 / sm_90."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import sparse_weights
import torch
from sparse_weights import prune_linears_, random_nm, random_sparse

from losa_deploy.errors import LosaError
from losa_deploy.kernels import triton as triton_kernels
from losa_deploy.kernels.dispatch import gpu_kernel, has_cuda_op, sparse_linear
from losa_deploy.kernels.formats.bitmask import BitmaskWeight, popcount
from losa_deploy.kernels.formats.gpu import BitmaskGPULayout, NMGPULayout, chunk_offsets, gpu_layout
from losa_deploy.kernels.formats.nm import NMWeight

ROOT = Path(__file__).resolve().parent.parent
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: conftest.py turned on Triton's interpreter
pytestmark = pytest.mark.skipif(not triton_kernels.available() or not (
    torch.cuda.is_available() or triton_kernels.interpreted()), reason="triton not installed")

# the interpreter's fp32 -> bf16 conversion does not round to nearest, so there one more rounding is allowed
check_linear = functools.partial(sparse_weights.check_linear, ulps=2 if triton_kernels.interpreted() else 1)


def make_weight(fmt: str, rows: int, cols: int, gen: torch.Generator, dtype: torch.dtype, sparsity: float = 0.7):
    """A dense sparse weight and its packed kernel weight. ``fmt``: ``bitmask`` or ``N:M`` (``mixed:M``:
    N per 8-row block)."""
    if fmt == "bitmask":
        w = random_sparse(rows, cols, sparsity, gen, dtype)
        return w, BitmaskWeight.from_dense(w)
    n, m = fmt.split(":")
    m = int(m)
    if n == "mixed":
        row_n = torch.randint(1, m, (rows,), generator=gen).repeat_interleave(8)[:rows]
        w = random_nm(rows, cols, row_n, m, gen, dtype=dtype)
        return w, NMWeight.from_dense(w, m=m, rows_per_block=8).kernel_layout()
    w = random_nm(rows, cols, int(n), m, gen, dtype=dtype)
    return w, NMWeight.from_dense(w, int(n), m).kernel_layout()


FORMATS = ["bitmask", "2:4", "2:8", "1:4", "4:16", "mixed:8", "2:6"]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("tokens", [1, 3, 8, 9, 20])
def test_triton_matches_float64(fmt, tokens, rng):
    from losa_deploy.kernels.triton.sparse_gemm import sparse_matmul

    rows = int(torch.randint(1, 70, (), generator=rng))
    cols = int(torch.randint(1, 700, (), generator=rng))
    dtype = [torch.bfloat16, torch.float16, torch.float32][int(torch.randint(0, 3, (), generator=rng))]
    w, packed = make_weight(fmt, rows, cols, rng, dtype)
    x = torch.randn(tokens, cols, generator=rng).to(dtype)
    bias = torch.randn(rows, generator=rng).to(dtype) if tokens % 2 else None
    layout = gpu_layout(packed.replace(**{k: v.to(DEVICE) for k, v in packed.tensors().items()}))
    y = sparse_matmul(x.to(DEVICE), layout, None if bias is None else bias.to(DEVICE))
    check_linear(y, x, w, bias)


@pytest.mark.parametrize("fmt", ["bitmask", "2:4"])
@pytest.mark.parametrize("path,tokens", [("decode", 1), ("decode", 6), ("dot", 5), ("dot", 33)])
@pytest.mark.parametrize("split_k", [1, 3])
def test_triton_paths_and_split_k(fmt, path, tokens, split_k, rng):
    """Each path at every token count it may see, with and without split-K (fp32 atomics), ragged tails."""
    from losa_deploy.kernels.triton.sparse_gemm import Config, sparse_matmul

    rows, cols = 45, 1000  # 1000 = 3 full 256-column tiles and a ragged one
    w, packed = make_weight(fmt, rows, cols, rng, torch.bfloat16, sparsity=0.5)
    x = torch.randn(tokens, cols, generator=rng).to(torch.bfloat16)
    bias = torch.randn(2 * rows, generator=rng).to(torch.bfloat16)[::2]  # strided: a view of another tensor
    layout = gpu_layout(packed.replace(**{k: v.to(DEVICE) for k, v in packed.tensors().items()}))
    cfg = Config(path, 16, block_t=16 if tokens <= 16 else 32, split_k=split_k)
    check_linear(sparse_matmul(x.to(DEVICE), layout, bias.to(DEVICE), cfg), x, w, bias)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("sparsity", [0.0, 0.6, 1.0])
def test_decompress_is_exact(fmt, sparsity, rng):
    """The panels path's decoder: any span of rows, back to the dense values bit for bit (ragged columns:
    a partial 256-column chunk and a partial word)."""
    from losa_deploy.kernels.triton.sparse_gemm import decompress

    rows, cols = int(torch.randint(2, 60, (), generator=rng)), int(torch.randint(1, 600, (), generator=rng))
    w, packed = make_weight(fmt, rows, cols, rng, torch.bfloat16, sparsity=sparsity if fmt == "bitmask" else 0.7)
    layout = gpu_layout(packed.replace(**{k: v.to(DEVICE) for k, v in packed.tensors().items()}))
    start = int(torch.randint(0, rows - 1, (), generator=rng))
    stop = int(torch.randint(start + 1, rows + 1, (), generator=rng))
    assert torch.equal(decompress(layout, slice(start, stop), torch.bfloat16).cpu(), w[start:stop])
    assert torch.equal(decompress(layout, slice(-2, None), torch.float32).cpu(), w[-2:].float())
    buffer = torch.full((rows + 3, cols), float("nan"), dtype=torch.bfloat16, device=DEVICE)
    assert torch.equal(decompress(layout, slice(None), torch.bfloat16, out=buffer).cpu(), w)
    with pytest.raises(LosaError, match="step 1"):
        decompress(layout, slice(0, rows, 2), torch.bfloat16)
    with pytest.raises(LosaError, match="out must be"):
        decompress(layout, slice(None), torch.bfloat16, out=buffer[:1])


@pytest.mark.parametrize("fmt", ["bitmask", "2:4", "mixed:8", "2:6"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_triton_panels_path(fmt, dtype, rng, monkeypatch):
    """Decode panels of rows, multiply with the vendor GEMM: small panels (one of 16 rows, reused) so the
    47 rows take three, the last one partial; with and without bias."""
    from losa_deploy.kernels.triton import sparse_gemm
    from losa_deploy.kernels.triton.sparse_gemm import Config, sparse_matmul

    rows, cols, tokens = 47, 300, 37
    monkeypatch.setattr(sparse_gemm, "PANEL_BYTES", 16 * cols * torch.tensor([], dtype=dtype).element_size())
    w, packed = make_weight(fmt, rows, cols, rng, dtype, sparsity=0.5)
    x = torch.randn(tokens, cols, generator=rng).to(dtype)
    layout = gpu_layout(packed.replace(**{k: v.to(DEVICE) for k, v in packed.tensors().items()}))
    for bias in (None, torch.randn(rows, generator=rng).to(dtype)):
        y = sparse_matmul(x.to(DEVICE), layout, None if bias is None else bias.to(DEVICE), Config("panels", 16))
        check_linear(y, x, w, bias)


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.95, 1.0])
def test_triton_bitmask_sparsity_extremes(sparsity, rng):
    from losa_deploy.kernels.triton.sparse_gemm import sparse_matmul

    w, packed = make_weight("bitmask", 33, 515, rng, torch.float32, sparsity=sparsity)
    x = torch.randn(2, 515, generator=rng)
    layout = gpu_layout(packed.replace(**{k: v.to(DEVICE) for k, v in packed.tensors().items()}))
    y = sparse_matmul(x.to(DEVICE), layout)
    if sparsity == 1.0:
        assert torch.equal(y.cpu(), torch.zeros(2, 33))
    else:
        check_linear(y, x, w, None)


def test_chunk_offsets_and_row_tables(rng):
    w, packed = make_weight("bitmask", 19, 777, rng, torch.float32, sparsity=0.6)
    offsets = chunk_offsets(packed.mask)
    kept = (w != 0).to(torch.int64)
    for c in range(offsets.shape[1]):
        assert torch.equal(offsets[:, c].to(torch.int64), kept[:, : 256 * c].sum(1))
    assert torch.equal(popcount(packed.mask).sum(1), kept.sum(1))

    _, nm = make_weight("mixed:8", 21, 101, rng, torch.float32)
    tables = NMGPULayout.build(nm)
    stride = (101 // 8) * nm.row_n() + (nm.row_n() * (101 % 8) + 7) // 8
    assert torch.equal(tables.row_ptr, torch.cat([torch.zeros(1, dtype=torch.int64), stride.cumsum(0)]))
    assert torch.equal(tables.word_values.to(torch.int64), nm.row_n() * 4)
    # every full word of the filled layout holds exactly 32·N/M values: the fixed stride the kernel relies on
    full = popcount(nm.mask[:, : 101 // 32])
    assert torch.equal(full, (nm.row_n() * 4)[:, None].expand_as(full))
    # M not dividing 32 runs as a bitmask over the filled stream
    assert isinstance(gpu_layout(make_weight("2:6", 9, 50, rng, torch.float32)[1]), BitmaskGPULayout)


def _cuda_linear(x, packed, bias, kernel: str):
    """The CUDA op on a packed weight: through ``sparse_linear`` for ``auto``, else with ``kernel`` forced."""
    cuda = packed.replace(**{k: v.cuda() for k, v in packed.tensors().items()})
    layout = gpu_layout(cuda)
    if kernel == "auto":
        return sparse_linear(x.cuda(), layout, bias.cuda(), backend="cuda")
    return torch.ops.losa.bitmask_linear(x.cuda(), layout.values, layout.mask, layout.row_ptr, x.shape[-1],
                                         bias.cuda(), kernel, 0)


@pytest.mark.skipif(not has_cuda_op(), reason="extension built without CUDA")
@pytest.mark.parametrize("kernel", ["auto", "rows", "groups:16:4", "groups:3:2", "groups:5:2:window", "positions",
                                    "positions:3", "positions:8:2", "positions:5:3"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tokens", [1, 2, 3, 4, 7, 16, 23])
def test_cuda_op_matches_float64(kernel, dtype, tokens, rng):
    """Every CUDA kernel (row walk; value groups at three block sizes, two depths and both mask walks; the
    one-token positions kernel at three block sizes and one to three rows per warp, one launch per token),
    every token width they are instantiated for (and padding to it): row steps of 1024/2048 columns with
    ragged tails, rows whose values start anywhere in a 16-byte group, empty rows, more rows than resident
    warps (the row loops), N:M weights through their bitmask view, and the dense fallback (fp32)."""
    cases = [("bitmask", 37, 2101, 0.7), ("bitmask", 64, 4096, 0.5), ("bitmask", 5, 33, 0.0),
             ("bitmask", 11, 300, 0.95), ("2:4", 19, 1030, 0), ("mixed:8", 21, 700, 0),
             ("bitmask", 9001, 72, 0.6)]
    for fmt, rows, cols, sparsity in cases:
        for dt in (dtype, torch.float32) if fmt == "bitmask" and rows == 5 else (dtype,):
            w, packed = make_weight(fmt, rows, cols, rng, dt, sparsity=sparsity)
            if fmt == "bitmask" and rows == 37:
                w[::4] = 0  # empty rows: no values, no groups
                packed = BitmaskWeight.from_dense(w)
            x = torch.randn(tokens, cols, generator=rng).to(dt)
            bias = torch.randn(rows, generator=rng).to(dt)
            check_linear(_cuda_linear(x, packed, bias, kernel), x, w, bias)


def test_groups_kernel_fit_rule(monkeypatch):
    """The Python copies of the value-group and positions kernels' shared-memory plans
    (dispatch.groups_kernel_fits, used to send 17-32 tokens to the CUDA op; positions_kernel_fits, used by
    the GPU suite) against hand-computed sizes on a 227 KiB (sm_90) block."""
    from losa_deploy.kernels import dispatch

    monkeypatch.setattr(dispatch, "_smem_optin", lambda device: 227 * 1024)
    # 4096 columns, 16 tokens: x 4096·16 + 33 padding columns of 16, bf16 = 132,128 B; 16 warps x 2 buffers of
    # 132 words (128 + sentinel, padded to 4) + 32 starts = 16 x 1,184 B -> 151,072 B
    assert dispatch.groups_kernel_fits(4096, 16)
    assert dispatch.groups_kernel_fits(4096, 9) and dispatch.groups_kernel_fits(11008, 8)
    assert not dispatch.groups_kernel_fits(11008, 16)  # 352 KB of x alone
    assert not dispatch.groups_kernel_fits(65536, 1)  # 131 KB of x + 16 x 16.5 KB of mask buffers
    assert dispatch.groups_kernel_fits(65536, 1, warps=4)
    # positions: x in fp32, 36 floats per word, words padded to steps of 32; 2 x 1,040 bf16 values per warp
    assert dispatch.positions_kernel_fits(4096)  # 128 x 144 + 16 x 4,160 = 84,992 B
    assert dispatch.positions_kernel_fits(32768, warps=16)  # 147,456 + 66,560 = 214,016 B
    assert not dispatch.positions_kernel_fits(40000, warps=16)  # 1,280 x 144 + 66,560 = 250,880 B
    assert dispatch.positions_kernel_fits(40000, warps=8)  # 184,320 + 33,280 = 217,600 B
    assert not dispatch.positions_kernel_fits(65536, warps=1)  # 294,912 B of x alone


@pytest.mark.skipif(not has_cuda_op(), reason="extension built without CUDA")
def test_cuda_kernel_choice_errors(rng):
    """A forced value-group kernel that cannot hold x in shared memory, and unknown kernel names, fail with
    a message; ``auto`` runs 16 tokens of 11008 columns as two value-group launches of 8 tokens there."""
    w, packed = make_weight("bitmask", 16, 11008, rng, torch.bfloat16, sparsity=0.7)
    x = torch.randn(16, 11008, generator=rng).to(torch.bfloat16)
    bias = torch.randn(16, generator=rng).to(torch.bfloat16)
    with pytest.raises(RuntimeError, match="does not fit"):
        _cuda_linear(x, packed, bias, "groups")
    check_linear(_cuda_linear(x, packed, bias, "auto"), x, w, bias)
    for bad in ("fastest", "groups:32", "groups:8:3", "groups:8:2:skip", "groups:4:2x", "groups:4:4:",
                "positions:0", "positions:17", "positions:x", "positions8", "positions:", "positions:4:0",
                "positions:4:x", "positions:4:2:1"):
        with pytest.raises(RuntimeError, match="kernel"):
            _cuda_linear(x[:1], packed, bias, bad)
    layout = gpu_layout(packed.replace(**{k: v.cuda() for k, v in packed.tensors().items()}))
    with pytest.raises(RuntimeError, match=r"mask must be contiguous int32 \[rows, 344\]"):  # a number in the message
        torch.ops.losa.bitmask_linear(x[:1].cuda(), layout.values, layout.mask.long(), layout.row_ptr, 11008, None,
                                      "auto", 0)


@pytest.mark.parametrize("dtype,backend", [
    (torch.float32, "triton"),
    pytest.param(torch.bfloat16, "auto", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")),
])
def test_sparse_linear_module_on_a_real_model(stories_dir, rng, dtype, backend):
    """stories260K (ragged FFN of 172), every linear 60% pruned, swapped for SparseLinear and moved to the
    device: the Triton path (forced, so it runs under the interpreter too) and, on a GPU, the default
    dispatch in bf16 (the CUDA kernel) give the dense model's logits."""
    from losa_deploy.models import load_model
    from losa_deploy.runtime.sparsify import sparsify_

    model = load_model(stories_dir).to(dtype).eval()
    prune_linears_(model, sparsity=0.6)
    ids = torch.randint(0, model.config.vocab_size, (1, 12), generator=rng)
    with torch.no_grad():
        want = model.float()(ids).logits
        sparsify_(model.to(dtype), backend=backend, progress=False)
        got = model.to(DEVICE)(ids.to(DEVICE)).logits.float().cpu()
    tolerance = 1e-4 if dtype == torch.float32 else 5e-2  # bf16 activations through five layers
    assert (got - want).abs().max() <= tolerance * want.abs().max()
    layers = [m for m in model.modules() if type(m).__name__ == "SparseLinear"]
    assert layers and all((m.gpu_layout is not None) == (DEVICE == "cuda") for m in layers)


def test_dispatch_choices_and_bad_input(rng):
    from losa_deploy.kernels.triton.sparse_gemm import Config, sparse_matmul

    w, packed = make_weight("bitmask", 8, 40, rng, torch.float32)
    x = torch.randn(3, 40, generator=rng)
    layout = gpu_layout(packed)
    if DEVICE == "cpu":
        assert gpu_kernel(x, packed, None, "triton") == "triton"
        assert gpu_kernel(x, packed, None, "torch") == "torch"
        with pytest.raises(LosaError, match="inference-only"):
            gpu_kernel(x.requires_grad_(), packed, None, "triton")
        x = x.detach()
        if not has_cuda_op():
            with pytest.raises(LosaError, match="'cuda'"):
                sparse_linear(x, packed, backend="cuda")
        # an autograd-tracked call on the Triton backend falls back to the differentiable torch path
        y = sparse_linear(x.clone().requires_grad_(), layout, backend="auto")
        check_linear(y.detach(), x, w, None)
        # a trainable bias alone (SparseLinear keeps nn.Linear's) still runs the kernel; its gradient flows
        bias = torch.randn(8, generator=rng, requires_grad=True)
        y = sparse_linear(x, layout, bias, backend="triton")
        check_linear(y.detach(), x, w, bias.detach())
        y.sum().backward()
        torch.testing.assert_close(bias.grad, torch.full((8,), 3.0))
    with pytest.raises(LosaError, match="unknown sparse backend"):
        gpu_kernel(x, packed, None, "sse9")
    with pytest.raises(LosaError, match="x must be"):
        sparse_matmul(x[:, :39], layout)
    with pytest.raises(LosaError, match="at most 8 tokens"):
        sparse_matmul(torch.randn(9, 40), layout, config=Config("decode", 16))
    with pytest.raises(LosaError, match="block_k must be"):
        sparse_matmul(x, layout, config=Config("dot", 16, block_k=512))
    with pytest.raises(LosaError, match="bf16, fp16 or fp32"):
        sparse_matmul(x.double(), layout)
    with pytest.raises(LosaError, match="path must be"):
        sparse_matmul(x, layout, config=Config("fast", 16))
    with pytest.raises(LosaError, match="chunk_offset must be int32"):
        BitmaskGPULayout(packed, layout.chunk_offset[:, :0])
    with pytest.raises(LosaError, match="no GPU layout"):
        gpu_layout(w)
    nm = make_weight("2:4", 8, 40, rng, torch.float32)[1]
    with pytest.raises(LosaError, match="word_values must be int32"):
        NMGPULayout(nm, NMGPULayout.build(nm).row_ptr, torch.zeros(8, dtype=torch.int64))
    with pytest.raises(LosaError, match="M dividing 32"):
        NMGPULayout.build(make_weight("2:6", 8, 40, rng, torch.float32)[1])
    y = sparse_matmul(x[:0], layout)
    assert y.shape == (0, 8)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("source", ["bitmask_gemv.cu", "bitmask_gemv_groups.cu", "bitmask_gemv_positions.cu",
                                    "delta_gemv.cu"])
def test_cuda_sources_compile(arch, source, tmp_path):
    """Each kernel core compiles on its own (no torch headers) for Ampere and Hopper, with no spills."""
    obj = tmp_path / "kernel.o"
    done = subprocess.run(["nvcc", "-std=c++17", "-O3", f"-arch={arch}", "-Xptxas=-warn-spills", "-Werror",
                           "all-warnings", f"-I{ROOT / 'csrc'}", "-c", str(ROOT / "csrc/cuda" / source),
                           "-o", str(obj)], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert obj.stat().st_size > 0


_AOT_SCRIPT = r"""
import triton
from triton_aot import resource_usage
from losa_deploy.kernels.triton import sparse_gemm as sg

pointers = dict(x_ptr="*bf16", y_ptr="*bf16", bias_ptr="*bf16", values_ptr="*bf16", mask_ptr="*i32",
                row_ptr="*i64", table_ptr="*i32")
scalars = dict.fromkeys(["tokens", "n_rows", "n_cols", "n_words", "n_chunks", "k_per_split"], "i32")
for tokens in (1, 8, 16):
    cfg = sg.default_config(tokens)
    for is_nm in (False, True):
        kernel = sg._decode_kernel if cfg.path == "decode" else sg._dot_kernel
        consts = dict(IS_NM=is_nm, BLOCK_K=cfg.block_k, BLOCK_R=cfg.block_r, HAS_BIAS=True, ATOMIC=False)
        if cfg.path == "decode":
            consts["T"] = triton.next_power_of_2(tokens)
        else:
            consts.update(BLOCK_T=cfg.block_t, PRECISION="tf32", UPCAST=False)
        usage = resource_usage(kernel, {**pointers, **scalars}, consts, cfg.num_warps, cfg.num_stages)
        print(kernel.fn.__name__, tokens, is_nm, usage)
        assert usage.get("STACK", -1) == 0, f"{kernel.fn.__name__} tokens={tokens} nm={is_nm} spills: {usage}"
cfg = sg.default_config(128)
assert cfg.path == "panels"
for is_nm in (False, True):
    signature = dict(values_ptr="*bf16", mask_ptr="*i32", row_ptr="*i64", table_ptr="*i32", out_ptr="*bf16",
                     **dict.fromkeys(["row0", "panel_rows", "n_rows", "n_cols", "n_words", "n_chunks"], "i32"))
    usage = resource_usage(sg._decompress_kernel, signature, dict(IS_NM=is_nm, BLOCK_R=cfg.block_r), cfg.num_warps)
    print("decompress", is_nm, usage)
    assert usage.get("STACK", -1) == 0, f"decompress nm={is_nm} spills: {usage}"
"""


@pytest.mark.skipif(not triton_kernels.available(), reason="triton not installed")
def test_triton_kernels_compile_for_hopper_without_spills():
    """The default configurations up to 16 tokens and the panels path's decoder compile to sm_90 machine code
    with Triton's own compiler (no GPU needed), with no register spills (local-memory stack of 0): the
    interpreter sees neither."""
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests"), env.get("PYTHONPATH", "")])
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    done = subprocess.run([sys.executable, "-c", _AOT_SCRIPT], env=env, capture_output=True, text=True,
                          check=False, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
