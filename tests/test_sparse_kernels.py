"""The sparse-linear kernels against a float64 reference: every CPU kernel (forced one by one), the
row and panel paths, bitmask and N:M, every value / activation dtype, ragged shapes, 1..67 tokens,
sparsities 0..99%; plus torch.library registration (fake kernels, autograd, torch.compile) and bad input."""

import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sparse_weights import random_nm, random_sparse

from losa_deploy.errors import LosaError
from losa_deploy.kernels import has_extension, ops, sparse_linear
from losa_deploy.kernels.dispatch import CPU_BACKENDS
from losa_deploy.kernels.formats.bitmask import BitmaskWeight
from losa_deploy.kernels.formats.nm import NMWeight

DTYPES = (torch.bfloat16, torch.float16, torch.float32)
EPS = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float32: 2.0**-24}
# Row path for fewer tokens, panel path (decompress + dense GEMM) from this many.
PATHS = {"rows": 10**6, "panel": 1}


def _supported(backend: str) -> bool:
    if backend == "torch":
        return True
    if not has_extension():
        return False
    try:
        ops().bitmask_linear(torch.zeros(1, 1), torch.zeros(0), torch.zeros(1, 1, dtype=torch.int32),
                             torch.zeros(2, dtype=torch.int64), 1, None, backend, 0)
    except RuntimeError:
        return False
    return True


BACKENDS = [pytest.param(b, marks=pytest.mark.skipif(not _supported(b), reason=f"no {b} kernel on this CPU"))
            for b in (*CPU_BACKENDS, "torch")]


def check_close(y: torch.Tensor, x: torch.Tensor, dense: torch.Tensor, bias: torch.Tensor | None):
    """y against x·Wᵀ + b in float64 on the stored values. The bound: rounding the output to y's dtype
    (the bf16 panel path also rounds the bias to bf16 for its GEMM) plus fp32 accumulation."""
    ref = x.double() @ dense.double().t()
    tol = 2 * EPS[y.dtype] * ref.abs()
    if bias is not None:
        ref = ref + bias.double()
        tol = 2 * EPS[y.dtype] * ref.abs() + EPS[y.dtype] * bias.double().abs()
    tol = tol + 1e-5 * (x.double().abs() @ dense.double().abs().t()) + 1e-6
    err = (y.double() - ref).abs()
    assert y.dtype == x.dtype and y.shape == ref.shape
    worst = int((err / tol).argmax())
    assert bool((err <= tol).all()), (f"x {x.dtype}, values {dense.dtype}, shape {tuple(dense.shape)}, "
                                      f"tokens {x.shape[0]}: error {float(err.view(-1)[worst]):.3g} > "
                                      f"tolerance {float(tol.view(-1)[worst]):.3g} (ref {float(ref.view(-1)[worst]):.3g})")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("path", PATHS)
def test_bitmask_linear_every_dtype(rng, backend, path):
    for sparsity in (0.0, 0.45, 0.8, 0.99):
        rows = int(torch.randint(1, 80, (), generator=rng))
        cols = int(torch.randint(1, 300, (), generator=rng)) | 1  # odd, so never a multiple of 32
        for vdtype in DTYPES:
            w = random_sparse(rows, cols, sparsity, rng, vdtype)
            packed = BitmaskWeight.from_dense(w)
            for xdtype in DTYPES:
                tokens = int(torch.randint(1, 68, (), generator=rng))
                x = torch.randn(tokens, cols, generator=rng).to(xdtype)
                bias = torch.randn(rows, generator=rng) if tokens % 2 else None
                y = sparse_linear(x, packed, bias, backend=backend, panel_tokens=PATHS[path])
                check_close(y, x, w, bias)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (2, 8), (5, 8), (4, 16), (3, 7), (2, 3)])
