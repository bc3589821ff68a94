"""DeepSparse side of benchmarks/kernels_cpu.py; runs inside .venv-deepsparse (deepsparse 1.8, numpy<2).

It never imports losa_deploy: the two environments cannot share packages, so the parent process talks to
it through files and pipes. ``JOB_DIR/jobs.json`` lists ``{"id", "weight", "tokens"}`` entries, each
weight an ``.npy`` file holding Wᵀ ``[in, out]`` in fp32 with the pruned entries exactly zero. The worker
builds one ONNX ``MatMul`` model per job, compiles it with DeepSparse's engine on ``--threads`` cores,
checks its output against NumPy, prints ``{"ready": ...}`` and then answers one JSON line per request
line ``{"id": ID}``: the seconds of one ``engine.run``, timed after reading a buffer larger than the
last-level cache (so the weights come from DRAM, as in decode).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np


def build_model(weight: np.ndarray, tokens: int, path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rows_in, rows_out = weight.shape
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [tokens, rows_in])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [tokens, rows_out])
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "sparse_linear", [x], [y],
                              [numpy_helper.from_array(weight, "w")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))


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
    for job in jobs:
        weight = np.load(args.job_dir / job["weight"])
        model = args.job_dir / f"{job['id']}.onnx"
        build_model(weight, job["tokens"], model)
        engine = compile_model(str(model), batch_size=job["tokens"], num_cores=args.threads)
        x = rng.standard_normal((job["tokens"], weight.shape[0])).astype(np.float32)
        error = float(np.abs(engine.run([x])[0] - x @ weight).max() / max(np.abs(x @ weight).max(), 1e-30))
        if error > 1e-3:
            raise SystemExit(f"deepsparse output for {job['id']} is off by {error:.3g} (relative)")
        engines[job["id"]], inputs[job["id"]] = engine, x
        del weight
    flush = np.ones(args.flush_mb << 17, dtype=np.int64)  # flush_mb MiB
    print(json.dumps({"ready": True, "version": deepsparse.__version__}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        engine, x = engines[request["id"]], inputs[request["id"]]
        flush.sum()
        start = time.perf_counter()
        engine.run([x])
        print(json.dumps({"id": request["id"], "seconds": time.perf_counter() - start}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
