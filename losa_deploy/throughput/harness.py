"""``run_bench``: prefill and decode throughput of models on engines, interleaved in one run.

Protocol (engines-and-formats.md §8): every (model, engine) cell is loaded once in its own worker
process; for each batch size, ``warmup`` rounds and then ``repeats`` rounds, each round asking every cell
once (round-robin, the first cell rotated each round); the same random prompts (token ids, seeded) for
every cell; greedy generation that never stops at EOS. Per sample:

* prefill tokens/s = batch x prompt_len / (time from the prompt to the first generated token);
* decode tokens/s = batch x (gen_len - 1) / (time of the other gen_len - 1 tokens);
* time per output token (TPOT) = that decode time / (gen_len - 1).

Reported: the median over the repeats, with quartiles and extremes, and each cell's decode and prefill
speed-up over the first cell at the same batch (the baseline: list it first).
"""

from __future__ import annotations

import os
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ..errors import LosaError
from ..utils.plots import check_plot_file
from .engines import ENGINES, Engine, Shape, get_engine, usable_core_ids
from .models import check_model_spec, resolve_bench_model
from .timing import WorkerProcess, remove_scratch, round_robin, scratch_dir, stop_workers, summarize

DTYPES = ("bf16", "fp16", "fp32")


@dataclass
class Cell:
    spec: str
    path: Path
    engine: Engine
    dtype: str
    worker: WorkerProcess | None = None
    info: dict = field(default_factory=dict)
    samples: dict = field(default_factory=dict)  # batch -> list of worker answers
    tokens: dict = field(default_factory=dict)   # batch -> greedy ids of the first prompt (warm-up round)

    @property
    def label(self) -> str:
        return f"{self.spec} / {self.engine.name} {self.dtype}"


def parse_engines(names: str | list[str]) -> list[tuple[str, str | None]]:
    """``"torch,losa:fp32"`` -> [("torch", None), ("losa", "fp32")] (None: the run's dtype)."""
    items = names.split(",") if isinstance(names, str) else list(names)
    parsed = []
    for item in (i.strip() for i in items):
        name, _, dtype = item.partition(":")
        engine = get_engine(name)
        if dtype and dtype not in DTYPES:
            raise LosaError(f"engine {item}: unknown dtype '{dtype}' (choose from {', '.join(DTYPES)})")
        if dtype and dtype not in engine.dtypes:  # asked for by name: running another would mislead
            raise LosaError(f"engine {item}: {name} runs {', '.join(engine.dtypes)} only")
        parsed.append((name, dtype or None))
    if not parsed or len(set(parsed)) != len(parsed):
        raise LosaError(f"--engine: expected distinct engines from {', '.join(ENGINES)}, got '{names}'")
    return parsed


def parse_batches(text: str | list[int]) -> list[int]:
    try:
        batches = [int(b) for b in text.split(",")] if isinstance(text, str) else [int(b) for b in text]
    except ValueError:
        raise LosaError(f"--batch: expected a comma list of positive integers, got '{text}'") from None
    if not batches or min(batches) < 1 or len(set(batches)) != len(batches):
        raise LosaError(f"--batch: expected distinct positive integers, got '{text}'")
    return batches