def test_nm_linear(rng, backend, n, m):
    rows, cols = 67, 172 + (m == 4) * 3  # ragged: a tail group for every M here
    for vdtype in DTYPES:
        w = random_nm(rows, cols, n, m, rng, dtype=vdtype)
        layout = NMWeight.from_dense(w, n, m, rows_per_block=16).kernel_layout()
        for xdtype in DTYPES:
            for tokens, panel in ((1, 0), (6, 0), (67, 10**6), (40, 1)):
                x = torch.randn(3, tokens, cols, generator=rng).to(xdtype)  # batch dims are kept
                bias = torch.randn(rows, generator=rng).to(xdtype)
                y = sparse_linear(x, layout, bias, backend=backend, panel_tokens=panel)
                assert y.shape == (3, tokens, rows)
                check_close(y.reshape(-1, rows), x.reshape(-1, cols), w, bias)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_nm_linear(rng, backend):
    row_n = torch.randint(1, 8, (100,), generator=rng)
    w = random_nm(100, 90, row_n, 8, rng)
    packed = NMWeight.from_dense(w, m=8, rows_per_block=1)  # N per row
    x = torch.randn(9, 90, generator=rng)
    check_close(sparse_linear(x, packed, backend=backend), x, w, None)


@pytest.mark.skipif(not _supported("amx"), reason="no AMX tiles on this CPU / OS")
@pytest.mark.parametrize("fmt", ["bitmask", "2:4", "mixed"])
def test_amx_tiles_every_token_count_they_take(rng, fmt):
    # bf16 x bf16 calls from 4 tokens on run on the tiles (amx_linear.cpp): ragged rows (not whole 16-row
    # tiles), columns (not whole 32-column chunks) and token groups (1-5 C tiles per pass, passes that
    # reuse the expanded tiles), with a bias (added before the kernel rounds its output to bf16).
    rows, cols = 16 * int(torch.randint(1, 5, (), generator=rng)) + 7, 32 * int(torch.randint(1, 6, (), generator=rng)) + 9
    if fmt == "bitmask":
        w = random_sparse(rows, cols, float(torch.rand((), generator=rng)), rng, torch.bfloat16)
        packed = BitmaskWeight.from_dense(w)
    else:
        w = random_nm(rows, cols, 2 if fmt == "2:4" else torch.randint(1, 8, (rows,), generator=rng), 4 if fmt == "2:4" else 8,
                      rng, dtype=torch.bfloat16)
        packed = NMWeight.from_dense(w, 2 if fmt == "2:4" else None, 4 if fmt == "2:4" else 8,
                                     rows_per_block=16 if fmt == "2:4" else 1).kernel_layout()
    for tokens in (4, 5, 15, 16, 17, 33, 64, 79, 80, 81, 96, 130, 161, 256, 257, 423):  # over 80: passes of <= 80
        x = torch.randn(tokens, cols, generator=rng).bfloat16()
        bias = torch.randn(rows, generator=rng) if tokens % 2 else None
        check_close(sparse_linear(x, packed, bias, backend="amx"), x, w, bias)


@pytest.mark.skipif(not _supported("amx"), reason="no AMX tiles on this CPU / OS")
def test_amx_tiles_round_their_output_like_torch(rng):
    # The tiles round their fp32 output to bf16 themselves, as torch's conversion (which the other paths
    # end with) does: nearest even, denormals kept, the same NaN. With x = 0, y is the bias, so y must
    # equal bias.to(bf16) bit for bit, as the avx512_bf16 path's does.
    rows = 37
    w = random_sparse(rows, 70, 0.5, rng, torch.bfloat16)
    bias = torch.randn(rows, generator=rng) * torch.logspace(-40, 38, rows).float()
    bias[:4] = torch.tensor([1e-39, -3e-40, float("nan"), float("inf")])
    bias[4:8] = torch.tensor([1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8), 3.3895e38])  # ties round to even
    y = sparse_linear(torch.zeros(9, 70, dtype=torch.bfloat16), BitmaskWeight.from_dense(w), bias, backend="amx")
    assert torch.equal(y[0].view(torch.int16), bias.bfloat16().view(torch.int16))
    rows_path = sparse_linear(torch.zeros(9, 70, dtype=torch.bfloat16), BitmaskWeight.from_dense(w), bias,
                              backend="avx512_bf16")
    assert torch.equal(y.view(torch.int16), rows_path.view(torch.int16))
    assert torch.equal(y.view(torch.int16), y[:1].view(torch.int16).expand_as(y))  # every token alike


