"""``losa_deploy.load``: open a ``losa`` (or ``vllm``) packed checkpoint as a ready Hugging Face model whose
packed linears are :class:`~.sparse_linear.SparseLinear` modules.

The model is built empty (parameters on the meta device) and filled tensor by tensor: plain tensors are
assigned as they stream in; each packed module's tensors are collected and become a ``SparseLinear``.
No dense copy of a packed weight is ever made, so memory is that of the packed model.
"""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path

import torch

from ..errors import LosaError
from ..kernels.dispatch import check_backend
from ..kernels.formats import read_packed
from ..models.checkpoint import check_checkpoint, parse_dtype
from ..models.skeleton import assign_weight, empty_model
from ..models.tensors import iter_tensors
from ..sparsity.sidecar import read_sidecar, verify_packed
from .sparse_linear import PACKED_KEYS, SparseLinear

_PACKING_KEYS = ("losa_sparse", "quantization_config")  # the losa format's block, the vllm format's


def packing_block(config: dict, path: Path) -> dict:
    """The block of config.json that lists the packed modules (see :mod:`losa_deploy.export.losa`)."""
    from ..export.losa import check_packing_block

    block = config.get("losa_sparse")
    quant = config.get("quantization_config") or {}
    if block is None and quant.get("quant_method") == "losa_sparse":
        block = quant
    if block is None:
        raise LosaError(f"{path} is not a packed checkpoint (no losa_sparse block in config.json); pack it "
                        "with `losa-deploy pack --format losa`, or open a plain one with load_model")
    check_packing_block(block, str(path))
    return block


def load_packed(path: str | os.PathLike, device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None,
                backend: str | None = None, trust_remote_code: bool = False, verify: bool = True) -> torch.nn.Module:
    """The model of a packed checkpoint, in eval mode on ``device``; ``dtype`` converts (None: as stored);
    ``backend`` picks the sparse kernel (see ``losa_deploy.kernels.dispatch``); ``verify``: check each
    packed weight's zero pattern against the ``losa_sparsity.json`` that ``pack`` wrote beside it (a
    corrupted mask can keep every count the format checks right, and would only show as wrong logits)."""
    from transformers import AutoConfig

    path = Path(path)
    device = _check_device(device)
    check_backend(backend)
    torch_dtype = parse_dtype(dtype)
    config = check_checkpoint(path, trust_remote_code, packed=True)
    block = packing_block(config, path)
    modules = block["modules"]
    plain = {k: v for k, v in config.items() if k not in _PACKING_KEYS}
    hf_config = AutoConfig.for_model(**plain)
    # Built in the asked dtype, as from_pretrained(dtype=) builds it: weights in that dtype, while buffers
    # transformers computes in fp32 (the RoPE inverse frequencies) stay fp32. model.to(dtype) would round
    # them too, and bf16 positions drift from the model's own after a few dozen tokens.
    model = empty_model(hf_config, trust_remote_code, dtype=torch_dtype)
    wanted = {k: t.dtype for k, t in model.state_dict(keep_vars=True).items()} if torch_dtype is not None else {}
    parts: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    for key, tensor in iter_tensors(path):
        module, _, leaf = key.rpartition(".")
        if module in modules and leaf != "bias":
            parts[module][key] = tensor  # read_packed checks its values
            continue
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise LosaError(f"{path} is corrupt: {key} holds NaN or Inf values")
        if key in wanted and tensor.is_floating_point():
            tensor = tensor.to(wanted[key])
        assign_weight(model, path, key, tensor)
    sidecar = (read_sidecar(path) or {}).get("modules", {}) if verify else {}
    for name, fmt in modules.items():
        if name not in parts:
            raise LosaError(f"{path} has no packed tensors for {name}")
        leaves = {key.rpartition(".")[2]: key for key in parts[name]}
        foreign = sorted(key for leaf, key in leaves.items() if leaf not in PACKED_KEYS.get(fmt, leaves))
        if foreign:  # e.g. a dense <p>.weight beside the packed one: which is meant?
            raise LosaError(f"{path}: {name} is packed ({fmt}) but also stores {foreign[0]}")
        try:
            packed = read_packed(fmt, parts.pop(name), prefix=name)
            if name in sidecar:
                verify_packed(name, sidecar[name], packed)
        except LosaError as exc:
            raise LosaError(f"{path}: {exc}") from None
        parent_name, _, child = name.rpartition(".")
        linear = model.get_submodule(name)
        if packed.shape != (linear.out_features, linear.in_features):
            raise LosaError(f"{path}: {name} is packed as {packed.shape}, the model's linear is "
                            f"{(linear.out_features, linear.in_features)}")
        sparse = SparseLinear(packed, linear.bias, backend=backend)
        setattr(model.get_submodule(parent_name), child, sparse if torch_dtype is None else sparse.to(torch_dtype))
    model.tie_weights()
    empty = [name for name, p in [*model.named_parameters(), *model.named_buffers()] if p.is_meta]
    if empty:
        raise LosaError(f"{path} is missing {len(empty)} weight(s), e.g. {empty[0]}")
    if torch_dtype is not None:
        model.config.dtype = torch_dtype
    _read_generation_config(model, path)
    # save_pretrained writes the packed tensors (SparseLinear's state dict), so it must write the block
    # that says so too, or the saved directory would read as a plain model with its linears missing.
    model.config.losa_sparse = block
    return model.eval().to(device)


def _read_generation_config(model: torch.nn.Module, path: Path) -> None:
    """The checkpoint's generate() defaults (extra EOS ids, sampling settings), as from_pretrained reads them."""
    from transformers import GenerationConfig

    if (path / "generation_config.json").is_file():
        try:
            model.generation_config = GenerationConfig.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise LosaError(f"{path}: cannot read generation_config.json ({exc})") from None


def _check_device(device: str | torch.device) -> torch.device:
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise LosaError(f"bad device {device!r}: {exc}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LosaError(f"device {device}: this torch ({torch.__version__}) sees no CUDA GPU")
    return device
