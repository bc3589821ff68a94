"""One prompt through a model on our runtime: a quick look at what a pruned or packed model says, and
how fast (``losa-deploy generate``, ``losa_deploy.generate``).

The text streams as it is decoded. Times come from the streamer's callbacks, one per generated token:
prefill is the call up to the first new token, decode the mean time of the tokens after it. They are one
generation's times, with transformers' per-step overhead; ``bench`` measures throughput properly.
"""

from __future__ import annotations

import time
from typing import TextIO

import torch
from transformers import TextStreamer

from ..errors import LosaError


class _TimedStreamer(TextStreamer):
    """transformers' streamer, writing to ``out`` (or nowhere), the prompt too with ``echo``, and stamping
    the time of each new token."""

    def __init__(self, tokenizer, out: TextIO | None, echo: bool):
        super().__init__(tokenizer, skip_prompt=not echo, skip_special_tokens=True)
        self.out, self.stamps, self.prompt_seen = out, [], False

    def put(self, value):
        if self.prompt_seen:  # the first call carries the prompt
            self.stamps.append(time.perf_counter())
        self.prompt_seen = True
        super().put(value)

    def on_finalized_text(self, text: str, stream_end: bool = False):
        if self.out is not None:
            self.out.write(text + ("\n" if stream_end else ""))
            self.out.flush()


def check_sampling(max_new_tokens: int, temperature: float, top_p: float) -> None:
    if max_new_tokens < 1:
        raise LosaError(f"max-new-tokens must be positive, got {max_new_tokens}")
    if not temperature >= 0.0:
        raise LosaError(f"temperature must be 0 (greedy) or positive, got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise LosaError(f"top-p must be in (0, 1], got {top_p}")


def prompt_ids(tokenizer, prompt: str, chat: bool) -> torch.Tensor:
    """[1, n] token ids of ``prompt``, inside the tokenizer's chat template with ``chat``."""
    if not prompt:
        raise LosaError("the prompt is empty")
    if not chat:
        return tokenizer(prompt, return_tensors="pt")["input_ids"]
    if not getattr(tokenizer, "chat_template", None):
        raise LosaError("--chat needs a chat template, and this model's tokenizer has none")
    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)["input_ids"]
    return torch.as_tensor(ids)


def _continuation(tokenizer, prompt: list[int], new: list[int]) -> str:
    """The text the new tokens add after the prompt's. Decoded alone, a sentencepiece tokenizer drops the
    first token's leading space ("big" + "rock"), so decode both and take the difference."""
    head = tokenizer.decode(prompt, skip_special_tokens=True)
    whole = tokenizer.decode(prompt + new, skip_special_tokens=True)
    return whole[len(head):] if whole.startswith(head) else tokenizer.decode(new, skip_special_tokens=True)


@torch.inference_mode()
def generate_text(model, tokenizer, input_ids: torch.Tensor, max_new_tokens: int = 64, temperature: float = 0.0,
                  top_p: float = 1.0, seed: int = 0, ignore_eos: bool = False, out: TextIO | None = None,
                  echo_prompt: bool = False) -> dict:
    """Continue the prompt ``input_ids`` [1, n] (from :func:`prompt_ids`; greedy at temperature 0, else
    sampled with ``seed``), streaming the new text (after the prompt's, with ``echo_prompt``) to ``out``;
    returns the text, token counts and times."""
    check_sampling(max_new_tokens, temperature, top_p)
    ids = input_ids.to(model.device)
    streamer = _TimedStreamer(tokenizer, out, echo_prompt)
    sampling = dict(do_sample=True, temperature=temperature, top_p=top_p) if temperature > 0 else \
        dict(do_sample=False, temperature=None, top_p=None, top_k=None)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    start = time.perf_counter()
    # The seed applies to this generation only: the caller's random state is restored afterwards.
    with torch.random.fork_rng(devices=[ids.device] if ids.device.type == "cuda" else []):
        torch.manual_seed(seed)
        sequences = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                   min_new_tokens=max_new_tokens if ignore_eos else None, pad_token_id=pad,
                                   streamer=streamer, **sampling)
    new = sequences[0, ids.shape[1]:].tolist()
    stamps = streamer.stamps
    decode_s = stamps[-1] - stamps[0] if len(stamps) > 1 else None
    return {"text": _continuation(tokenizer, ids[0].tolist(), new), "prompt_tokens": ids.shape[1],
            "new_tokens": len(new), "token_ids": new, "prefill_s": stamps[0] - start if stamps else None,
            "decode_tokens_per_s": (len(stamps) - 1) / decode_s if decode_s else None,
            "sampling": "greedy" if temperature == 0 else f"temperature {temperature:g}, top-p {top_p:g}, seed {seed}"}


__all__ = ["check_sampling", "generate_text", "prompt_ids"]
