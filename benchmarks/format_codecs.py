"""Packed-format conversions at load and pack time: the compiled codecs vs the PyTorch reference.

Loading a packed N:M linear (``ld.load``, the vLLM plugin) checks its canonical arrays, checks its zero
pattern against the sidecar hash (unpacking it) and builds the CPU kernel's layout; packing encodes it
(N:M at 2:4, and a 50% unstructured weight as a bitmask), after detecting its pattern. Each step runs on
LLaMA-2-7B's linear shapes in bf16, both ways, interleaved in one process (the order alternates every
round); we report medians and the median of the per-round ratios. ``detect_pattern`` has no switch: its
row gives the compiled time only (``pytorch_s`` null).

    python benchmarks/format_codecs.py [--rounds 3] [--threads 2] [--json codecs.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from losa_deploy.kernels import has_extension
from losa_deploy.kernels.formats import bitmask, nm
from losa_deploy.kernels.formats.bitmask import BitmaskWeight
from losa_deploy.kernels.formats.nm import NMWeight
from losa_deploy.sparsity.patterns import detect_pattern
from losa_deploy.utils.fs import atomic_file

SHAPES = {"q/k/v/o 4096x4096": (4096, 4096), "gate/up 11008x4096": (11008, 4096), "down 4096x11008": (4096, 11008)}


def two_four(rows: int, cols: int, gen: torch.Generator) -> torch.Tensor:
    w = torch.randn(rows, cols // 4, 4, generator=gen)
    w.scatter_(-1, w.abs().argsort(-1)[..., :2], 0.0)
    return w.view(rows, cols).to(torch.bfloat16)


def unstructured(weight: torch.Tensor) -> torch.Tensor:
    return torch.where(weight.abs() >= weight.abs().float().median(), weight, 0)


def steps(weight: torch.Tensor) -> dict:
    """step -> (function, the module whose compiled path a switch turns off)."""
    packed = NMWeight.from_dense(weight, 2, 4)
    state = packed.state_dict()
    half = unstructured(torch.randn_like(weight, dtype=torch.float32)).to(weight.dtype)
    return {
        "2:4 encode (pack)": (lambda: NMWeight.from_dense(weight, 2, 4), nm),
        "2:4 check (read)": (lambda: NMWeight.from_state_dict(state), nm),
        "2:4 to_dense (hash)": (packed.to_dense, nm),
        "2:4 kernel layout (load)": (packed.kernel_layout, nm),
        "50% bitmask encode (pack)": (lambda: BitmaskWeight.from_dense(half), bitmask),
        "50% detect_pattern": (lambda: detect_pattern(half), None),
    }


class _PyTorchOnly:
    """Turns a format module's compiled path off for the block (``nm._codec``, ``bitmask.ops``)."""

    def __init__(self, module):
        self.module, self.name = module, "_codec" if module is nm else "ops"

    def __enter__(self):
        self.saved = getattr(self.module, self.name)
        setattr(self.module, self.name, lambda *tensors: None)

    def __exit__(self, *exc):
        setattr(self.module, self.name, self.saved)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run(rounds: int) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    rows = []
    for shape_name, shape in SHAPES.items():
        weight = two_four(*shape, gen)
        for step, (fn, module) in steps(weight).items():
            times = {"compiled": [], "pytorch": []}
            ways = ("compiled", "pytorch") if module is not None else ("compiled",)
            for r in range(rounds):
                for way in (ways if r % 2 == 0 else ways[::-1]):
                    if way == "pytorch":
                        with _PyTorchOnly(module):
                            times[way].append(timed(fn))
                    else:
                        times[way].append(timed(fn))
            row = {"shape": shape_name, "step": step, "compiled_s": statistics.median(times["compiled"]),
                   "pytorch_s": None, "speedup": None}
            if times["pytorch"]:
                row["pytorch_s"] = statistics.median(times["pytorch"])
                row["speedup"] = statistics.median(p / c for p, c in zip(times["pytorch"], times["compiled"]))
            rows.append(row)
            reference = (f"pytorch {row['pytorch_s'] * 1e3:8.1f} ms   {row['speedup']:6.1f}x"
                         if row["speedup"] else "")
            print(f"{shape_name:20s} {step:26s} compiled {row['compiled_s'] * 1e3:8.1f} ms   {reference}", flush=True)
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
            json.dump({"command": "benchmarks/format_codecs.py", "threads": args.threads, "rows": rows}, handle, indent=1)


if __name__ == "__main__":
    main()
