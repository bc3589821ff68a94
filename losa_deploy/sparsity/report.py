"""What ``losa-deploy inspect`` reports: per-layer shape, sparsity and pattern, read tensor by tensor."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import LosaError
from ..models.arch import architecture_for
from ..models.checkpoint import check_checkpoint
from ..models.tensors import iter_model_tensors
from .patterns import detect_pattern, model_pattern
from .sidecar import read_sidecar, verify_module


def inspect_checkpoint(path: str | os.PathLike, trust_remote_code: bool = False) -> dict:
    """Per prunable linear: shape, sparsity, pattern; the global sparsity; the sidecar check.

    Raises :class:`LosaError` when the checkpoint carries a sidecar that disagrees with its weights.
    """
    path = Path(path)
    config = check_checkpoint(path, trust_remote_code)
    arch = architecture_for(config["model_type"])
    key_re = arch.weight_key_pattern()
    sidecar = read_sidecar(path)
    layers, patterns, checked = [], {}, 0
    for key, weight in iter_model_tensors(path, arch, lambda k: key_re.match(k) is not None):
        name = key[: -len(".weight")]
        block = int(key_re.match(key).group(1))
        pattern = detect_pattern(weight)
        patterns[name] = pattern
        layers.append({"name": name, "block": block, "shape": list(weight.shape), "dtype": str(weight.dtype),
                       "sparsity": pattern.sparsity, "nnz": pattern.nnz, "pattern": pattern.describe(),
                       "kind": pattern.kind, "n": pattern.n, "m": pattern.m})
        if sidecar is not None and name in sidecar["modules"]:
            verify_module(name, sidecar["modules"][name], weight)
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
    }
