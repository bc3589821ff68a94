"""The public Python API: each step of the pipeline as one function (the CLI is a thin layer over it).

    dense checkpoint -> prune -> finetune -> merge -> pack -> load / serve / bench

Model arguments accept a checkpoint directory, a ``.gguf`` file or ``"smollm2-135m"`` (the embedded
default), or an already loaded model where noted.
"""

from __future__ import annotations

import os

from .data import SELF, eval_windows, parse_slice, read_source, self_generate, slice_source, tokenize_text
from .errors import LosaError
from .eval.perplexity import perplexity
from .models import check_checkpoint, context_length, load_model, load_tokenizer, resolve_model
from .runtime import SparseLinear, sparsify_
from .sparsity.report import inspect_checkpoint


def inspect(model: str | os.PathLike, trust_remote_code: bool = False) -> dict:
    """Per-layer sparsity and pattern of a checkpoint (see :func:`inspect_checkpoint`)."""
    return inspect_checkpoint(resolve_model(model), trust_remote_code)


def evaluate(model: str | os.PathLike, data: str, seqlen: int | None = None, max_windows: int | None = None,
             data_slice: str | None = None, text_field: str | None = None, nsamples: int = 16,
             batch_size: int = 4, dtype: str = "fp32", seed: int = 0, trust_remote_code: bool = False,
             progress: bool = True) -> dict:
    """Perplexity of ``model`` on a data file (or ``data="self"``: on text it samples itself).

    Every input is checked before the model is loaded, so bad input fails in a second.
    """
    path = resolve_model(model)
    config = check_checkpoint(path, trust_remote_code)
    ctx = context_length(config)
    seqlen = seqlen or min(2048, ctx)
    if seqlen > ctx:
        raise LosaError(f"seqlen {seqlen} is longer than the model's context ({ctx} tokens)")
    tokenizer = load_tokenizer(path, trust_remote_code)
    windows = None
    if data != SELF:
        source = slice_source(read_source(data, text_field=text_field), *parse_slice(data_slice))
        windows = eval_windows(tokenize_text(tokenizer, source.as_text()), seqlen, max_windows)
    lm = load_model(path, dtype=dtype, trust_remote_code=trust_remote_code)
    if windows is None:
        windows = self_generate(lm, tokenizer, nsamples, seqlen, seed=seed, progress=progress)
    result = perplexity(lm, windows, batch_size=batch_size, progress=progress)
    return {**result, "model": str(path), "data": str(data), "slice": data_slice or "0:1", "dtype": dtype}


def pack(model: str | os.PathLike, out: str | os.PathLike, format: str = "hf", dtype: str | None = None,
         overwrite: bool = False, trust_remote_code: bool = False, progress: bool = True) -> dict:
    """Pack a checkpoint for serving: ``format`` is hf, nm-vllm, losa, vllm or deepsparse.

    Streams tensor by tensor into a temporary directory renamed to ``out`` when complete. ``dtype``
    (bf16, fp16, fp32) converts floating tensors; None keeps the stored dtype. Returns the files written,
    their sizes and the sparsity of the written weights (see :mod:`losa_deploy.export`).
    """
    from .export import pack_checkpoint

    return pack_checkpoint(model, out, format=format, dtype=dtype, overwrite=overwrite,
                           trust_remote_code=trust_remote_code, progress=progress)


def load(path: str | os.PathLike, device: str = "cpu", dtype: str | None = None, backend: str | None = None,
         trust_remote_code: bool = False):
    """A ``losa`` or ``vllm`` packed checkpoint as a ready Hugging Face model (eval mode, on ``device``)
    whose packed linears are :class:`SparseLinear` modules running our kernels: the serving API.

    ``dtype`` converts (None: as stored); ``backend`` picks the sparse kernel (None: the best available).
    """
    from .runtime.loader import load_packed

    return load_packed(path, device=device, dtype=dtype, backend=backend, trust_remote_code=trust_remote_code)


__all__ = ["SparseLinear", "evaluate", "inspect", "load", "load_model", "load_tokenizer", "pack",
           "sparsify_"]
