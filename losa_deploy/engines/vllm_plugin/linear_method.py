"""``LosaSparseLinearMethod``: a vLLM linear whose weight stays packed and runs on our sparse kernels.

* ``create_weights`` registers the packed tensors of the checkpoint (``lb_*`` for a bitmask part, ``nm_*``
  for an N:M part) as empty placeholders: their sizes depend on the number of kept weights, which only
  the checkpoint knows. Their ``weight_loader`` files each tensor under its shard id (q/k/v, 0/1, or None
  for an unfused layer), so fused layers load their parts as vLLM streams them.
* ``process_weights_after_loading`` rebuilds each part (``BitmaskWeight`` / ``NMWeight``), checks it has the
  full logical shape and the zero pattern the checkpoint's ``mask_sha256`` names (``LOSA_VERIFY=0`` skips
  that), takes this rank's tensor-parallel slice in the packed layout (:mod:`.sharding`),
  converts it to the kernel layout in the model dtype and drops the placeholders. The parts of a fused
  layer whose layouts stack (all bitmask, or all N:M with whole row blocks) become one weight, and the
  CPU weights go on huge pages (``kernels/placement.py``).
* ``apply`` runs ``losa_deploy.kernels.sparse_linear`` on each weight (the compiled CPU kernels; CUDA
  kernels where built) and concatenates the outputs when a fused layer's parts stayed apart (different
  formats: each keeps its own best layout). Where no compiled kernel exists for the device, the parts
  are decompressed once to a dense weight (with a warning) rather than on every call. On CUDA each
  weight is kept in its GPU layout (``kernels/formats/gpu.py``, ``$LOSA_GPU_LAYOUT``), built once after
  loading: without it, every call rebuilt the offset tables.
"""

from __future__ import annotations

import dataclasses
import logging
import os

import torch
from vllm.model_executor.layers.linear import LinearMethodBase, QKVParallelLinear, RowParallelLinear
from vllm.model_executor.utils import set_weight_attrs

from ...errors import LosaError
from ...kernels.dispatch import _kernel_isa, kernel_weight, sparse_linear
from ...kernels.formats import read_packed
from ...kernels.formats.bitmask import BitmaskWeight
from ...kernels.formats.gpu import model_gpu_layout
from ...kernels.formats.nm import NMWeight
from ...kernels.placement import place_for_decode
from ...sparsity.sidecar import packed_mask_sha256
from .sharding import take

logger = logging.getLogger("losa_deploy")

# The checkpoint tensors of each packed format, with the dtype they are stored in (None: the values,
# stored in the checkpoint dtype and converted to the model dtype after loading).
_COMPONENTS = {
    "bitmask": {"lb_shape": torch.int64, "lb_values": None, "lb_mask": torch.uint32, "lb_row_ptr": torch.int64},
    "nm": {"nm_shape": torch.int64, "nm_pattern": torch.int64, "nm_values": None, "nm_mask": torch.uint8,
           "nm_n": torch.uint8},
}


