"""Prompt templates for instruction data."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PromptTemplate:
    name: str
    with_input: str
    without_input: str

    def render(self, instruction: str, input: str = "") -> str:
        if input and input.strip():
            return self.with_input.format(instruction=instruction.strip(), input=input.strip())
        return self.without_input.format(instruction=instruction.strip())


# The Stanford Alpaca template (the response follows the prompt directly).
ALPACA = PromptTemplate(
    name="alpaca",
    with_input=(
        "Below is an instruction that describes a task, paired with an input that provides further "
        "context. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
    ),
    without_input=(
        "Below is an instruction that describes a task. Write a response that appropriately completes "
        "the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
    ),
)

TEMPLATES = {t.name: t for t in (ALPACA,)}
