"""Instruction examples tokenized for causal-LM fine-tuning, with optional response-only loss."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import LosaError
from .sources import Example

IGNORE_INDEX = -100  # label value the loss skips (PyTorch's cross_entropy default)


@dataclass
class TokenizedExample:
    input_ids: torch.Tensor  # [L]
    labels: torch.Tensor  # [L], IGNORE_INDEX on prompt tokens when the loss is on the response only


def tokenize_examples(tokenizer, examples: list[Example], max_len: int,
                      response_only: bool = True) -> list[TokenizedExample]:
    """Tokenize each example as the one text ``prompt + response`` (what generation and ``eval`` see),
    then EOS. With ``response_only`` the labels skip the prompt: the tokens the full text shares with
    the prompt alone. Tokenizing the two apart would start the response with a word-start token that the
    joined text never has (SentencePiece's prefix space)."""
    out = []
    for ex in examples:
        ids = tokenizer(ex.prompt + ex.response, add_special_tokens=True, verbose=False)["input_ids"]
        prompt = tokenizer(ex.prompt, add_special_tokens=True, verbose=False)["input_ids"]
        n_prompt = _common_prefix(ids, prompt)  # a token merged across the boundary counts as response
        if tokenizer.eos_token_id is not None and ids[-1:] != [tokenizer.eos_token_id]:  # once, if not added
            ids = ids + [tokenizer.eos_token_id]
        labels = [IGNORE_INDEX] * n_prompt + ids[n_prompt:] if response_only else list(ids)
        ids, labels = ids[:max_len], labels[:max_len]
        if len(ids) < 2 or all(label == IGNORE_INDEX for label in labels[1:]):
            continue  # nothing to learn from: the response was cut off entirely
        out.append(TokenizedExample(torch.tensor(ids), torch.tensor(labels)))
    if not out:
        raise LosaError(f"no usable examples: every response is empty or cut off at max length {max_len}")
    return out


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def collate(batch: list[TokenizedExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch; padded positions get IGNORE_INDEX labels and a zero attention mask."""
    length = max(e.input_ids.numel() for e in batch)
    ids = torch.full((len(batch), length), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), length), IGNORE_INDEX, dtype=torch.long)
    attn = torch.zeros((len(batch), length), dtype=torch.long)
    for i, e in enumerate(batch):
        n = e.input_ids.numel()
        ids[i, :n], labels[i, :n], attn[i, :n] = e.input_ids, e.labels, 1
    return {"input_ids": ids, "labels": labels, "attention_mask": attn}
