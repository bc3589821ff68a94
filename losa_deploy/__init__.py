"""losa-deploy: prune a dense Hugging Face causal LM, recover it with sparsity-preserving low-rank
fine-tuning (LoSA, Shears), merge exactly, pack it for serving engines and run it on sparse kernels.

The public API lives in :mod:`losa_deploy.api` and is re-exported here lazily, so ``import losa_deploy``
stays cheap (transformers is imported on first use).
"""

from ._version import __version__
from .errors import LosaError

_API = {"SparseLinear", "bench", "evaluate", "finetune", "generate", "inspect", "load", "load_model", "load_tokenizer",
        "masked_lora_linear", "merge", "pack", "prune", "sparsify_", "use_fast_attention",
        "use_growing_cache"}


def __getattr__(name):
    if name in _API:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'losa_deploy' has no attribute '{name}'")


__all__ = ["LosaError", "__version__", *sorted(_API)]
