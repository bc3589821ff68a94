"""GPU sparse-linear kernels against cuBLAS dense and 2:4 cuSPARSELt at LLaMA-2-7B shapes (issue #7).

One command checks and times every GPU kernel, in bf16:

* shapes (out x in): 4096x4096 (q/k/v/o), 11008x4096 (gate/up), 4096x11008 (down);
* patterns: 50/70/90% unstructured (bitmask layout) and 2:4 (N:M layout; also cuSPARSELt);
* tokens: 1, 8, 16, 32, 128.

Contenders per case:

* ``dense``: ``F.linear`` on the dense bf16 weight (cuBLAS), the baseline of every ratio;
* ``auto``: ``losa_deploy.kernels.sparse_linear`` with the layer's GPU layout, i.e. what ``SparseLinear``
  runs on CUDA (the CUDA decode op up to 16 tokens, else the Triton kernels' default config);
* ``cuda rows``: the CUDA op's row-walk kernel (``csrc/cuda/bitmask_gemv.cu``; 16 tokens per launch);
* ``cuda groups:W:P``: the CUDA op's value-group kernel (``bitmask_gemv_groups.cu``) with W warps per
  block and P groups per lane in flight, a few settings (the best is reported);
* ``cuda positions:W[:R]``: the CUDA op's one-token positions kernel (``bitmask_gemv_positions.cu``);
* ``cuda delta W:D``: the delta-layout kernel (``losa::delta_linear``, ``csrc/cuda/delta_gemv.cu``) on the
  same weight repacked (``kernels/formats/delta.py``), W warps per block, D groups per lane per step, loads
  one step ahead (A = 1) or not, up to 16 tokens (one launch where x fits shared memory); its layout's
  bytes are reported as
  ``bytes_delta``;
* ``triton*``: the best of a few Triton launch configurations (block rows, warps, stages, split-K), the
  autotuning of this suite, kept small so the whole run takes minutes;
* ``cslt``: ``torch.sparse.to_sparse_semi_structured`` (cuSPARSELt, or CUTLASS where torch picks it) for
  2:4; a failure is caught and reported.

Every kernel's output is first checked against ``F.linear`` in fp32 on the same bf16 values, with fresh
random inputs (relative Frobenius error <= 1e-2). Times are ``triton.testing.do_bench`` medians, which
flush the L2 cache before every call, so weights come from HBM as in decode. The masked-LoRA training
benchmark (benchmarks/masked_lora.py, issue #6) runs too, on a small grid. A table is printed last and
everything is written as JSON to ``--out``.

    python benchmarks/gpu_suite.py --out gpu_suite.json           # the full grid (a few minutes on an H100)
    python benchmarks/gpu_suite.py --quick --out quick.json        # one shape, two patterns, two token counts
    TRITON_INTERPRET=1 python benchmarks/gpu_suite.py --smoke --out smoke.json   # tiny shapes on the CPU
                                                                   # (checks this script, times nothing real)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from losa_deploy.kernels.dispatch import (
    gpu_kernel,
    groups_kernel_fits,
    has_cuda_op,
    has_delta_op,
    positions_kernel_fits,
    sparse_linear,
)
from losa_deploy.kernels.formats.bitmask import BitmaskWeight
from losa_deploy.kernels.formats.delta import DeltaWeight
from losa_deploy.kernels.formats.gpu import gpu_layout
from losa_deploy.kernels.formats.nm import NMWeight
from losa_deploy.utils.fs import atomic_file

SHAPES = ((4096, 4096), (11008, 4096), (4096, 11008))
GROUP_KERNELS = ("groups:16:2", "groups:16:2:window", "groups:8:2:window", "groups:16:4")  # the op's default first
POSITION_KERNELS = ("positions:16", "positions:8", "positions:16:2", "positions:8:2")  # one token only; W[:rows per warp]
PATTERNS = ("50%", "70%", "90%", "2:4")
# the op's default first; warps:depth:ahead (ahead 1: each step's loads one step early)
DELTA_CONFIGS = ("8:2:1", "8:2:0", "4:2:1", "16:2:1", "8:1:1", "8:4:0", "16:4:0")
DELTA_TIMED_TOKENS = 16  # the delta kernel is timed up to here
TOKENS = (1, 8, 16, 32, 128)
TOLERANCE = 1e-2
BARS = (("70%", 1, 2.0), ("50%", 1, 1.5), ("70%", 16, 1.3))  # (pattern, tokens, speedup over dense), H100


def triton_candidates(tokens: int):
    from losa_deploy.kernels.triton.sparse_gemm import DECODE_MAX_TOKENS, Config, default_config

    if tokens <= DECODE_MAX_TOKENS:
        others = [Config("decode", 8), Config("decode", 8, split_k=1), Config("decode", 16, num_warps=8),
                  Config("decode", 4, block_k=128, num_stages=3), Config("decode", 2, num_warps=2)]
    else:
        bt = 16 if tokens <= 16 else 32 if tokens <= 32 else 64
        others = [Config("dot", 64, block_k=128, block_t=bt, num_warps=8),
                  Config("dot", 64, block_k=64, block_t=bt, num_warps=8),
                  Config("dot", 128, block_k=64, block_t=bt, num_warps=8),
                  Config("dot", 32, block_k=128, block_t=bt, num_warps=4),
                  Config("dot", 64, block_k=64, block_t=bt, num_warps=8, num_stages=3, split_k=1),
                  Config("panels", 16), Config("panels", 8), Config("panels", 32, num_warps=8)]
    default = default_config(tokens)
    return [default, *[c for c in others if c != default]]


def kernel_runs(kernel: str, cols: int, tokens: int, device) -> bool:
    """Whether the CUDA op runs ``kernel`` (``rows``, ``groups:W:P[:window]``, ``positions:W[:R]``) at this size:
    a forced value-group kernel that does not fit is an error, so the suite and the probe leave it out.
    The positions kernel is timed at one token only (more tokens are one launch each)."""
    family, *settings = kernel.split(":")
    warps = int(settings[0]) if settings else 16  # both kernels' default
    if family == "positions":
        return tokens == 1 and positions_kernel_fits(cols, warps, device)
    return groups_kernel_fits(cols, tokens, device, warps) if family == "groups" else True


def make_weight(rows: int, cols: int, pattern: str, gen: torch.Generator) -> torch.Tensor:
    device = gen.device
    w = torch.randn(rows, cols, generator=gen, device=device)
    if pattern.endswith("%"):
        keep = torch.rand(rows, cols, generator=gen, device=device) >= float(pattern[:-1]) / 100
    else:
        n, m = (int(v) for v in pattern.split(":"))
        scores = torch.rand(rows, cols // m, m, generator=gen, device=device)
        keep = (scores.argsort(-1).argsort(-1) < n).view(rows, cols)
    return (w * keep).to(torch.bfloat16)


def pack(w: torch.Tensor, pattern: str):
    if pattern.endswith("%"):
        return BitmaskWeight.from_dense(w)
    n, m = (int(v) for v in pattern.split(":"))
    return NMWeight.from_dense(w, n, m).kernel_layout()


def rel_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.float() - ref).norm() / ref.norm().clamp_min(1e-30))


def bench(fn) -> float:
    """Median microseconds (do_bench flushes L2 before every call); a wall-clock median off the GPU (--smoke)."""
    import triton.testing

    if not torch.cuda.is_available():
        return 1e6 * sorted(_wall(fn) for _ in range(3))[1]
    return 1e3 * triton.testing.do_bench(fn, warmup=5, rep=30, return_mode="median")


def _wall(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def semi_structured(w: torch.Tensor):
    """The 2:4 weight as torch's semi-structured tensor, or the error message."""
    try:
        from torch.sparse import to_sparse_semi_structured

        return to_sparse_semi_structured(w), None
    except Exception as exc:  # unsupported device / build: report, do not fail the suite
        return None, f"{type(exc).__name__}: {exc}"


