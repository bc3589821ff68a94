"""Perplexity by the standard protocol (as in the SparseGPT / Wanda / LoSA evaluations).

The whole text is tokenized once and cut into non-overlapping windows of ``seqlen`` tokens (the remainder
dropped); every window is scored independently and ppl = exp(mean token NLL) over all predicted tokens
(``seqlen - 1`` per window). NLLs are accumulated in float64.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..errors import LosaError
from ..kernels.attention import fast_attention


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, batch_size: int = 4, progress: bool = True) -> dict:
    """Score ``windows [n, seqlen]``; returns ``ppl``, ``nll``, ``seqlen``, ``windows``, ``tokens``."""
    device = next(model.parameters()).device
    n, seqlen = windows.shape
    if n == 0 or seqlen < 2:
        raise LosaError(f"perplexity needs at least one window of 2 or more tokens, got {n} x {seqlen}")
    total_nll = 0.0
    bar = tqdm(total=n, desc="perplexity", unit="win", disable=not progress)
    with fast_attention(model):
        for start in range(0, n, batch_size):
            ids = windows[start: start + batch_size].to(device)
            logits = model(input_ids=ids, use_cache=False).logits
            # Token t is predicted from positions < t: drop the last logit and the first label.
            nll = F.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="sum"
            )
            total_nll += float(nll.double())
            bar.update(ids.shape[0])
    bar.close()
    predicted = n * (seqlen - 1)
    mean_nll = total_nll / predicted
    return {
        "ppl": math.exp(mean_nll),
        "nll": mean_nll,
        "seqlen": seqlen,
        "windows": n,
        "tokens": n * seqlen,
        "predicted_tokens": predicted,
    }
