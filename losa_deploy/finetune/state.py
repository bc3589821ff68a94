"""Checkpoints at every phase boundary, so a killed fine-tune resumes to the same final weights.

A checkpoint holds what a phase changes: the pruned base weights of the adapted linears, their masks
(bitmask words), the adapter factors (their shapes carry the ranks) and the run's history. Every phase
seeds its own randomness from (seed, phase), so nothing else is needed to continue exactly. The
checkpoint directory is replaced atomically; the run's arguments are fingerprinted so ``--resume`` only
continues the same run.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..adapters.model import adapter_state_dict, adapters_of, load_adapter_state_dict
from ..errors import LosaError
from ..kernels.formats import bitmask
from ..utils.fs import atomic_dir

STATE = "state.json"


def fingerprint(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def save_checkpoint(path: str | os.PathLike, model, phase: int, settings: dict, history: list[dict],
                    extra: dict | None = None) -> None:
    layers = adapters_of(model)
    base = {f"{n}.weight": m.weight.detach().contiguous() for n, m in layers.items()}
    masks = {f"{n}.mask": bitmask.to_disk(m.mask_words.cpu()) for n, m in layers.items() if m.masked}
    with atomic_dir(path, overwrite=True) as tmp:
        save_file(base, tmp / "base.safetensors")
        save_file(adapter_state_dict(model), tmp / "adapter.safetensors")
        if masks:
            save_file(masks, tmp / "masks.safetensors")
        state = {"phase": phase, "fingerprint": fingerprint(settings), "settings": settings, "history": history,
                 "extra": extra or {}}
        (tmp / STATE).write_text(json.dumps(state, indent=2, default=str) + "\n")


def read_checkpoint(path: str | os.PathLike, settings: dict) -> dict | None:
    """The saved state if ``path`` holds a checkpoint of this very run; None if there is none."""
    path = Path(path)
    if not (path / STATE).is_file():
        return None
    state = json.loads((path / STATE).read_text())
    if state["fingerprint"] != fingerprint(settings):
        raise LosaError(f"checkpoint {path} belongs to a run with different settings; remove it or drop --resume")
    return state


def restore_checkpoint(path: str | os.PathLike, model) -> None:
    """Load base weights, masks and adapter factors into a model whose adapters are already injected."""
    path = Path(path)
    base = load_file(path / "base.safetensors")
    masks = load_file(path / "masks.safetensors") if (path / "masks.safetensors").is_file() else {}
    with torch.no_grad():
        for name, layer in adapters_of(model).items():
            layer.weight.data = base[f"{name}.weight"].to(layer.weight.dtype)
            if layer.masked:
                layer.mask_words = bitmask.from_disk(masks[f"{name}.mask"]).to(layer.weight.device)
        load_adapter_state_dict(model, load_file(path / "adapter.safetensors"))


def remove_checkpoint(path: str | os.PathLike) -> None:
    shutil.rmtree(path, ignore_errors=True)
