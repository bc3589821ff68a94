"""DeepSparse side of benchmarks/kernels_cpu.py; runs inside .venv-deepsparse (deepsparse 1.8, numpy<2).

It never imports losa_deploy: the two environments cannot share packages, so the parent process talks to
it through files and pipes. ``JOB_DIR/jobs.json`` lists ``{"id", "weight", "tokens"}`` entries, each
weight an ``.npy`` file holding Wᵀ ``[in, out]`` in fp32 with the pruned entries exactly zero. The worker
builds one ONNX ``MatMul`` model per job, compiles it with DeepSparse's engine on ``--threads`` cores,
checks its output against NumPy, prints ``{"ready": ...}`` and then answers one JSON line per request
line ``{"id": ID}``: the seconds of one ``engine.run``, timed after reading a buffer larger than the
last-level cache (so the weights come from DRAM, as in decode).

A job with ``"layers": L`` is a layer stream instead: no weight file; the worker draws L weights of
``rows`` x ``cols`` at ``pattern`` itself (NumPy; "2:4" or a percentage of zeros), builds one model with L
MatMuls of the same x, runs it once to warm up and answers with the seconds per layer of the next run.
Together the L weights are larger than the last-level cache, so each comes from DRAM, while the engine's
code and threads are warm: a decode step's steady state.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np


def build_model(weights: list[np.ndarray], tokens: int, path: Path) -> None:
    """An ONNX model with one MatMul of the input x per weight (Wᵀ, [in, out]), each its own output."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rows_in, rows_out = weights[0].shape
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [tokens, rows_in])
    ys = [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, [tokens, rows_out]) for i in range(len(weights))]
    nodes = [helper.make_node("MatMul", ["x", f"w{i}"], [f"y{i}"]) for i in range(len(weights))]
    inits = [numpy_helper.from_array(w, f"w{i}") for i, w in enumerate(weights)]
    graph = helper.make_graph(nodes, "sparse_linear", [x], ys, inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))


def draw_weight(rows: int, cols: int, pattern: str, rng: np.random.Generator) -> np.ndarray:
    """Wᵀ [cols, rows] in fp32 with exact zeros: 2:4 along the input, or the given percentage at random."""
    w = rng.standard_normal((rows, cols), dtype=np.float32)
    if pattern == "2:4":
        groups = w.reshape(rows, cols // 4, 4)
        drop = rng.random(groups.shape).argsort(-1)[..., :2]
        np.put_along_axis(groups, drop, 0.0, axis=-1)
    else:
        w[rng.random((rows, cols)) < float(pattern.rstrip("%")) / 100] = 0.0
    return np.ascontiguousarray(w.T)


def check(engine, x: np.ndarray, weights: list[np.ndarray], job_id: str) -> None:
    outputs = engine.run([x])
    for out, weight in zip(outputs, weights):
        ref = x @ weight
        error = float(np.abs(out - ref).max() / max(np.abs(ref).max(), 1e-30))
        if error > 1e-3:
            raise SystemExit(f"deepsparse output for {job_id} is off by {error:.3g} (relative)")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("job_dir", type=Path)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--flush-mb", type=int, default=128)
    args = parser.parse_args()

    import deepsparse
    from deepsparse import compile_model

    jobs = json.loads((args.job_dir / "jobs.json").read_text())
    rng = np.random.default_rng(0)
    engines, inputs = {}, {}
    layers = {}
    for job in jobs:
        if "layers" in job:
            weights = [draw_weight(job["rows"], job["cols"], job["pattern"], rng) for _ in range(job["layers"])]
        else:
            weights = [np.load(args.job_dir / job["weight"])]
        model = args.job_dir / f"{job['id']}.onnx"
        build_model(weights, job["tokens"], model)
        engine = compile_model(str(model), batch_size=job["tokens"], num_cores=args.threads)
        model.unlink()
        x = rng.standard_normal((job["tokens"], weights[0].shape[0])).astype(np.float32)
        check(engine, x, weights, job["id"])
        engines[job["id"]], inputs[job["id"]], layers[job["id"]] = engine, x, job.get("layers")
        del weights
    flush = np.ones(args.flush_mb << 17, dtype=np.int64)  # flush_mb MiB
    print(json.dumps({"ready": True, "version": deepsparse.__version__}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        engine, x, count = engines[request["id"]], inputs[request["id"]], layers[request["id"]]
        if count:
            engine.run([x])  # the stream's own weights evict each other: only the code and threads warm up
        else:
            flush.sum()
        start = time.perf_counter()
        engine.run([x])
        seconds = (time.perf_counter() - start) / (count or 1)
        print(json.dumps({"id": request["id"], "seconds": seconds}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
