"""``sparsify_(model)``: swap ``SparseLinear`` in for every ``nn.Linear`` whose sparsity pays off.

Like torchao's ``quantize_``, it works in place on any module tree, so a Hugging Face model keeps running
through ``forward`` and ``generate`` unchanged. A linear is swapped when its weight is at least
``min_sparsity`` zeros (the packed bytes are ``2d + 1/8`` per weight for 16-bit values, so moderate
sparsity already moves fewer bytes than the dense weight), it passes ``filter_fn``, and its weight is not
shared with another module (tied embeddings stay dense).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import LosaError
from ..kernels.dispatch import check_backend
from ..sparsity.patterns import sparsity
from .sparse_linear import FORMATS, SparseLinear

logger = logging.getLogger("losa_deploy")

DEFAULT_MIN_SPARSITY = 0.3


def _shared_weights(model: nn.Module) -> set[int]:
    """ids of parameters reachable under more than one name (tied weights)."""
    seen: dict[int, int] = {}
    for _, param in model.named_parameters(remove_duplicate=False):
        seen[id(param)] = seen.get(id(param), 0) + 1
    return {pid for pid, count in seen.items() if count > 1}


def sparsify_(model: nn.Module, min_sparsity: float = DEFAULT_MIN_SPARSITY, format: str = "auto",
              dtype: torch.dtype | None = None, filter_fn: Callable[[nn.Linear, str], bool] | None = None,
              backend: str | None = None, progress: bool = True) -> nn.Module:
    """Replace, in place, each sparse enough ``nn.Linear`` of ``model`` by a :class:`SparseLinear`.

    ``format``: ``auto`` (N:M when the weight follows an N:M pattern with M in 4, 8, 16, else bitmask),
    ``bitmask`` or ``nm``. ``dtype``: the packed values' dtype (default: each weight's own, so the model's
    outputs do not change). ``filter_fn(module, name)`` can exclude modules. Returns ``model``.
    """
    if not 0.0 <= min_sparsity <= 1.0:
        raise LosaError(f"min_sparsity must be in [0, 1], got {min_sparsity}")
    if format not in FORMATS:
        raise LosaError(f"unknown sparse format {format!r} (choose from {', '.join(FORMATS)})")
    if type(model) is nn.Linear:  # it has no parent to swap it in: say how, rather than corrupt it
        raise LosaError("sparsify_ swaps the linears inside a model; for a bare nn.Linear use "
                        "SparseLinear.from_linear(linear)")
    check_backend(backend)
    shared = _shared_weights(model)
    candidates = [(name, module) for name, module in model.named_modules()
                  if type(module) is nn.Linear and (filter_fn is None or filter_fn(module, name))]
    # Pack every linear first and swap only when all have packed: a weight that does not fit the asked
    # format (format="nm" on an unstructured one) must not leave the model half converted.
    packed = {}
    for name, linear in tqdm(candidates, desc="sparsify", disable=not progress, leave=False):
        if id(linear.weight) in shared or sparsity(linear.weight) < min_sparsity:
            continue
        try:
            packed[name] = SparseLinear.from_linear(linear, format=format, dtype=dtype, backend=backend)
        except LosaError as exc:
            raise LosaError(f"{name}: {exc}") from None
    for name, sparse in packed.items():
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, sparse)
    _record_packing(model, packed)
    logger.info("sparsify_: %d of %d linears now sparse", len(packed), len(candidates))
    return model


def _record_packing(model: nn.Module, packed: dict[str, SparseLinear]) -> None:
    """Name the packed modules in a transformers model's config, as ``ld.load`` does: ``save_pretrained``
    then writes a checkpoint that says its linears are packed (without the block, every loader would
    find those weights missing and initialise them at random)."""
    from ..export.losa import CONFIG_KEY, FORMAT, FORMAT_VERSION

    config = getattr(model, "config", None)
    if not packed or config is None or not hasattr(config, "to_dict"):
        return
    block = getattr(config, CONFIG_KEY, None) or {"format": FORMAT, "format_version": FORMAT_VERSION, "modules": {}}
    modules = {**block["modules"], **{name: "bitmask" if m.format == "bitmask" else "nm" for name, m in packed.items()}}
    setattr(config, CONFIG_KEY, {**block, "modules": dict(sorted(modules.items()))})


__all__ = ["DEFAULT_MIN_SPARSITY", "sparsify_"]