@pytest.mark.skipif(not _supported("amx"), reason="no AMX tiles on this CPU / OS")
@pytest.mark.parametrize("tokens", [96, 250, 601])
def test_amx_tiles_with_x_past_one_sweep(rng, tokens):
    # Wide rows: each pass's packed x (3-4 groups x 211 chunks x 1 KiB) fills a sweep of its own, so the
    # blocks go by once per pass, each expanding its tiles again.
    rows, cols = 16 * 5 + 3, 32 * 210 + 5
    w = random_sparse(rows, cols, 0.7, rng, torch.bfloat16)
    x = torch.randn(tokens, cols, generator=rng).bfloat16()
    bias = torch.randn(rows, generator=rng) if tokens % 2 else None
    check_close(sparse_linear(x, BitmaskWeight.from_dense(w), bias, backend="amx"), x, w, bias)


@settings(max_examples=50, deadline=None)
@given(rows=st.integers(1, 70), cols=st.integers(1, 200), tokens=st.integers(1, 67),
       sparsity=st.floats(0.0, 1.0), nm=st.booleans(), backend=st.sampled_from([*CPU_BACKENDS, "torch"]),
       vdtype=st.sampled_from(DTYPES), xdtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**31))
def test_shape_fuzz(rows, cols, tokens, sparsity, nm, backend, vdtype, xdtype, seed):
    if not _supported(backend):
        return
    gen = torch.Generator().manual_seed(seed)
    if nm:
        w = random_nm(rows, cols, 2, 4, gen, underfill=sparsity, dtype=vdtype)
        packed = NMWeight.from_dense(w, 2, 4)
    else:
        w = random_sparse(rows, cols, sparsity, gen, vdtype)
        packed = BitmaskWeight.from_dense(w)
    x = torch.randn(tokens, cols, generator=gen).to(xdtype)
    check_close(sparse_linear(x, packed, backend=backend), x, w, None)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sparse_rows_with_dense_chunks(rng, backend):
    """Rows sparse enough for the 256-bit value loads of the AVX-512 bf16 kernel (at most 35% dense), with
    some 32-column chunks holding more than 16 values: those chunks must take the 512-bit load."""
    rows, cols = 37, 32 * 14 + 9
    w = random_sparse(rows, cols, 0.93, rng, torch.bfloat16)
    for r in range(rows):
        dense_chunks = torch.randperm(13, generator=rng)[:2].tolist()  # never the ragged last chunk
        for c in dense_chunks:
            keep = 17 + int(torch.randint(0, 16, (), generator=rng))  # 17..32 values in this chunk
            cols_kept = 32 * c + torch.randperm(32, generator=rng)[:keep]
            w[r, cols_kept] = torch.randn(keep, generator=rng).to(torch.bfloat16) + 3.0
    assert float((w != 0).float().mean(1).max()) <= 0.35
    packed = BitmaskWeight.from_dense(w)
    for tokens in (1, 2, 3, 9):
        x = torch.randn(tokens, cols, generator=rng).to(torch.bfloat16)
        check_close(sparse_linear(x, packed, backend=backend), x, w, None)


def test_values_at_the_very_end_of_the_buffer(rng):
    """The kernels' wide loads must not run past the value buffer (the last rows are copied first)."""
    w = torch.zeros(5, 40)
    w[-1, -1] = 3.0  # the only value, the last element of its buffer
    packed = BitmaskWeight.from_dense(w)
    x = torch.randn(2, 40, generator=rng)
    for backend in (b for b in CPU_BACKENDS if _supported(b)):
        check_close(sparse_linear(x, packed, backend=backend), x, w, None)


def test_empty_inputs(rng):
    packed = BitmaskWeight.from_dense(random_sparse(7, 33, 0.5, rng))
    assert sparse_linear(torch.zeros(0, 33), packed).shape == (0, 7)
    empty = BitmaskWeight.from_dense(torch.zeros(0, 33))
    assert sparse_linear(torch.ones(2, 33), empty).shape == (2, 0)
    no_inputs = BitmaskWeight.from_dense(torch.zeros(5, 0))  # as nn.Linear(0, 5): the output is the bias
    bias = torch.randn(5, generator=rng)
    assert torch.equal(sparse_linear(torch.ones(3, 0), no_inputs, bias), bias.expand(3, 5))


