"""Attach adapters to a model, collect their parameters, and merge them back (PEFT's "model" layer).

Adapters go on the prunable linears of every decoder block, as the architecture adapter names them.
``merge_adapters`` replaces each ``LoraLinear`` with a plain ``nn.Linear`` and, for masked adapters,
checks that the zero pattern is exactly the mask's (non-zeros never grow).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from ..errors import LosaError
from ..models.arch import get_architecture
from .config import AdapterConfig
from .layer import LoraLinear


def inject_adapters(model: nn.Module, config: AdapterConfig, ranks: dict[str, int] | None = None,
                    seed: int = 0) -> dict[str, LoraLinear]:
    """Replace the target linears with ``LoraLinear`` (all base parameters frozen); returns them by name.

    ``ranks`` maps module names to initial ranks (default ``config.rank`` everywhere). A and B are seeded
    per module so injection is deterministic.
    """
    arch = get_architecture(model)
    targets = config.targets or arch.linear_names
    unknown = set(targets) - set(arch.linear_names)
    if unknown:
        raise LosaError(f"unknown adapter target(s) {sorted(unknown)} for {arch.name} (choose from "
                        f"{', '.join(arch.linear_names)})")
    for p in model.parameters():
        p.requires_grad_(False)
    adapters = {}
    gen = torch.Generator().manual_seed(seed)
    for i, block in enumerate(arch.block_list(model)):
        for name in targets:
            full = f"{arch.blocks_path}.{i}.{name}"
            base = block.get_submodule(name)
            if not isinstance(base, nn.Linear):
                raise LosaError(f"{full} is {type(base).__name__}, not nn.Linear (adapters already attached?)")
            layer = LoraLinear(base, (ranks or {}).get(full, config.rank), config.scale, config.max_rank,
                               config.dropout, config.masked, config.init, generator=gen)
            _replace(block, name, layer)
            adapters[full] = layer
    return adapters


def adapters_of(model: nn.Module) -> dict[str, LoraLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLinear)}


def adapter_parameters(model: nn.Module) -> Iterator[nn.Parameter]:
    for layer in adapters_of(model).values():
        yield layer.lora_A
        yield layer.lora_B


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{module}.lora_A`` / ``{module}.lora_B`` in float32 (PEFT's tensor orientation)."""
    out = {}
    for name, layer in adapters_of(model).items():
        out[f"{name}.lora_A"] = layer.lora_A.detach().float().contiguous()
        out[f"{name}.lora_B"] = layer.lora_B.detach().float().contiguous()
    return out


def load_adapter_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Install factors (ranks follow the tensors' shapes)."""
    for name, layer in adapters_of(model).items():
        try:
            A, B = state[f"{name}.lora_A"], state[f"{name}.lora_B"]
        except KeyError:
            raise LosaError(f"adapter state has no factors for {name}") from None
        if A.shape[1] != layer.in_features or B.shape[0] != layer.out_features or A.shape[0] != B.shape[1]:
            raise LosaError(f"adapter for {name} has shapes A{tuple(A.shape)} B{tuple(B.shape)}, which do not "
                            f"fit a {layer.out_features}x{layer.in_features} base (different base model?)")
        if A.shape[0] > layer.max_rank:
            raise LosaError(f"adapter for {name} has rank {A.shape[0]} above max_rank {layer.max_rank}")
        layer.lora_A = nn.Parameter(A.to(layer.weight.device, torch.float32, copy=True))
        layer.lora_B = nn.Parameter(B.to(layer.weight.device, torch.float32, copy=True))


def merge_adapters(model: nn.Module, dtype: torch.dtype | None = None) -> dict:
    """Fold every adapter into its base weight (fp32 math, one cast to ``dtype``, default the base's own);
    returns merge statistics.

    For masked adapters the merged zero pattern must lie inside the mask, and the number of non-zeros
    must not grow (it can shrink only by exact cancellations, which are counted).
    """
    stats = {"modules": 0, "masked": 0, "nnz_before": 0, "nnz_after": 0, "cancelled": 0}
    for name, layer in list(adapters_of(model).items()):
        linear = layer.to_linear(dtype)
        if not bool(torch.isfinite(linear.weight).all()):
            raise LosaError(f"merging {name} overflows {linear.weight.dtype} (the base's stored dtype); merge into "
                            "an fp32 copy of the base (exact, so the adapter still recognises it)")
        if layer.masked:  # a value that underflows in the cast counts as a cancellation too
            nz = linear.weight != 0
            if bool((nz & ~layer.mask).any()):
                raise LosaError(f"merge of {name} produced non-zeros outside the mask")
            stats["masked"] += 1
            stats["nnz_before"] += int(layer.mask.sum())
            stats["nnz_after"] += int(nz.sum())
            stats["cancelled"] += int((layer.mask & ~nz).sum())
        parent, _, child = name.rpartition(".")
        _replace(model.get_submodule(parent), child, linear)
        stats["modules"] += 1
    return stats


def unload_adapters(model: nn.Module) -> None:
    """Put the plain base linears back (the adapters are dropped; save them first)."""
    for name, layer in list(adapters_of(model).items()):
        linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                           dtype=layer.weight.dtype, device=layer.weight.device)
        linear.weight.data = layer.weight.detach()
        if layer.bias is not None:
            linear.bias.data = layer.bias.detach()
        parent, _, child = name.rpartition(".")
        _replace(model.get_submodule(parent), child, linear)


def _replace(parent: nn.Module, dotted: str, module: nn.Module) -> None:
    owner, _, leaf = dotted.rpartition(".")
    setattr(parent.get_submodule(owner) if owner else parent, leaf, module)