def run_case(rows, cols, pattern, w, packed, layout, sparse24, tokens, gen, sweep: bool, kernels=(),
             delta: DeltaWeight | None = None, delta_configs=DELTA_CONFIGS) -> dict:
    """Check and time every contender for one (shape, pattern, tokens); the Triton sweep only if ``sweep``;
    ``kernels``: the CUDA op's kernels to time one by one (all of them up to 32 tokens, two above);
    ``delta``: the weight in the delta layout, timed up to :data:`DELTA_TIMED_TOKENS` tokens with each of
    ``delta_configs``."""
    from losa_deploy.kernels.triton.sparse_gemm import DECODE_MAX_TOKENS, Config, sparse_matmul

    x = torch.randn(tokens, cols, generator=gen, device=gen.device).to(torch.bfloat16)
    ref = F.linear(x.float(), w.float())
    dense_us = bench(lambda: F.linear(x, w))
    row = dict(shape=f"{rows}x{cols}", out=rows, inp=cols, pattern=pattern, tokens=tokens, dense_us=dense_us,
               bytes_packed=sum(t.nbytes for t in packed.tensors().values()), bytes_dense=w.nbytes, errors={})
    backend = "auto" if x.is_cuda else "triton"  # --smoke: the interpreter
    contenders = {"auto": lambda: sparse_linear(x, layout, backend=backend)}
    row["auto_kernel"] = gpu_kernel(x, packed, None, backend)
    if has_cuda_op():
        for kernel in [k for k in kernels if tokens <= 32 or k in ("rows", GROUP_KERNELS[0])]:
            if not kernel_runs(kernel, cols, tokens, x.device):
                continue
            if kernel.endswith(":window") and tokens > 2:  # the window walk exists up to 2 tokens
                continue
            contenders[f"cuda {kernel}"] = lambda kernel=kernel: torch.ops.losa.bitmask_linear(
                x, layout.values, layout.mask, layout.row_ptr, cols, None, kernel, 0)
    if delta is not None and tokens <= DELTA_TIMED_TOKENS:
        row["bytes_delta"] = delta.nbytes
        for config in delta_configs:
            contenders[f"cuda delta {config}"] = lambda config=config: torch.ops.losa.delta_linear(
                x, delta.values, delta.deltas, delta.row_ptr, cols, None, config)
    for cfg in triton_candidates(tokens) if sweep else []:
        contenders[f"triton {cfg_name(cfg)}"] = lambda cfg=cfg: sparse_matmul(x, layout, config=cfg)
    if tokens > DECODE_MAX_TOKENS:  # the prefill path, timed even without the sweep (where it starts is open)
        panels = Config("panels", 16)
        contenders.setdefault(f"triton {cfg_name(panels)}", lambda: sparse_matmul(x, layout, config=panels))
    if sparse24 is not None:
        contenders["cslt"] = lambda: F.linear(x, sparse24)
    times = {}
    for name, fn in contenders.items():
        try:
            err = rel_error(fn(), ref)
        except Exception as exc:
            row["errors"][name] = f"{type(exc).__name__}: {str(exc)[:300]}"
            continue
        row[f"err {name}"] = err
        if not err <= TOLERANCE:
            row["errors"][name] = f"relative error {err:.2e} > {TOLERANCE}"
            continue
        times[name] = bench(fn)
    row["times_us"] = times
    # the fastest setting of each kernel family: (its names' prefix, the part dropped from the kept name, key)
    for family, dropped, key in (("triton", "triton ", "triton"), ("cuda groups", "cuda ", "groups"),
                                 ("cuda positions", "cuda positions:", "positions"),
                                 ("cuda delta", "cuda delta ", "delta")):
        members = {k: v for k, v in times.items() if k.startswith(family)}
        if members:
            best = min(members, key=members.get)
            row[f"{key}_best"], row[f"{key}_us"] = best[len(dropped):], members[best]
    if "delta_us" in row:
        row["speedup_delta"] = dense_us / row["delta_us"]
    for name, key in (("auto", "auto"), ("cuda rows", "rows"), ("cslt", "cslt")):
        if name in times:
            row[f"{key}_us"] = times[name]
    if "auto" in times:  # bytes the kernel must read over its time (x and y are small)
        row["auto_GBps"] = row["bytes_packed"] / times["auto"] / 1e3
    row["dense_GBps"] = row["bytes_dense"] / dense_us / 1e3
    if "triton_us" in row:
        row["triton_best_us"] = row["triton_us"]
    sparse_times = [times[k] for k in times if k != "cslt"]
    if sparse_times:
        row["best_us"] = min(sparse_times)
        row["speedup_best"] = dense_us / row["best_us"]
    if "auto" in times:
        row["speedup_auto"] = dense_us / times["auto"]
    if "cslt" in times:
        row["speedup_cslt"] = dense_us / times["cslt"]
    return row


