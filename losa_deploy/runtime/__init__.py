"""Running sparse models: ``SparseLinear`` and ``sparsify_``."""

from .sparse_linear import SparseLinear
from .sparsify import sparsify_

__all__ = ["SparseLinear", "sparsify_"]
