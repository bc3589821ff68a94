"""The one place that knows about compiled code.

``ops()`` returns ``torch.ops.losa`` when the C++ extension loaded, or ``None``; callers then take their
pure-PyTorch path. The package imports and works either way, and says once when the extension is missing.
Set ``LOSA_DISABLE_EXT=1`` to force the pure-PyTorch paths (tests use it to cover the fallbacks).

``sparse_linear(x, packed, bias)`` runs a packed sparse weight (formats/) on the best kernel available
(see :mod:`.dispatch`); it is imported on first use, so this package stays cheap to import.
"""

from ._ext import extension, extension_error, has_extension, ops


def __getattr__(name):
    if name == "sparse_linear":
        from .dispatch import sparse_linear

        return sparse_linear
    raise AttributeError(f"module 'losa_deploy.kernels' has no attribute '{name}'")


__all__ = ["extension", "extension_error", "has_extension", "ops", "sparse_linear"]
