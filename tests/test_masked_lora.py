"""The masked-LoRA linear: every backend (compiled CPU kernels, Triton tiles and Triton-built panels under
Triton's interpreter, PyTorch panels) against the materialising reference, gradcheck in float64, dropout, dtypes, the memory property
(nothing d×k saved for backward) and bad input."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from losa_deploy.errors import LosaError
from losa_deploy.kernels import has_extension, ops
from losa_deploy.kernels import masked_lora as masked_lora_module
from losa_deploy.kernels import triton as triton_kernels
from losa_deploy.kernels.formats.bitmask import pack_mask, to_disk
from losa_deploy.kernels.masked_lora import (
    effective_weight,
    masked_lora_linear,
    masked_lora_linear_materialized,
    resolve_backend,
)

# conftest.py turns on Triton's interpreter where there is no GPU; then Triton runs on CPU tensors.
TRITON_DEVICE = "cpu" if triton_kernels.interpreted() else "cuda"

needs_ext = pytest.mark.skipif(not has_extension(), reason="compiled extension not built")
needs_triton = pytest.mark.skipif(not triton_kernels.available() or not (
    torch.cuda.is_available() or triton_kernels.interpreted()), reason="triton not installed")
CPU_BACKENDS = [pytest.param("cpp", marks=needs_ext), "torch"]
TRITON_BACKENDS = [pytest.param("triton", marks=needs_triton), pytest.param("panels", marks=needs_triton)]
ALL_BACKENDS = [*CPU_BACKENDS, *TRITON_BACKENDS]


def make_problem(gen, tokens, d, k, rank, sparsity, dtype=torch.float64, adapter_dtype=None, lead=()):
    """A pruned W (zero outside M), its mask, adapters with non-trivial B, activations, an upstream grad."""
    adapter_dtype = adapter_dtype or (torch.float64 if dtype == torch.float64 else torch.float32)
    mask = torch.rand(d, k, generator=gen) >= sparsity
    weight = (torch.randn(d, k, generator=gen, dtype=torch.float64) * mask).to(dtype)
    lora_a = torch.randn(rank, k, generator=gen, dtype=torch.float64).to(adapter_dtype)
    lora_b = torch.randn(d, rank, generator=gen, dtype=torch.float64).to(adapter_dtype)
    x = torch.randn(*lead, tokens, k, generator=gen, dtype=torch.float64).to(dtype)
    grad_y = torch.randn(*lead, tokens, d, generator=gen, dtype=torch.float64)
    return mask, weight, lora_a, lora_b, x, grad_y


def device_of(backend: str) -> str:
    return TRITON_DEVICE if backend in ("triton", "panels") else "cpu"


def run(fn, x, weight, mask, lora_a, lora_b, grad_y, device="cpu", **kwargs):
    """Output and gradients (x, A, B) of one forward + backward on ``device``, as float64 on the CPU."""
    x, lora_a, lora_b = (t.detach().to(device).requires_grad_() for t in (x, lora_a, lora_b))
    y = fn(x, weight.to(device), mask.to(device), lora_a, lora_b, **kwargs)
    y.backward(grad_y.to(device, y.dtype))
    return [t.detach().double().cpu() for t in (y, x.grad, lora_a.grad, lora_b.grad)]


def reference(x, weight, mask, lora_a, lora_b, grad_y, **kwargs):
    """The materialising reference, in float64 on the same (possibly low-precision) values."""
    return run(masked_lora_linear_materialized, x.double(), weight.double(), mask, lora_a.double(),
               lora_b.double(), grad_y, **kwargs)


def assert_close(got, want, rtol, bound=None):
    """Errors relative to the largest reference value, or, with ``bound`` (the same problem on absolute
    values: each output's sum of |terms|), element by element relative to that: a sum that cancels to
    nearly nothing (one output of a 1x1 layer, say) then keeps the tolerance of its terms."""
    for i, (name, g, w) in enumerate(zip(("y", "dx", "dA", "dB"), got, want)):
        scale = w.abs().max().clamp_min(1e-12) if bound is None else bound[i].clamp_min(1e-30)
        err = ((g - w).abs() / scale).max().item()
        assert err <= rtol, f"{name}: relative error {err:.2e} > {rtol:.0e}"


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@settings(max_examples=40, deadline=None)
@given(tokens=st.integers(1, 40), d=st.integers(1, 70), k=st.integers(1, 200), rank=st.integers(1, 64),
       sparsity=st.sampled_from([0.0, 0.3, 0.5, 0.7, 0.9, 0.95]), seed=st.integers(0, 2**31),
       dtype=st.sampled_from([torch.float64, torch.float32]))
def test_matches_materialized_reference(backend, tokens, d, k, rank, sparsity, seed, dtype):
    # float64 runs the portable C++ kernels, float32 the vectorised ones (AVX-512 here).
    gen = torch.Generator().manual_seed(seed)
    mask, weight, a, b, x, grad_y = make_problem(gen, tokens, d, k, rank, sparsity, dtype=dtype)
    want = reference(x, weight, mask, a, b, grad_y, scale=0.75)
    bound = reference(x.abs(), weight.abs(), mask, a.abs(), b.abs(), grad_y.abs(), scale=0.75)
    got = run(masked_lora_linear, x, weight, mask, a, b, grad_y, scale=0.75, backend=backend)
    assert_close(got, want, rtol=1e-12 if dtype == torch.float64 else 1e-5, bound=bound)


@pytest.mark.parametrize("backend", TRITON_BACKENDS)
@pytest.mark.parametrize("rank,sparsity,dtype", [(1, 0.0, torch.float32), (33, 0.95, torch.float64),
                                                 (7, 0.5, torch.bfloat16)])
def test_triton_matches_reference(rng, backend, rank, sparsity, dtype):
    # Ragged: 45 output rows and 77 inputs cross the 32-wide tiles; rank 33 pads to 64. Rows 0-31 are
    # pruned whole, so their tiles of G are empty and skipped (random masks never empty a tile).
    mask, weight, a, b, x, grad_y = make_problem(rng, 19, 45, 77, rank, sparsity, dtype=dtype, lead=(2,))
    mask[:32] = False
    weight[:32] = 0
    want = reference(x, weight, mask, a, b, grad_y, scale=1.5)
    got = run(masked_lora_linear, x, weight, mask, a, b, grad_y, device=TRITON_DEVICE, scale=1.5, backend=backend)
    assert_close(got, want, rtol={torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype])


@pytest.mark.parametrize("backend", ["torch", *TRITON_BACKENDS])
def test_panels_meet_at_ragged_edges(rng, monkeypatch, backend):
    # 32-wide panels: 70 outputs and 101 inputs make three row panels and four column panels, the last
    # ones partial, so every product is stitched from panels (on a GPU panels are 32 MiB).
    monkeypatch.setattr(masked_lora_module, "_PANEL", 32)
    mask, weight, a, b, x, grad_y = make_problem(rng, 13, 70, 101, 6, 0.6, dtype=torch.float32)
    want = reference(x, weight, mask, a, b, grad_y, scale=0.8)
    got = run(masked_lora_linear, x, weight, mask, a, b, grad_y, device=device_of(backend), scale=0.8,
              backend=backend)
    assert_close(got, want, rtol=1e-5)


@pytest.mark.parametrize("d,k", [(4096, 4096), (4096, 11008), (11008, 4096), (300, 70)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_panels_stay_under_a_quarter_of_the_delta(d, k, dtype):
    # The panels backend's memory promise (issue #6's bar: extra memory at most half the reference's, whose
    # extra is at least its bf16 d×k delta). The spans are planned without a GPU.
    for total, other in ((d, k), (k, d)):
        spans = masked_lora_module._spans(total, other, torch.device("cuda"),
                                          masked_lora_module._quarter_delta(dtype, d * k))
        assert spans[0].start == 0 and spans[-1].stop == total
        assert all(a.stop == b.start and a.start % 32 == 0 for a, b in zip(spans, spans[1:]))
        biggest = max(s.stop - s.start for s in spans) * other * dtype.itemsize
        assert biggest <= max(8 << 20, d * k * 2 // 4)
        if d * k * 2 // 4 > 8 << 20:
            assert len(spans) >= 4 * 2 // dtype.itemsize  # not one panel of everything


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_effective_panel_is_the_merged_weight(rng, dtype):
    from losa_deploy.kernels.triton.masked_lora import effective_panel, mask_panel_

    d, k, rank = 57, 150, 5
    mask, weight, a, b, _, _ = make_problem(rng, 1, d, k, rank, 0.5, dtype=dtype)
    words = pack_mask(mask)
    merged = effective_weight(weight.double(), mask, a.double(), b.double(), 1.7)
    rows, cols = slice(9, 50), slice(32, 141)  # panels start on a word; these end inside one
    dev = TRITON_DEVICE
    panel = effective_panel(weight.to(dev), words.to(dev), a.to(dev), b.to(dev), 1.7, rows, cols, dtype)
    assert panel.dtype == dtype and panel.shape == (41, 109)
    want = merged[rows, cols]
    err = ((panel.cpu().double() - want).abs().max() / want.abs().max()).item()
    assert err <= {torch.float64: 1e-13, torch.float32: 1e-6, torch.bfloat16: 1e-2}[dtype]  # bf16: rounding + TF32 B·A
    assert not panel.cpu()[~mask[rows, cols]].any()  # exactly zero off the mask
    adapter_only = effective_panel(None, words.to(dev), a.to(dev), b.to(dev), 1.7, rows, cols, dtype)
    base_only = effective_panel(weight.to(dev), words.to(dev), a.to(dev), b.to(dev), 0.0, rows, cols, dtype)
    assert torch.equal(base_only.cpu(), weight[rows, cols])
    if dtype == torch.float64:
        assert torch.allclose(adapter_only.cpu() + base_only.cpu(), want, rtol=1e-13, atol=1e-13)
    g = torch.randn(d, 109, generator=rng, dtype=dtype)
    masked = mask_panel_(g.clone().to(dev), words.to(dev), cols).cpu()
    assert torch.equal(masked, g * mask[:, cols])


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_gradcheck_float64(rng, backend, dropout):
    device = device_of(backend)
    mask, weight, a, b, x, _ = (t.to(device) for t in make_problem(rng, 3, 9, 37, 2, 0.4))
    seed = int(torch.randint(0, 2**31, (1,), generator=rng))

    def f(x, a, b):  # the same dropout draw on every evaluation
        return masked_lora_linear(x, weight, mask, a, b, 1.3, dropout=dropout, training=True,
                                  generator=torch.Generator(device).manual_seed(seed), backend=backend)

    inputs = tuple(t.clone().requires_grad_() for t in (x, a, b))
    assert torch.autograd.gradcheck(f, inputs, fast_mode=backend in ("triton", "panels"))


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_dropout_with_fixed_seed(rng, backend):
    device = device_of(backend)
    mask, weight, a, b, x, grad_y = make_problem(rng, 23, 30, 50, 4, 0.5)
    kwargs = dict(scale=0.5, dropout=0.25, training=True, device=device)
    seed = int(torch.randint(0, 2**31, (1,), generator=rng))

    def seeded(s):
        return torch.Generator(device).manual_seed(s)

    def fused(*args, **kw):
        return run(masked_lora_linear, *args, **kw, backend=backend)

    got = fused(x, weight, mask, a, b, grad_y, generator=seeded(seed), **kwargs)
    again = fused(x, weight, mask, a, b, grad_y, generator=seeded(seed), **kwargs)
    other = fused(x, weight, mask, a, b, grad_y, generator=seeded(seed + 1), **kwargs)
    want = reference(x, weight, mask, a, b, grad_y, generator=seeded(seed), **kwargs)
    assert_close(got, want, rtol=1e-12)
    assert all(torch.equal(g, h) for g, h in zip(got, again))
    assert not torch.allclose(got[0], other[0])
    # Dropout is on the adapter path only and only in training: the base product is untouched.
    no_drop = reference(x, weight, mask, a, b, grad_y, scale=0.5)
    eval_mode = fused(x, weight, mask, a, b, grad_y, scale=0.5, dropout=0.25, training=False, device=device)
    assert_close(eval_mode, no_drop, rtol=1e-12)
    base_only = reference(x, weight, mask, a, b * 0, grad_y, scale=0.5)
    dropped_base = fused(x, weight, mask, a, b * 0, grad_y, generator=seeded(seed), **kwargs)
    assert_close(dropped_base[:2], base_only[:2], rtol=1e-12)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_bfloat16_autocast(rng, backend):
    # Training runs under bf16 autocast with fp32 master adapters and a bf16 frozen base.
    mask, weight, a, b, x, grad_y = make_problem(rng, 37, 45, 172, 8, 0.6, dtype=torch.float32)
    weight = weight.bfloat16()
    xr, ar, br = (t.detach().clone().requires_grad_() for t in (x, a, b))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = masked_lora_linear(xr, weight, mask, ar, br, 0.5, backend=backend)
    assert y.dtype == torch.bfloat16
    y.backward(grad_y.bfloat16())
    assert xr.grad.dtype == torch.float32 and ar.grad.dtype == br.grad.dtype == torch.float32
    got = [t.detach().double() for t in (y, xr.grad, ar.grad, br.grad)]
    want = reference(x.bfloat16(), weight, mask, a, b, grad_y.bfloat16().double(), scale=0.5)
    assert_close(got, want, rtol=3e-2)


@needs_ext
def test_an_unknown_instruction_set_cap_is_refused_by_every_kernel_that_reads_it(monkeypatch):
    # One parser (cpu_features.h) for the masked-LoRA and attention kernels: the same error from each.
    monkeypatch.setenv("LOSA_CPU_ISA", "sse4")
    for read_cap in (ops().masked_lora_isa, ops().causal_attention_isa):
        with pytest.raises(RuntimeError, match="LOSA_CPU_ISA must be default, avx2, avx512 or avx512_bf16, got 'sse4'"):
            read_cap()
    monkeypatch.setenv("LOSA_CPU_ISA", "avx2")
    assert ops().masked_lora_isa() in ("default", "avx2") and ops().causal_attention_isa() != "avx512"


@needs_ext
@pytest.mark.parametrize("isa", ["default", "avx2", "avx512", "avx512_bf16"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_cpu_instruction_set_variant(rng, monkeypatch, isa, dtype):
    monkeypatch.setenv("LOSA_CPU_ISA", isa)
    # Capped at what this CPU has: the variants it lacks fall back to the best one it has.
    assert ops().masked_lora_isa() in ("default", "avx2", "avx512", "avx512_bf16")
    # Plus degenerate shapes: one input (the bf16 rank-pair interleave once failed at k = 1), one output.
    for tokens, d, k, rank in ((21, 70, 300, 5), (3, 4, 1, 3), (5, 1, 33, 2), (2, 1, 1, 1)):
        mask, weight, a, b, x, grad_y = make_problem(rng, tokens, d, k, rank, 0.5, dtype=dtype)
        mask[0, 0], weight[0, 0] = True, 1.0  # at least one kept weight
        want = reference(x, weight, mask, a, b, grad_y, scale=1.25)
        bound = reference(x.abs(), weight.abs(), mask, a.abs(), b.abs(), grad_y.abs(), scale=1.25)
        got = run(masked_lora_linear, x, weight, mask, a, b, grad_y, scale=1.25, backend="cpp")
        assert_close(got, want, rtol=1e-5 if dtype == torch.float32 else 2e-2, bound=bound)


@needs_ext
def test_mask_as_bool_or_bitmask_words(rng):
    mask, weight, a, b, x, grad_y = make_problem(rng, 5, 33, 65, 3, 0.5)
    words = pack_mask(mask)
    results = [run(masked_lora_linear, x, weight, m, a, b, grad_y, scale=0.9) for m in (mask, words, to_disk(words))]
    for other in results[1:]:
        assert all(torch.equal(g, h) for g, h in zip(results[0], other))
    merged = effective_weight(weight, words, a, b, 0.9)
    y = x @ merged.t()
    assert torch.allclose(results[0][0], y, rtol=1e-12, atol=1e-12)
    assert ((merged != 0) & ~mask).sum() == 0


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_nothing_d_by_k_is_saved_for_backward(rng, backend):
    d, k = 96, 160
    mask, weight, a, b, x, _ = make_problem(rng, 8, d, k, 4, 0.5, dtype=torch.float32)
    a, b, x = a.requires_grad_(), b.requires_grad_(), x.requires_grad_()

    def saved_sizes(fn):
        sizes = []

        def pack(t):
            if t.data_ptr() != weight.data_ptr():  # the caller's own frozen weight is not ours to count
                sizes.append(t.numel())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn(x, weight, mask, a, b, 0.5, dropout=0.1, training=True)
        return sizes

    fused = saved_sizes(lambda *args, **kw: masked_lora_linear(*args, **kw, backend=backend))
    materialized = saved_sizes(masked_lora_linear_materialized)
    assert max(fused) < d * k / 4  # the packed mask words are the largest: d·k/32 int32
    assert max(materialized) >= d * k  # the reference keeps its d×k delta (this test can fail)


def test_resolve_backend():
    expected = "cpp" if has_extension() else "torch"
    assert resolve_backend("cpu", torch.float32) == expected
    assert resolve_backend("cpu", torch.float16) == "torch"
    assert resolve_backend("cpu", torch.float32, "torch") == "torch"
    # CUDA (no GPU needed to decide): Triton-built panels when Triton is there, else the PyTorch panels.
    assert resolve_backend("cuda", torch.bfloat16) == ("panels" if triton_kernels.available() else "torch")


@pytest.mark.parametrize("change,message", [
    (dict(lora_b=torch.zeros(9, 3)), "rank mismatch"),
    (dict(lora_a=torch.zeros(2, 36)), "do not fit"),
    (dict(mask=torch.ones(9, 36, dtype=torch.bool)), "mask shape"),
    (dict(mask=torch.ones(9, 1, dtype=torch.int32)), "mask words shape"),
    (dict(mask=torch.ones(9, 37)), "must be bool"),
    (dict(x=torch.zeros(4, 36)), "features"),
    (dict(weight=torch.zeros(9, 37, requires_grad=True)), "frozen"),
    (dict(weight=torch.zeros(9, 37, dtype=torch.bfloat16)), "autocast"),
    (dict(dropout=1.0), "dropout"),
    (dict(scale=float("nan")), "scale"),
    (dict(backend="cuda"), "backend must be one of"),
    (dict(bias=torch.zeros(8)), r"bias must be a \[9\] tensor"),
])
def test_bad_input_is_a_clear_error(change, message):
    args = dict(x=torch.zeros(4, 37), weight=torch.zeros(9, 37), mask=torch.ones(9, 37, dtype=torch.bool),
                lora_a=torch.zeros(2, 37), lora_b=torch.zeros(9, 2), scale=1.0, dropout=0.0, backend="auto",
                bias=None)
    args.update(change)
    with pytest.raises(LosaError, match=message):
        masked_lora_linear(args["x"], args["weight"], args["mask"], args["lora_a"], args["lora_b"], args["scale"],
                           bias=args["bias"], dropout=args["dropout"], backend=args["backend"])


def test_numpy_scale_is_a_number(rng):
    import numpy as np

    mask, weight, a, b, x, _ = make_problem(rng, 3, 5, 7, 2, 0.5, dtype=torch.float32)
    torch.testing.assert_close(masked_lora_linear(x, weight, mask, a, b, np.float32(0.5)),
                               masked_lora_linear(x, weight, mask, a, b, 0.5))


_AOT_SCRIPT = r"""
import torch
from triton_aot import resource_usage
from losa_deploy.kernels.triton import masked_lora as ml

TYPES = {torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}
# bf16 and fp32 training at LoSA's and Shears' ranks; fp64 (tests only) where it multiplies without tl.dot
for dtype, rank, names in ((torch.bfloat16, 16, "all"), (torch.bfloat16, 64, "all"), (torch.float32, 16, "all"),
                           (torch.float32, 64, "all"), (torch.float64, 64, ("mm", "panel"))):
    adapters = torch.float64 if dtype == torch.float64 else torch.float32
    cfg = ml._config(torch.empty(0, dtype=dtype), torch.empty(rank, 1, dtype=adapters))  # as on a GPU
    warps = cfg.pop("num_warps")
    act, acc = "*" + TYPES[dtype], "*" + TYPES[adapters]
    sizes = dict.fromkeys(["d", "k", "n_words", "rank"], "i32")
    products = dict(w_ptr=act, words_ptr="*i32", a_ptr=acc, b_ptr=acc)
    flags = dict(HAS_W=True, HAS_AB=True)
    panel = {**cfg, **flags}
    panel.pop("BLOCK_T")
    cases = {
        "mm": (ml._mm_kernel, dict(x_ptr=act, **products, y_ptr=act, tokens="i32", **sizes), {**cfg, **flags}),
        "mm_t": (ml._mm_t_kernel, dict(g_ptr=act, **products, dx_ptr=act, tokens="i32", **sizes), {**cfg, **flags}),
        "grad_ab": (ml._grad_ab_kernel, dict(g_ptr=act, x_ptr=act, words_ptr="*i32", a_ptr=acc, b_ptr=acc,
                                             da_ptr=acc, db_ptr=acc, tokens="i32", **sizes), dict(cfg)),
        "panel": (ml._panel_kernel, dict(**products, out_ptr=act, row0="i32", col0="i32", panel_rows="i32",
                                         panel_cols="i32", **sizes), panel),
    }
    for name, (kernel, signature, constexprs) in cases.items():
        if names == "all" or name in names:
            usage = resource_usage(kernel, signature, constexprs, warps)
            print(name, dtype, rank, usage)
            assert usage.get("STACK", -1) == 0, f"{name} {dtype} rank {rank} spills: {usage}"
usage = resource_usage(ml._mask_kernel, dict(g_ptr="*fp32", words_ptr="*i32", col0="i32", rows_total="i32",
                                              panel_cols="i32", n_words="i32"), dict(BLOCK_N=64, BLOCK_K=64), 8)
print("mask", usage)
assert usage.get("STACK", -1) == 0, f"mask spills: {usage}"
"""


@needs_triton
def test_triton_kernels_compile_for_hopper_without_spills():
    """The masked-LoRA Triton kernels, as a GPU launch configures them, compile to sm_90 code with Triton's
    own compiler (no GPU needed) and spill no registers, in bf16 and fp32 at ranks 16 and 64; the
    interpreter sees neither. float64 takes the path without tl.dot (Triton 3.6 aborted compiling an fp64
    tl.dot on an H200)."""
    pytest.importorskip("triton.backends.nvidia")
    root = Path(__file__).resolve().parent.parent
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(root), str(root / "tests"), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, "-c", _AOT_SCRIPT], env=env, capture_output=True, text=True,
                          check=False, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]


@needs_ext
def test_cpp_gradients_are_the_same_on_every_run(rng):
    """dB sums over column panels that threads claim as they go: the sum must not depend on which thread
    took which panels (it did, and LoSA runs differed by 0.4% in perplexity). Several panels per thread,
    two threads, five runs: bitwise equal."""
    d, k, r, tokens = 576, 1536, 8, 512  # a shape whose dB did differ between runs before
    weight_mask = torch.rand(d, k, generator=rng) > 0.5
    weight = torch.randn(d, k, generator=rng) * weight_mask
    x = torch.randn(tokens, k, generator=rng)
    a, b = torch.randn(r, k, generator=rng) * 0.1, torch.randn(d, r, generator=rng) * 0.1
    threads = torch.get_num_threads()
    try:
        grads = []
        # Five runs at two threads, then one at a single thread (as each data-parallel process runs): the
        # panel groups depend on the shape only, so the thread count does not change the bits either.
        for n in (2, 2, 2, 2, 2, 1):
            torch.set_num_threads(n)
            a_, b_ = a.clone().requires_grad_(), b.clone().requires_grad_()
            masked_lora_linear(x, weight, weight_mask, a_, b_, 2.0, backend="cpp").square().sum().backward()
            grads.append((a_.grad, b_.grad))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(ga, grads[0][0]) and torch.equal(gb, grads[0][1]) for ga, gb in grads[1:])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_double_backward_is_refused(rng, backend):
    """The kernels have no derivative of their own: a second derivative through them is an error, not
    the silent zeros (cpp) or wrong d/dA (torch) it was."""
    mask, weight, a, b, x, _ = make_problem(rng, 5, 33, 70, 4, 0.5)
    x, a = x.requires_grad_(), a.requires_grad_()
    y = masked_lora_linear(x, weight, mask, a, b.requires_grad_(), 0.7, backend=backend)
    (dx,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        dx.square().sum().backward()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("d,k,tokens", [(0, 7, 3), (5, 0, 3), (5, 7, 0)])
def test_empty_shapes(rng, backend, d, k, tokens):
    """An empty dimension: the right empty or zero output and gradients (k = 0 crashed the C++ kernels
    with a division by zero, and the reshape before them)."""
    mask, weight, a, b, x, _ = make_problem(rng, tokens, d, k, 3, 0.5)
    a, b, x = a.requires_grad_(), b.requires_grad_(), x.requires_grad_()
    y = masked_lora_linear(x, weight, mask, a, b, 0.5, backend=backend)
    assert y.shape == (tokens, d) and not y.any()
    y.sum().backward()
    assert x.grad.shape == x.shape and a.grad.shape == a.shape and b.grad.shape == b.shape
    assert not (x.grad.any() or a.grad.any() or b.grad.any())


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_autocast_keeps_no_cast_of_the_weight_for_backward(rng, backend):
    """fp32 W under bf16 autocast (the trainer's setting): backward keeps the caller's W, not a bf16 copy
    of it per layer (d x k each, alive until backward), and the gradients are those of the bf16 product."""
    mask, weight, a, b, x, _ = make_problem(rng, 9, 96, 160, 4, 0.5, dtype=torch.float32)
    a, b, x = a.requires_grad_(), b.requires_grad_(), x.requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = masked_lora_linear(x, weight, mask, a, b, 0.5, backend=backend)
    assert not [t for t in saved if t.numel() >= weight.numel() and t.data_ptr() != weight.data_ptr()]
    y.float().square().sum().backward()
    grads = [t.grad.clone() for t in (x, a, b)]
    for t in (x, a, b):
        t.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        masked_lora_linear(x, weight.to(torch.bfloat16), mask, a, b, 0.5, backend=backend).float().square().sum().backward()
    assert all(torch.equal(g, t.grad) for g, t in zip(grads, (x, a, b)))