def test_backend_from_environment(rng, monkeypatch):
    packed = BitmaskWeight.from_dense(random_sparse(10, 50, 0.5, rng))
    monkeypatch.setenv("LOSA_SPARSE_BACKEND", "no-such-kernel")
    with pytest.raises(LosaError, match="unknown sparse backend 'no-such-kernel'"):
        sparse_linear(torch.randn(1, 50), packed)


def test_bad_input_is_a_clear_error(rng):
    w = random_sparse(10, 50, 0.5, rng)
    packed = BitmaskWeight.from_dense(w)
    with pytest.raises(LosaError, match="takes 50 input features"):
        sparse_linear(torch.randn(2, 49), packed)
    with pytest.raises(LosaError, match="bias must be"):
        sparse_linear(torch.randn(2, 50), packed, torch.zeros(9))
    with pytest.raises(LosaError, match="is on meta"):
        sparse_linear(torch.randn(2, 50, device="meta"), packed)
    with pytest.raises(LosaError, match="floating point"):
        sparse_linear(torch.ones(2, 50, dtype=torch.int64), packed)
    with pytest.raises(LosaError, match="needs a BitmaskWeight or NMWeight"):
        sparse_linear(torch.randn(2, 50), w)


@pytest.mark.skipif(not has_extension(), reason="compiled extension not built")
def test_ops_reject_bad_arrays(rng):
    packed = BitmaskWeight.from_dense(random_sparse(10, 50, 0.5, rng))
    x = torch.randn(2, 50)
    v, mask, ptr = packed.values, packed.mask, packed.row_ptr
    with pytest.raises(RuntimeError, match="values must be bfloat16, float16 or float32"):
        ops().bitmask_linear(x, v.double(), mask, ptr, 50, None, "auto", 0)
    with pytest.raises(RuntimeError, match="x must be bfloat16, float16 or float32"):
        ops().bitmask_linear(x.double(), v, mask, ptr, 50, None, "auto", 0)
    with pytest.raises(RuntimeError, match="100 input features need 4"):
        ops().bitmask_linear(x, v, mask, ptr, 100, None, "auto", 0)
    with pytest.raises(RuntimeError, match="row_ptr must run from 0"):
        ops().bitmask_linear(x, v[:-1], mask, ptr, 50, None, "auto", 0)
    with pytest.raises(RuntimeError, match="unknown CPU kernel"):
        ops().bitmask_linear(x, v, mask, ptr, 50, None, "sse9", 0)
    past = mask.clone()
    past[3, -1] |= 1 << 20  # column 64 + 20 = 84 of a 50-wide row: every kernel would read x out of bounds
    with pytest.raises(RuntimeError, match="row 3 keeps a column past the 50 input features"):
        ops().bitmask_linear(x, v, past, ptr, 50, None, "auto", 0)
    with pytest.raises(RuntimeError, match="row 3 keeps a column past"):
        ops().bitmask_to_dense(v, past, ptr, 50)
    layout = NMWeight.from_dense(random_nm(10, 50, 2, 4, rng), 2, 4).kernel_layout()
    with pytest.raises(RuntimeError, match="N = 4, which must be in 0..3"):
        ops().nm_linear(x, layout.values, layout.mask, layout.block_n + 2, 50, 4, 64, None, "auto", 0)
    with pytest.raises(RuntimeError, match="values given"):
        ops().nm_linear(x, layout.values[1:], layout.mask, layout.block_n, 50, 4, 64, None, "auto", 0)
    past = layout.mask.clone()
    past[3, -1] |= 1 << 20
    with pytest.raises(RuntimeError, match="row 3 keeps a column past the 50 input features"):
        ops().nm_linear(x, layout.values, past, layout.block_n, 50, 4, 64, None, "auto", 0)


