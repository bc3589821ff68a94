"""Masks and patterns, the sparsity sidecar, and (later) allocation and pruners."""

from .patterns import LayerPattern, detect_pattern, is_nm, model_pattern, nm_tail_keep, sparsity
from .sidecar import (
    SIDECAR,
    base_model_record,
    build_sidecar,
    negative_zeros,
    read_sidecar,
    verify_sidecar,
    write_sidecar,
)

__all__ = [
    "LayerPattern",
    "SIDECAR",
    "base_model_record",
    "build_sidecar",
    "negative_zeros",
    "detect_pattern",
    "is_nm",
    "model_pattern",
    "nm_tail_keep",
    "read_sidecar",
    "sparsity",
    "verify_sidecar",
    "write_sidecar",
]
