"""CPU sparse-linear kernels against dense PyTorch and DeepSparse at LLaMA-2-7B linear shapes (issue #10).

For each shape (4096x4096: q/k/v/o; 11008x4096: gate/up; 4096x11008: down), pattern (50/70/90%
unstructured: the bitmask kernel; 2:4: the N:M kernel) and token count (1, 8, 32) it times, interleaved
(every repetition runs each contender once, in turn):

* ours: ``losa_deploy.kernels.sparse_linear`` with bf16 values and bf16 activations;
* torch dense bf16 and fp32: ``F.linear`` on the same (dense, zero-filled) weight;
* DeepSparse 1.8 (tokens 1 by default): an ONNX ``MatMul`` holding the same sparse weight in fp32, on its
  engine, in ``.venv-deepsparse`` (driven through files and a pipe: benchmarks/deepsparse_worker.py).
  Two ways: one call with its weights cold (against ours timed the same way), and a *layer stream*: L
  weights of the shape and pattern, together at least STREAM_BYTES, run one after the other (DeepSparse:
  one model of L MatMuls; ours: L packed copies), so every layer's weights come from DRAM while code and
  threads stay warm, as in a decode step. The stream reports the time per layer.

Every contender uses the same number of threads. Before each timed call two buffers, each four times the
size of the last-level cache, are read, so the weights come from DRAM as in decode (a model's layers never
stay cached from one token to the next); then the contender runs once on a small slice of its weight, so
its code is warm as in decode (``run_config`` says why, and how DeepSparse is handled; ``--cold-path``
skips it). Those reads are streaming reads with the same threads (``losa::stream_read`` and ``torch.sum``,
the faster counts), so they also measure the machine's read bandwidth right before each call: each call's
GB/s (packed bytes: values + masks + offsets, over its time) is compared with the read just before it. A
512 MiB probe before and after each run is recorded for context.

The machine may be shared: before each configuration (and each bandwidth probe) the run waits until other
processes use less than ``--quiet-cores`` of CPU (at most ``--max-wait`` seconds), and records what they
used while it was timed. ``--runs`` whole runs go one after the other; the table shows the median over
runs and the range.

    .venv/bin/python benchmarks/kernels_cpu.py                  # the full table, JSON + RESULTS.md + PNG
    .venv/bin/python benchmarks/kernels_cpu.py --quick --no-results   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from losa_deploy.envinfo import cpu_info, deepsparse_python
from losa_deploy.kernels import ops, sparse_linear
from losa_deploy.kernels.formats.bitmask import BitmaskWeight
from losa_deploy.kernels.formats.nm import NMWeight
from losa_deploy.kernels.placement import huge_pages_enabled, on_huge_pages, place_for_decode
from losa_deploy.utils.fs import atomic_file, write_json
from losa_deploy.utils.plots import save_figure

HERE = Path(__file__).resolve().parent
SHAPES = ((4096, 4096), (11008, 4096), (4096, 11008))
PATTERNS = ("50%", "70%", "90%", "2:4")
TOKENS = (1, 8, 32)
SECTION = "## CPU sparse kernels (issue #10)"
# Everything from this line to the next section is hand-written and survives a re-run.
NOTES_MARK = "<!-- notes below are kept when kernels_cpu.py rewrites the table above -->"
FLUSH_BYTES = 128 << 20  # 4x the 32 MiB L3 of the reference machine
WARM_OUTPUTS = 64  # rows of the weight slice each contender runs between the flush and its timed call
DEEPSPARSE_SETTLE_S = 0.02  # pause before each DeepSparse run (see run_config)
STREAM_BYTES = FLUSH_BYTES  # a layer stream's weights together, per side (each side counts its own bytes)
ONNX_LIMIT_BYTES = 1_800_000_000  # a DeepSparse stream's model, dense fp32 initializers, under protobuf's 2 GB


def stream_layers(bytes_per_weight: float) -> int:
    """How many weights of ``bytes_per_weight`` a layer stream needs to hold STREAM_BYTES (at least 2)."""
    return max(2, -(-STREAM_BYTES // int(bytes_per_weight)))


def deepsparse_stream_layers(rows: int, cols: int, pattern: str) -> int:
    """Layers of DeepSparse's stream: its kept fp32 values (a lower bound of what it stores) fill
    STREAM_BYTES, within what one ONNX file can hold."""
    kept = 0.5 if pattern == "2:4" else 1 - float(pattern.rstrip("%")) / 100
    return min(stream_layers(4 * kept * rows * cols), ONNX_LIMIT_BYTES // (4 * rows * cols))


def config_key(rows: int, cols: int, pattern: str, tokens: int) -> str:
    return f"{rows}x{cols}-{pattern.replace('%', 'pct').replace(':', 'of')}-t{tokens}"


def make_weight(rows: int, cols: int, pattern: str, seed: int) -> torch.Tensor:
    """A bf16 weight with exact zeros: unstructured at the given sparsity, or 2:4 along the input. The
    same arguments give the same weight (the DeepSparse side rebuilds it)."""
    gen = torch.Generator().manual_seed(zlib.crc32(f"{seed}-{rows}x{cols}-{pattern}".encode()))
    w = torch.randn(rows, cols, generator=gen)
    if pattern == "2:4":
        drop = torch.rand(rows, cols // 4, 4, generator=gen).argsort(-1)[..., :2]
        w.view(rows, -1, 4).scatter_(-1, drop, 0.0)
    else:
        w[torch.rand(rows, cols, generator=gen) < float(pattern.rstrip("%")) / 100] = 0.0
    return w.to(torch.bfloat16)


class OtherLoad:
    """CPU time other processes use on this (shared) machine, in cores: all busy time in /proc/stat minus
    this process's and its helpers' (the DeepSparse worker). Timings taken while others compute are slower
    for reasons that have nothing to do with the kernels, so the run waits for a quiet moment before each
    configuration and records what the others used while it was timed."""

    def __init__(self, quiet_cores: float, max_wait: float):
        self.quiet_cores, self.max_wait, self.pids = quiet_cores, max_wait, [os.getpid()]
        self.hz = os.sysconf("SC_CLK_TCK")

    def _ticks(self) -> tuple[float, float]:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        busy = sum(fields[:8]) - fields[3] - fields[4]  # all but idle and iowait
        ours = 0
        for pid in self.pids:
            stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            ours += int(stat[11]) + int(stat[12])
        return busy, ours

    def start(self) -> tuple[float, float, float]:
        return (time.monotonic(), *self._ticks())

    def cores_since(self, mark: tuple[float, float, float]) -> float:
        busy, ours = self._ticks()
        return max(0.0, (busy - mark[1]) - (ours - mark[2])) / self.hz / max(time.monotonic() - mark[0], 1e-3)

    def wait_quiet(self) -> float:
        """Sleep until the others used under ``quiet_cores`` for a second (at most ``max_wait`` s); the wait."""
        begin = time.monotonic()
        while time.monotonic() - begin < self.max_wait:
            mark = self.start()
            time.sleep(1.0)
            if self.cores_since(mark) < self.quiet_cores:
                break
        return time.monotonic() - begin


class Flusher:
    """Reads two buffers of FLUSH_BYTES each, larger than the caches, so the next call finds its weights in
    DRAM, and returns the GB/s of the faster read: the machine's read bandwidth at that moment, paired with
    the call that follows.

    The buffers sit on huge pages like the packed weights (where enabled); one is read by our probe, the
    other by ``torch.sum`` (which of the two streams faster varies with the VM's memory regime). Each is
    read from DRAM: the other one's read has just evicted it."""

    def __init__(self):
        self.halves = [on_huge_pages(torch.ones(FLUSH_BYTES // 8, dtype=torch.int64)) for _ in range(2)]
        losa = ops()
        self.readers = (losa.stream_read if losa is not None else torch.sum, torch.sum)

    def __call__(self) -> float:
        best = 0.0
        for reader, half in zip(self.readers, self.halves):
            start = time.perf_counter()
            reader(half)
            best = max(best, half.nbytes / (time.perf_counter() - start) / 1e9)
        return best


def read_bandwidth(reps: int = 7) -> dict:
    """GB/s of a 512 MiB streaming read with the current threads (median of ``reps``): torch.sum and our
    probe, on torch's own allocation and on huge pages (where our packed weights live)."""
    buffer = torch.ones(64 << 20, dtype=torch.int64)
    huge = on_huge_pages(buffer)
    probes = {"torch.sum": lambda: buffer.sum()}
    if ops() is not None:
        probes["losa.stream_read"] = lambda: ops().stream_read(buffer)
        if huge is not buffer:
            probes["losa.stream_read (huge pages)"] = lambda: ops().stream_read(huge)
            probes["torch.sum (huge pages)"] = lambda: huge.sum()
    out = {}
    for name, fn in probes.items():
        fn()
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        out[name] = buffer.nbytes / statistics.median(times) / 1e9
    return out


class DeepSparse:
    """The DeepSparse worker process: compiles one engine per (shape, pattern, tokens), then times runs."""

    def __init__(self, python: Path, configs: list[tuple[int, int, str, int]], seed: int, threads: int):
        self.tmp = tempfile.TemporaryDirectory(prefix="losa-deepsparse-")
        job_dir = Path(self.tmp.name)
        jobs = []
        for rows, cols, pattern, tokens in configs:
            key = config_key(rows, cols, pattern, tokens)
            np.save(job_dir / f"{key}.npy", make_weight(rows, cols, pattern, seed).float().t().contiguous().numpy())
            jobs.append({"id": key, "weight": f"{key}.npy", "tokens": tokens})
            if tokens == 1:
                jobs.append({"id": f"{key}-stream", "rows": rows, "cols": cols, "pattern": pattern, "tokens": 1,
                             "layers": deepsparse_stream_layers(rows, cols, pattern)})
        self.layers = {job["id"]: job.get("layers", 1) for job in jobs}
        (job_dir / "jobs.json").write_text(json.dumps(jobs))
        print(f"compiling {len(jobs)} DeepSparse engines ...", file=sys.stderr, flush=True)
        self.proc = subprocess.Popen([str(python), str(HERE / "deepsparse_worker.py"), str(job_dir), "--threads",
                                      str(threads)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        ready = self.proc.stdout.readline()
        if not ready:
            raise RuntimeError("the DeepSparse worker exited before it was ready (see its stderr above)")
        self.version = json.loads(ready)["version"]
        for job in jobs:  # the engines hold their weights; the files are no longer needed
            if "weight" in job:
                (job_dir / job["weight"]).unlink()

    def time(self, key: str) -> float:
        self.proc.stdin.write(json.dumps({"id": key}) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())["seconds"]

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=60)
        self.tmp.cleanup()


def pack(dense: torch.Tensor, pattern: str):
    if pattern == "2:4":
        return NMWeight.from_dense(dense, 2, 4).kernel_layout(), "nm"
    return BitmaskWeight.from_dense(dense), "bitmask"


def fresh_copy(packed):
    """``packed`` with every tensor copied onto the default allocator (not on huge pages)."""
    return packed.replace(**{name: t.clone() for name, t in packed.tensors().items()})


def layer_stream(packed, x: torch.Tensor):
    """Our side of the layer stream: copies of ``packed`` in their own memory (huge pages, as in decode),
    together at least STREAM_BYTES, and a call that runs x through each once; returns (call, layers)."""
    count = stream_layers(packed.nbytes)
    copies = [place_for_decode(fresh_copy(packed)) for _ in range(count)]

    def run():
        for weight in copies:
            sparse_linear(x, weight)

    return run, count


def linear_calls(x, xf, packed, bf16, bf16_huge, fp32) -> dict:
    """The timed contenders, each a call of one product with these weights (a slice's, for warm-ups)."""
    return {
        "ours": lambda: sparse_linear(x, packed),
        "torch_bf16": lambda: F.linear(x, bf16),
        "torch_bf16_huge": lambda: F.linear(x, bf16_huge),
        "torch_fp32": lambda: F.linear(xf, fp32),
    }


def run_config(rows, cols, pattern, tokens_list, reps, seed, flush, deepsparse, ds_tokens, load, warm):
    """All token counts of one (shape, pattern): one weight, interleaved timings per token count.

    Every timed call follows a flush (the weights come from DRAM). With ``warm``, each contender then
    runs once on the first WARM_OUTPUTS output rows of its weight, copied elsewhere, before its timed call:
    in a decode step the previous layer has just run the same code, so the code, the dispatcher and the
    threads are warm and only the weights are cold. Without it, a call also pays for fetching all of that
    from DRAM (about 0.2 ms here, measured on a 64-row weight), which no decode step pays.

    DeepSparse cannot be warmed that way: running another engine in between made its timed run slower,
    not faster (up to 5x on 2:4 in a quick run). So where DeepSparse
    runs, ours is also timed cold ("ours_cold") and the DeepSparse ratio compares cold with cold."""
    dense_bf16 = make_weight(rows, cols, pattern, seed)
    gen = torch.Generator().manual_seed(seed)
    dense_fp32 = dense_bf16.float()
    packed, kernel = pack(dense_bf16, pattern)
    packed = place_for_decode(packed)  # where SparseLinear and the vLLM plugin keep it: on huge pages
    dense_bf16_huge = on_huge_pages(dense_bf16)  # torch's GEMV on the same memory, for fairness
    small_bf16 = dense_bf16[:WARM_OUTPUTS].clone()
    small_packed = place_for_decode(pack(small_bf16, pattern)[0])
    small_fp32 = small_bf16.float()
    results = []
    for tokens in tokens_list:
        x = torch.randn(tokens, cols, generator=gen).to(torch.bfloat16)
        xf = x.float()
        ref = xf @ dense_fp32.t()
        err = float((sparse_linear(x, packed).float() - ref).abs().max() / ref.abs().max())
        assert err < 2e-2, f"kernel output is off by {err:.3g} (relative)"
        contenders = linear_calls(x, xf, packed, dense_bf16, dense_bf16_huge, dense_fp32)
        # The slice is smaller than a huge page: both torch bf16 contenders warm up on the same copy.
        warm_ups = linear_calls(x, xf, small_packed, small_bf16, small_bf16, small_fp32)
        key = config_key(rows, cols, pattern, tokens)
        use_ds = deepsparse is not None and tokens in ds_tokens
        if use_ds and warm:
            contenders["ours_cold"] = contenders["ours"]
        stream = layer_stream(packed, x) if use_ds and tokens == 1 else None
        for fn in contenders.values():
            fn()
        extra = (["deepsparse"] if use_ds else []) + (["ours_stream", "deepsparse_stream"] if stream else [])
        times = {name: [] for name in [*contenders, *extra]}
        read_gbs = []  # the flush read just before each timed call of ours
        waited = load.wait_quiet()
        mark = load.start()
        for _ in range(reps):
            for name, fn in contenders.items():
                gbs = flush()
                if name == "ours":
                    read_gbs.append(gbs)
                if warm and name in warm_ups:
                    warm_ups[name]()
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
            if use_ds:
                # This process's OpenMP threads spin for a while after each parallel region (libgomp's
                # default) and would take DeepSparse's cores: measured 14.6 ms instead of 3.0 ms for one
                # 11008x4096 run straight after ours, 2.95 ms after a 10 ms pause.
                time.sleep(DEEPSPARSE_SETTLE_S)
                times["deepsparse"].append(deepsparse.time(key))
            if stream:
                run_stream, layers = stream
                run_stream()  # warms the code and threads; its weights then evict each other
                start = time.perf_counter()
                run_stream()
                times["ours_stream"].append((time.perf_counter() - start) / layers)
                time.sleep(DEEPSPARSE_SETTLE_S)
                times["deepsparse_stream"].append(deepsparse.time(f"{key}-stream"))
        others = load.cores_since(mark)
        med = {name: statistics.median(ts) for name, ts in times.items()}
        row = {"shape": [rows, cols], "pattern": pattern, "tokens": tokens, "kernel": kernel,
               "packed_bytes": packed.nbytes, "dense_bf16_bytes": dense_bf16.nbytes,
               **{f"{name}_ms": 1e3 * t for name, t in med.items()},
               "ours_gbs": packed.nbytes / med["ours"] / 1e9,
               # Each call against the read bandwidth measured just before it (the VM's memory speed
               # changes by 2x from one minute to the next): the median over repetitions.
               "read_gbs": statistics.median(read_gbs),
               "bw_fraction": statistics.median(packed.nbytes / t / 1e9 / bw
                                                for t, bw in zip(times["ours"], read_gbs)),
               # Against the faster of torch's two placements (its own allocation, huge pages).
               "speedup_vs_torch_bf16": min(med["torch_bf16"], med["torch_bf16_huge"]) / med["ours"],
               "speedup_vs_torch_fp32": med["torch_fp32"] / med["ours"]}
        row["others_cores"], row["waited_s"] = round(others, 2), round(waited, 1)
        if use_ds:
            row["speedup_vs_deepsparse"] = med["deepsparse"] / med.get("ours_cold", med["ours"])
        if stream:
            row["stream_layers"] = [stream[1], deepsparse.layers[f"{key}-stream"]]
            row["speedup_vs_deepsparse_stream"] = med["deepsparse_stream"] / med["ours_stream"]
        results.append(row)
        print(f"{rows}x{cols} {pattern:>4} t{tokens:<3} ours {row['ours_ms']:.3f} ms "
              f"({row['ours_gbs']:.1f} GB/s, {row['bw_fraction']:.0%} of {row['read_gbs']:.1f} GB/s)  "
              f"x{row['speedup_vs_torch_bf16']:.2f} vs bf16  "
              f"x{row['speedup_vs_torch_fp32']:.2f} vs fp32"
              + (f"  x{row['speedup_vs_deepsparse']:.2f} vs DeepSparse" if use_ds else "")
              + (f" (stream x{row['speedup_vs_deepsparse_stream']:.2f})" if stream else "")
              + f"  (others {others:.2f} cores, waited {waited:.0f} s)", file=sys.stderr, flush=True)
    return results


SPREAD = ("ours_gbs", "bw_fraction", "speedup_vs_torch_bf16", "speedup_vs_torch_fp32", "speedup_vs_deepsparse",
          "speedup_vs_deepsparse_stream")


def combine_runs(runs: list[dict]) -> list[dict]:
    """Per configuration, the median over runs of every number, and the spread (min, max) of the ratios."""
    combined = []
    for i, first in enumerate(runs[0]["results"]):
        rows = [run["results"][i] for run in runs]
        row = {k: v for k, v in first.items() if not isinstance(v, float)}
        for key, value in first.items():
            if isinstance(value, float):
                row[key] = statistics.median(r[key] for r in rows)
        row["spread"] = {k: [min(r[k] for r in rows), max(r[k] for r in rows)] for k in SPREAD if k in first}
        combined.append(row)
    return combined


def check_bars(results: list[dict]) -> list[dict]:
    """The issue's performance bars on the median over runs, each with its worst configuration."""
    def pick(tokens, patterns):
        return [r for r in results if r["tokens"] == tokens and r["pattern"] in patterns]

    bars = []

    def bar(name, rows, key, threshold):
        if rows:
            worst = min(rows, key=lambda r: r[key])
            bars.append({"bar": name, "threshold": threshold, "worst": worst[key],
                         "worst_spread": worst["spread"][key],
                         "worst_at": f"{worst['shape'][0]}x{worst['shape'][1]} {worst['pattern']} t{worst['tokens']}",
                         "met": all(r[key] >= threshold for r in rows)})

    bar("tokens 1: packed bytes at >= 80% of read bandwidth (50%, 70%, 2:4)", pick(1, ("50%", "70%", "2:4")),
        "bw_fraction", 0.8)
    bar("tokens 1: >= 2.4x torch dense bf16 at 70%", pick(1, ("70%",)), "speedup_vs_torch_bf16", 2.4)
    bar("tokens 1: >= 1.6x torch dense bf16 at 50% and 2:4", pick(1, ("50%", "2:4")), "speedup_vs_torch_bf16", 1.6)
    bar("tokens 8: >= 1.5x torch dense bf16 at 70%", pick(8, ("70%",)), "speedup_vs_torch_bf16", 1.5)
    bar("tokens 1: >= 1.8x faster than DeepSparse (layer stream: warm code, cold weights)",
        [r for r in pick(1, PATTERNS) if "deepsparse_stream_ms" in r], "speedup_vs_deepsparse_stream", 1.8)
    bar("tokens 1: >= 1.8x faster than DeepSparse (one call, code and weights cold)",
        [r for r in pick(1, PATTERNS) if "deepsparse_ms" in r], "speedup_vs_deepsparse", 1.8)
    return bars


def markdown(report: dict) -> str:
    runs = report["runs"]
    bws = [run["read_bandwidth_gbs"] for run in runs]

    def ratio(r, key, fmt="{:.2f}x"):
        lo, hi = r["spread"][key]
        return f"{fmt.format(r[key])} ({fmt.format(lo)}-{fmt.format(hi)})" if len(runs) > 1 else fmt.format(r[key])

    lines = [
        SECTION, "",
        f"Command: `{report['command']}`  ",
        f"Machine: {report['machine']['model']} (Zen 4 VM), {report['threads']} threads, torch {report['torch']}, "
        f"DeepSparse {report['deepsparse'] or 'not installed'}. Before each configuration the run waits for "
        "other processes to go quiet (at most "
        f"{report['max_wait']:.0f} s) and records the cores they used while it was timed (last column, median "
        f"over runs). Runs: {len(runs)}, {report['reps']} interleaved repetitions each; every number is the "
        "median over runs, with the range over runs in brackets.  ",
        f"Read bandwidth: every timed call follows a flush, two streaming reads of {FLUSH_BYTES >> 20} MiB each "
        f"with {report['threads']} threads{' on huge pages' if report.get('huge_pages') else ''} (our probe and "
        "torch.sum, the faster counts), and each call's "
        "GB/s is compared with the read just before it (\"% of read bw\": median over repetitions of that "
        "ratio; \"read GB/s\": median of those reads). The VM's memory speed changes by about 2x from one "
        "minute to the next, so a reference taken minutes away misjudges the kernel both ways. For context, the "
        "512 MiB probe before and after each run (highest of torch.sum and our probe, torch's allocation and "
        "huge pages): " + ", ".join(f"{bw:.1f}" for bw in bws) + " GB/s.  ",
        "Times: median of the interleaved repetitions, weights cold (the flush above comes before every call"
        + ("; then each contender runs once on a 64-row slice of its weight, held elsewhere, so its code, "
           "dispatcher and threads are warm as in a decode step where the previous layer has just run"
           if report.get("warm_path") else
           "; no warm-up call: code, dispatcher and threads are cold too") + "). "
        "Ours: bf16 values and activations, packed weights on huge pages as `SparseLinear` keeps them "
        f"({'on' if report.get('huge_pages') else 'off'} in this run); 50/70/90% use the bitmask kernel, 2:4 the "
        "N:M kernel. GB/s = packed bytes (values + masks + offsets) / time. torch bf16: `F.linear` on the dense "
        "weight in torch's own allocation and on huge pages; the speedup is against the faster of the two. "
        "DeepSparse: fp32 ONNX MatMul with the same zeros"
        + (", timed cold (a run of another engine in between slows it down), so its speedup is against ours "
           "timed cold in the same run (in brackets)" if report.get("warm_path") else "")
        + "; each of its runs follows a 20 ms pause, so this process's idle OpenMP threads have stopped "
        "spinning. Layer stream (tokens 1): L weights of the shape and pattern, together at least "
        f"{STREAM_BYTES >> 20} MiB on each side (DeepSparse's counted as fp32 kept values: L is given as ours / "
        "DeepSparse's), run once to warm up and once timed: time per layer, every layer's weights from DRAM, "
        "code and threads warm. DeepSparse runs its L as one model of L MatMuls of the same x (it may overlap "
        "them); ours runs L calls one after the other.", "",
        "| shape (out x in) | pattern | tokens | packed MB | ours ms | GB/s | read GB/s | % of read bw | torch bf16 ms (own / huge) | "
        "speedup | torch fp32 ms | speedup | DeepSparse ms (ours cold) | speedup | stream ms/layer: ours / DeepSparse (L) | "
        "speedup | others' cores |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        cold = f" ({r['ours_cold_ms']:.3f})" if "ours_cold_ms" in r else ""
        ds = (f"{r['deepsparse_ms']:.3f}{cold} | {ratio(r, 'speedup_vs_deepsparse')}" if "deepsparse_ms" in r
              else "- | -")
        if "deepsparse_stream_ms" in r:
            layers = "/".join(map(str, r["stream_layers"]))
            ds += (f" | {r['ours_stream_ms']:.3f} / {r['deepsparse_stream_ms']:.3f} ({layers}) | "
                   f"{ratio(r, 'speedup_vs_deepsparse_stream')}")
        else:
            ds += " | - | -"
        lines.append(
            f"| {r['shape'][0]}x{r['shape'][1]} | {r['pattern']} | {r['tokens']} | {r['packed_bytes'] / 2**20:.1f} | "
            f"{r['ours_ms']:.3f} | {r['ours_gbs']:.1f} | {r['read_gbs']:.1f} | {ratio(r, 'bw_fraction', '{:.0%}')} | "
            f"{r['torch_bf16_ms']:.3f} / {r['torch_bf16_huge_ms']:.3f} | {ratio(r, 'speedup_vs_torch_bf16')} | "
            f"{r['torch_fp32_ms']:.3f} | "
            f"{ratio(r, 'speedup_vs_torch_fp32')} | {ds} | {r['others_cores']:.2f} |")
    lines += ["", "| performance bar | worst configuration (median, range over runs) | at | met |", "|---|---|---|---|"]
    for b in report["bars"]:
        fmt = "{:.0%}" if "bandwidth" in b["bar"] else "{:.2f}x"
        lo, hi = b["worst_spread"]
        lines.append(f"| {b['bar']} | {fmt.format(b['worst'])} ({fmt.format(lo)}-{fmt.format(hi)}) | "
                     f"{b['worst_at']} | {'yes' if b['met'] else '**no**'} |")
    return "\n".join(lines) + "\n"


def write_results_section(path: Path, text: str) -> None:
    """Replace the generated part of this script's section of RESULTS.md (or append the section). Other
    sections stay as they are, and so do the notes written below NOTES_MARK inside this one."""
    old = path.read_text() if path.exists() else "# Measured results\n"
    start = old.find(SECTION)
    if start < 0:
        new = old.rstrip("\n") + "\n\n" + text + "\n" + NOTES_MARK + "\n"
    else:
        end = old.find("\n## ", start + len(SECTION))
        end = len(old) if end < 0 else end
        mark = old.find(NOTES_MARK, start, end)
        notes = old[mark:end] if mark >= 0 else NOTES_MARK + "\n"
        new = old[:start] + text + "\n" + notes.rstrip("\n") + "\n" + old[end:]
    with atomic_file(path) as handle:
        handle.write(new)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report["results"] if r["tokens"] == 1]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.85 * len(rows) + 2), 3.8))
    labels = [f"{r['shape'][0]}x{r['shape'][1]}\n{r['pattern']}" for r in rows]
    gbs = [r["ours_gbs"] for r in rows]
    spread = [[g - r["spread"]["ours_gbs"][0] for g, r in zip(gbs, rows)],
              [r["spread"]["ours_gbs"][1] - g for g, r in zip(gbs, rows)]]
    ax.bar(range(len(rows)), gbs, yerr=spread, capsize=2, color="tab:blue", label="ours (packed bytes / time)")
    ax.bar(range(len(rows)), [r["dense_bf16_bytes"] / r["torch_bf16_ms"] / 1e6 for r in rows], width=0.35,
           color="tab:gray", label="torch dense bf16 (dense bytes / time)")
    # Each configuration's own reference: the reads paired with its calls (the memory speed drifts).
    xs = range(len(rows))
    read = [r["read_gbs"] for r in rows]
    ax.hlines(read, [x - 0.45 for x in xs], [x + 0.45 for x in xs], color="black", linewidth=1,
              label="read bandwidth just before the calls (median; the bar check uses each call's own ratio)")
    ax.hlines([0.8 * b for b in read], [x - 0.45 for x in xs], [x + 0.45 for x in xs], color="black",
              linewidth=1, linestyle="--", label="80% of it")
    ax.set_xticks(range(len(rows)), labels, fontsize=7)
    ax.set_ylabel("GB/s")
    ax.set_title(f"sparse linear, 1 token, bf16, {report['threads']} threads")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=2)
    save_figure(fig, path)


def report(args, argv, runs: list[dict], deepsparse_version: str | None) -> None:
    """Prints the table of the runs so far and (unless --no-results) writes the JSON, RESULTS.md and the plot."""
    out = {
        "command": " ".join([*([f"LOSA_DEEPSPARSE_PYTHON={os.environ['LOSA_DEEPSPARSE_PYTHON']}"]
                               if "LOSA_DEEPSPARSE_PYTHON" in os.environ else []),
                             "python", "benchmarks/kernels_cpu.py", *(argv if argv is not None else sys.argv[1:])]),
        "machine": cpu_info(), "threads": args.threads, "torch": torch.__version__, "deepsparse": deepsparse_version,
        "reps": args.reps, "max_wait": args.max_wait, "huge_pages": huge_pages_enabled(),
        "warm_path": not args.cold_path, "runs": runs,
        "results": combine_runs(runs),
    }
    out["bars"] = check_bars(out["results"])
    text = markdown(out)
    print(text, flush=True)
    if not args.no_results:
        write_json(args.json, out)
        write_results_section(args.results, text)
        plot(out, args.plot)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--runs", type=int, default=3, help="whole runs, one after the other (median and range)")
    parser.add_argument("--shapes", default=",".join(f"{o}x{i}" for o, i in SHAPES))
    parser.add_argument("--patterns", default=",".join(PATTERNS))
    parser.add_argument("--tokens", default=",".join(map(str, TOKENS)))
    parser.add_argument("--deepsparse-tokens", default="1", help="token counts DeepSparse runs ('' for none)")
    parser.add_argument("--no-deepsparse", action="store_true")
    parser.add_argument("--quick", action="store_true", help="4096x4096, 50%%/70%%/2:4, tokens 1 and 8, 5 reps, 1 run")
    parser.add_argument("--json", type=Path, default=HERE / "kernels_cpu.json")
    parser.add_argument("--plot", type=Path, default=HERE / "kernels_cpu.png")
    parser.add_argument("--results", type=Path, default=HERE / "RESULTS.md")
    parser.add_argument("--no-results", action="store_true", help="do not touch RESULTS.md, the JSON or the plot")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet-cores", type=float, default=0.2,
                        help="before each configuration, wait until other processes use less CPU than this")
    parser.add_argument("--max-wait", type=float, default=120.0, help="seconds to wait for that at most")
    parser.add_argument("--cold-path", action="store_true",
                        help="time each call straight after the flush, with no warm-up call on a small slice "
                             "(code, dispatcher and threads cold too; the protocol before 2026-11-26 12:00)")
    args = parser.parse_args(argv)
    if args.quick:
        args.shapes, args.patterns, args.tokens, args.reps, args.runs = "4096x4096", "50%,70%,2:4", "1,8", 5, 1
    if ops() is None:
        raise SystemExit("the compiled extension is not loaded: build it first (make install)")
    torch.set_num_threads(args.threads)
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    patterns = args.patterns.split(",")
    tokens = [int(t) for t in args.tokens.split(",")]
    ds_tokens = {int(t) for t in args.deepsparse_tokens.split(",") if t} & set(tokens)
    load = OtherLoad(args.quiet_cores, args.max_wait)
    deepsparse = None
    python = deepsparse_python()
    if ds_tokens and not args.no_deepsparse and python is not None:
        configs = [(rows, cols, pattern, t) for rows, cols in shapes for pattern in patterns for t in sorted(ds_tokens)]
        deepsparse = DeepSparse(python, configs, args.seed, args.threads)
        load.pids.append(deepsparse.proc.pid)
    flush = Flusher()
    runs = []
    try:
        for index in range(args.runs):
            load.wait_quiet()
            before = read_bandwidth()
            print(f"run {index + 1}/{args.runs}: read bandwidth {before}", file=sys.stderr, flush=True)
            results = []
            for rows, cols in shapes:
                for pattern in patterns:
                    results += run_config(rows, cols, pattern, tokens, args.reps, args.seed, flush, deepsparse,
                                          ds_tokens, load, warm=not args.cold_path)
            load.wait_quiet()
            after = read_bandwidth()
            bandwidth = max(*before.values(), *after.values())
            runs.append({"bandwidth_before": {k: round(v, 2) for k, v in before.items()},
                         "bandwidth_after": {k: round(v, 2) for k, v in after.items()},
                         "read_bandwidth_gbs": bandwidth, "results": results})
            # Written after every run, so an interrupted benchmark still leaves the runs it finished.
            report(args, argv, runs, deepsparse.version if deepsparse is not None else None)
    finally:
        if deepsparse is not None:
            deepsparse.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
