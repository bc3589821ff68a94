"""Masked-LoRA training step (one forward + backward of one linear): fused kernels vs the references.

Methods, all computing y = x·Wᵀ + s·x·((B·A)⊙M)ᵀ with x, A, B trainable and W frozen:

- ``plain``:     unmasked LoRA, x·Wᵀ + s·(x·Aᵀ)·Bᵀ: the speed of light, which masked LoRA cannot reach
                 (the mask breaks the factorisation; kernels.md §6.5)
- ``reference``: the LoSA / SQFT reference: s·(B·A)⊙M built densely, autograd through it
- ``ref_ckpt``:  the same with the adapter branch under ``torch.utils.checkpoint`` (the delta is rebuilt
                 in backward instead of kept)
- ``fused``:     :func:`losa_deploy.kernels.masked_lora.masked_lora_linear` (mask as bitmask words)

Time: every method of a configuration runs in one process, interleaved (the order rotates every round),
after a warm-up; we report medians and the median of the per-round ratios, because the machines are
shared. Memory, CPU: each (configuration, method) runs once in a fresh subprocess; the peak is the
kernel's resident-set high-water mark (VmHWM, reset through /proc/self/clear_refs just before the step)
minus the resident set before it. glibc is told to serve every allocation over 64 KiB with mmap
(MALLOC_MMAP_THRESHOLD_), so freed tensors leave the resident set and cannot hide a later allocation.
Memory, GPU: torch.cuda.max_memory_allocated over the step, minus what was allocated before it.

    python benchmarks/masked_lora.py                       # the issue's grid on the CPU (2 threads, bf16)
    python benchmarks/masked_lora.py --device cuda         # the same grid on a GPU
    python benchmarks/masked_lora.py --quick               # one small configuration
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import itertools
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch.utils.checkpoint import checkpoint
from tqdm.auto import tqdm

from losa_deploy.kernels.formats.bitmask import pack_mask
from losa_deploy.kernels.masked_lora import (
    masked_lora_linear,
    masked_lora_linear_materialized,
    resolve_backend,
)
from losa_deploy.utils.fs import atomic_file
from losa_deploy.utils.plots import save_figure

METHODS = ("plain", "reference", "ref_ckpt", "fused")
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
MMAP_THRESHOLD = 65536


@dataclasses.dataclass(frozen=True)
class Config:
    d: int
    k: int
    rank: int
    tokens: int
    dtype: str = "bf16"
    dropout: float = 0.0
    sparsity: float = 0.5


def make_inputs(cfg: Config, device: str, seed: int = 0) -> dict:
    """A frozen W pruned to ``sparsity`` (unstructured), its mask, fp32 adapters, activations and dY."""
    gen = torch.Generator(device).manual_seed(seed)
    dtype = DTYPES[cfg.dtype]
    mask = torch.rand(cfg.d, cfg.k, generator=gen, device=device) >= cfg.sparsity
    weight = torch.randn(cfg.d, cfg.k, generator=gen, device=device).mul_(mask).to(dtype)
    return dict(
        weight=weight,
        mask=mask,
        words=pack_mask(mask),
        lora_A=torch.randn(cfg.rank, cfg.k, generator=gen, device=device).mul_(0.01).requires_grad_(),
        lora_B=torch.randn(cfg.d, cfg.rank, generator=gen, device=device).mul_(0.01).requires_grad_(),
        x=torch.randn(cfg.tokens, cfg.k, generator=gen, device=device).to(dtype),
        grad_y=torch.randn(cfg.tokens, cfg.d, generator=gen, device=device).to(dtype),
    )


def _plain(x, inp, scale, dropout):
    adapter_in = torch.nn.functional.dropout(x, dropout) if dropout else x
    lora = torch.nn.functional.linear(torch.nn.functional.linear(adapter_in, inp["lora_A"]), inp["lora_B"])
    return torch.nn.functional.linear(x, inp["weight"]) + lora * scale


def _reference(x, inp, scale, dropout):
    return masked_lora_linear_materialized(x, inp["weight"], inp["mask"], inp["lora_A"], inp["lora_B"], scale,
                                           dropout=dropout, training=True)


def _ref_ckpt(x, inp, scale, dropout):
    def adapter(x, a, b):
        adapter_in = torch.nn.functional.dropout(x, dropout) if dropout else x
        return torch.nn.functional.linear(adapter_in, (b @ a) * inp["mask"] * scale)

    base = torch.nn.functional.linear(x, inp["weight"])
    return base + checkpoint(adapter, x, inp["lora_A"], inp["lora_B"], use_reentrant=False)


def _fused(x, inp, scale, dropout):
    return masked_lora_linear(x, inp["weight"], inp["words"], inp["lora_A"], inp["lora_B"], scale,
                              dropout=dropout, training=True, backend=FUSED_BACKEND)


FUSED_BACKEND = "auto"  # --backend: which implementation "fused" times
STEPS = {"plain": _plain, "reference": _reference, "ref_ckpt": _ref_ckpt, "fused": _fused}


def step(method: str, cfg: Config, inp: dict, scale: float = 2.0) -> None:
    """One forward + backward under autocast (bf16) or in fp32; gradients of x, A and B."""
    for name in ("lora_A", "lora_B"):
        inp[name].grad = None
    x = inp["x"].detach().requires_grad_()
    device = x.device.type
    with torch.autocast(device, dtype=torch.bfloat16, enabled=cfg.dtype == "bf16"):
        y = STEPS[method](x, inp, scale, cfg.dropout)
    y.backward(inp["grad_y"])
    if device == "cuda":
        torch.cuda.synchronize()


def time_config(cfg: Config, device: str, rounds: int) -> dict:
    """Median seconds per method and median per-round ratios, methods interleaved in rotating order."""
    inp = make_inputs(cfg, device)
    for method in METHODS:
        step(method, cfg, inp)  # warm-up: library initialisation, caches
    seconds = {m: [] for m in METHODS}
    for r in range(rounds):
        for method in METHODS[r % len(METHODS):] + METHODS[:r % len(METHODS)]:
            start = time.perf_counter()
            step(method, cfg, inp)
            seconds[method].append(time.perf_counter() - start)
    out = {f"time_{m}": statistics.median(s) for m, s in seconds.items()}
    for num, den in (("reference", "fused"), ("ref_ckpt", "fused"), ("fused", "plain")):
        out[f"{num}/{den}"] = statistics.median(a / b for a, b in zip(seconds[num], seconds[den]))
    return out


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_bytes_here(method: str, cfg: Config, device: str) -> int:
    """Peak memory of one step above what was resident (CPU) or allocated (GPU) before it."""
    small = dataclasses.replace(cfg, d=64, k=96, tokens=16)
    step(method, small, make_inputs(small, device))  # library start-up is not the step's memory
    inp = make_inputs(cfg, device)
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step(method, cfg, inp)
        return torch.cuda.max_memory_allocated() - before
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current resident set
    before = _rss_kib("VmRSS")
    step(method, cfg, inp)
    return (_rss_kib("VmHWM") - before) * 1024


def peak_bytes(method: str, cfg: Config, device: str, threads: int) -> int:
    """:func:`peak_bytes_here` in a fresh process (CPU), so no earlier step's freed memory is reused."""
    if device == "cuda":
        return peak_bytes_here(method, cfg, device)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD), "OMP_NUM_THREADS": str(threads)}
    probe = json.dumps({"method": method, "config": dataclasses.asdict(cfg), "threads": threads})
    done = subprocess.run([sys.executable, __file__, "--memory-probe", probe], env=env, capture_output=True,
                          text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"memory probe failed: {done.stderr.strip()[-2000:]}")
    return int(done.stdout.strip().splitlines()[-1])