def cfg_name(cfg) -> str:
    base = f"{cfg.path} r{cfg.block_r} k{cfg.block_k} w{cfg.num_warps} s{cfg.num_stages}"
    return base + (f" t{cfg.block_t}" if cfg.path == "dot" else "") + (f" split{cfg.split_k}" if cfg.split_k else "")


def run_grid(args, info: dict) -> list[dict]:
    """Every case, the JSON rewritten after each; past ``--sweep-budget`` seconds the Triton sweep stops."""
    gen = torch.Generator(args.device).manual_seed(args.seed)
    rows_out = []
    start = time.perf_counter()
    for rows, cols in args.shapes:
        for pattern in args.patterns:
            w = make_weight(rows, cols, pattern, gen)
            packed = pack(w, pattern)
            layout = gpu_layout(packed)
            delta = (DeltaWeight.build(layout.values, layout.mask, cols)
                     if has_delta_op() and args.delta_configs else None)
            sparse24, cslt_error = semi_structured(w) if pattern == "2:4" else (None, None)
            if sparse24 is not None:
                info["cslt_backend"] = type(sparse24).__name__  # cuSPARSELt or CUTLASS, as torch chose
            for tokens in args.tokens:
                case_start = time.perf_counter()
                sweep = case_start - start < args.sweep_budget
                row = run_case(rows, cols, pattern, w, packed, layout, sparse24, tokens, gen, sweep, args.cuda_kernels,
                               delta, args.delta_configs)
                if cslt_error:
                    row["errors"]["cslt"] = cslt_error
                row["seconds"] = time.perf_counter() - case_start
                rows_out.append(row)
                print(table_row(row), flush=True)
                write(args.out, info, rows_out, None)
    return rows_out


