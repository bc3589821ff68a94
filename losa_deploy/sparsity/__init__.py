"""Masks and patterns, the sparsity sidecar, and (later) allocation and pruners."""

from .patterns import LayerPattern, detect_pattern, is_nm, model_pattern, nm_tail_keep, sparsity
from .sidecar import SIDECAR, build_sidecar, read_sidecar, verify_sidecar, write_sidecar

__all__ = [
    "LayerPattern",
    "SIDECAR",
    "build_sidecar",
    "detect_pattern",
    "is_nm",
    "model_pattern",
    "nm_tail_keep",
    "read_sidecar",
    "sparsity",
    "verify_sidecar",
    "write_sidecar",
]
