"""Loads ``losa_deploy._C`` once, lazily, and remembers why it failed if it did."""

from __future__ import annotations

import functools
import importlib
import logging
import os

logger = logging.getLogger("losa_deploy")

_error: str | None = None


@functools.cache
def extension():
    """The compiled module, or ``None`` (said once, as a warning) when it cannot be loaded."""
    global _error
    module = None
    if os.environ.get("LOSA_DISABLE_EXT", "") not in ("", "0"):
        _error = "disabled by LOSA_DISABLE_EXT"
    else:
        try:
            import torch  # noqa: F401  (the extension links against torch's libraries)

            module = importlib.import_module("losa_deploy._C")
        except Exception as exc:  # ImportError, or an undefined symbol from a torch mismatch
            _error = f"{type(exc).__name__}: {exc}"
        else:
            from .dispatch import register_op_metadata

            register_op_metadata()
    if module is None:
        logger.warning("losa-deploy: compiled kernels unavailable (%s); using the pure-PyTorch paths. "
                       "Rebuild with `pip install --no-build-isolation -e .`.", _error)
    return module


def has_extension() -> bool:
    return extension() is not None


def extension_error() -> str | None:
    extension()
    return _error


def ops():
    """``torch.ops.losa`` if the extension is loaded, else ``None``."""
    if extension() is None:
        return None
    import torch

    return torch.ops.losa
