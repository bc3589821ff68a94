"""Calibration windows from a file or from the model itself (``--calib FILE|self``)."""

from __future__ import annotations

import torch

from .selfgen import self_generate
from .sources import parse_slice, read_source, slice_source
from .windows import sample_windows, tokenize_text

SELF = "self"


def calibration_windows(model, tokenizer, spec: str, nsamples: int, seqlen: int, seed: int = 0,
                        data_slice: str | None = None, progress: bool = True) -> torch.Tensor:
    """``[nsamples, seqlen]`` token ids: random windows of a text file's slice, or self-generated."""
    if spec == SELF:
        return self_generate(model, tokenizer, nsamples, seqlen, seed=seed, progress=progress)
    source = slice_source(read_source(spec), *parse_slice(data_slice))
    return sample_windows(tokenize_text(tokenizer, source.as_text()), nsamples, seqlen, seed)
