"""Packed formats: bitmask and N:M pack / unpack bit-exactly, their on-disk arrays round-trip, the kernel
layout of N:M matches, and malformed arrays or weights that do not fit are clear errors."""

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sparse_weights import random_nm, random_sparse

from losa_deploy.errors import LosaError
from losa_deploy.kernels.formats.bitmask import BitmaskWeight, mask_sha256, popcount, to_disk, unpack_mask
from losa_deploy.kernels.formats.nm import NMKernelLayout, NMWeight, mask_bytes

DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.93, 1.0])
def test_bitmask_round_trip(rng, dtype, sparsity):
    w = random_sparse(45, 173, sparsity, rng, dtype)
    w[3] = 0  # an empty row
    packed = BitmaskWeight.from_dense(w)
    assert torch.equal(packed.to_dense(), w)
    assert packed.nnz == int((w != 0).sum())
    assert packed.values.dtype == dtype and packed.mask.shape == (45, 6)
    state = packed.state_dict("model.layers.0.mlp.down_proj")
    assert state["model.layers.0.mlp.down_proj.lb_mask"].dtype == torch.uint32
    assert state["model.layers.0.mlp.down_proj.lb_shape"].tolist() == [45, 173]
    again = BitmaskWeight.from_state_dict(state, "model.layers.0.mlp.down_proj")
    assert torch.equal(again.to_dense(), w)
    # The mask words are those the sidecar hashes.
    import hashlib
    assert hashlib.sha256(to_disk(packed.mask).numpy().tobytes()).hexdigest() == mask_sha256(w)


def test_bitmask_values_in_another_dtype(rng):
    w = random_sparse(20, 70, 0.6, rng)
    packed = BitmaskWeight.from_dense(w, dtype=torch.bfloat16)
    assert torch.equal(packed.to_dense(), w.to(torch.bfloat16))


def test_popcount_matches_unpacked_bits(rng):
    mask = torch.rand(30, 200, generator=rng) < 0.4
    from losa_deploy.kernels.formats.bitmask import pack_mask
    words = pack_mask(mask)
    expected = unpack_mask(words, 200).view(30, -1).sum(1)
    assert torch.equal(popcount(words).sum(1), expected)


def test_bitmask_rejects_malformed_arrays(rng):
    packed = BitmaskWeight.from_dense(random_sparse(10, 40, 0.5, rng))
    bad_ptr = packed.row_ptr.clone()
    bad_ptr[4] += 1
    with pytest.raises(LosaError, match="row_ptr"):
        BitmaskWeight(packed.shape, packed.values, packed.mask, bad_ptr)
    with pytest.raises(LosaError, match="values"):
        BitmaskWeight(packed.shape, packed.values.to(torch.int32), packed.mask, packed.row_ptr)
    spill = packed.mask.clone()
    spill[0, -1] |= 1 << 20  # column 52 of a 40-wide row
    ptr = packed.row_ptr.clone()
    ptr[1:] += 1
    values = torch.cat([packed.values, packed.values[:1]])
    with pytest.raises(LosaError, match="past column"):
        BitmaskWeight(packed.shape, values, spill, ptr)
    state = packed.state_dict("p")
    del state["p.lb_row_ptr"]
    with pytest.raises(LosaError, match="missing p.lb_row_ptr"):
        BitmaskWeight.from_state_dict(state, "p")
    with pytest.raises(LosaError, match="2-D"):
        BitmaskWeight.from_dense(torch.ones(3))
    with pytest.raises(LosaError, match="bfloat16, float16 or float32"):
        BitmaskWeight.from_dense(torch.ones(3, 3, dtype=torch.float64))


NM_CASES = [(2, 4), (1, 4), (3, 4), (2, 8), (4, 8), (7, 8), (4, 16), (11, 16), (2, 5), (3, 7), (1, 2)]


