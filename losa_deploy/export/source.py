"""The input side of packing: a checked checkpoint, read one tensor at a time and made ready to write.

Every tensor that passes through :meth:`PackSource.tensors` is

* checked: a NaN or Inf in a stored weight means a corrupt file (a one-line error, nothing written);
* converted to the output dtype (floating tensors only), refusing values the dtype cannot hold;
* scrubbed of ``-0.0`` (it becomes ``+0.0``: vLLM's old CUTLASS 2:4 path broke on negative zeros, and
  an exact-zero test should never depend on the sign bit);
* and, for prunable linears, verified against the input's sidecar and recorded for the output's sidecar.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..errors import LosaError
from ..models.arch import Architecture, architecture_for
from ..models.checkpoint import check_checkpoint, stored_shapes
from ..models.skeleton import check_stored_weights
from ..models.tensors import iter_tensors
from ..sparsity.sidecar import SidecarBuilder, read_sidecar, verify_module

logger = logging.getLogger("losa_deploy")

DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


@dataclass
class PackSource:
    """A checkpoint being packed: where it is, what it is, and the dtype it is written in."""

    path: Path
    config: dict
    arch: Architecture
    dtype: torch.dtype | None  # None: keep each tensor's stored dtype
    progress: bool = True
    input_sidecar: dict | None = None  # the checkpoint's own sidecar, verified as the weights stream by
    sidecar: SidecarBuilder = field(default_factory=SidecarBuilder)
    stats: dict = field(default_factory=lambda: dict.fromkeys(
        ("negative_zeros_scrubbed", "underflowed_to_zero", "dense_bytes"), 0))
    warnings: list[str] = field(default_factory=list)  # what the caller's report (--json) repeats
    stored: dict[str, tuple[int, ...]] = field(default_factory=dict)  # name -> shape, from the headers
    model_key: Callable[[str], str] = str  # a stored key -> the model's name for it (Architecture.model_keys)

    @classmethod
    def open(cls, path: str | os.PathLike, dtype: torch.dtype | None, trust_remote_code: bool = False,
             progress: bool = True) -> PackSource:
        path = Path(path)
        config = check_checkpoint(path, trust_remote_code)
        arch = architecture_for(config["model_type"])
        stored = stored_shapes(path)
        model_key = arch.model_keys(stored)  # facebook/opt-* store their keys without "model."
        stored = {model_key(k): shape for k, shape in stored.items()}
        check_stored_weights(path, stored, trust_remote_code)  # before anything is written
        sidecar = read_sidecar(path)
        unstored = sorted(m for m in (sidecar or {}).get("modules", {}) if f"{m}.weight" not in stored)
        if unstored:
            raise LosaError(f"{path}: its sidecar lists {unstored[0]}, which the checkpoint does not store")
        return cls(path, config, arch, dtype, progress, sidecar, stored=stored, model_key=model_key)

    def __post_init__(self):
        self._weight_key = self.arch.weight_key_pattern()

    def module_name(self, key: str) -> str | None:
        """The module name of a prunable linear's weight key (``...q_proj.weight`` -> ``...q_proj``)."""
        return key[: -len(".weight")] if self._weight_key.match(key) else None

    @property
    def output_dtype_name(self) -> str:
        """The dtype written into config.json."""
        if self.dtype is not None:
            return DTYPE_NAMES[self.dtype]
        return self.config.get("dtype") or self.config.get("torch_dtype") or "float32"

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Every stored tensor, checked, converted and scrubbed, one at a time."""
        from safetensors import SafetensorError

        total = len(self.stored) or None  # None: a source built by hand, with no header read
        # Read, not mapped: a mapped tensor's pages would stay resident until the whole file had streamed by,
        # and _prepare scrubs the tensor it is given in place.
        stream = tqdm(iter_tensors(self.path, mmap=False), total=total, desc="packing", unit="tensor",
                      disable=not self.progress)
        try:
            for key, tensor in stream:
                key = self.model_key(key)
                tensor = self._prepare(key, tensor)
                self.stats["dense_bytes"] += tensor.numel() * tensor.element_size()
                yield key, tensor
        except SafetensorError as exc:  # a header that disagrees with its data
            raise LosaError(f"{self.path} holds a corrupt tensor ({exc})") from None

    def _prepare(self, key: str, tensor: torch.Tensor) -> torch.Tensor:
        if not tensor.is_floating_point():
            return tensor
        if not bool(torch.isfinite(tensor).all()):
            raise LosaError(f"tensor {key} in {self.path} is corrupt: it holds NaN or Inf values")
        name = self.module_name(key)
        if name is not None and self.input_sidecar is not None and name in self.input_sidecar["modules"]:
            verify_module(name, self.input_sidecar["modules"][name], tensor)
        out = tensor if self.dtype is None else tensor.to(self.dtype)
        if out is not tensor:
            if not bool(torch.isfinite(out).all()):
                raise LosaError(f"tensor {key} has values outside the range of {DTYPE_NAMES[self.dtype]}; "
                                "choose a wider --dtype")
            if name is not None:
                self.stats["underflowed_to_zero"] += int(((tensor != 0) & (out == 0)).sum())
        # Else out is the tensor as read: tensors() reads each into memory of its own (a pickle's into a
        # private mapping), so the scrub below writes over nobody's data, and a clone would only add the
        # largest tensor to the peak.
        zeros = out == 0
        self.stats["negative_zeros_scrubbed"] += int((zeros & torch.signbit(out)).sum())
        out.masked_fill_(zeros, 0.0)  # -0.0 == 0, so this writes +0.0 over both signs
        if name is not None:
            self.sidecar.add(name, out)
        return out

    def output_sidecar(self) -> dict:
        """The sidecar of what was written; the input's provenance (``method``) is carried over."""
        if not self.sidecar.modules:
            raise LosaError(f"{self.path} holds no prunable linear weights")
        previous = self.input_sidecar or {}
        config_bytes = (self.path / "config.json").read_bytes()
        base_model = previous.get("base_model") or {
            "name_or_path": self.config.get("_name_or_path") or str(self.path),
            "config_sha256": hashlib.sha256(config_bytes).hexdigest(),
        }
        return self.sidecar.build(base_model=base_model, method=previous.get("method"))

    def warn(self, message: str) -> None:
        """Log a warning and keep it for the report."""
        logger.warning("losa-deploy: %s", message)
        self.warnings.append(message)

    def warn_if_dense(self, sidecar: dict) -> None:
        """Packing a dense model works, but nothing will run faster: say so."""
        if sidecar["pattern"] == "dense":
            self.warn(f"{self.path} has no sparsity (every prunable linear is dense): packed anyway, "
                      "but sparse kernels will not make it faster")
