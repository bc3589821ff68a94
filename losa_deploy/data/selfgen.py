"""Self-generated calibration data: sample sequences from the model itself.

Pruning then needs no data set at all (self-calibration, Williams et al., 2025). Sampling runs our own
short loop over the KV cache so that it is seeded, batched and shows progress.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm


@torch.no_grad()
def self_generate(model, tokenizer, nsamples: int, seqlen: int, seed: int = 0, temperature: float = 1.0,
                  top_p: float = 0.95, batch_size: int = 64, progress: bool = True) -> torch.Tensor:
    """``[nsamples, seqlen]`` token ids sampled from the model, each starting with its BOS token.

    End-of-sequence is suppressed so every sample fills the window. Sample ``i`` draws from its own
    generator seeded with ``(seed, i)``, so the samples do not depend on ``batch_size``.
    """
    bos = _start_token(model, tokenizer)
    eos = tokenizer.eos_token_id
    device = next(model.parameters()).device
    out = []
    total = nsamples * (seqlen - 1)
    bar = tqdm(total=total, desc="self-generating calibration", unit="tok", disable=not progress)
    for start in range(0, nsamples, batch_size):
        b = min(batch_size, nsamples - start)
        gens = [torch.Generator().manual_seed(seed * 1_000_003 + start + i) for i in range(b)]
        ids = torch.full((b, 1), bos, dtype=torch.long, device=device)
        past = None
        step_input = ids
        for _ in range(seqlen - 1):
            res = model(input_ids=step_input, past_key_values=past, use_cache=True)
            past = res.past_key_values
            logits = res.logits[:, -1, :].float()
            if eos is not None and eos != bos:
                logits[:, eos] = float("-inf")
            step_input = _sample(logits, temperature, top_p, gens).to(device)
            ids = torch.cat([ids, step_input], dim=1)
            bar.update(b)
        out.append(ids.cpu())
    bar.close()
    return torch.cat(out)


def _start_token(model, tokenizer) -> int:
    for candidate in (tokenizer.bos_token_id, model.config.bos_token_id, tokenizer.eos_token_id):
        if isinstance(candidate, int):
            return candidate
    return 0


def _sample(logits: torch.Tensor, temperature: float, top_p: float, gens: list[torch.Generator]) -> torch.Tensor:
    """One token per row, from the smallest prefix of the sorted distribution whose mass reaches ``top_p``
    (always at least the top token), renormalised; row ``i`` draws with ``gens[i]``.

    Each draw takes exactly one uniform number from its generator (inverse CDF over the nucleus), so a
    nucleus that gains or loses a boundary token (logits differ in the last bits between batch sizes) does
    not shift the random stream of every later step.
    """
    probs = torch.softmax(logits.cpu().float() / max(temperature, 1e-5), dim=-1)
    # The nucleus is looked for among the top candidates: a full sort of a 49K vocabulary per row, and a draw
    # over all of it, were half of self-generation's time. A row whose candidates hold too little mass sorts.
    top, index = probs.topk(min(_NUCLEUS_CANDIDATES, probs.shape[-1]), dim=-1)
    out = []
    for p, cand, cand_index, g in zip(probs, top, index, gens):
        if top_p >= 1.0 or (float(cand.sum()) < top_p and cand.numel() < p.numel()):
            cand, cand_index = p.sort(descending=True)
        keep = cand.cumsum(0) - cand <= top_p
        cdf = cand[keep].cumsum(0)
        u = torch.rand(1, generator=g, dtype=cdf.dtype) * cdf[-1]
        out.append(cand_index[keep][torch.searchsorted(cdf, u).clamp(max=cdf.numel() - 1)])
    return torch.stack(out).view(-1, 1)


_NUCLEUS_CANDIDATES = 1024
