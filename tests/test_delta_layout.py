"""The delta layout (``kernels/formats/delta.py``) and its CUDA decode kernel.

The kernel's device code (``csrc/cuda/delta_gemv_kernel.cuh``) runs here on the CPU through the emulator
in ``tests/cuda_host/`` (one thread per CUDA thread, real warp shuffles and block barriers), against
float64; on a GPU the op ``losa::delta_linear`` is checked the same way. The torch-facing C++ of the CUDA
build is syntax-checked against this machine's torch headers, so a GPU build does not break unseen (nvcc
builds the kernel itself in tests/test_gpu_kernels.py, with the other CUDA kernels)."""

from __future__ import annotations

import ctypes
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch
from sparse_weights import check_linear, random_nm, random_sparse

from losa_deploy.errors import LosaError
from losa_deploy.kernels.dispatch import has_delta_op, sparse_linear
from losa_deploy.kernels.formats.bitmask import BitmaskWeight
from losa_deploy.kernels.formats.delta import GROUP, MAX_DELTA, DeltaWeight
from losa_deploy.kernels.formats.gpu import DeltaGPULayout, gpu_layout
from losa_deploy.kernels.formats.nm import NMWeight

ROOT = Path(__file__).resolve().parent.parent

def _cuda_include() -> Path:
    from torch.utils.cpp_extension import CUDA_HOME  # $CUDA_HOME, nvcc's folder, or /usr/local/cuda

    return Path(CUDA_HOME or "/usr/local/cuda") / "include"


CUDA_INCLUDE = _cuda_include()


def delta_of(w: torch.Tensor) -> DeltaWeight:
    b = BitmaskWeight.from_dense(w)
    return DeltaWeight.build(b.values, b.mask, w.shape[1])


