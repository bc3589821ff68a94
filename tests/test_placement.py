"""Huge-page placement of packed weights (kernels/placement.py): the copy is exact and 2 MiB-aligned, small
tensors and disabled placement leave tensors alone, and SparseLinear keeps its weights placed (and its
outputs unchanged) across construction and dtype conversion."""

import pytest
import torch
from sparse_weights import random_nm, random_sparse

from losa_deploy.kernels import has_extension
from losa_deploy.kernels.formats.bitmask import BitmaskWeight
from losa_deploy.kernels.formats.nm import NMKernelLayout, NMWeight
from losa_deploy.kernels.placement import (
    HUGE_PAGE_BYTES,
    HUGE_PAGE_OFFSET,
    on_huge_pages,
    place_for_decode,
    thp_mode,
)
from losa_deploy.runtime import SparseLinear

pytestmark = pytest.mark.skipif(not has_extension(), reason="compiled extension not built")


def _placed(t: torch.Tensor) -> bool:
    """Where a placed copy starts: one cache line into a huge page (placement.HUGE_PAGE_OFFSET)."""
    return t.data_ptr() % HUGE_PAGE_BYTES == HUGE_PAGE_OFFSET


def test_large_tensor_copied_exactly_onto_aligned_memory(rng):
    n = HUGE_PAGE_BYTES // 2 + int(torch.randint(1, 5000, (1,), generator=rng))  # bf16: just over 1 page
    src = torch.randn(n, generator=rng).to(torch.bfloat16)
    out = on_huge_pages(src)
    assert out is not src and _placed(out)
    assert out.dtype == src.dtype and out.shape == src.shape
    assert torch.equal(out.view(torch.int16), src.view(torch.int16))  # bit-exact
    del src
    assert torch.isfinite(out.float()).all()  # owns its memory


