"""Any checkpoint on our runtime, and a one-line account of what it runs on.

A packed checkpoint (``pack --format losa|vllm``) opens with :func:`losa_deploy.load`. Any other model
(a pruned HF folder, a GGUF file, the embedded default) opens with ``load_model`` and is given the same
runtime: its sparse linears become :class:`SparseLinear` (``sparsify_``: dense ones stay ``nn.Linear``),
and it decodes on our CPU attention and the in-place KV cache, as ``load`` sets up.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .sparse_linear import SparseLinear


def open_model(path: str | os.PathLike, dtype: str | None = None, device: str = "cpu",
               trust_remote_code: bool = False, progress: bool = True) -> torch.nn.Module:
    """The model at ``path`` (a resolved checkpoint directory) in eval mode on our runtime; ``dtype``
    None keeps the stored one."""
    from ..api import load, load_model, sparsify_, use_fast_attention
    from ..models.checkpoint import is_packed_checkpoint
    from .cache import use_growing_cache
    from .loader import check_device

    check_device(device)
    path = Path(path)
    if is_packed_checkpoint(path):
        return load(path, device=device, dtype=dtype, trust_remote_code=trust_remote_code)
    model = load_model(path, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    sparsify_(model, progress=progress)
    use_fast_attention(model)
    use_growing_cache(model)
    return model.eval()


def kernel_path(model: torch.nn.Module) -> str:
    """What the model's linears and attention run on, e.g. ``losa SparseLinear (14 bitmask) + 1 dense
    nn.Linear, losa_cpu attention``."""
    modules = list(model.modules())
    formats: dict[str, int] = {}
    for module in modules:
        if isinstance(module, SparseLinear):
            formats[module.format] = formats.get(module.format, 0) + 1
    dense = sum(type(m) is torch.nn.Linear for m in modules)
    path = (f"losa SparseLinear ({', '.join(f'{n} {f}' for f, n in sorted(formats.items()))}) + {dense} dense "
            f"nn.Linear" if formats else f"torch nn.Linear ({dense} dense)")
    if getattr(model.config, "_attn_implementation", None) == "losa_cpu":
        path += ", losa_cpu attention"
    return path


__all__ = ["kernel_path", "open_model"]