def run_bench(models: list[str], engines: str | list[str] = "torch,losa", device: str = "cpu",
              batches: str | list[int] = (1,), prompt_len: int = 128, gen_len: int = 128, repeats: int = 5,
              warmup: int = 1, threads: int | None = None, dtype: str = "bf16", seed: int = 0,
              plot: str | os.PathLike | None = None, command: str | None = None,
              pairs: list[tuple[str, str]] | None = None, load_timeout: float = 3600,
              request_timeout: float = 3600, progress: bool = True) -> dict:
    """Measure every model on every engine; returns the results (see the module docstring).

    ``engines``: a comma list of torch, losa, vllm, deepsparse, onnxruntime, each optionally ``:DTYPE``.
    ``pairs``: instead of every model on every engine, exactly these (model, engine) cells, in this order
    (e.g. a dense folder on torch beside its packed sparse folder on losa). ``threads``: per engine
    (default: every core this process may run on). Everything is checked before anything is loaded.
    """
    started = time.time()
    if pairs is not None:
        pairs = [(os.fspath(model), engine) for model, engine in pairs]  # a path object names a folder like its string
        models = [model for model, _ in pairs]
        plan = [(model, parse_engines(engine)[0]) for model, engine in pairs]
    else:
        models = [os.fspath(model) for model in models]
        plan = [(model, engine) for model in models for engine in parse_engines(engines)]
    batch_list = parse_batches(batches)
    if dtype not in DTYPES:
        raise LosaError(f"--dtype: choose from {', '.join(DTYPES)}, got '{dtype}'")
    if prompt_len < 1 or gen_len < 2 or repeats < 1 or warmup < 0:
        raise LosaError("--prompt-len must be >= 1, --gen-len >= 2, --repeats >= 1 and --warmup >= 0")
    cores = usable_cores()
    threads = threads or cores
    if threads < 1:
        raise LosaError(f"--threads must be positive, got {threads}")
    if device == "cpu" and threads > cores and any(name == "vllm" for _, (name, _) in plan):
        raise LosaError(f"engine vllm binds one thread per core: --threads {threads} exceeds the "
                        f"{cores} cores this process may use")
    _check_device(device, [name for _, (name, _) in plan])
    engines_used = {get_engine(name) for _, (name, _) in plan}
    if 1 not in batch_list and all(e.batch1_only for e in engines_used):
        raise LosaError(f"engine(s) {', '.join(sorted(e.name for e in engines_used))} run batch 1 only, and --batch "
                        f"asks for {','.join(map(str, batch_list))}: add 1, or an engine that batches")
    if not models:
        raise LosaError("bench: no MODEL given")
    for spec in models:
        check_model_spec(spec)
    if plot is not None:
        check_plot_file(plot)

    paths = {spec: resolve_bench_model(spec, progress) for spec in dict.fromkeys(models)}
    vocab = min(_vocab_size(p) for p in paths.values())
    shape = Shape(max(batch_list), prompt_len, gen_len)
    for path in paths.values():
        _check_context(path, shape)
    cells = []
    for spec, (name, cell_dtype) in plan:
        engine = get_engine(name)
        run_dtype = cell_dtype or dtype
        if run_dtype not in engine.dtypes:  # only the run's --dtype: parse_engines refused an engine's own
            run_dtype = engine.dtypes[0]  # DeepSparse and ONNX Runtime run the fp32 export
        engine.check(paths[spec])  # before any worker starts: a refusal costs nothing then
        engine.check_shape(paths[spec], shape)
        cells.append(Cell(spec, paths[spec], engine, run_dtype))
    prompts = make_prompts(batch_list, prompt_len, vocab, seed)
    from ..envinfo import environment

    machine = {**environment(), "load_average_start": os.getloadavg()}
    try:
        _start_workers(cells, threads, shape, device, load_timeout, progress)
        _measure(cells, batch_list, prompts, gen_len, warmup, repeats, request_timeout, progress)
    except BaseException:
        # Failed, interrupted or terminated: a polite close would wait for a busy worker's request.
        stop_workers([c.worker for c in cells if c.worker is not None])
        raise
    finally:
        for cell in cells:
            if cell.worker is not None:
                cell.worker.close()  # at once after stop_workers
                remove_scratch(cell.worker.work)
    machine["load_average_end"] = os.getloadavg()
    results = {
        "command": command or " ".join(shlex.quote(a) for a in sys.argv),
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "seconds": time.time() - started,
        "settings": {"models": list(paths), "cells": [f"{c.spec} {c.engine.name}:{c.dtype}" for c in cells],
                     "device": device, "batches": batch_list, "prompt_len": prompt_len, "gen_len": gen_len,
                     "warmup": warmup, "repeats": repeats, "threads": threads, "dtype": dtype, "seed": seed,
                     "vocab_for_prompts": vocab},
        "machine": machine,
        "cells": [{"model": c.spec, "path": str(c.path), "engine": c.engine.name, "dtype": c.dtype, **c.info}
                  for c in cells],
        "rows": _rows(cells, batch_list, prompt_len, gen_len),
    }
    results["agreement"] = _agreement(cells, batch_list)
    if plot is not None:
        from .report import plot_results

        plot_results(results, plot)
        results["plot"] = str(plot)
    return results


def usable_cores() -> int:
    """How many cores this process may run on (taskset, a container's cpuset), not all the machine's."""
    return len(usable_core_ids())


def make_prompts(batches: list[int], prompt_len: int, vocab: int, seed: int) -> dict[int, list[list[int]]]:
    """The random prompts (token ids) of each batch size, the same for every cell."""
    rng = np.random.default_rng(seed)
    return {b: rng.integers(0, vocab, size=(b, prompt_len)).tolist() for b in batches}


def _check_device(device: str, engines: list[str]) -> None:
    if device not in ("cpu", "cuda"):
        raise LosaError(f"--device: choose cpu or cuda, got '{device}'")
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise LosaError("--device cuda: no CUDA device is available")
        cpu_only = [e for e in engines if e in ("deepsparse", "onnxruntime")]
        if cpu_only:
            raise LosaError(f"--device cuda: {', '.join(cpu_only)} run on the CPU only")