@pytest.mark.skipif(not has_extension(), reason="compiled extension not built")
def test_ops_are_registered_for_compile_and_autograd(rng):
    w = random_sparse(12, 45, 0.6, rng)
    packed = BitmaskWeight.from_dense(w)
    layout = NMWeight.from_dense(random_nm(12, 45, 2, 4, rng), 2, 4).kernel_layout()
    x = torch.randn(3, 45, generator=rng)
    bias = torch.randn(12, generator=rng)
    torch.library.opcheck(torch.ops.losa.bitmask_linear.default,
                          (x, packed.values, packed.mask, packed.row_ptr, 45, bias, "auto", 0))
    torch.library.opcheck(torch.ops.losa.nm_linear.default,
                          (x, layout.values, layout.mask, layout.block_n, 45, 4, 64, bias, "auto", 0))
    # Gradients reach x (with batch dims) and the bias; the packed weight is frozen.
    w_nm = layout.to_dense()
    for weight, dense in ((packed, w), (layout, w_nm)):
        xg, bg = x.expand(2, 3, 45).clone().requires_grad_(), bias.clone().requires_grad_()
        sparse_linear(xg, weight, bg).square().sum().backward()
        xr, br = xg.detach().clone().requires_grad_(), bias.clone().requires_grad_()
        torch.nn.functional.linear(xr, dense, br).square().sum().backward()
        torch.testing.assert_close(xg.grad, xr.grad)
        torch.testing.assert_close(bg.grad, br.grad)
    with pytest.raises(RuntimeError, match="frozen"):
        ops().bitmask_linear(x, packed.values.clone().requires_grad_(), packed.mask, packed.row_ptr, 45, None,
                             "auto", 0)
    # One opaque op in a torch.compile graph, no graph break.
    compiled = torch.compile(lambda t: sparse_linear(t, packed, bias) * 2, fullgraph=True, backend="eager")
    check_close(compiled(x) / 2, x, w, bias)


@pytest.mark.skipif(not has_extension(), reason="compiled extension not built")
def test_compiled_training_step_traces_the_backward(rng):
    """AOTAutograd traces the C++ backward with fake tensors: it may only call dispatcher ops (the formats'
    ``*_to_dense`` ops, faked in Python), never read packed data directly."""
    w = random_sparse(13, 37, 0.7, rng)
    bitmask = BitmaskWeight.from_dense(w)
    nm = NMWeight.from_dense(random_nm(13, 37, 2, 4, rng), 2, 4).kernel_layout()
    torch.library.opcheck(torch.ops.losa.bitmask_to_dense.default, (bitmask.values, bitmask.mask, bitmask.row_ptr, 37))
    torch.library.opcheck(torch.ops.losa.nm_to_dense.default, (nm.values, nm.mask, nm.block_n, 37, 4, 64))
    for weight in (bitmask, nm):
        dense = weight.to_dense()
        bias = torch.randn(13, generator=rng)
        x = torch.randn(2, 5, 37, generator=rng)
        step = torch.compile(lambda t, b, weight=weight: sparse_linear(t, weight, b).square().sum(),
                             fullgraph=True, backend="aot_eager")
        xg, bg = x.clone().requires_grad_(), bias.clone().requires_grad_()
        step(xg, bg).backward()
        xr, br = x.double().requires_grad_(), bias.double().requires_grad_()
        torch.nn.functional.linear(xr, dense.double(), br).square().sum().backward()
        torch.testing.assert_close(xg.grad, xr.grad.float(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(bg.grad, br.grad.float(), rtol=1e-5, atol=1e-5)


def test_pure_pytorch_path_without_extension(tmp_path):
    code = (
        "import torch\n"
        "from losa_deploy.kernels import has_extension, sparse_linear\n"
        "from losa_deploy.kernels.formats.bitmask import BitmaskWeight\n"
        "from losa_deploy.kernels.formats.nm import NMWeight\n"
        "assert not has_extension()\n"
        "w = torch.randn(9, 70); w[torch.rand(9, 70) < 0.6] = 0\n"
        "x = torch.randn(4, 70)\n"
        "assert torch.allclose(sparse_linear(x, BitmaskWeight.from_dense(w)), x @ w.t(), atol=1e-5)\n"
        "w24 = torch.randn(9, 72); w24.view(9, 18, 4)[..., :2] = 0\n"
        "assert torch.allclose(sparse_linear(x[:, :1].expand(4, 72), NMWeight.from_dense(w24, 2, 4)),\n"
        "                      x[:, :1].expand(4, 72) @ w24.t(), atol=1e-5)\n"
        "try:\n"
        "    sparse_linear(x, BitmaskWeight.from_dense(w), backend='avx2')\n"
        "except Exception as exc:\n"
        "    assert 'needs the compiled extension' in str(exc)\n"
        "else:\n"
        "    raise AssertionError('a CPU backend without the extension must fail')\n"
    )
    env = {"LOSA_DISABLE_EXT": "1", "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