def nibbles(d: DeltaWeight) -> torch.Tensor:
    """int64 [groups * 8]: each entry's delta."""
    shifts = 4 * torch.arange(GROUP, dtype=torch.int64)
    return (((d.deltas.to(torch.int64) & 0xFFFFFFFF)[:, None] >> shifts) & MAX_DELTA).reshape(-1)


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.7, 0.9, 0.99, 1.0])
def test_layout_is_exact_and_well_formed(sparsity, rng):
    """Round trip to the dense weight, bit for bit, on ragged shapes with empty rows, a kept column 0 and
    gaps wider than 15; each row a whole number of groups; padding entries hold zeros."""
    rows = int(torch.randint(3, 40, (1,), generator=rng))
    cols = int(torch.randint(1, 700, (1,), generator=rng))
    w = random_sparse(rows, cols, sparsity, rng, torch.bfloat16)
    w[::5] = 0  # empty rows
    if rows > 2 and sparsity < 1:
        w[1, 0] = 1.5  # column 0: a first delta of 0
        w[2] = 0
        w[2, cols - 1] = -2.0  # one value after a gap of cols - 1
    d = delta_of(w)
    assert torch.equal(d.to_dense(), w)
    groups = d.row_ptr.diff()
    assert int(groups.sum()) == d.deltas.numel() and d.values.numel() == GROUP * d.deltas.numel()
    kept = (w != 0).sum(1)
    assert bool(((groups == 0) == (kept == 0)).all())  # empty rows, and only they, have no groups
    cols_of = d.columns()
    assert bool(((cols_of >= 0) & (cols_of < max(cols, 1))).all())
    # entries beyond the kept values are zero-valued padding
    assert int((d.values != 0).sum()) == int(kept.sum())
    # the padding is the least the nibbles allow: one entry per 15 columns of a gap, whole groups per row
    for r in range(rows):
        columns = (w[r] != 0).nonzero().flatten().tolist()
        entries = sum(max(-(-(c - p) // MAX_DELTA), 1) for p, c in zip([0, *columns], columns))
        assert int(groups[r]) == -(-entries // GROUP), f"row {r}"
    assert int(nibbles(d).sum()) == int(cols_of[d.row_ptr[1:][groups > 0] * GROUP - 1].sum())


def test_layout_built_in_row_chunks_is_the_same(rng):
    """Building a few kept weights at a time (whole rows per chunk, a row larger than the chunk alone, empty
    rows at chunk edges) gives the same arrays as one pass."""
    w = random_sparse(23, 300, 0.6, rng, torch.bfloat16)
    w[::5] = 0
    w[-1] = 0
    b = BitmaskWeight.from_dense(w)
    whole = DeltaWeight.build(b.values, b.mask, 300)
    for chunk in (1, 50, 170, 10**9):
        part = DeltaWeight.build(b.values, b.mask, 300, chunk=chunk)
        for name in ("values", "deltas", "row_ptr"):
            assert torch.equal(getattr(part, name), getattr(whole, name)), (chunk, name)
    empty = DeltaWeight.build(b.values[:0], b.mask[:0], 300, chunk=4)
    assert empty.shape == (0, 300) and empty.row_ptr.tolist() == [0]


def test_layout_size_and_padding_at_llm_sparsity(rng):
    """At 70% sparsity: about 1.005 entries per kept value (gaps over 15 are rare) and 0.76 B/weight,
    within 5% of the bitmask's 0.725."""
    w = random_sparse(256, 4096, 0.7, rng, torch.bfloat16)
    b = BitmaskWeight.from_dense(w)
    d = DeltaWeight.build(b.values, b.mask, 4096)
    assert 1.0 < d.values.numel() / b.values.numel() < 1.03
    assert d.nbytes / w.numel() < 1.06 * b.nbytes / w.numel()


def test_layout_from_nm_and_gpu_layout(rng):
    """N:M weights (2:4 and mixed N:8) through their bitmask view; ``gpu_layout(delta=True)`` keeps the
    base layout for the other paths and routes them there (here: the CPU)."""
    w24 = random_nm(13, 84, 2, 4, rng, dtype=torch.bfloat16)
    w8 = random_nm(21, 70, torch.randint(1, 8, (21,), generator=rng), 8, rng, dtype=torch.bfloat16)
    for w, packed in [(w24, NMWeight.from_dense(w24, 2, 4).kernel_layout()),
                      (w8, NMWeight.from_dense(w8, m=8, rows_per_block=8).kernel_layout())]:
        layout = gpu_layout(packed, delta=True)
        assert isinstance(layout, DeltaGPULayout)
        assert torch.equal(layout.delta.to_dense(), w)
        x = torch.randn(3, w.shape[1], generator=rng).to(torch.bfloat16)
        check_linear(sparse_linear(x, layout), x, w, None)


def test_layout_bad_input(rng):
    w = random_sparse(4, 40, 0.5, rng)
    d = delta_of(w)
    with pytest.raises(LosaError, match="deltas must be int32"):
        DeltaWeight(d.shape, d.values, d.deltas.long(), d.row_ptr)
    with pytest.raises(LosaError, match=r"values must be \[\d+\] \(8 per group\)"):
        DeltaWeight(d.shape, d.values[:-1], d.deltas, d.row_ptr)
    with pytest.raises(LosaError, match="row_ptr must be int64"):
        DeltaWeight(d.shape, d.values, d.deltas, d.row_ptr[:-1])
    b = BitmaskWeight.from_dense(w)
    with pytest.raises(LosaError, match="the mask keeps"):
        DeltaWeight.build(b.values[:-1], b.mask, 40)


def test_delta_layout_only_for_16_bit_values_and_triton_reads_its_base(rng):
    """fp32 values get no delta copy (the kernel takes bf16 / fp16); the Triton kernels read a
    DeltaGPULayout's base."""
    from losa_deploy.kernels.formats.gpu import BitmaskGPULayout
    from losa_deploy.kernels.triton import available, interpreted
    from losa_deploy.kernels.triton.sparse_gemm import sparse_matmul

    w = random_sparse(12, 70, 0.6, rng)
    assert isinstance(gpu_layout(BitmaskWeight.from_dense(w), delta=True), BitmaskGPULayout)
    if not (available() and (interpreted() or torch.cuda.is_available())):
        pytest.skip("triton not installed")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    w16 = w.to(torch.bfloat16).to(device)
    layout = gpu_layout(BitmaskWeight.from_dense(w16), delta=True)
    assert isinstance(layout, DeltaGPULayout)
    x = torch.randn(3, 70, generator=rng).to(torch.bfloat16)
    # two ulps: the interpreter's fp32 -> bf16 conversion does not round to nearest
    check_linear(sparse_matmul(x.to(device), layout).cpu(), x, w16.cpu(), None, ulps=1 if device == "cuda" else 2)


def test_delta_kernel_fit_rule(monkeypatch):
    """dispatch.delta_kernel_fits mirrors the launcher: the tokens rounded up to a power of two, staged in
    fp32 up to 4 and in 16 bits from 8, in one block's shared memory (227 KiB on sm_90)."""
    from losa_deploy.kernels import dispatch

    monkeypatch.setattr(dispatch, "_smem_optin", lambda device: 227 * 1024)
    assert dispatch.delta_kernel_fits(11008) and dispatch.delta_kernel_fits(58112)  # 227 KiB = 58,112 floats
    assert not dispatch.delta_kernel_fits(58113)
    assert dispatch.delta_kernel_fits(11008, 4)  # 11008 x 4 x 4 = 176,128 B
    assert dispatch.delta_kernel_fits(11008, 5) and dispatch.delta_kernel_fits(11008, 8)  # x 8 x 2: the same
    assert not dispatch.delta_kernel_fits(11008, 9)  # 16 x 2 = 352,256 B
    assert dispatch.delta_kernel_fits(4096, 16) and not dispatch.delta_kernel_fits(4096, 17)  # 131,072 B; > 16
    assert dispatch.delta_kernel_fits(14336, 3) and not dispatch.delta_kernel_fits(14600, 3)  # 229,376; 233,600 B
    monkeypatch.setattr(dispatch, "_smem_optin", lambda device: 0)  # below compute capability 8.0
    assert not dispatch.delta_kernel_fits(64)


def test_gpu_layout_env_choice(monkeypatch):
    from losa_deploy.kernels.formats.gpu import gpu_layout_kind

    monkeypatch.setenv("LOSA_GPU_LAYOUT", "delta")
    assert gpu_layout_kind() == "delta"
    monkeypatch.setenv("LOSA_GPU_LAYOUT", "csr")
    with pytest.raises(LosaError, match="unknown LOSA_GPU_LAYOUT 'csr'"):
        gpu_layout_kind()


# -- the kernel's device code, emulated on the CPU ----------------------------------------------------------


@pytest.fixture(scope="module")
def emulated(tmp_path_factory):
    """tests/cuda_host/delta_gemv_host.cpp built with the host compiler (CUDA's headers for the 16-bit
    types), loaded with ctypes."""
    cxx = shutil.which("g++")
    if cxx is None or not (CUDA_INCLUDE / "cuda_bf16.h").is_file():
        pytest.skip("needs g++ and the CUDA toolkit's headers")
    lib = tmp_path_factory.mktemp("cuda_host") / "delta_gemv_host.so"
    done = subprocess.run([cxx, "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", f"-I{CUDA_INCLUDE}",
                           f"-I{ROOT / 'csrc'}", f"-I{ROOT / 'tests/cuda_host'}",
                           str(ROOT / "tests/cuda_host/delta_gemv_host.cpp"), "-o", str(lib)],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    fn = ctypes.CDLL(str(lib)).delta_gemv_host
    p, i64, c_int, c_uint = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_uint
    fn.argtypes = [p, p, p, p, p, p, i64, i64, i64, c_int, c_int, c_uint, c_uint, c_int, c_int]
    fn.restype = c_int
    return fn


def run_emulated(fn, x, d: DeltaWeight, bias, blocks: int, warps: int, depth: int, ahead: bool) -> torch.Tensor:
    rows, cols = d.shape
    y = torch.full((x.shape[0], rows), float("nan"), dtype=x.dtype)
    rc = fn(x.data_ptr(), d.values.data_ptr(), d.deltas.data_ptr(), d.row_ptr.data_ptr(),
            None if bias is None else bias.data_ptr(), y.data_ptr(), rows, cols, d.deltas.numel(), x.shape[0],
            int(x.dtype == torch.bfloat16), blocks, warps, depth, int(ahead))
    assert rc == 0
    return y


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tokens", [1, 2, 3, 4, 6, 8, 11, 16])
@pytest.mark.parametrize("depth", [1, 2, 4])
@pytest.mark.parametrize("ahead", [True, False])
def test_emulated_kernel_matches_float64(emulated, dtype, tokens, depth, ahead, rng):
    """Every instantiation (token strides 1/2/4 staged in fp32 and 8/16 in 16 bits; 3, 6 and 11 tokens
    padded; depths 1/2/4; loads a step ahead or not): rows of several steps and a partial last step, empty
    rows (also the first and last rows, which the prefetch must skip), more rows than warps (the grid
    stride), one or two blocks, and a row whose only value sits at the last column."""
    rows = int(torch.randint(5, 24, (1,), generator=rng))
    cols = int(torch.randint(300, 1400, (1,), generator=rng))
    sparsity = float(torch.empty(1).uniform_(0.3, 0.9, generator=rng))
    w = random_sparse(rows, cols, sparsity, rng, dtype)
    w[::4] = 0
    w[-1] = 0
    w[1] = 0
    w[1, cols - 1] = 0.75
    x = torch.randn(tokens, cols, generator=rng).to(dtype)
    bias = torch.randn(rows, generator=rng).to(dtype) if tokens != 2 else None
    warps = int(torch.randint(1, 4, (1,), generator=rng))
    blocks = int(torch.randint(1, 3, (1,), generator=rng))
    check_linear(run_emulated(emulated, x, delta_of(w), bias, blocks, warps, depth, ahead), x, w, bias)


@pytest.mark.parametrize("cols,offset", [(1024, 0), (1000, 0), (1000, 1), (1001, 0)])
@pytest.mark.parametrize("tokens", [1, 11])
def test_emulated_kernel_x_staging(emulated, cols, offset, tokens, rng):
    """x staged 8 columns per 16-byte load (whole 8-column runs, 16-byte aligned x; fp32 at one token, bf16
    planes at 11 tokens padded to 16) or one by one (a ragged width, or x starting 2 bytes into its
    storage)."""
    w = random_sparse(9, cols, 0.6, rng, torch.bfloat16)
    storage = torch.randn(tokens * cols + offset, generator=rng).to(torch.bfloat16)
    x = storage[offset:].view(tokens, cols)
    assert (x.data_ptr() % 16 == 0) == (offset == 0)
    check_linear(run_emulated(emulated, x, delta_of(w), None, 2, 2, 1, True), x, w, None)


def test_emulated_kernel_dense_and_very_sparse(emulated, rng):
    """A dense weight (a group per 8 columns, all deltas 1) and a 99%-sparse one (mostly padding)."""
    for sparsity in (0.0, 0.99):
        w = random_sparse(6, 517, sparsity, rng, torch.bfloat16)
        w[0, 0] = 1.0
        x = torch.randn(1, 517, generator=rng).to(torch.bfloat16)
        check_linear(run_emulated(emulated, x, delta_of(w), None, 1, 8, 2, True), x, w, None)  # auto's 8 warps


# -- the CUDA build: sources compile, and the op on a GPU --------------------------------------------------


@pytest.mark.skipif(shutil.which("g++") is None or not (CUDA_INCLUDE / "cuda_runtime.h").is_file(),
                    reason="needs g++ and the CUDA toolkit's headers")
@pytest.mark.parametrize("source", ["bitmask_linear_cuda.cpp", "delta_linear_cuda.cpp"])
def test_cuda_op_sources_parse(source, tmp_path):
    """The torch-facing C++ of the CUDA build (compiled only on a GPU machine) against this torch's headers:
    a typo there would otherwise first show as a failed build on a lent GPU. (c10's CUDA build macros
    header is generated by torch's CUDA build; an empty one stands in.)"""
    stub = tmp_path / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True)
    (stub / "cuda_cmake_macros.h").write_text("#pragma once\n")
    torch_include = Path(torch.__file__).parent / "include"
    done = subprocess.run(["g++", "-std=c++20", "-fsyntax-only", "-Wall", f"-I{tmp_path}", f"-I{torch_include}",
                           f"-I{torch_include / 'torch/csrc/api/include'}", f"-I{CUDA_INCLUDE}",
                           f"-I{sysconfig.get_paths()['include']}", f"-I{ROOT / 'csrc'}",
                           str(ROOT / "csrc/cuda" / source)], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.skipif(not has_delta_op(), reason="extension built without CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("config", ["auto", "1:1", "3:4", "16:2", "8:1:0", "5:4:0", "8:2:1"])
def test_cuda_delta_op_matches_float64(dtype, config, rng):
    """The op on a GPU: 1-17 tokens (16 per launch where x fits, else fewer), ragged shapes, empty rows,
    more rows than resident warps, every launch shape."""
    for rows, cols, sparsity in [(37, 2101, 0.7), (64, 4096, 0.5), (9001, 72, 0.6), (11, 300, 0.95)]:
        w = random_sparse(rows, cols, sparsity, rng, dtype)
        w[::4] = 0
        d = delta_of(w.cuda())
        for tokens in (1, 2, 3, 4, 7, 16, 17):
            x = torch.randn(tokens, cols, generator=rng).to(dtype)
            bias = torch.randn(rows, generator=rng).to(dtype)
            y = torch.ops.losa.delta_linear(x.cuda(), d.values, d.deltas, d.row_ptr, cols, bias.cuda(), config)
            check_linear(y.cpu(), x, w, bias)


@pytest.mark.skipif(not has_delta_op(), reason="extension built without CUDA")
def test_cuda_delta_op_awkward_inputs(rng):
    """Values at a misaligned view (the op copies them to an aligned base), non-contiguous x, an fp32 bias,
    5-9 tokens and 33 (launches of 16 and a ragged last one); a bias on the CPU is an error, not a bad read."""
    w = random_sparse(70, 1000, 0.7, rng, torch.bfloat16)
    d = delta_of(w.cuda())
    shifted = torch.empty(d.values.numel() + 1, dtype=d.values.dtype, device="cuda")
    shifted[1:] = d.values
    values = shifted[1:]
    assert values.data_ptr() % 16 != 0
    for tokens in (5, 8, 9, 33):
        x = torch.randn(1000, tokens, generator=rng).to(torch.bfloat16)
        bias = torch.randn(70, generator=rng)
        y = torch.ops.losa.delta_linear(x.cuda().T, values, d.deltas, d.row_ptr, 1000, bias.cuda(), "auto")
        check_linear(y.cpu(), x.T, w, bias.to(torch.bfloat16))
    with pytest.raises(RuntimeError, match="one device"):
        torch.ops.losa.delta_linear(x.cuda().T, d.values, d.deltas, d.row_ptr, 1000, bias, "auto")


@pytest.mark.skipif(not has_delta_op(), reason="extension built without CUDA")
def test_sparse_linear_runs_the_delta_layout(rng, monkeypatch):
    """``$LOSA_GPU_LAYOUT=delta``: SparseLinear on CUDA holds the delta layout, runs it at 1-16 tokens and
    the bitmask kernels beyond; a bad config is a clear error."""
    from losa_deploy.runtime.sparse_linear import SparseLinear

    monkeypatch.setenv("LOSA_GPU_LAYOUT", "delta")
    w = random_sparse(48, 300, 0.7, rng, torch.bfloat16)
    layer = SparseLinear(BitmaskWeight.from_dense(w)).cuda()
    assert isinstance(layer.gpu_layout, DeltaGPULayout)
    for tokens in (1, 4, 9, 20):
        x = torch.randn(tokens, 300, generator=rng).to(torch.bfloat16)
        check_linear(layer(x.cuda()).cpu(), x, w, None)
    from losa_deploy.kernels import dispatch

    monkeypatch.setattr(dispatch, "_smem_optin", lambda device: 1024)  # x does not fit: the bitmask kernels
    check_linear(layer(x[:1].cuda()).cpu(), x[:1], w, None)
    check_linear(layer(x[:3].cuda()).cpu(), x[:3], w, None)
    delta = layer.gpu_layout.delta
    for bad in ("8:3", "8", "0:2", "17:2", "8:2:2", "8:2:1:0", "8:x", "8:2:", ":2", "-1:2"):
        with pytest.raises(RuntimeError, match="unknown kernel config"):
            torch.ops.losa.delta_linear(x[:1].cuda(), delta.values, delta.deltas, delta.row_ptr, 300, None, bad)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-v"]))