def write(path: str, info: dict, rows: list[dict], lora) -> None:
    with atomic_file(path, "w") as handle:
        json.dump(dict(info=info, rows=rows, masked_lora=lora), handle, indent=1, default=str)


HEADER = ("| shape (out x in) | pattern | T | dense µs | auto µs (kernel) | auto × | auto GB/s | CUDA rows µs | "
          "best CUDA groups µs (W:P) | best CUDA positions µs (W) | best CUDA delta µs (W:D) | delta × | "
          "best Triton µs (config) | best × | cuSPARSELt µs | cslt × |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")


def _fmt(value, spec=".1f") -> str:
    return "—" if value is None else format(value, spec)


def table_row(r: dict) -> str:
    return (f"| {r['shape']} | {r['pattern']} | {r['tokens']} | {r['dense_us']:.1f} | {_fmt(r.get('auto_us'))} "
            f"({r.get('auto_kernel', '?')}) | {_fmt(r.get('speedup_auto'), '.2f')} | {_fmt(r.get('auto_GBps'), '.0f')} | "
            f"{_fmt(r.get('rows_us'))} | {_fmt(r.get('groups_us'))} ({r.get('groups_best', 'groups:—')[len('groups:'):]}) | "
            f"{_fmt(r.get('positions_us'))} ({r.get('positions_best', '—')}) | "
            f"{_fmt(r.get('delta_us'))} ({r.get('delta_best', '—')}) | {_fmt(r.get('speedup_delta'), '.2f')} | "
            f"{_fmt(r.get('triton_best_us'))} ({r.get('triton_best', '—')}) | {_fmt(r.get('speedup_best'), '.2f')} | "
            f"{_fmt(r.get('cslt_us'))} | {_fmt(r.get('speedup_cslt'), '.2f')} |")


def bar_lines(rows: list[dict]) -> list[str]:
    lines = []
    for pattern, tokens, need in BARS:
        for r in rows:
            if r["pattern"] == pattern and r["tokens"] == tokens:
                got_auto, got_best = r.get("speedup_auto", 0.0), r.get("speedup_best", 0.0)
                delta = f", delta {r['speedup_delta']:.2f}x" if "speedup_delta" in r else ""
                lines.append(f"bar {pattern} T={tokens} {r['shape']}: need >= {need:.1f}x; auto {got_auto:.2f}x, "
                             f"best {got_best:.2f}x{delta} -> {'MET' if got_auto >= need else 'not met'} (auto), "
                             f"{'MET' if got_best >= need else 'not met'} (best)")
    return lines


def copy_bandwidth() -> float:
    """GB/s of a 1 GiB device-to-device copy, counting bytes read and written (the HBM ceiling)."""
    src = torch.empty(1 << 29, dtype=torch.float16, device="cuda")
    dst = torch.empty_like(src)
    return 2 * src.nbytes / bench(lambda: dst.copy_(src)) / 1e3