def grid(args) -> list[Config]:
    if args.quick:
        return [Config(d=1024, k=1024, rank=16, tokens=256, dtype=args.dtype)]
    configs = [Config(4096, k, r, t, args.dtype) for k, r, t in itertools.product(args.k, args.rank, args.tokens)]
    if args.dropout_row:
        configs.append(Config(4096, 4096, 16, 1024, args.dtype, dropout=0.1))
    return configs


def run(args) -> list[dict]:
    device = args.device
    torch.set_num_threads(args.threads)
    rows = []
    for cfg in tqdm(grid(args), desc="masked-LoRA benchmark", unit="config", disable=args.no_progress):
        row = {**dataclasses.asdict(cfg), "backend": resolve_backend(device, DTYPES[cfg.dtype], FUSED_BACKEND)}
        row.update(time_config(cfg, device, args.rounds))
        for method in METHODS:
            row[f"peak_{method}"] = peak_bytes(method, cfg, device, args.threads)
        for method in ("reference", "ref_ckpt", "fused"):
            row[f"extra_{method}"] = row[f"peak_{method}"] - row["peak_plain"]
        row["extra_fused/extra_reference"] = row["extra_fused"] / max(row["extra_reference"], 1)
        rows.append(row)
        print(table_row(row), flush=True)
    return rows


