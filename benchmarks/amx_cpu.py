"""The AMX path of the CPU sparse linear against the AVX-512 BF16 row kernel and dense bf16, side by side.

For LLaMA-2-7B linear shapes, patterns (70% and 50% unstructured: bitmask; 2:4: N:M) and token counts,
one process times, interleaved (each repetition runs every contender once, the order alternating):

* ``amx``: ``sparse_linear(..., backend="amx")`` (csrc/cpu/amx_linear.cpp from 4 tokens on);
* ``rows``: ``backend="avx512_bf16"``, what it replaces there: the row kernel, and from 32 tokens the panel path
  (decompress panels of rows, then oneDNN's GEMM);
* ``dense``: ``F.linear`` on the same zero-filled bf16 weight (oneDNN; on an AMX CPU it uses the tiles).

bf16 values and activations; medians of ``--reps`` calls. The weights stay in the cache hierarchy between
calls as far as they fit (benchmarks/kernels_cpu.py measures with cold weights); this compares the
arithmetic, which is what bounds these token counts. Needs a CPU with AMX-BF16 (Sapphire Rapids or later).

    .venv/bin/python benchmarks/amx_cpu.py [--tokens 1 2 4 8 16 32 64 128 256 512 1024] [--reps 11] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from losa_deploy.kernels.dispatch import sparse_linear
from losa_deploy.kernels.formats.bitmask import BitmaskWeight
from losa_deploy.kernels.formats.nm import NMWeight
from losa_deploy.utils.fs import atomic_file

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]
PATTERNS = ["70%", "50%", "2:4"]


def weight(rows: int, cols: int, pattern: str, gen: torch.Generator):
    w = torch.randn(rows, cols, generator=gen).bfloat16()
    if pattern == "2:4":
        groups = w.view(rows, -1, 4)
        drop = groups.float().abs().argsort(-1)[..., :2]
        groups.scatter_(-1, drop, 0)
        return w, NMWeight.from_dense(w, 2, 4).kernel_layout()
    w[torch.rand(rows, cols, generator=gen) < float(pattern.rstrip("%")) / 100] = 0
    return w, BitmaskWeight.from_dense(w)


def measure(w, packed, tokens: int, reps: int, gen: torch.Generator) -> dict:
    x = torch.randn(tokens, w.shape[1], generator=gen).bfloat16()
    calls = {"amx": lambda: sparse_linear(x, packed, backend="amx"),
             "rows": lambda: sparse_linear(x, packed, backend="avx512_bf16"),
             "dense": lambda: F.linear(x, w)}
    ref = x.double() @ w.double().t()
    errors = {name: float(((f().double() - ref).abs() / (ref.abs() + 1)).max()) for name, f in calls.items()}
    times = {name: [] for name in calls}
    for rep in range(reps):
        order = list(calls.items()) if rep % 2 == 0 else list(reversed(calls.items()))
        for name, f in order:
            start = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - start)
    ms = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    return {"tokens": tokens, "ms": ms, "amx_x_rows": ms["rows"] / ms["amx"], "amx_x_dense": ms["dense"] / ms["amx"],
            "rows_x_dense": ms["dense"] / ms["rows"], "max_rel_error": errors}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024])
    p.add_argument("--reps", type=int, default=11)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    rows = []
    print("| shape | pattern | tokens | amx ms | row kernel ms | dense bf16 ms | amx x rows | amx x dense | rows x dense |")
    print("|---|---|---|---|---|---|---|---|---|")
    for shape in SHAPES:
        for pattern in PATTERNS:
            w, packed = weight(*shape, pattern, gen)
            for tokens in args.tokens:
                r = {"shape": f"{shape[0]}x{shape[1]}", "pattern": pattern, **measure(w, packed, tokens, args.reps, gen)}
                rows.append(r)
                print(f"| {r['shape']} | {pattern} | {tokens} | {r['ms']['amx']:.2f} | {r['ms']['rows']:.2f} | "
                      f"{r['ms']['dense']:.2f} | **{r['amx_x_rows']:.2f}x** | {r['amx_x_dense']:.2f}x | "
                      f"{r['rows_x_dense']:.2f}x |", flush=True)
    if args.json:
        with atomic_file(args.json) as tmp:
            tmp.write(json.dumps({"threads": args.threads, "reps": args.reps, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
