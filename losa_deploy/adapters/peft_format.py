"""Adapters in PEFT's on-disk format, with the per-module ranks PEFT needs to load them.

``adapter_config.json`` is a PEFT ``LoraConfig``: ``r`` is the most common rank and ``rank_pattern``
lists every module whose rank differs, ``alpha_pattern`` keeps PEFT's scale (alpha / r) equal to ours
(fixed ``s``) at every rank. Tensors go to ``adapter_model.safetensors`` under PEFT's key names. The
checkpoint loads in stock PEFT (``PeftModel.from_pretrained``) and with :func:`load_peft_adapter`.

An adapter only makes sense on the exact base it was trained on (the pruned weights, not the dense
model and not the merged result). ``losa_adapter.json`` keeps a SHA-256 of every adapted base weight,
and :func:`load_peft_adapter` refuses a base whose weights differ.

A *masked* adapter computes (B·A)⊙M, which stock PEFT cannot express: PEFT would apply it unmasked (a
different function, and merging it there would densify W). ``losa_adapter.json`` records the masking;
:func:`load_peft_adapter` honours it, taking M from the zero pattern of the (pruned) base it attaches to.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .._version import __version__
from ..errors import LosaError
from ..models.arch import get_architecture
from ..models.checkpoint import check_safetensors
from ..utils.fs import atomic_dir
from .config import AdapterConfig
from .model import adapter_state_dict, adapters_of, inject_adapters, load_adapter_state_dict

PEFT_PREFIX = "base_model.model."
SIDE = "losa_adapter.json"


def save_peft_adapter(model, out: str | os.PathLike, base_model: str, overwrite: bool = False) -> Path:
    layers = adapters_of(model)
    if not layers:
        raise LosaError("the model has no adapters to save")
    first = next(iter(layers.values()))
    ranks = {name: layer.rank for name, layer in layers.items()}
    default_r = Counter(ranks.values()).most_common(1)[0][0]
    arch = get_architecture(model)
    targets = sorted({arch.locate(name)[1] for name in layers})
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": default_r,
        "lora_alpha": first.scale * default_r,
        "lora_dropout": first.dropout,
        "bias": "none",
        "target_modules": [t.rsplit(".", 1)[-1] for t in targets],
        "rank_pattern": {n: r for n, r in ranks.items() if r != default_r},
        "alpha_pattern": {n: first.scale * r for n, r in ranks.items() if r != default_r},
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "use_rslora": False,
        "inference_mode": True,
    }
    side = {"producer": f"losa-deploy {__version__}", "masked": first.masked, "scale": first.scale,
            "max_rank": first.max_rank, "ranks": ranks,
            "mask": "the zero pattern of the base weights" if first.masked else None,
            "base_sha256": {name: weight_sha256(layer.weight) for name, layer in layers.items()}}
    tensors = {}
    for key, t in adapter_state_dict(model).items():
        module, which = key.rsplit(".", 1)
        tensors[f"{PEFT_PREFIX}{module}.{which}.weight"] = t
    with atomic_dir(out, overwrite=overwrite) as tmp:
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
        (tmp / SIDE).write_text(json.dumps(side, indent=2) + "\n")
        save_file(tensors, tmp / "adapter_model.safetensors", metadata={"format": "pt"})
    return Path(out)


def load_peft_adapter(model, path: str | os.PathLike) -> dict:
    """Attach the adapter saved at ``path`` to ``model`` (whose prunable linears are plain nn.Linear)."""
    path = Path(path)
    try:
        config = json.loads((path / "adapter_config.json").read_text())
        side = json.loads((path / SIDE).read_text()) if (path / SIDE).is_file() else {}
        check_safetensors(path / "adapter_model.safetensors")
        tensors = load_file(path / "adapter_model.safetensors")
    except (OSError, json.JSONDecodeError) as exc:
        raise LosaError(f"cannot read the adapter in {path}: {exc}") from None
    state = {}
    for key, t in tensors.items():
        if not key.startswith(PEFT_PREFIX) or not key.endswith(".weight"):
            raise LosaError(f"unexpected tensor {key} in {path}")
        state[key[len(PEFT_PREFIX): -len(".weight")]] = t
    ranks = {k.rsplit(".", 1)[0]: t.shape[0] for k, t in state.items() if k.endswith("lora_A")}
    arch = get_architecture(model)
    known = set(arch.linears(model))
    foreign = sorted(set(ranks) - known)
    if foreign:
        raise LosaError(f"adapter in {path} does not match this base model: no module {foreign[0]}")
    _check_base(model, side.get("base_sha256", {}), path)
    scales = _peft_scales(config, ranks) if "scale" not in side else dict.fromkeys(ranks, side["scale"])
    # Our layers share one scale s; a module of another scale carries the ratio in B (s·B·A is unchanged).
    scale = Counter(scales.values()).most_common(1)[0][0]
    for name, module_scale in scales.items():
        if module_scale != scale:
            state[f"{name}.lora_B"] = state[f"{name}.lora_B"] * (module_scale / scale)
    targets = tuple(sorted({arch.locate(n)[1] for n in ranks}))
    cfg = AdapterConfig(rank=1, max_rank=max(side.get("max_rank", 0), *ranks.values()), alpha=scale,
                        scale_rank=1, dropout=0.0, masked=bool(side.get("masked", False)), targets=targets)
    inject_adapters(model, cfg, ranks=ranks)
    with torch.no_grad():
        load_adapter_state_dict(model, state)
    return {"ranks": ranks, "masked": cfg.masked, "scale": scale if len(set(scales.values())) == 1 else scales}


def _peft_scales(config: dict, ranks: dict[str, int]) -> dict[str, float]:
    """Each module's scale as stock PEFT computes it: its alpha (``alpha_pattern`` or ``lora_alpha``) over
    its rank, or over the rank's square root with ``use_rslora``."""
    alpha_pattern = config.get("alpha_pattern") or {}
    scales = {}
    for name, rank in ranks.items():
        # PEFT's rule: a pattern key matches a module whose name ends in it, at a dot.
        key = next((k for k in alpha_pattern if re.match(rf"(.*\.)?({k})$", name)), None)
        alpha = alpha_pattern[key] if key is not None else config["lora_alpha"]
        scales[name] = alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)
    return scales


def weight_sha256(weight: torch.Tensor) -> str:
    """SHA-256 of a weight's values in float32 (so a bf16 checkpoint loaded as fp32 hashes the same)."""
    data = weight.detach().float().cpu().contiguous().numpy().tobytes()
    return hashlib.sha256(data).hexdigest()


def _check_base(model, expected: dict[str, str], path: Path) -> None:
    modules = dict(model.named_modules())
    for name, digest in expected.items():
        module = modules.get(name)
        if module is None or weight_sha256(module.weight) != digest:
            raise LosaError(f"adapter in {path} was trained on a different base: the weights of {name} differ "
                            "(an adapter attaches to the exact pruned base it was trained on, not to a merged "
                            "or differently pruned model)")