@pytest.mark.parametrize("n,m", NM_CASES)
def test_nm_round_trip_and_kernel_layout(rng, n, m):
    cols = 173 if m != 2 else 171  # ragged: a tail group for every M here
    w = random_nm(70, cols, n, m, rng)
    packed = NMWeight.from_dense(w, n, m)
    assert (packed.n, packed.m, packed.block_n) == (n, m, None)
    assert packed.mask.shape == (70, mask_bytes(cols, m))
    assert torch.equal(packed.to_dense(), w)
    again = NMWeight.from_state_dict(packed.state_dict("p"), "p")
    assert torch.equal(again.values, packed.values) and torch.equal(again.mask, packed.mask)
    layout = packed.kernel_layout()
    assert torch.equal(layout.to_dense(), w)
    assert torch.equal(layout.canonical().to_dense(), w)
    # Every group of the kernel layout marks exactly N positions: values per row are fixed.
    assert layout.values.numel() == 70 * ((cols // m) * n + -(-n * (cols % m) // m))


@pytest.mark.parametrize("m", [4, 8, 16])
def test_nm_mask_bytes_are_bitmask_words(rng, m):
    """For M in 4, 8, 16 a row's N:M mask bytes are its losa-bitmask words, bit for bit."""
    w = random_nm(9, 128, m // 2, m, rng)
    packed = NMWeight.from_dense(w, m // 2, m)
    words = BitmaskWeight.from_dense(w).mask
    assert torch.equal(packed.mask.view(9, -1), to_disk(words).view(torch.uint8).view(9, -1))


def test_nm_detects_pattern_and_mixed_n(rng):
    row_n = torch.tensor([2] * 64 + [4] * 64 + [1] * 10)
    w = random_nm(138, 100, row_n, 8, rng, underfill=0.0)
    packed = NMWeight.from_dense(w)
    assert packed.m == 8 and packed.n == 4 and packed.block_n.tolist() == [2, 4, 1]
    assert "p.nm_n" in packed.state_dict("p")
    assert torch.equal(packed.to_dense(), w)
    layout = packed.kernel_layout()
    assert layout.block_n.tolist() == [2, 4, 1]
    assert torch.equal(layout.to_dense(), w)
    uniform = NMWeight.from_dense(w, 4, 8)  # the same weight as plain 4:8
    assert uniform.block_n is None and torch.equal(uniform.to_dense(), w)


def test_nm_rejects_weights_that_do_not_fit(rng):
    w = random_nm(20, 64, 3, 8, rng, underfill=0.0)
    with pytest.raises(LosaError, match=r"not 2:8 sparse: row 0, group 0 \(columns 0-7\) keeps 3 where 2 may stay"):
        NMWeight.from_dense(w, 2, 8)
    with pytest.raises(LosaError, match="not N:M sparse"):
        NMWeight.from_dense(random_sparse(20, 64, 0.5, rng))
    tail = random_nm(4, 66, 2, 8, rng, underfill=0.0)
    tail[0, 64:] = 1.0  # the 2-wide tail group of 2:8 keeps at most ceil(2*2/8) = 1
    with pytest.raises(LosaError, match=r"row 0, its tail group \(the last 2 columns\) keeps 2 where 1 may stay"):
        NMWeight.from_dense(tail, 2, 8)
    with pytest.raises(LosaError, match="M <= 16"):
        NMWeight.from_dense(w, 2, 32)
    with pytest.raises(LosaError, match="0 <= N < M"):
        NMWeight.from_dense(w, 8, 8)


def test_nm_rejects_malformed_arrays(rng):
    packed = NMWeight.from_dense(random_nm(10, 40, 2, 4, rng), 2, 4)
    crowded = packed.mask.clone()
    crowded[3, 0] = 0x0F  # four positions in a 2:4 group
    with pytest.raises(LosaError, match="row 3 group 0 keeps more"):
        NMWeight(packed.shape, 2, 4, packed.values, crowded)
    with pytest.raises(LosaError, match="values must be"):
        NMWeight(packed.shape, 2, 4, packed.values[:, :-1], packed.mask)
    layout = packed.kernel_layout()
    with pytest.raises(LosaError, match="exactly its N"):
        NMKernelLayout(layout.shape, 4, layout.rows_per_block, layout.block_n, layout.values,
                       layout.mask & ~1)
    state = packed.state_dict("p")
    state["p.nm_pattern"] = torch.tensor([2, 4], dtype=torch.int64)
    with pytest.raises(LosaError, match="nm_pattern"):
        NMWeight.from_state_dict(state, "p")


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 40), cols=st.integers(1, 150), m=st.integers(2, 16), data=st.data(),
       seed=st.integers(0, 2**31))
def test_nm_round_trip_fuzz(rows, cols, m, data, seed):
    n = data.draw(st.integers(1, m - 1))
    gen = torch.Generator().manual_seed(seed)
    w = random_nm(rows, cols, n, m, gen, underfill=0.2)
    packed = NMWeight.from_dense(w, n, m, rows_per_block=data.draw(st.integers(1, 70)))
    assert torch.equal(packed.to_dense(), w)
    assert torch.equal(packed.kernel_layout().to_dense(), w)


def test_bitmask_concat_rows_stacks_parts(rng):
    """Fused q/k/v-like parts stacked into one weight: its dense form is the dense parts stacked."""
    cols = int(torch.randint(33, 300, (1,), generator=rng))
    dense = [random_sparse(int(torch.randint(1, 90, (1,), generator=rng)), cols, s, rng) for s in (0.3, 0.7, 0.99)]
    stacked = BitmaskWeight.concat_rows([BitmaskWeight.from_dense(d) for d in dense])
    assert torch.equal(stacked.to_dense(), torch.cat(dense))
    with pytest.raises(LosaError, match="same input width"):
        BitmaskWeight.concat_rows([BitmaskWeight.from_dense(dense[0]), BitmaskWeight.from_dense(dense[1][:, 1:])])


@pytest.mark.parametrize("rows_per_block", [4, 64])
def test_nm_kernel_layout_concat_rows(rng, rows_per_block):
    """N:M layouts with per-block N stack when every part but the last fills whole row blocks."""
    cols = 4 * int(torch.randint(9, 60, (1,), generator=rng)) + 3
    rows = [2 * rows_per_block, rows_per_block, rows_per_block + 3]
    ns = (2, 1, 3)
    dense = [random_nm(r, cols, n, 4, rng) for r, n in zip(rows, ns)]
    layouts = [NMWeight.from_dense(d, n, 4, rows_per_block=rows_per_block).kernel_layout() for d, n in zip(dense, ns)]
    stacked = NMKernelLayout.concat_rows(layouts)
    assert torch.equal(stacked.to_dense(), torch.cat(dense))
    with pytest.raises(LosaError, match="whole blocks"):
        NMKernelLayout.concat_rows([layouts[2], layouts[0]])


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 90), cols=st.integers(1, 140), m=st.integers(2, 16), data=st.data(),
       seed=st.integers(0, 2**31), dtype=st.sampled_from(DTYPES))
