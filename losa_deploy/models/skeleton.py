"""The model a config describes, built without its weights (parameters on the meta device, buffers real:
RoPE tables are computed, not stored), and the weights it needs.

``ld.load`` and the ONNX export fill such a skeleton tensor by tensor (``assign_weight``); ``pack`` compares what a checkpoint
stores with what the skeleton needs before it writes anything.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..errors import LosaError


def empty_model(config, trust_remote_code: bool = False, dtype: torch.dtype | None = None) -> nn.Module:
    """The causal LM of a transformers ``config``, its parameters on the meta device."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    extra = {} if dtype is None else {"dtype": dtype}
    try:
        with init_empty_weights(include_buffers=False):
            return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code, **extra)
    except (ValueError, KeyError, TypeError, AttributeError, ImportError) as exc:
        raise LosaError(f"cannot build the {config.model_type} model from its config: {exc}") from None


def assign_weight(model: nn.Module, path: str | Path, key: str, tensor: torch.Tensor) -> None:
    """Put one stored tensor of the checkpoint at ``path`` into the empty ``model`` (refusing one it has no
    place or no room for)."""
    model_type = model.config.model_type
    try:
        unexpected = model.load_state_dict({key: tensor}, strict=False, assign=True).unexpected_keys
    except RuntimeError as exc:  # torch's "size mismatch for KEY: ..." report
        raise LosaError(f"{path} is corrupt: {key} has shape {tuple(tensor.shape)}, which does not fit the "
                        f"{model_type} model ({str(exc).splitlines()[-1].strip()})") from None
    if unexpected:
        raise LosaError(f"{path} holds a tensor the {model_type} model does not have: {key}")


def required_weights(model: nn.Module) -> tuple[dict[str, tuple[int, ...]], list[set[str]]]:
    """(name -> shape of every weight the model loads, the groups of names tied to one weight: storing any
    one of a group will do)."""
    model.tie_weights()
    shapes = {name: tuple(t.shape) for name, t in model.state_dict(keep_vars=True).items()}
    names_of: dict[int, set[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(param), set()).add(name)
    return shapes, [names for names in names_of.values() if len(names) > 1]


def check_stored_weights(path: str | Path, stored: dict[str, tuple[int, ...]], trust_remote_code: bool = False) -> None:
    """Refuse a checkpoint that lacks a weight its model needs, or stores one in another shape. ``stored``:
    its tensors' shapes (``checkpoint.stored_shapes``, from the headers: nothing is loaded). A loader would
    initialise a missing weight at random."""
    from transformers import AutoConfig

    path = Path(path)
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
    except (ValueError, KeyError, OSError) as exc:
        raise LosaError(f"{path}: cannot read the model config ({exc})") from None
    needed, tied = required_weights(empty_model(config, trust_remote_code))
    alternatives = {name: group for group in tied for name in group}
    missing = sorted(k for k in needed if k not in stored and not alternatives.get(k, set()) & stored.keys())
    if missing:
        raise LosaError(f"{path} is missing {len(missing)} weight(s) of the model, e.g. {missing[0]}")
    for key, shape in stored.items():
        if key in needed and shape != needed[key]:
            raise LosaError(f"{path}: {key} has shape {shape}, the {config.model_type} model's is {needed[key]}")
