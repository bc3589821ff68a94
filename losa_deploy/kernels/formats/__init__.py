"""Packed weight formats, each described once (byte layout, pack, unpack).

Kernels, exporters and the vLLM plugin import these descriptions; nobody re-derives a layout.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ...errors import LosaError


def read_packed(fmt: str, state: Mapping[str, torch.Tensor], prefix: str = ""):
    """The packed weight (``"bitmask"`` or ``"nm"``) stored under ``prefix`` in ``state``, as the serving
    paths (``losa_deploy.load``, the vLLM plugin) read it: structure checked by the format, and values
    finite, since a NaN there would only surface as NaN logits (``pack`` refuses them; a file changed
    since has not been through ``pack``)."""
    from .bitmask import BitmaskWeight
    from .nm import NMWeight

    readers = {"bitmask": BitmaskWeight.from_state_dict, "nm": NMWeight.from_state_dict}
    if fmt not in readers:
        raise LosaError(f"unknown packed format {fmt!r} (choose from {', '.join(readers)})")
    packed = readers[fmt](state, prefix)
    if packed.values.is_floating_point() and not bool(torch.isfinite(packed.values).all()):
        raise LosaError(f"{prefix or 'the packed weight'} holds NaN or Inf values")
    return packed
