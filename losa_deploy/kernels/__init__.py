"""The one place that knows about compiled code.

``ops()`` returns ``torch.ops.losa`` when the C++ extension loaded, or ``None``; callers then take their
pure-PyTorch path. The package imports and works either way, and says once when the extension is missing.
Set ``LOSA_DISABLE_EXT=1`` to force the pure-PyTorch paths (tests use it to cover the fallbacks).
"""

from ._ext import extension, extension_error, has_extension, ops

__all__ = ["extension", "extension_error", "has_extension", "ops"]