def _vocab_size(path: Path) -> int:
    from ..models.checkpoint import read_config
    from .runners import adapter_base

    config = read_config(adapter_base(path) or path)
    return int(config.get("text_config", config)["vocab_size"])


def _check_context(path: Path, shape: Shape) -> None:
    from ..models import context_length
    from ..models.checkpoint import read_config
    from .runners import adapter_base

    ctx = context_length(read_config(adapter_base(path) or path))
    if shape.prompt_len + shape.gen_len > ctx:
        raise LosaError(f"{path}: prompt + generated tokens ({shape.prompt_len + shape.gen_len}) exceed its "
                        f"context ({ctx})")


def _start_workers(cells: list[Cell], threads: int, shape: Shape, device: str, timeout: float,
                   progress: bool) -> None:
    """One worker per cell, loaded one after the other (loading is not timed; peaks stay one model)."""
    for cell in tqdm(cells, desc="load", disable=not progress, leave=False):
        folder = cell.engine.prepare(cell.path, cell.dtype, progress)
        work = scratch_dir(cell.label)
        try:
            argv, env = cell.engine.command(folder, cell.dtype, threads, shape, work)
            if device == "cuda":
                argv += ["--device", "cuda"]
            cell.worker = WorkerProcess(cell.label, argv, env, work)
        except BaseException:
            remove_scratch(work)  # no worker owns it yet
            raise
        cell.info = {"folder": str(folder), **cell.worker.wait_ready(timeout)}


def _measure(cells: list[Cell], batches: list[int], prompts: dict, gen_len: int, warmup: int, repeats: int,
             timeout: float, progress: bool) -> None:
    plan = [(b, r) for b in batches for r in range(warmup + repeats)]
    total = sum(len(_active(cells, b)) for b, _ in plan)
    with tqdm(total=total, desc="bench", disable=not progress, leave=False) as bar:
        for batch, round_index in plan:
            active = _active(cells, batch)
            for cell in round_robin(active, round_index) if active else []:  # none: the batch's rows say skipped
                answer = cell.worker.request({"prompts": prompts[batch], "gen_len": gen_len}, timeout)
                cell.tokens.setdefault(batch, answer["tokens"])
                if round_index >= warmup:
                    cell.samples.setdefault(batch, []).append(answer)
                bar.update()


def _active(cells: list[Cell], batch: int) -> list[Cell]:
    return [c for c in cells if batch == 1 or not c.engine.batch1_only]


def _rows(cells: list[Cell], batches: list[int], prompt_len: int, gen_len: int) -> list[dict]:
    rows = []
    for batch in batches:
        base = None
        for cell in _active(cells, batch):
            samples = cell.samples[batch]
            row = {"model": cell.spec, "engine": cell.engine.name, "dtype": cell.dtype, "batch": batch,
                   "kernel_path": cell.info.get("kernel_path"), "tokens": cell.tokens[batch],
                   "prefill_tok_s": summarize([batch * prompt_len / s["prefill_s"] for s in samples]),
                   "decode_tok_s": summarize([batch * (gen_len - 1) / s["decode_s"] for s in samples]),
                   "tpot_ms": summarize([1000 * s["decode_s"] / (gen_len - 1) for s in samples])}
            timing = sorted({s["timing"] for s in samples if "timing" in s})  # a worker that says how it timed
            if timing:
                row["timing"] = ", ".join(timing)
            base = base or row
            row["baseline"] = f"{base['model']} / {base['engine']} {base['dtype']}"
            for key in ("decode_tok_s", "prefill_tok_s"):
                row[f"{key.split('_')[0]}_speedup"] = row[key]["median"] / base[key]["median"]
            rows.append(row)
        skipped = [c for c in cells if c not in _active(cells, batch)]
        rows.extend({"model": c.spec, "engine": c.engine.name, "dtype": c.dtype, "batch": batch,
                     "skipped": f"{c.engine.name} runs batch 1 only"} for c in skipped)
    return rows


def _agreement(cells: list[Cell], batches: list[int]) -> list[dict]:
    """Per model and batch: does each engine's greedy output (first prompt) equal the first engine's?"""
    out = []
    for batch in batches:
        by_model: dict[str, list[Cell]] = {}
        for cell in _active(cells, batch):
            by_model.setdefault(cell.spec, []).append(cell)
        for spec, group in by_model.items():
            reference = group[0]
            for cell in group[1:]:
                a, b = reference.tokens[batch], cell.tokens[batch]
                first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
                out.append({"model": spec, "batch": batch, "reference": f"{reference.engine.name} {reference.dtype}",
                            "engine": f"{cell.engine.name} {cell.dtype}", "identical": a == b,
                            "first_difference": first})
    return out