HEADER = ("| k | r | T | p | plain s | reference s | ref_ckpt s | fused s | reference/fused | ref_ckpt/fused "
          "| fused/plain | extra MiB ref | extra MiB ref_ckpt | extra MiB fused | fused/ref extra | bar |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")


def table_row(row: dict) -> str:
    mib = 1 << 20
    met = row["reference/fused"] >= 1.5 and row["extra_fused/extra_reference"] <= 0.5
    return (f"| {row['k']} | {row['rank']} | {row['tokens']} | {row['dropout']} | {row['time_plain']:.3f} | "
            f"{row['time_reference']:.3f} | {row['time_ref_ckpt']:.3f} | {row['time_fused']:.3f} | "
            f"{row['reference/fused']:.2f} | {row['ref_ckpt/fused']:.2f} | {row['fused/plain']:.2f} | "
            f"{row['extra_reference'] / mib:.0f} | {row['extra_ref_ckpt'] / mib:.0f} | {row['extra_fused'] / mib:.0f} | "
            f"{row['extra_fused/extra_reference']:.2f} | {'yes' if met else 'no'} |")


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"k{r['k']} r{r['rank']} T{r['tokens']}" + (f" p{r['dropout']}" if r["dropout"] else "") for r in rows]
    fig, (ax_t, ax_m) = plt.subplots(2, 1, figsize=(max(6.0, 0.45 * len(rows) + 2), 6.5), sharex=True)
    xs = range(len(rows))
    width = 0.38
    ax_t.bar([x - width / 2 for x in xs], [r["reference/fused"] for r in rows], width, label="reference / fused")
    ax_t.bar([x + width / 2 for x in xs], [r["fused/plain"] for r in rows], width, label="fused / plain LoRA")
    ax_t.axhline(1.5, color="k", ls="--", lw=0.8, label="bar: reference/fused ≥ 1.5")
    ax_t.set_ylabel("time ratio (fwd+bwd)")
    ax_t.legend(fontsize=7)
    mib = 1 << 20
    ax_m.bar([x - width / 2 for x in xs], [r["extra_reference"] / mib for r in rows], width, label="reference")
    ax_m.bar([x + width / 2 for x in xs], [r["extra_fused"] / mib for r in rows], width, label="fused")
    ax_m.set_ylabel("peak memory over plain LoRA (MiB)")
    ax_m.set_xticks(list(xs), labels, rotation=60, ha="right", fontsize=7)
    ax_m.legend(fontsize=7)
    fig.suptitle(f"masked LoRA, d=4096, {rows[0]['dtype']}, backend {rows[0]['backend']}")
    save_figure(fig, path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (default 2)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="bf16 = bf16 autocast (default)")
    parser.add_argument("--k", type=int, nargs="+", default=[4096, 11008])
    parser.add_argument("--rank", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument("--tokens", type=int, nargs="+", default=[256, 1024, 2048])
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per configuration")
    parser.add_argument("--no-dropout-row", dest="dropout_row", action="store_false",
                        help="skip the extra k=4096 r=16 T=1024 configuration with dropout 0.1")
    parser.add_argument("--quick", action="store_true", help="one small configuration (smoke test)")
    parser.add_argument("--json", help="write the rows as JSON here")
    parser.add_argument("--plot", help="write a PNG of the ratios and memory here")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--backend", default="auto", help="masked_lora_linear backend for the fused column")
    parser.add_argument("--memory-probe", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    global FUSED_BACKEND
    FUSED_BACKEND = args.backend
    if args.memory_probe:  # child process of peak_bytes
        probe = json.loads(args.memory_probe)
        torch.set_num_threads(probe["threads"])
        print(peak_bytes_here(probe["method"], Config(**probe["config"]), "cpu"))
        return 0
    print(f"device {args.device}, threads {args.threads}, torch {torch.__version__}")
    print(HEADER)
    rows = run(args)
    if args.json:
        with atomic_file(args.json, "w") as handle:
            json.dump(rows, handle, indent=1)
    if args.plot:
        plot(rows, args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
