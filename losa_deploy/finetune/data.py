"""Training examples for fine-tuning, and how a token budget is split across a method's phases."""

from __future__ import annotations

import torch

from ..data import TextSource, TokenizedExample, tokenize_examples, tokenize_text
from ..errors import LosaError


def training_examples(tokenizer, source: TextSource, max_len: int, response_only: bool = True
                      ) -> list[TokenizedExample]:
    """Instruction examples (prompt masked if ``response_only``), or a text cut into ``max_len`` windows."""
    if source.is_instruct:
        return tokenize_examples(tokenizer, source.examples, max_len, response_only)
    ids = tokenize_text(tokenizer, source.text)
    n = ids.numel() // max_len
    if n == 0:
        raise LosaError(f"training text has {ids.numel()} tokens, shorter than one window of {max_len}")
    return [TokenizedExample(w.clone(), w.clone()) for w in ids[: n * max_len].view(n, max_len)]


def tokens_of(example: TokenizedExample) -> int:
    return example.input_ids.numel()


def split_budget(examples: list[TokenizedExample], phases: int, budget_tokens: int | None,
                 weights: list[float] | None = None) -> list[list[TokenizedExample]]:
    """``phases`` disjoint consecutive slices of the budget, in proportion to ``weights`` (default even).

    ``None`` uses all the data. Every method on the same budget sees the same examples, in the same
    order, so comparisons between methods are fair.
    """
    total = sum(tokens_of(e) for e in examples)
    budget = total if budget_tokens is None else budget_tokens
    if budget > total:
        raise LosaError(f"token budget {budget} exceeds the {total} tokens of the training data")
    if budget < phases:
        raise LosaError(f"token budget {budget} is too small for {phases} phases")
    weights = weights or [1.0] * phases
    bounds = [round(budget * sum(weights[:p]) / sum(weights)) for p in range(phases + 1)]
    slices, start = [], 0
    for p in range(phases):
        want, got, end = bounds[p + 1] - bounds[p], 0, start
        while end < len(examples) and got < want:
            got += tokens_of(examples[end])
            end += 1
        if end == start:
            raise LosaError(f"not enough training examples for phase {p + 1} of {phases}")
        slices.append(examples[start:end])
        start = end
    return slices


def shuffled(examples: list, seed: int) -> list:
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
    return [examples[i] for i in order]
