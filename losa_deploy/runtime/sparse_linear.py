"""``SparseLinear``: a drop-in ``nn.Linear`` replacement that holds a packed sparse weight.

The module keeps the kernel layout in memory (a bitmask weight as it is; an N:M weight in its load-time
layout) and runs ``losa_deploy.kernels.sparse_linear``. Its ``state_dict`` holds the canonical on-disk
arrays (``<p>.lb_*`` or ``<p>.nm_*``, engines-and-formats.md §4.2) and the bias, so saving a sparsified
model writes a losa-bitmask checkpoint and loading one restores it. ``.to(dtype)`` converts the values
like it converts a dense weight; the packed weight is frozen (gradients flow to the input and the bias).

On the CPU the large packed tensors live on transparent huge pages (``kernels/placement.py``): decode
streams them once per token, and 2 MiB pages spare it a TLB miss every 4 KiB.

On CUDA (after ``.to("cuda")``, or built from CUDA tensors) the module also keeps the GPU kernels' layout
(``kernels/formats/gpu.py``: the same tensors plus small offset tables, rebuilt whenever the tensors move
or change dtype), so each forward runs the GPU kernel the token count calls for (``kernels.dispatch``)
without rebuilding anything. With ``$LOSA_GPU_LAYOUT=delta`` that layout also holds the weight in the
delta layout (``kernels/formats/delta.py``, a second copy of about the packed size), whose CUDA kernel
runs 1-16 tokens. On the CPU nothing changes.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import LosaError
from ..kernels.dispatch import check_backend, kernel_weight, sparse_linear
from ..kernels.formats.bitmask import BitmaskWeight
from ..kernels.formats.gpu import GPULayout, model_gpu_layout
from ..kernels.formats.nm import DEFAULT_ROWS_PER_BLOCK, NMKernelLayout, NMWeight
from ..kernels.placement import place_for_decode
from ..sparsity.patterns import LayerPattern, detect_pattern

FORMATS = ("auto", "bitmask", "nm")
_BITMASK_KEYS = ("lb_shape", "lb_values", "lb_mask", "lb_row_ptr")
_NM_KEYS = ("nm_shape", "nm_pattern", "nm_values", "nm_mask", "nm_n")
PACKED_KEYS = {"bitmask": _BITMASK_KEYS, "nm": _NM_KEYS}  # a packed module's tensors, by format


def choose_format(weight: torch.Tensor, pattern: LayerPattern | None = None) -> str:
    """``nm`` when the weight follows an N:M pattern whose groups tile 32-column chunks, else ``bitmask``
    (``pattern``: the weight's ``detect_pattern``, when the caller already has it)."""
    pattern = pattern or detect_pattern(weight)
    return "nm" if pattern.kind in ("nm", "mixed_nm") and 32 % pattern.m == 0 else "bitmask"


def pack_weight(weight: torch.Tensor, format: str = "auto", dtype: torch.dtype | None = None,
                rows_per_block: int = DEFAULT_ROWS_PER_BLOCK, pattern: LayerPattern | None = None
                ) -> BitmaskWeight | NMWeight:
    """Pack a dense sparse weight in the asked format (``auto``: see :func:`choose_format`; ``pattern``
    spares detecting it again)."""
    if format not in FORMATS:
        raise LosaError(f"unknown sparse format {format!r} (choose from {', '.join(FORMATS)})")
    if format == "auto":
        format = choose_format(weight, pattern)
    if format == "nm":
        m = pattern.m if pattern is not None and pattern.kind in ("nm", "mixed_nm") else None
        return NMWeight.from_dense(weight, m=m, rows_per_block=rows_per_block, dtype=dtype)
    return BitmaskWeight.from_dense(weight, dtype=dtype)


class SparseLinear(nn.Module):
    """``y = x · Wᵀ + b`` with ``W`` packed (bitmask or N:M); behaves like the ``nn.Linear`` it replaces."""

    def __init__(self, weight: BitmaskWeight | NMWeight | NMKernelLayout, bias: torch.Tensor | None = None,
                 backend: str | None = None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        check_backend(backend)
        self.backend = backend  # None: $LOSA_SPARSE_BACKEND or auto (see kernels.dispatch)
        self._set_packed(kernel_weight(weight))
        if bias is not None and tuple(bias.shape) != (self.out_features,):
            raise LosaError(f"bias must be [{self.out_features}], got {tuple(bias.shape)}")
        # The bias trains if the replaced one did, as in nn.Linear; only the packed weight is frozen.
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad)

    @classmethod
    def from_linear(cls, linear: nn.Linear, format: str = "auto", dtype: torch.dtype | None = None,
                    backend: str | None = None) -> SparseLinear:
        """Pack ``linear``'s weight (values in ``dtype``, default the weight's own, so the result is exact)."""
        return cls(pack_weight(linear.weight, format, dtype), linear.bias, backend)

    def to_dense_linear(self) -> nn.Linear:
        dense = self.packed.to_dense()
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=dense.device, dtype=dense.dtype)
        with torch.no_grad():
            linear.weight.copy_(dense)
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sparse_linear(x, self.gpu_layout or self.packed, self.bias, backend=self.backend)

    @property
    def format(self) -> str:
        if isinstance(self.packed, BitmaskWeight):
            return "bitmask"
        n = self.packed.block_n
        return f"{int(n.max())}:{self.packed.m}" if bool((n == n.max()).all()) else f"mixed N:{self.packed.m}"

    @property
    def sparsity(self) -> float:
        # N:M layouts also store zero-valued filler, so count non-zero values rather than slots.
        kept = int(self.packed.values.count_nonzero())
        return 1.0 - kept / max(self.in_features * self.out_features, 1)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"format={self.format}, values={self.packed.values.dtype}")

    # -- the packed tensors are buffers (so .to() moves and converts them) and the packed object views them

    def _set_packed(self, packed: BitmaskWeight | NMKernelLayout, changed: set[str] | None = None) -> None:
        """Install ``packed``; its large CPU tensors go on huge pages (only those in ``changed`` if given)."""
        self.packed = packed = place_for_decode(packed, changed)
        for name, tensor in packed.tensors().items():
            self.register_buffer(name, tensor, persistent=False)
        self._refresh_gpu_layout()

    def _apply(self, fn, recurse=True):
        before = {name: t.data_ptr() for name, t in self.packed.tensors().items()}
        super()._apply(fn, recurse)
        # No packed format holds float64 values: a float64 conversion (model.double(), for a float64
        # reference) keeps them in float32, where they came from exactly; the bias and the outputs follow
        # the model to float64 (float64 inputs run in float64 on the PyTorch path).
        if self.values.dtype == torch.float64:
            self.values = self.values.to(torch.float32)
        packed = self.packed.replace(**{name: getattr(self, name) for name in self.packed.tensors()})
        # Tensors fn left in place (e.g. .to() to the same dtype) are on huge pages already: do not copy them.
        self._set_packed(packed, {name for name, t in packed.tensors().items() if t.data_ptr() != before[name]})
        return self

    def __setstate__(self, state):
        # Unpickled and deep-copied tensors come back on the default allocator: place them again.
        super().__setstate__(state)
        self._set_packed(self.packed)

    def _refresh_gpu_layout(self) -> None:
        on_cuda = self.packed.values.device.type == "cuda"
        self.gpu_layout: GPULayout | None = model_gpu_layout(self.packed) if on_cuda else None

    # -- state dict: the canonical on-disk arrays ---------------------------------------------------------

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        canonical = self.packed if isinstance(self.packed, BitmaskWeight) else self.packed.canonical()
        destination.update(canonical.state_dict(prefix))
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # (torch passes strict=True here even for load_state_dict(strict=False): that only decides whether
        # the missing and unexpected keys raise.)
        is_nm = prefix + "nm_values" in state_dict
        own = {*(_NM_KEYS if is_nm else _BITMASK_KEYS), *(["bias"] if self.bias is not None else [])}
        if strict:
            unexpected_keys.extend(k for k in state_dict if k.startswith(prefix) and "." not in k[len(prefix):]
                                   and k[len(prefix):] not in own)
        packed = None
        if is_nm or prefix + "lb_values" in state_dict:
            try:
                packed = (NMWeight.from_state_dict(state_dict, prefix).kernel_layout() if is_nm
                          else BitmaskWeight.from_state_dict(state_dict, prefix))
            except LosaError as exc:
                error_msgs.append(f"{prefix.rstrip('.')}: {exc}")
                return
            if packed.shape != (self.out_features, self.in_features):
                error_msgs.append(f"{prefix.rstrip('.')}: packed weight is {packed.shape}, the module is "
                                  f"{(self.out_features, self.in_features)}")
                return
        elif strict:  # no packed weight: missing (in the module's own format), as nn.Linear reports it
            own_keys = _BITMASK_KEYS if isinstance(self.packed, BitmaskWeight) else _NM_KEYS
            missing_keys.extend(prefix + key for key in own_keys)
        if self.bias is not None:
            if prefix + "bias" in state_dict:
                with torch.no_grad():
                    self.bias.copy_(state_dict[prefix + "bias"])
            elif strict:
                missing_keys.append(prefix + "bias")
        if packed is not None:
            # Loaded into the module's device and value dtype, as nn.Linear copies into its own weight.
            device, dtype = self.packed.values.device, self.packed.values.dtype
            self._set_packed(packed.replace(**{k: v.to(device, dtype) if k == "values" else v.to(device)
                                               for k, v in packed.tensors().items()}))


__all__ = ["FORMATS", "SparseLinear", "choose_format", "pack_weight"]
