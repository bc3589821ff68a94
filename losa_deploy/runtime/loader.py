"""``losa_deploy.load``: open a ``losa`` (or ``vllm``) packed checkpoint as a ready Hugging Face model whose
packed linears are :class:`~.sparse_linear.SparseLinear` modules.

The model is built empty (parameters on the meta device) and filled tensor by tensor: plain tensors are
assigned as they stream in; each packed module becomes a ``SparseLinear`` as soon as its last tensor has
streamed in (``packed_tensors.iter_packed``). No dense copy of a packed weight is ever made, and only one
module's file tensors are held beside the model, so memory is that of the packed model.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..errors import LosaError
from ..kernels.dispatch import check_backend
from ..models.checkpoint import check_checkpoint, parse_dtype
from ..models.skeleton import assign_weight, empty_model
from ..sparsity.sidecar import read_sidecar, verify_packed
from .packed_tensors import iter_packed
from .sparse_linear import SparseLinear

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
    device = check_device(device)
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
    sidecar = (read_sidecar(path) or {}).get("modules", {}) if verify else {}
    waiting = {}  # name -> packed weight of the modules whose bias streams in after them (a later shard)
    for key, item in iter_packed(path, modules):
        if isinstance(item, torch.Tensor):
            _assign_plain(model, path, key, item, wanted)
            name, _, leaf = key.rpartition(".")
            if leaf == "bias" and name in waiting:
                _install(model, name, waiting.pop(name), backend, torch_dtype)
        else:
            _check_packed(model, path, key, item, sidecar.get(key))
            linear = model.get_submodule(key)
            if linear.bias is not None and linear.bias.is_meta:
                # Its bias has not streamed in yet: SparseLinear copies the bias it is given, and a bias
                # loaded into it afterwards would be copied into that empty (meta) copy, i.e. dropped.
                waiting[key] = item
            else:
                _install(model, key, item, backend, torch_dtype)
        del item  # else this module's canonical arrays stay alive while the next one streams in
    for name, packed in waiting.items():  # a bias never stored: the check for empty weights names it
        _install(model, name, packed, backend, torch_dtype)
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


def _assign_plain(model: torch.nn.Module, path: Path, key: str, tensor: torch.Tensor,
                  wanted: dict[str, torch.dtype]) -> None:
    """Put a plain tensor into the empty model, in the dtype the model was built in (``wanted``)."""
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        raise LosaError(f"{path} is corrupt: {key} holds NaN or Inf values")
    if key in wanted and tensor.is_floating_point():
        tensor = tensor.to(wanted[key])
    assign_weight(model, path, key, tensor)


def _check_packed(model: torch.nn.Module, path: Path, name: str, packed, entry: dict | None) -> None:
    """Refuse a packed weight whose zero pattern disagrees with the sidecar ``entry`` (None: unchecked), or
    whose shape is not the model's linear's."""
    if entry is not None:
        try:
            verify_packed(name, entry, packed)
        except LosaError as exc:
            raise LosaError(f"{path}: {exc}") from None
    linear = model.get_submodule(name)
    if packed.shape != (linear.out_features, linear.in_features):
        raise LosaError(f"{path}: {name} is packed as {packed.shape}, the model's linear is "
                        f"{(linear.out_features, linear.in_features)}")


def _install(model: torch.nn.Module, name: str, packed, backend: str | None, dtype: torch.dtype | None) -> None:
    """Replace the model's empty linear ``name`` by a SparseLinear of ``packed`` and the linear's bias."""
    parent_name, _, child = name.rpartition(".")
    sparse = SparseLinear(packed, model.get_submodule(name).bias, backend=backend)
    setattr(model.get_submodule(parent_name), child, sparse if dtype is None else sparse.to(dtype))


def _read_generation_config(model: torch.nn.Module, path: Path) -> None:
    """The checkpoint's generate() defaults (extra EOS ids, sampling settings), as from_pretrained reads them."""
    from transformers import GenerationConfig

    if (path / "generation_config.json").is_file():
        try:
            model.generation_config = GenerationConfig.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise LosaError(f"{path}: cannot read generation_config.json ({exc})") from None


def check_device(device: str | torch.device) -> torch.device:
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise LosaError(f"bad device {device!r}: {exc}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LosaError(f"device {device}: this torch ({torch.__version__}) sees no CUDA GPU")
    return device