def test_small_tensor_and_disabled_placement_left_alone(rng, monkeypatch):
    small = torch.randn(1000, generator=rng)
    assert on_huge_pages(small) is small
    big = torch.randn(HUGE_PAGE_BYTES // 4 + 7, generator=rng)
    monkeypatch.setenv("LOSA_HUGE_PAGES", "0")
    assert on_huge_pages(big) is big


def test_sparse_linear_places_weights_and_keeps_outputs(rng):
    rows, cols = 2531, 2123  # ragged; values > 2 MiB at 50%, in fp32 and in bf16
    weight = random_sparse(rows, cols, 0.5, rng)
    layer = SparseLinear(BitmaskWeight.from_dense(weight))
    assert layer.packed.values.nbytes >= HUGE_PAGE_BYTES and _placed(layer.packed.values)
    assert layer.packed.values is layer.values  # the buffer and the kernel's view are one tensor
    x = torch.randn(3, cols, generator=rng)
    ref = (x.double() @ weight.double().T).float()
    torch.testing.assert_close(layer(x), ref, rtol=1e-4, atol=1e-4)
    placed_mask = layer.packed.mask
    layer.to(torch.float32)  # nothing changes: nothing is copied
    assert layer.packed.mask is placed_mask
    layer.to(torch.bfloat16)  # new value tensor (half the bytes, still > 1 page): placed again
    assert layer.packed.mask is placed_mask  # the int tensors stay where they are
    assert layer.packed.values.dtype == torch.bfloat16 and _placed(layer.packed.values)
    ref16 = x.to(torch.bfloat16).double() @ weight.to(torch.bfloat16).double().T
    torch.testing.assert_close(layer(x.to(torch.bfloat16)).double(), ref16, rtol=2e-2, atol=2e-2)


def test_place_for_decode_only_touches_named_tensors(rng):
    packed = BitmaskWeight.from_dense(random_sparse(2048, 8192, 0.9, rng))  # mask: 2 MiB
    placed = place_for_decode(packed, changed={"mask"})
    assert placed.values is packed.values
    assert placed.mask is not packed.mask and torch.equal(placed.mask, packed.mask)


def test_share_memory_shares_the_packed_weight_the_kernel_reads(rng):
    """``Module.share_memory()`` (for a model served from forked workers) moves every buffer into shared
    memory; placing them on huge pages afterwards would copy them out again, unshared."""
    rows, cols = 1531, 2917  # ragged; values and mask each over one huge page
    weight = random_sparse(rows, cols, 0.4, rng)
    layer = SparseLinear(BitmaskWeight.from_dense(weight))
    layer.share_memory()
    for name, tensor in layer.packed.tensors().items():
        assert tensor.is_shared(), name
        assert tensor is getattr(layer, name)  # the kernel reads the shared buffer, not a copy
    x = torch.randn(5, cols, generator=rng)
    torch.testing.assert_close(layer(x), (x.double() @ weight.double().T).float(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["bitmask", "2:4"])
def test_building_and_converting_a_layer_checks_its_bits_once(rng, kind, monkeypatch):
    # Placing on huge pages and .to(dtype) hold copies of checked arrays: the full pass over the mask runs
    # when the layout is built, not again for each move (it was three times per module in ld.load).
    cls = BitmaskWeight if kind == "bitmask" else NMKernelLayout
    calls = []
    check = cls._check_bits
    monkeypatch.setattr(cls, "_check_bits", lambda self: (calls.append(self.shape), check(self))[1])
    rows, cols = 1031, 2053  # ragged; values > 2 MiB: placed on huge pages
    weight = random_sparse(rows, cols, 0.5, rng) if kind == "bitmask" else random_nm(rows, cols, 2, 4, rng)
    packed = BitmaskWeight.from_dense(weight) if kind == "bitmask" else NMWeight.from_dense(weight, 2, 4)
    layer = SparseLinear(packed)
    layer.to(torch.bfloat16)
    assert calls == [(rows, cols)]
    x = torch.randn(5, cols, generator=rng).to(torch.bfloat16)
    ref = x.double() @ weight.to(torch.bfloat16).double().T
    torch.testing.assert_close(layer(x).double(), ref, rtol=2e-2, atol=2e-2)


def _anon_huge_kib(t: torch.Tensor) -> int:
    """AnonHugePages of the mapping that holds ``t``'s first byte (/proc/self/smaps)."""
    ptr, inside = t.data_ptr(), False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            head = line.split(" ", 1)[0]
            if "-" in head:  # a mapping's first line: "lo-hi perms ..."
                lo, _, hi = head.partition("-")
                try:
                    inside = int(lo, 16) <= ptr < int(hi, 16)
                except ValueError:
                    inside = False
            elif inside and line.startswith("AnonHugePages:"):
                return int(line.split()[1])
    return 0


@pytest.mark.skipif(thp_mode() not in ("madvise", "always"), reason="transparent huge pages are off")
def test_placed_tensor_is_backed_by_huge_pages(rng):
    """Not only aligned: the kernel really backs the copy with 2 MiB pages (what benchmarks/huge_pages.py
    compares against the default allocator)."""
    pages = 3
    src = torch.randn(pages * HUGE_PAGE_BYTES // 4 - int(torch.randint(1, 999, (1,), generator=rng)), generator=rng)
    out = on_huge_pages(src)
    out.add_(0)  # touch every page
    assert _anon_huge_kib(out) >= (pages - 1) * HUGE_PAGE_BYTES // 1024
    assert torch.equal(out, src)


@pytest.mark.skipif(thp_mode() not in ("madvise", "always"), reason="transparent huge pages are off")
def test_offset_copy_of_whole_huge_pages_takes_no_extra_huge_page(rng):
    """A tensor of exactly k huge pages, copied 64 bytes in: its last 64 bytes spill onto an ordinary page,
    not onto a (k+1)-th huge page (2:4 4096x4096 values and masks are exact multiples: +2 MiB each)."""
    pages = 2
    src = torch.randn(pages * HUGE_PAGE_BYTES // 4, generator=rng)
    out = on_huge_pages(src)
    out.add_(0)
    assert torch.equal(out, src)
    assert _anon_huge_kib(out) == pages * HUGE_PAGE_BYTES // 1024


def test_huge_page_copy_refuses_an_offset_off_the_cache_lines(rng):
    from losa_deploy.kernels import ops

    src = torch.randn(HUGE_PAGE_BYTES // 4 + 3, generator=rng)
    for bad in (-64, 32, HUGE_PAGE_BYTES):
        with pytest.raises(RuntimeError, match="offset must be a multiple of 64"):
            ops().huge_page_copy(src, bad)
    out = ops().huge_page_copy(src, 4096)
    assert out.data_ptr() % HUGE_PAGE_BYTES == 4096 and torch.equal(out, src)


def test_deep_copied_and_unpickled_layers_are_placed_again(rng):
    import copy
    import pickle

    rows, cols = 1789, 2311  # ragged; values over one huge page at 40%
    weight = random_sparse(rows, cols, 0.4, rng)
    layer = SparseLinear(BitmaskWeight.from_dense(weight))
    x = torch.randn(4, cols, generator=rng)
    ref = (x.double() @ weight.double().T).float()
    for twin in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert _placed(twin.packed.values) and twin.packed.values is twin.values
        assert twin.packed.values.data_ptr() != layer.packed.values.data_ptr()
        torch.testing.assert_close(twin(x), ref, rtol=1e-4, atol=1e-4)