class LosaSparseLinearMethod(LinearMethodBase):
    """One layer's packed parts: ``parts`` is ``[(shard id, "bitmask" | "nm"), ...]`` in output order, and
    ``hashes`` the ``(checkpoint module, mask_sha256 or None)`` of each."""

    def __init__(self, parts: list[tuple[str | int | None, str]],
                 hashes: list[tuple[str, str | None]] | None = None):
        self.parts = parts
        self.hashes = hashes or [(None, None)] * len(parts)

    def create_weights(self, layer: torch.nn.Module, input_size_per_partition: int,
                       output_partition_sizes: list[int], input_size: int, output_size: int,
                       params_dtype: torch.dtype, **extra_weight_attrs):
        if len(output_partition_sizes) != len(self.parts):
            raise ValueError(f"losa_sparse: the layer has {len(output_partition_sizes)} outputs, the checkpoint "
                             f"packs {len(self.parts)} modules into it")
        layer.losa_loaded = {}  # (shard id, tensor name) -> the checkpoint tensor
        layer.losa_partition = (input_size_per_partition, list(output_partition_sizes), input_size)
        layer.losa_dtype = params_dtype
        extra_weight_attrs.pop("weight_loader", None)  # ours files packed tensors; vLLM's would copy them
        for fmt in sorted({fmt for _, fmt in self.parts}):
            for name, dtype in _COMPONENTS[fmt].items():
                placeholder = torch.nn.Parameter(torch.empty(0, dtype=dtype or params_dtype), requires_grad=False)
                set_weight_attrs(placeholder, {**extra_weight_attrs, "weight_loader": _loader(layer, name)})
                layer.register_parameter(name, placeholder)

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        input_per_rank, output_per_rank, input_size = layer.losa_partition
        device = next(iter(p.device for p in layer.parameters()), torch.device("cpu"))
        weights = []
        verify = os.environ.get("LOSA_VERIFY", "1") != "0"
        for (shard, fmt), (module, digest), rows in zip(self.parts, self.hashes, output_per_rank):
            packed = self._read(layer, shard, fmt)
            if verify and digest is not None and packed_mask_sha256(packed) != digest:
                raise ValueError(f"losa_sparse: the zero pattern of {module} does not match its mask_sha256 "
                                 "(a corrupt or edited checkpoint)")
            if packed.shape[1] != input_size:
                raise ValueError(f"losa_sparse: {layer.prefix} part {shard} takes {packed.shape[1]} inputs, "
                                 f"the layer {input_size}")
            start = _shard_rank(layer, shard) * rows
            cols = None
            if isinstance(layer, RowParallelLinear) and input_per_rank != input_size:
                cols = (layer.tp_rank * input_per_rank, (layer.tp_rank + 1) * input_per_rank)
            local = take(packed, rows=(start, start + rows), cols=cols)
            weights.append(kernel_weight(_to(local, device, layer.losa_dtype)))
        weights = [place_for_decode(w) for w in _stacked(weights)]
        for fmt in {fmt for _, fmt in self.parts}:
            for name in _COMPONENTS[fmt]:
                delattr(layer, name)
        del layer.losa_loaded
        layer.losa_weights = weights
        layer.losa_dense = None
        if not _has_kernel(device, layer.losa_dtype):
            logger.warning("losa_sparse: no compiled sparse kernel for %s; %s runs as a dense matmul",
                           device, layer.prefix)
            layer.losa_dense = torch.cat([w.to_dense() for w in weights])
        else:
            layer.losa_weights = device_layouts(weights, device)

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if layer.losa_dense is not None:
            return torch.nn.functional.linear(x, layer.losa_dense, bias)
        outputs = [sparse_linear(x, weight) for weight in layer.losa_weights]
        y = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=-1)
        return y if bias is None else y + bias

    def _read(self, layer, shard, fmt) -> BitmaskWeight | NMWeight:
        state = {name: tensor for (s, name), tensor in layer.losa_loaded.items() if s == shard}
        if not state:
            raise ValueError(f"losa_sparse: the checkpoint has no packed weight for {layer.prefix} part {shard}")
        try:
            return read_packed(fmt, state)
        except LosaError as exc:  # name the module: vLLM's traceback does not
            part = "" if shard is None else f" part {shard}"
            raise ValueError(f"losa_sparse: {layer.prefix}{part} is not a valid packed {fmt} weight: {exc}") from None


def _loader(layer: torch.nn.Module, name: str):
    """The weight loader of one packed tensor: vLLM passes the shard id as an argument (fused layers) or
    on the tensor (``shard_id``, set by its weight mapper)."""

    def load(param: torch.nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        shard = shard_id if shard_id is not None else getattr(loaded, "shard_id", None)
        layer.losa_loaded[(shard, name)] = loaded.detach().clone()

    return load


def _shard_rank(layer: torch.nn.Module, shard) -> int:
    """Which slice of a part's rows this rank holds (K/V heads are replicated when TP > KV heads)."""
    if isinstance(layer, RowParallelLinear):
        return 0  # a row-parallel layer splits columns; every rank has all rows
    if isinstance(layer, QKVParallelLinear) and shard in ("k", "v"):
        return layer.tp_rank // layer.num_kv_head_replicas
    return layer.tp_rank


def _to(packed: BitmaskWeight | NMWeight, device: torch.device, dtype: torch.dtype):
    """The packed weight on ``device`` with its values in the model dtype (index tensors unchanged)."""
    tensors = {f.name: getattr(packed, f.name) for f in dataclasses.fields(packed)}
    tensors = {name: t.to(device) for name, t in tensors.items() if isinstance(t, torch.Tensor)}
    tensors["values"] = tensors["values"].to(dtype)
    return dataclasses.replace(packed, **tensors)


def _stacked(weights: list) -> list:
    """A fused layer's parts (q/k/v, gate/up) as one weight when their layouts stack: one kernel call per
    forward instead of one per part plus a concatenation of the outputs."""
    kind = type(weights[0])
    if len(weights) == 1 or any(type(w) is not kind for w in weights):
        return weights
    try:
        return [kind.concat_rows(weights)]
    except LosaError:  # e.g. N:M parts that end inside a row block
        return weights


def device_layouts(weights: list, device: torch.device) -> list:
    """The kernel weights as ``apply`` runs them on ``device``: on CUDA their GPU layouts (offset tables,
    and the delta layout under ``$LOSA_GPU_LAYOUT=delta``), built once here rather than on every call."""
    return [model_gpu_layout(w) for w in weights] if device.type == "cuda" else weights


def _has_kernel(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether sparse_linear would run a compiled kernel here (the dispatcher's own decision)."""
    return all(_kernel_isa(op, device.type, dtype, None) for op in ("bitmask_linear", "nm_linear"))
