"""Token windows: the whole text tokenized once, then cut (evaluation) or sampled (calibration)."""

from __future__ import annotations

import torch

from ..errors import LosaError


def tokenize_text(tokenizer, text: str) -> torch.Tensor:
    """The text as one 1-D LongTensor of token ids (special tokens as the tokenizer adds them)."""
    ids = tokenizer(text, add_special_tokens=True, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def eval_windows(ids: torch.Tensor, seqlen: int, max_windows: int | None = None) -> torch.Tensor:
    """Non-overlapping windows ``[n, seqlen]`` from the start; the remainder is dropped."""
    if seqlen < 2:
        raise LosaError(f"seqlen must be at least 2, got {seqlen}")
    n = ids.numel() // seqlen
    if n == 0:
        raise LosaError(f"the text has {ids.numel()} tokens, shorter than one window of {seqlen}")
    if max_windows is not None:
        if max_windows < 1:
            raise LosaError(f"max-windows must be positive, got {max_windows}")
        n = min(n, max_windows)
    return ids[: n * seqlen].view(n, seqlen)


def sample_windows(ids: torch.Tensor, nsamples: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """``nsamples`` windows of ``seqlen`` tokens at random offsets (seeded), for calibration."""
    if nsamples < 1:
        raise LosaError(f"nsamples must be positive, got {nsamples}")
    if ids.numel() < seqlen:
        raise LosaError(f"calibration text has {ids.numel()} tokens, shorter than one window of {seqlen}")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen + 1, (nsamples,), generator=gen)
    return torch.stack([ids[s: s + seqlen] for s in starts.tolist()])
