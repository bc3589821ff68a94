"""What putting packed weights on transparent huge pages buys the CPU decode kernels (kernels/placement.py).

For each LLaMA-2-7B linear shape and pattern it builds a *layer stream*: L packed copies of one weight,
together at least --stream-mib, so every layer's weights come from DRAM as in a decode step. The stream
exists twice, once on 2 MiB huge pages (as ``SparseLinear`` keeps its weights) and once on the default
allocator (4 KiB pages where THP is in its default ``madvise`` mode), and the two are timed alternately,
--reps times each, in one process: the VM's memory speed moves by up to 2x from one minute to the next,
so only the ratio of neighbouring runs means anything. Reported: time per layer, GB/s of packed bytes, and
the median over repetitions of each huge-page run's speed over the 4 KiB run just before it.

    .venv/bin/python benchmarks/huge_pages.py --json benchmarks/results/huge_pages_cpu.json
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from kernels_cpu import SHAPES, fresh_copy, make_weight, pack

from losa_deploy.envinfo import cpu_info
from losa_deploy.kernels import ops, sparse_linear
from losa_deploy.kernels.placement import huge_pages_enabled, place_for_decode
from losa_deploy.utils.fs import write_json

PATTERNS = ("50%", "70%", "2:4")


def stream_ms(layers, x) -> float:
    """Milliseconds per layer for one pass over the stream."""
    start = time.perf_counter()
    for w in layers:
        sparse_linear(x, w)
    return (time.perf_counter() - start) * 1e3 / len(layers)


def measure(shape, pattern: str, tokens: int, stream_bytes: int, reps: int, gen) -> dict:
    first, _ = pack(make_weight(*shape, pattern, seed=0), pattern)
    nbytes = first.nbytes
    count = max(2, -(-stream_bytes // nbytes))
    small = [fresh_copy(first) for _ in range(count)]
    huge = [place_for_decode(fresh_copy(first)) for _ in range(count)]
    moved = sum(h.values.data_ptr() != s.values.data_ptr() for h, s in zip(huge, small))
    x = torch.randn(tokens, shape[1], generator=gen).bfloat16()
    assert torch.equal(sparse_linear(x, huge[0]), sparse_linear(x, small[0]))
    stream_ms(small, x), stream_ms(huge, x)  # warm-up: code, threads, page tables
    pairs = [(stream_ms(small, x), stream_ms(huge, x)) for _ in range(reps)]
    small_ms = statistics.median(p[0] for p in pairs)
    huge_ms = statistics.median(p[1] for p in pairs)
    ratios = sorted(s / h for s, h in pairs)
    return {"shape": f"{shape[0]}x{shape[1]}", "pattern": pattern, "tokens": tokens, "layers": count,
            "packed_mb": nbytes / 1e6, "huge_copies": moved, "ms_4k": small_ms, "ms_huge": huge_ms,
            "gbs_4k": nbytes / small_ms / 1e6, "gbs_huge": nbytes / huge_ms / 1e6,
            "speedup": statistics.median(ratios), "speedup_range": [ratios[0], ratios[-1]]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--stream-mib", type=int, default=384, help="packed bytes per stream (default 384)")
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if ops() is None:
        raise SystemExit("error: the compiled extension is not built (make install)")
    if not huge_pages_enabled():
        raise SystemExit("error: huge pages are off (LOSA_HUGE_PAGES=0)")
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    rows = []
    print("| shape | pattern | tokens | layers | ms/layer 4 KiB | ms/layer huge | GB/s 4 KiB | GB/s huge | huge x 4 KiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for shape in SHAPES:
        for pattern in PATTERNS:
            for tokens in args.tokens:
                r = measure(shape, pattern, tokens, args.stream_mib << 20, args.reps, gen)
                rows.append(r)
                lo, hi = r["speedup_range"]
                print(f"| {r['shape']} | {pattern} | {tokens} | {r['layers']} | {r['ms_4k']:.3f} | "
                      f"{r['ms_huge']:.3f} | {r['gbs_4k']:.1f} | {r['gbs_huge']:.1f} | "
                      f"**{r['speedup']:.2f}x** ({lo:.2f}-{hi:.2f}) |", flush=True)
    if args.json:
        write_json(args.json, {"threads": args.threads, "reps": args.reps, "stream_mib": args.stream_mib,
                               "cpu": cpu_info(), "rows": rows})


if __name__ == "__main__":
    main()
