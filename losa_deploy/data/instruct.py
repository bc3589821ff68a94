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
    """Tokenize prompt and response separately so the prompt/response boundary is exact."""
    out = []
    for ex in examples:
        prompt = tokenizer(ex.prompt, add_special_tokens=True, verbose=False)["input_ids"]
        response = tokenizer(ex.response, add_special_tokens=False, verbose=False)["input_ids"]
        if tokenizer.eos_token_id is not None:
            response = response + [tokenizer.eos_token_id]
        ids = (prompt + response)[:max_len]
        labels = ([IGNORE_INDEX] * len(prompt) if response_only else list(prompt)) + response
        labels = labels[:max_len]
        if len(ids) < 2 or all(label == IGNORE_INDEX for label in labels[1:]):
            continue  # nothing to learn from: the response was cut off entirely
        out.append(TokenizedExample(torch.tensor(ids), torch.tensor(labels)))
    if not out:
        raise LosaError(f"no usable examples: every response is empty or cut off at max length {max_len}")
    return out


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
