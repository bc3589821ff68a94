"""The ``losa_sparsity.json`` sidecar: per-layer sparsity and pattern, saved beside the weights.

Format (engines-and-formats.md §4.1): ``format``, ``format_version``, ``producer``, ``base_model``,
``pattern``, ``global_sparsity``, ``modules`` (per linear: ``shape``, ``sparsity``, ``nnz``, ``nm``,
``pattern``, ``mask_sha256``), ``method``, ``checks``. ``mask_sha256`` hashes the packed little-endian
bitmask of ``W != 0``. A sidecar that disagrees with the weights is an error, not a warning.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path

import torch

from .._version import __version__
from ..errors import LosaError
from ..kernels.formats.bitmask import BitmaskWeight, mask_sha256, words_sha256
from ..utils.fs import write_json
from .patterns import LayerPattern, detect_pattern, model_pattern

SIDECAR = "losa_sparsity.json"
FORMAT = "losa-sparsity"
FORMAT_VERSION = 1


def module_entry(weight: torch.Tensor, pattern: LayerPattern | None = None) -> dict:
    pattern = pattern or detect_pattern(weight)
    return {
        "shape": list(weight.shape),
        "sparsity": round(pattern.sparsity, 6),
        "nnz": pattern.nnz,
        "pattern": pattern.kind,
        "nm": {"n": pattern.n, "m": pattern.m} if pattern.kind in ("nm", "mixed_nm") else None,
        "mask_sha256": mask_sha256(weight),
    }


class SidecarBuilder:
    """Builds the sidecar one weight at a time, so a streaming writer never holds the whole model."""

    def __init__(self):
        self.modules: dict[str, dict] = {}
        self.patterns: dict[str, LayerPattern] = {}

    def add(self, name: str, weight: torch.Tensor) -> LayerPattern:
        self.patterns[name] = detect_pattern(weight)
        self.modules[name] = module_entry(weight, self.patterns[name])
        return self.patterns[name]

    def build(self, base_model: dict | None = None, method: dict | None = None) -> dict:
        nnz = sum(p.nnz for p in self.patterns.values())
        numel = sum(p.numel for p in self.patterns.values())
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "producer": f"losa-deploy {__version__}",
            "base_model": base_model or {},
            "pattern": model_pattern(self.patterns),
            "global_sparsity": round(1.0 - nnz / max(numel, 1), 6),
            "modules": dict(self.modules),
            "method": method or {},
            "checks": {"negative_zeros": 0},
        }


def base_model_record(path: str | os.PathLike) -> dict:
    """The sidecar's ``base_model``: the checkpoint it came from and a hash of its config."""
    path = Path(path)
    return {"name_or_path": str(path),
            "config_sha256": hashlib.sha256((path / "config.json").read_bytes()).hexdigest()}


def negative_zeros(weights: Iterable[torch.Tensor]) -> int:
    """How many entries are -0.0 (a merge or prune must write +0.0 only)."""
    return sum(int((w.signbit() & (w == 0)).sum()) for w in weights)


def build_sidecar(weights: Iterable[tuple[str, torch.Tensor]], base_model: dict | None = None,
                  method: dict | None = None) -> dict:
    """Describe the named prunable weights (module name -> ``[out, in]`` weight)."""
    builder = SidecarBuilder()
    for name, weight in weights:
        builder.add(name, weight)
    return builder.build(base_model, method)


def write_sidecar(directory: str | os.PathLike, sidecar: dict) -> Path:
    path = Path(directory) / SIDECAR
    write_json(path, sidecar)
    return path


def read_sidecar(directory: str | os.PathLike) -> dict | None:
    """The sidecar of a checkpoint directory, or None if it has none."""
    path = Path(directory) / SIDECAR
    if not path.is_file():
        return None
    try:
        sidecar = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise LosaError(f"{path} is not valid JSON ({exc.msg})") from None
    if not isinstance(sidecar, dict) or sidecar.get("format") != FORMAT or sidecar.get("format_version") != FORMAT_VERSION:
        raise LosaError(f"{path} is not a {FORMAT} v{FORMAT_VERSION} sidecar")
    if not isinstance(sidecar.get("modules"), dict) or not all(isinstance(e, dict) for e in sidecar["modules"].values()):
        raise LosaError(f"{path}: 'modules' must map each module name to its entry")
    return sidecar


def verify_module(name: str, entry: dict, weight: torch.Tensor) -> None:
    """Raise if the sidecar entry for ``name`` does not describe ``weight``."""
    _check_entry(name, entry, weight.shape, lambda: mask_sha256(weight))


def verify_packed(name: str, entry: dict, packed) -> None:
    """:func:`verify_module` for a packed weight (a ``kernels.formats`` layout)."""
    _check_entry(name, entry, packed.shape, lambda: packed_mask_sha256(packed))


def packed_mask_sha256(packed) -> str:
    """The ``mask_sha256`` of a packed weight's zero pattern. A bitmask with no stored zero is hashed as it
    is (its mask words are the hashed bitmask); other layouts are unpacked first."""
    exact_words = isinstance(packed, BitmaskWeight) and int(packed.values.count_nonzero()) == packed.values.numel()
    return words_sha256(packed.mask) if exact_words else mask_sha256(packed.to_dense())


def _check_entry(name: str, entry: dict, shape, digest) -> None:
    if list(shape) != entry.get("shape"):
        raise LosaError(f"sidecar disagrees with the weights: {name} has shape {list(shape)}, "
                        f"sidecar says {entry.get('shape')}")
    if digest() != entry.get("mask_sha256"):
        raise LosaError(f"sidecar disagrees with the weights: the zero pattern of {name} does not match "
                        "its mask_sha256")


def verify_sidecar(sidecar: dict, weights: dict[str, torch.Tensor]) -> None:
    """Check every module of the sidecar against the weights (module name -> weight)."""
    missing = sorted(set(sidecar["modules"]) - set(weights))
    if missing:
        raise LosaError(f"sidecar disagrees with the weights: no weight for module {missing[0]}")
    for name, entry in sidecar["modules"].items():
        verify_module(name, entry, weights[name])