def masked_lora(args) -> list[dict] | str:
    """The issue-6 training benchmark on CUDA (fused Triton vs materialising reference vs plain LoRA)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import masked_lora as bench_lora

    out = Path(args.out).with_name(Path(args.out).stem + "_masked_lora.json")
    argv = ["--device", "cuda", "--rank", "16", "--k", "4096", "11008", "--tokens", *map(str, args.lora_tokens),
            "--no-dropout-row", "--rounds", "5", "--no-progress", "--json", str(out)]
    try:
        bench_lora.main(argv)
        return json.loads(out.read_text())
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="JSON results file")
    parser.add_argument("--quick", action="store_true", help="4096x4096, 70%% and 2:4, tokens 1 and 16")
    parser.add_argument("--tokens", type=int, nargs="+", default=list(TOKENS))
    parser.add_argument("--lora-tokens", type=int, nargs="+", default=[256, 1024, 2048])
    parser.add_argument("--no-lora", action="store_true", help="skip the masked-LoRA benchmark")
    parser.add_argument("--sweep-budget", type=float, default=150.0,
                        help="seconds after which the Triton config sweep stops (default 150)")
    parser.add_argument("--cuda-kernels", nargs="*", default=["rows", *GROUP_KERNELS, *POSITION_KERNELS],
                        help="the CUDA op's kernels timed one by one (default: rows, a few groups settings and "
                        "the positions kernel at two block sizes and two rows per warp)")
    parser.add_argument("--delta-configs", nargs="*", default=list(DELTA_CONFIGS),
                        help="launch shapes (warps:depth[:ahead]) of the delta-layout kernel to time; none: skip it")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny ragged shapes on the CPU under TRITON_INTERPRET=1: checks this script only")
    parser.add_argument("--seed", type=int, default=int(time.time()))
    args = parser.parse_args(argv)
    args.device = "cpu" if args.smoke else "cuda"
    if args.smoke:
        import os

        if os.environ.get("TRITON_INTERPRET") != "1":
            print("error: --smoke needs TRITON_INTERPRET=1", file=sys.stderr)
            return 2
        args.shapes, args.patterns, args.tokens, args.no_lora = ((70, 520),), PATTERNS, [1, 17], True
    elif not torch.cuda.is_available():
        print("error: gpu_suite.py needs a CUDA GPU (or --smoke)", file=sys.stderr)
        return 2
    else:
        args.shapes = SHAPES[:1] if args.quick else SHAPES
        args.patterns = ("70%", "2:4") if args.quick else PATTERNS
        args.tokens = [1, 16] if args.quick else args.tokens
    import triton

    props = torch.cuda.get_device_properties(0) if args.device == "cuda" else None
    info = dict(device=props.name if props else "cpu (Triton interpreter)",
                sms=props.multi_processor_count if props else 0, torch=torch.__version__, triton=triton.__version__,
                cuda_op=has_cuda_op(), delta_op=has_delta_op(), seed=args.seed, command=" ".join(sys.argv))
    if args.device == "cuda":
        info["copy_GBps"] = copy_bandwidth()
    print(json.dumps(info), flush=True)
    start = time.perf_counter()
    print(HEADER, flush=True)
    rows = run_grid(args, info)
    info["grid_seconds"] = time.perf_counter() - start
    lora = None if args.no_lora else masked_lora(args)
    info["seconds"] = time.perf_counter() - start
    write(args.out, info, rows, lora)
    errors = [(r["shape"], r["pattern"], r["tokens"], k, v) for r in rows for k, v in r["errors"].items()]
    print(f"\n{info['device']}, torch {info['torch']}, triton {info['triton']}, CUDA op built: {info['cuda_op']}, "
          f"copy {info.get('copy_GBps', 0):.0f} GB/s, {info['seconds']:.0f} s")
    for e in errors:
        print("check/run failure:", *e)
    if isinstance(lora, str):
        print("masked-LoRA benchmark failed:", lora)
    print(HEADER)
    for r in rows:
        print(table_row(r))
    print("\n".join(bar_lines(rows)))
    return 1 if any(k != "cslt" for *_, k, _ in errors) else 0


if __name__ == "__main__":
    raise SystemExit(main())
