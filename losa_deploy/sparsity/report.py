"""What ``losa-deploy inspect`` reports: per-layer shape, sparsity and pattern, read tensor by tensor."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import torch

from ..errors import LosaError
from ..models.arch import architecture_for
from ..models.checkpoint import check_checkpoint, is_packed
from ..models.tensors import iter_model_tensors
from .patterns import detect_pattern, model_pattern
from .sidecar import read_sidecar, verify_module


def inspect_checkpoint(path: str | os.PathLike, trust_remote_code: bool = False) -> dict:
    """Per prunable linear: shape, sparsity, pattern; the global sparsity; the sidecar check.

    Raises :class:`LosaError` when the checkpoint carries a sidecar that disagrees with its weights.
    """
    path = Path(path)
    config = check_checkpoint(path, trust_remote_code, packed=True)
    arch = architecture_for(config["model_type"])
    key_re = arch.weight_key_pattern()
    sidecar = read_sidecar(path)
    layers, patterns, checked = [], {}, 0
    weights = _packed_weights(path, config) if is_packed(config) else _dense_weights(path, arch)
    for name, weight in weights:
        block = int(key_re.match(f"{name}.weight").group(1))
        pattern = detect_pattern(weight)
        patterns[name] = pattern
        layers.append({"name": name, "block": block, "shape": list(weight.shape), "dtype": str(weight.dtype),
                       "sparsity": pattern.sparsity, "nnz": pattern.nnz, "pattern": pattern.describe(),
                       "kind": pattern.kind, "n": pattern.n, "m": pattern.m})
        if sidecar is not None and name in sidecar["modules"]:
            verify_module(name, sidecar["modules"][name], weight)  # a packed one's unpacked zeros are its own
            checked += 1
    if not layers:  # a global sparsity of 0 / 0 weights means nothing
        raise LosaError(f"{path} holds no prunable linear weights of the {arch.name} layout "
                        f"(e.g. {arch.blocks_path}.0.{arch.linear_names[0]}.weight)")
    layers.sort(key=lambda r: (r["block"], arch.linear_names.index(r["name"].split(f".{r['block']}.", 1)[1])))
    nnz = sum(r["nnz"] for r in layers)
    numel = sum(p.numel for p in patterns.values())
    if sidecar is not None:
        missing = sorted(set(sidecar["modules"]) - set(patterns))
        if missing:
            raise LosaError(f"sidecar disagrees with the weights: no weight for module {missing[0]}")
    return {
        "model": str(path),
        "model_type": config["model_type"],
        "architecture": arch.name,
        "layers": layers,
        "linear_params": numel,
        "global_sparsity": 1.0 - nnz / max(numel, 1),
        "pattern": model_pattern(patterns),
        "sidecar": None if sidecar is None else {"verified_modules": checked, "pattern": sidecar.get("pattern")},
        "packed": is_packed(config),
    }


def _dense_weights(path: Path, arch) -> Iterator[tuple[str, torch.Tensor]]:
    """(module, weight) for every prunable linear of an unpacked checkpoint."""
    key_re = arch.weight_key_pattern()
    # Read, not mapped: each weight is checked and let go, and mapped pages would stay resident to the end.
    for key, weight in iter_model_tensors(path, arch, lambda k: key_re.match(k) is not None, mmap=False):
        yield key[: -len(".weight")], weight


def _packed_weights(path: Path, config: dict) -> Iterator[tuple[str, torch.Tensor]]:
    """(module, dense weight) for every packed module of a ``losa`` / ``vllm`` checkpoint,
    read as the serving paths read it (``iter_packed``, as ``load`` reads it). A module is unpacked as soon
    as its last tensor has streamed by, so only one module's tensors are held at a time."""
    from ..runtime.loader import packing_block
    from ..runtime.packed_tensors import iter_packed

    for name, packed in iter_packed(path, packing_block(config, path)["modules"], plain=False):
        yield name, packed.to_dense()
