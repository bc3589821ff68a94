"""Attention forward without gradient on the CPU: our kernels against torch's SDPA (flash), same inputs.

This is the attention of every calibration pass (pruning, RMI, LoSA's phases) and of perplexity; the
shapes are those passes' batches: stories260K (8 heads of 8), SmolLM2-135M (9 query / 3 key-value heads of
64) and LLaMA-2-7B (32 heads of 128), mostly 8 windows of 256 tokens, plus longer windows: the "long"
rows are where kernels/attention.py keeps SDPA (over 512 positions with heads wider than 16). Both run in one
process, interleaved (the order alternates every round), after a warm-up; we report medians and the
median of the per-round ratios, because the machines are noisy. Each result is also checked against a
float64 reference (max abs error of both, so the speed is not bought with accuracy).

With ``--decode``: one decode step (one new row per sequence) against a KV cache of 160 to 4096
positions, in bf16 (and fp32), as our runtime runs it (``losa_deploy.load``): our decode kernel against
SDPA as transformers calls it for that step (no mask, grouped heads by ``enable_gqa``). The "GB/s" column
is the cache bytes our kernel reads per second: a decode step is a read of the cache.

    .venv/bin/python benchmarks/attention_cpu.py [--decode] [--rounds 20] [--json benchmarks/results/attention_cpu.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from losa_deploy.kernels.attention import available, causal_attention, decode_attention
from losa_deploy.utils.fs import atomic_file

# name, batch, query heads, key/value heads, sequence, head size
SHAPES = [("stories260K", 8, 8, 8, 256, 8), ("stories260K long", 2, 8, 8, 2048, 8),
          ("smollm2-135m", 8, 9, 3, 256, 64), ("smollm2-135m", 4, 9, 3, 512, 64),
          ("smollm2-135m long", 2, 9, 3, 1024, 64), ("llama2-7b", 8, 32, 32, 256, 128),
          ("llama2-7b long", 1, 32, 32, 2048, 128)]
# name, batch, query heads, key/value heads, cached positions, head size, dtype
DECODE_SHAPES = [("stories260K", 8, 8, 8, 256, 8, torch.float32), ("smollm2-135m", 1, 9, 3, 512, 64, torch.bfloat16),
                 ("smollm2-135m", 8, 9, 3, 512, 64, torch.bfloat16), ("llama2-7b", 1, 32, 32, 160, 128, torch.bfloat16),
                 ("llama2-7b", 8, 32, 32, 160, 128, torch.bfloat16), ("llama2-7b", 8, 32, 32, 160, 128, torch.float32),
                 ("llama2-7b", 8, 32, 32, 1024, 128, torch.bfloat16), ("llama2-7b", 1, 32, 32, 4096, 128, torch.bfloat16),
                 ("llama3-8b (GQA 4)", 1, 32, 8, 2048, 128, torch.bfloat16),
                 ("llama3-8b (GQA 4)", 8, 32, 8, 1024, 128, torch.bfloat16)]


def sdpa(q, k, v, scale):
    # What transformers' SDPA path computes and returns ([B, S, H, D], contiguous).
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=k.shape[1] != q.shape[1])
    return out.transpose(1, 2).contiguous()


def reference(q, k, v, scale):
    """The same attention in float64 (SDPA's math path; the tests check our kernel against a hand-written one)."""
    return sdpa(q.double(), k.double(), v.double(), scale)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def interleaved(runs: dict, rounds: int) -> dict[str, list[float]]:
    """Seconds per call of each of the two runs, alternating which goes first every round (after a warm-up)."""
    for fn in runs.values():
        fn()
    first, second = runs
    times = {m: [] for m in runs}
    for r in range(rounds):
        for m in ((first, second) if r % 2 == 0 else (second, first)):
            times[m].append(timed(runs[m]))
    return times


def summary(times: dict[str, list[float]]) -> dict:
    ratios = [s / o for s, o in zip(times["sdpa"], times["ours"])]
    return {"ours_ms": 1e3 * statistics.median(times["ours"]), "sdpa_ms": 1e3 * statistics.median(times["sdpa"]),
            "speedup": statistics.median(ratios), "speedup_range": [min(ratios), max(ratios)]}


@torch.no_grad()
def measure(shape, rounds: int) -> dict:
    name, batch, heads, kv_heads, seq, dim = shape
    gen = torch.Generator().manual_seed(0)
    # As transformers hands them over: [B, S, H, D] projections viewed as [B, H, S, D].
    q = torch.randn(batch, seq, heads, dim, generator=gen).transpose(1, 2)
    k, v = (torch.randn(batch, seq, kv_heads, dim, generator=gen).transpose(1, 2) for _ in range(2))
    scale = dim ** -0.5
    ref = reference(q, k, v, scale)
    errors = {"ours": (causal_attention(q, k, v, scale).double() - ref).abs().max().item(),
              "sdpa": (sdpa(q, k, v, scale).double() - ref).abs().max().item()}
    times = interleaved({"ours": lambda: causal_attention(q, k, v, scale), "sdpa": lambda: sdpa(q, k, v, scale)},
                        rounds)
    return {"shape": name, "batch": batch, "heads": heads, "kv_heads": kv_heads, "seq": seq, "head_dim": dim,
            **summary(times), "max_abs_error": errors}


def sdpa_decode(q, k, v):
    # transformers' SDPA call for a decode step: no mask, grouped heads expanded by SDPA itself.
    return F.scaled_dot_product_attention(q, k, v, enable_gqa=k.shape[1] != q.shape[1]).transpose(1, 2).contiguous()


@torch.no_grad()
def measure_decode(shape, rounds: int) -> dict:
    name, batch, heads, kv_heads, cached, dim, dtype = shape
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(batch, 1, heads, dim, generator=gen).to(dtype).transpose(1, 2)
    k, v = (torch.randn(batch, kv_heads, cached, dim, generator=gen).to(dtype) for _ in range(2))
    ref = sdpa_decode(q.double(), k.double(), v.double())
    errors = {"ours": (decode_attention(q, k, v).double() - ref).abs().max().item(),
              "sdpa": (sdpa_decode(q, k, v).double() - ref).abs().max().item()}
    times = interleaved({"ours": lambda: decode_attention(q, k, v), "sdpa": lambda: sdpa_decode(q, k, v)}, rounds)
    row = {"shape": name, "batch": batch, "heads": heads, "kv_heads": kv_heads, "seq": cached, "head_dim": dim,
           "dtype": str(dtype).removeprefix("torch."), **summary(times), "max_abs_error": errors}
    row["ours_cache_gb_s"] = (k.nbytes + v.nbytes) / (row["ours_ms"] * 1e6)
    return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--decode", action="store_true", help="time one decode step against a KV cache instead")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args()
    if not available():
        print("error: the AVX-512 attention kernel is not available here (extension missing, CPU without "
              "AVX-512, or LOSA_FAST_ATTENTION=0)", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    if args.decode:
        rows = [measure_decode(shape, args.rounds) for shape in DECODE_SHAPES]
        print("| shape | batch x heads (kv) x cached x head size | dtype | SDPA ms | ours ms | speedup (range) | "
              "ours GB/s | max abs error ours / SDPA |\n|---|---|---|---|---|---|---|---|")
    else:
        rows = [measure(shape, args.rounds) for shape in SHAPES]
        print("| shape | batch x heads (kv) x seq x head size | SDPA ms | ours ms | speedup (range) | "
              "max abs error ours / SDPA |\n|---|---|---|---|---|---|")
    for r in rows:
        lo, hi = r["speedup_range"]
        dtype = f" {r['dtype']} |" if args.decode else ""
        speed = f" {r['ours_cache_gb_s']:.1f} |" if args.decode else ""
        print(f"| {r['shape']} | {r['batch']} x {r['heads']} ({r['kv_heads']}) x {r['seq']} x {r['head_dim']} |{dtype} "
              f"{r['sdpa_ms']:.2f} | {r['ours_ms']:.2f} | **{r['speedup']:.2f}x** ({lo:.2f}-{hi:.2f}) |{speed} "
              f"{r['max_abs_error']['ours']:.1e} / {r['max_abs_error']['sdpa']:.1e} |")
    if args.json:
        with atomic_file(args.json) as handle:
            handle.write(json.dumps({"threads": args.threads, "rounds": args.rounds, "torch": torch.__version__,
                                     "mode": "decode" if args.decode else "prefill",
                                     "command": " ".join(sys.argv), "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
