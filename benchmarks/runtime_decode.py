"""Our runtime's decode step, piece by piece: transformers' defaults against our attention and our cache.

``losa_deploy.load`` switches a CPU model to the ``losa_cpu`` attention, and bench's ``losa`` engine also
decodes into a :class:`~losa_deploy.runtime.cache.GrowingCache`. This times what each is worth on a whole
model: the same loaded model decodes greedily from the same random prompts as
  * ``sdpa+dynamic``: transformers' SDPA and ``DynamicCache`` (what the model would do without us),
  * ``ours+dynamic``: our attention kernels, ``DynamicCache``,
  * ``ours+growing``: our attention kernels and the in-place cache (what bench's ``losa`` engine runs),
in turn every round (the order rotating), and we report the median time per decode step of each and the
median per-round speed-up over the first.

    python benchmarks/runtime_decode.py PACKED_DIR [--batch 1 8] [--prompt-len 128] [--gen-len 32] \
        [--rounds 5] [--threads 2] [--dtype bf16] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
from transformers import DynamicCache

import losa_deploy as ld
from losa_deploy.kernels.attention import NAME
from losa_deploy.runtime.cache import GrowingCache
from losa_deploy.utils.fs import atomic_file

VARIANTS = {"sdpa+dynamic": ("sdpa", DynamicCache), "ours+dynamic": (NAME, DynamicCache),
            "ours+growing": (NAME, GrowingCache)}


@torch.inference_mode()
def decode_step_s(model, prompts: torch.Tensor, gen_len: int, cache) -> float:
    """Seconds per decode step of a greedy generation of ``gen_len`` tokens (the prefill not counted)."""
    out = model(input_ids=prompts, past_key_values=cache, use_cache=True, logits_to_keep=1)
    token = out.logits[:, -1].argmax(-1)
    start = time.perf_counter()
    for _ in range(gen_len - 1):
        out = model(input_ids=token[:, None], past_key_values=out.past_key_values, use_cache=True, logits_to_keep=1)
        token = out.logits[:, -1].argmax(-1)
    return (time.perf_counter() - start) / (gen_len - 1)


def measure(model, batch: int, args) -> dict:
    gen = torch.Generator().manual_seed(batch)
    prompts = torch.randint(0, model.config.vocab_size, (batch, args.prompt_len), generator=gen)
    names = list(VARIANTS)
    times = {name: [] for name in names}
    for r in range(args.rounds + 1):  # round 0 warms every variant up
        for name in names[r % len(names):] + names[:r % len(names)]:
            attention, cache = VARIANTS[name]
            model.config._attn_implementation = attention
            seconds = decode_step_s(model, prompts, args.gen_len, cache(config=model.config))
            if r:
                times[name].append(seconds)
    model.config._attn_implementation = NAME
    base = names[0]
    row = {"batch": batch, "prompt_len": args.prompt_len, "ms": {n: 1e3 * statistics.median(t) for n, t in times.items()}}
    row["speedup"] = {n: statistics.median(b / o for b, o in zip(times[base], times[n])) for n in names}
    return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", help="a losa- or vllm-packed folder")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--gen-len", type=int, default=32)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model = ld.load(args.model, dtype=args.dtype)
    if model.config._attn_implementation != NAME:
        print("error: the losa_cpu attention is not available here (extension, AVX-512 or LOSA_FAST_ATTENTION)",
              file=sys.stderr)
        return 2
    rows = [measure(model, batch, args) for batch in args.batch]
    print("| batch | prompt | " + " | ".join(f"{n} ms/step" for n in VARIANTS) + " | " +
          " | ".join(f"{n} x" for n in list(VARIANTS)[1:]) + " |")
    print("|---" * (2 + 2 * len(VARIANTS) - 1) + "|")
    for r in rows:
        print(f"| {r['batch']} | {r['prompt_len']} | " + " | ".join(f"{r['ms'][n]:.2f}" for n in VARIANTS) + " | " +
              " | ".join(f"**{r['speedup'][n]:.2f}x**" for n in list(VARIANTS)[1:]) + " |")
    if args.json:
        with atomic_file(args.json) as handle:
            handle.write(json.dumps({"command": " ".join(sys.argv), "threads": args.threads, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