def test_nm_compiled_codec_equals_the_pytorch_reference(rows, cols, m, data, seed, dtype):
    """The compiled codec (checking, packing, unpacking, kernel layout) writes exactly the arrays the
    PyTorch reference writes, for any M, ragged widths, mixed N per row block and every value dtype."""
    from losa_deploy.kernels import has_extension
    from losa_deploy.kernels.formats import nm

    if not has_extension():
        pytest.skip("no compiled extension")
    gen = torch.Generator().manual_seed(seed)
    rows_per_block = data.draw(st.integers(1, 40))
    block_n = torch.randint(1, m, (-(-rows // rows_per_block),), generator=gen)
    row_n = block_n.repeat_interleave(rows_per_block)[:rows]
    w = random_nm(rows, cols, row_n, m, gen, underfill=0.3, dtype=dtype)
    packed = NMWeight.from_dense(w, m=m, rows_per_block=rows_per_block)  # compiled encode
    n = packed.n
    values, mask = nm._encode_torch(w, n, m, dtype)
    assert torch.equal(packed.values, values) and torch.equal(packed.mask, mask)
    assert torch.equal(packed.to_dense(), w) and torch.equal(packed._to_dense_torch(), w)
    layout = packed.kernel_layout()
    ref_values, ref_words = packed._kernel_arrays_torch()
    assert torch.equal(layout.values, ref_values) and torch.equal(layout.mask, ref_words)
    assert torch.equal(layout.to_dense(), w)
    # A stored zero inside a kept position (another writer may store one) unpacks as a zero there.
    if packed.values.count_nonzero():
        zeroed = packed.values.clone()
        zeroed.view(-1)[zeroed.view(-1).nonzero()[0]] = 0
        other = NMWeight(packed.shape, n, m, zeroed, packed.mask, packed.block_n, rows_per_block)
        assert torch.equal(other.to_dense(), other._to_dense_torch())
        assert all(torch.equal(a, b) for a, b in zip((other.kernel_layout().values, other.kernel_layout().mask),
                                                      other._kernel_arrays_torch()))


@pytest.mark.parametrize("device_check", ["compiled", "pytorch"])
def test_nm_checks_agree_on_corrupt_fields(rng, device_check, monkeypatch):
    """Both checkers refuse a field with a bit past its group's columns (in the tail) or more kept
    positions than N, and a kernel layout whose group is not filled to N."""
    from losa_deploy.kernels import has_extension
    from losa_deploy.kernels.formats import nm

    if device_check == "compiled" and not has_extension():
        pytest.skip("no compiled extension")
    if device_check == "pytorch":
        monkeypatch.setattr(nm, "_codec", lambda *tensors: None)
    packed = NMWeight.from_dense(random_nm(12, 38, 2, 8, rng), 2, 8)  # a 6-wide tail group
    outside = packed.mask.clone()
    outside[5, -1] |= 0x80  # column 39 of the tail: past the 38 columns
    with pytest.raises(LosaError, match="outside the columns"):
        NMWeight(packed.shape, 2, 8, packed.values, outside)
    crowded = packed.mask.clone()
    crowded[7, 2] = 0x07
    with pytest.raises(LosaError, match="row 7 group 2 keeps more"):
        NMWeight(packed.shape, 2, 8, packed.values, crowded)
    layout = packed.kernel_layout()
    words = layout.mask.clone()
    words[9, 1] ^= 1 << 3  # one more or one fewer position in a group of row 9
    with pytest.raises(LosaError, match="exactly its N"):
        NMKernelLayout(layout.shape, 8, layout.rows_per_block, layout.block_n, layout.values, words)


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.97, 1.0])
def test_bitmask_compiled_encode_equals_the_pytorch_path(rng, sparsity, monkeypatch):
    """BitmaskWeight.from_dense through the compiled encoder writes the arrays the PyTorch path writes,
    on ragged shapes, into each value dtype (a value that rounds to zero in fp16 stays stored)."""
    from losa_deploy.kernels import has_extension
    from losa_deploy.kernels.formats import bitmask

    if not has_extension():
        pytest.skip("no compiled extension")
    for source, stored in ((torch.float32, torch.float16), (torch.bfloat16, None), (torch.float32, None)):
        rows, cols = (int(v) for v in torch.randint(1, 120, (2,), generator=rng))
        w = random_sparse(rows, cols, sparsity, rng, source)
        w[0, 0] = 1e-30  # nonzero, kept, but zero once stored as fp16
        compiled = BitmaskWeight.from_dense(w, dtype=stored)
        with monkeypatch.context() as patch:
            patch.setattr(bitmask, "ops", lambda: None)
            reference = BitmaskWeight.from_dense(w, dtype=stored)
        for name in ("values", "mask", "row_ptr"):
            assert torch.equal(getattr(compiled, name), getattr(reference, name)), name
        assert compiled.values.dtype == (stored or source)


def test_nm_codec_ops_refuse_arrays_that_would_overrun_their_rows(rng):
    """Called directly (the format classes check first), the compiled ops refuse a row whose N exceeds the
    slot stride and a field keeping more than its N, before writing past the row (an ASan build found both
    writing into the next row's values)."""
    from losa_deploy.kernels import has_extension, ops

    if not has_extension():
        pytest.skip("no compiled extension")
    keep = torch.tensor([[1, 1, 1, 0, 1, 1, 1, 0], [1, 0, 0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    with pytest.raises(RuntimeError, match="row 0 has N = 3 outside"):
        ops().nm_canonical_encode(keep, torch.randn(2, 8, generator=rng), torch.tensor([3, 1]), 1, 4)
    with pytest.raises(RuntimeError, match="row 0 keeps more weights than its N allows"):
        ops().nm_canonical_to_kernel(torch.randn(1, 8, generator=rng), torch.full((1, 4), 0xFF, dtype=torch.uint8),
                                     torch.tensor([1]), 1, 4, 32)


@pytest.mark.parametrize("m", [4, 8, 16])
def test_nm_weights_with_no_rows_pack(m):
    """A weight with 0 rows packs (the byte-popcount group counts reshaped an empty tensor with -1)."""
    from losa_deploy.sparsity.patterns import nm_group_counts

    assert nm_group_counts(torch.zeros(0, 40, dtype=torch.bool), m).shape == (0, 40 // m)
    packed = NMWeight.from_dense(torch.zeros(0, 40), None, m)
    assert packed.values.shape[0] == 0 and packed.to_dense().shape == (0, 40)


def _count_bit_checks(monkeypatch, cls) -> list[int]:
    calls = [0]
    check = cls._check_bits

    def counted(self):
        calls[0] += 1
        return check(self)

    monkeypatch.setattr(cls, "_check_bits", counted)
    return calls


@pytest.mark.parametrize("kind", ["bitmask", "nm"])
def test_replace_checks_the_arrays_not_the_bits_again(rng, kind, monkeypatch):
    # replace() holds copies of arrays checked when the weight was built: it re-checks shapes and dtypes
    # only (the bit pass is what a load repeated for every move), and anything malformed is still refused.
    if kind == "bitmask":
        cls, weight = BitmaskWeight, random_sparse(37, 101, 0.6, rng)
        packed = BitmaskWeight.from_dense(weight)
    else:
        cls, weight = NMKernelLayout, random_nm(37, 101, 2, 4, rng)
        packed = NMWeight.from_dense(weight, 2, 4).kernel_layout()
    calls = _count_bit_checks(monkeypatch, cls)
    moved = packed.replace(values=packed.values.to(torch.bfloat16), mask=packed.mask.clone())
    assert calls[0] == 0
    assert moved.values.dtype == torch.bfloat16 and packed.values.dtype == torch.float32
    assert torch.equal(moved.to_dense(), weight.to(torch.bfloat16))
    with pytest.raises(LosaError, match="must keep its shape"):
        packed.replace(values=packed.values[:-1])
    with pytest.raises(LosaError, match="mask must be int32"):
        packed.replace(mask=packed.mask.to(torch.int64))
    with pytest.raises(LosaError, match="values must be 1-D"):
        packed.replace(values=packed.values.double())
    cls(**{f.name: getattr(packed, f.name) for f in dataclasses.fields(packed)})  # the constructor checks bits
    assert calls[0] == 1
