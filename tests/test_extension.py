"""The compiled extension: it loads, its mask ops match the pure-PyTorch reference, and the package
falls back cleanly when it is disabled."""

import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from losa_deploy.kernels import has_extension, ops
from losa_deploy.kernels.formats import bitmask

pytestmark = pytest.mark.skipif(not has_extension(), reason="compiled extension not built")


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 40), cols=st.integers(1, 200), density=st.floats(0.0, 1.0), seed=st.integers(0, 2**31))
def test_pack_unpack_match_reference(rows, cols, density, seed):
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(rows, cols, generator=gen) < density
    words = ops().pack_mask(mask)
    assert words.dtype == torch.int32 and words.shape == (rows, (cols + 31) // 32)
    assert torch.equal(words, bitmask.pack_mask_reference(mask))
    assert torch.equal(ops().unpack_mask(words, cols), mask)
    assert torch.equal(bitmask.unpack_mask_reference(words, cols), mask)


def test_bit_order_is_little_endian_per_word():
    mask = torch.zeros(2, 40, dtype=torch.bool)
    mask[0, 0] = True  # bit 0 of word 0
    mask[0, 31] = True  # bit 31 of word 0 (the sign bit of the int32 carrier)
    mask[1, 33] = True  # bit 1 of word 1
    words = bitmask.pack_mask(mask)
    on_disk = bitmask.to_disk(words)
    assert on_disk.dtype == torch.uint32
    assert words[0, 0].item() & 0xFFFFFFFF == 0x80000001
    assert words[1, 1].item() == 2 and words[1, 0].item() == 0 and words[0, 1].item() == 0
    assert on_disk.numpy().tobytes()[:4] == bytes([0x01, 0x00, 0x00, 0x80])


def test_ops_reject_bad_input():
    with pytest.raises(RuntimeError, match="2-D"):
        ops().pack_mask(torch.ones(3, dtype=torch.bool))
    with pytest.raises(RuntimeError, match="bool"):
        ops().pack_mask(torch.ones(3, 4))
    with pytest.raises(RuntimeError, match="cannot hold"):
        ops().unpack_mask(torch.zeros(2, 1, dtype=torch.int32), 40)


def test_package_works_and_says_so_once_without_extension(tmp_path):
    code = (
        "import logging, torch\n"
        "logging.basicConfig()\n"
        "from losa_deploy.kernels import has_extension\n"
        "from losa_deploy.kernels.formats import bitmask\n"
        "assert not has_extension() and not has_extension()\n"
        "m = torch.rand(3, 70) > 0.5\n"
        "assert torch.equal(bitmask.unpack_mask(bitmask.pack_mask(m), 70), m)\n"
    )
    env = {"LOSA_DISABLE_EXT": "1", "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("compiled kernels unavailable") == 1


def test_error_messages_carry_their_numbers_dtypes_and_shapes():
    """LOSA_CHECK (csrc/check.h) formats every part itself: integers, dtypes by name, shapes as [a, b]."""
    values, mask = torch.zeros(4, dtype=torch.bfloat16), torch.zeros(3, 2, dtype=torch.int32)
    with pytest.raises(RuntimeError, match=r"^bitmask_linear: row_ptr has 2 entries, 3 rows need 4"):
        torch.ops.losa.bitmask_linear(torch.zeros(1, 64, dtype=torch.bfloat16), values, mask,
                                      torch.zeros(2, dtype=torch.long), 64, None, "auto", 0)
    q = torch.zeros(1, 2, 3, 4)
    with pytest.raises(RuntimeError, match=r"float32 only, got Double"):
        ops().causal_attention(q.double(), q.double(), q.double(), 1.0)
    with pytest.raises(RuntimeError, match=r"key \[1, 2, 5, 4\] does not match query \[1, 2, 3, 4\]"):
        ops().causal_attention(q, torch.zeros(1, 2, 5, 4), torch.zeros(1, 2, 5, 4), 1.0)


def test_sources_check_input_only_through_losa_check():
    """A bare TORCH_CHECK streaming a number crashed the process on a CUDA torch build (RESULTS.md, issue
    #7): every check in csrc/ goes through LOSA_CHECK, which formats its message without an ostream."""
    from pathlib import Path

    csrc = Path(__file__).resolve().parents[1] / "csrc"
    offenders = [f"{path.relative_to(csrc)}:{n}" for path in sorted(csrc.rglob("*"))
                 if path.suffix in {".cpp", ".cu", ".h", ".cuh"} and path.name != "check.h"
                 for n, line in enumerate(path.read_text().splitlines(), 1) if "TORCH_CHECK(" in line]
    assert not offenders, offenders
