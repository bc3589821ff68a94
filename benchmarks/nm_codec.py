"""N:M format conversions at load and pack time: the compiled codec vs the PyTorch reference.

Loading a packed N:M linear (``ld.load``, the vLLM plugin) checks its canonical arrays, checks its zero
pattern against the sidecar hash (unpacking it) and builds the CPU kernel's layout; packing encodes it.
Each step runs on LLaMA-2-7B's linear shapes at 2:4 in bf16, both ways, interleaved in one process
(the order alternates every round); we report medians and the median of the per-round ratios.

    python benchmarks/nm_codec.py [--rounds 3] [--threads 2] [--json nm_codec.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from losa_deploy.kernels import has_extension
from losa_deploy.kernels.formats import nm
from losa_deploy.kernels.formats.nm import NMWeight
from losa_deploy.utils.fs import atomic_file

SHAPES = {"q/k/v/o 4096x4096": (4096, 4096), "gate/up 11008x4096": (11008, 4096), "down 4096x11008": (4096, 11008)}


def two_four(rows: int, cols: int, gen: torch.Generator) -> torch.Tensor:
    w = torch.randn(rows, cols // 4, 4, generator=gen)
    w.scatter_(-1, w.abs().argsort(-1)[..., :2], 0.0)
    return w.view(rows, cols).to(torch.bfloat16)


def steps(weight: torch.Tensor) -> dict:
    packed = NMWeight.from_dense(weight, 2, 4)
    state = packed.state_dict()
    return {
        "encode (pack)": lambda: NMWeight.from_dense(weight, 2, 4),
        "check (read)": lambda: NMWeight.from_state_dict(state),
        "to_dense (hash)": packed.to_dense,
        "kernel layout (load)": packed.kernel_layout,
    }


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run(rounds: int) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    compiled = nm._codec
    rows = []
    for shape_name, shape in SHAPES.items():
        weight = two_four(*shape, gen)
        for step, fn in steps(weight).items():
            times = {"compiled": [], "pytorch": []}
            for r in range(rounds):
                for way in (("compiled", "pytorch") if r % 2 == 0 else ("pytorch", "compiled")):
                    nm._codec = compiled if way == "compiled" else (lambda *tensors: None)
                    try:
                        times[way].append(timed(fn))
                    finally:
                        nm._codec = compiled
            ratios = [p / c for p, c in zip(times["pytorch"], times["compiled"])]
            rows.append({"shape": shape_name, "step": step, "compiled_s": statistics.median(times["compiled"]),
                         "pytorch_s": statistics.median(times["pytorch"]), "speedup": statistics.median(ratios)})
            print(f"{shape_name:20s} {step:22s} compiled {rows[-1]['compiled_s'] * 1e3:8.1f} ms   "
                  f"pytorch {rows[-1]['pytorch_s'] * 1e3:8.1f} ms   {rows[-1]['speedup']:6.1f}x", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--json", help="write the rows as JSON")
    args = parser.parse_args()
    if not has_extension():
        raise SystemExit("error: the compiled extension is not built (make install)")
    torch.set_num_threads(args.threads)
    rows = run(args.rounds)
    if args.json:
        with atomic_file(args.json, "w") as handle:
            json.dump({"command": "benchmarks/nm_codec.py", "threads": args.threads, "rows": rows}, handle, indent=1)


if __name__ == "__main__":
    main()
