"""Engine adapters, harness side: each says which dtypes and batches it runs, prepares the folder its
worker opens (packing the model into the cache when the engine needs another format) and builds the
worker's command line. The workers themselves are :mod:`.worker` (torch, losa, vllm) and
:mod:`.onnx_worker` (onnxruntime, deepsparse).
"""

from __future__ import annotations

import hashlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from ..envinfo import deepsparse_python, deepsparse_version
from ..errors import LosaError
from ..models.checkpoint import is_packed_checkpoint
from ..models.zoo import cache_dir
from .runners import adapter_base

# Below this global sparsity the vllm engine serves the dense checkpoint with stock vLLM (the dense
# baseline); from it on, the packed checkpoint through our plugin (sparsify_'s own default threshold).
SPARSE_FROM = 0.3


@dataclass(frozen=True)
class Shape:
    """What the workers must be able to run: the largest batch, the prompt and generation lengths."""

    max_batch: int
    prompt_len: int
    gen_len: int

    @property
    def max_len(self) -> int:
        return -(-(self.prompt_len + self.gen_len) // 16) * 16


class Engine:
    name = ""
    dtypes: tuple[str, ...] = ("bf16", "fp32")
    batch1_only = False

    def check(self, model: Path) -> None:
        """Refuse, quickly and before any worker starts, a model this engine cannot run."""

    def check_shape(self, model: Path, shape: Shape) -> None:
        """Refuse, as quickly, a run shape this engine cannot run correctly on this model."""

    def prepare(self, model: Path, dtype: str, progress: bool) -> Path:
        """The folder the worker opens (default: the model itself); may pack the model (slow)."""
        return model

    def command(self, folder: Path, dtype: str, threads: int, shape: Shape, work: Path) -> tuple[list[str], dict]:
        """The worker's argv and the environment variables to add; ``work`` is a scratch directory that
        lives as long as the worker."""
        argv = [sys.executable, "-m", "losa_deploy.throughput.worker", self.name, str(folder), "--dtype", dtype,
                "--threads", str(threads), "--max-batch", str(shape.max_batch), "--prompt-len",
                str(shape.prompt_len), "--max-len", str(shape.max_len)]
        return argv, {"OMP_NUM_THREADS": str(threads)}


def usable_core_ids() -> list[int]:
    """The cores this process may run on (taskset, a container's cpuset), not all the machine's."""
    if hasattr(os, "sched_getaffinity"):  # Linux
        return sorted(os.sched_getaffinity(0)) or [0]
    return list(range(os.cpu_count() or 1))


def _bind_cores(threads: int) -> str:
    """vLLM's CPU thread binding: the first ``threads`` cores this process may run on (under taskset or a
    cpuset those need not start at 0, and binding outside them fails). vLLM runs one thread per bound core,
    so the harness refuses more threads than cores for it."""
    return ",".join(str(c) for c in usable_core_ids()[:threads])


class TorchEngine(Engine):
    name = "torch"
    dtypes = ("bf16", "fp16", "fp32")

    def check(self, model: Path) -> None:
        _refuse_onnx_export(self.name, model)
        if is_packed_checkpoint(model):
            raise LosaError(f"engine torch runs plain HF checkpoints; {model} is packed (use --engine losa)")


class LosaEngine(Engine):
    name = "losa"
    dtypes = ("bf16", "fp16", "fp32")

    def check(self, model: Path) -> None:
        _refuse_onnx_export(self.name, model)


class VLLMEngine(Engine):
    name = "vllm"

    def check(self, model: Path) -> None:
        _refuse_onnx_export(self.name, model)
        if adapter_base(model) is not None:
            raise LosaError(f"engine vllm: {model} is an unmerged LoRA adapter; bench its merged model instead")
        _check_vllm_cpu_head_size(model)

    def prepare(self, model: Path, dtype: str, progress: bool) -> Path:
        if is_packed_checkpoint(model) or _global_sparsity(model) < SPARSE_FROM:
            return model
        return packed(model, "vllm", dtype, progress)

    def command(self, folder: Path, dtype: str, threads: int, shape: Shape, work: Path) -> tuple[list[str], dict]:
        argv, env = super().command(folder, dtype, threads, shape, work)
        # vLLM's CPU worker binds its OpenMP threads to these cores ("auto" would keep one core back for
        # its scheduler, halving the threads on a 2-core machine).
        # Its KV cache takes VLLM_CPU_KVCACHE_SPACE GiB of memory (1 holds 32 x 256 tokens of a 7B-shaped
        # 2-block model many times over), not a share of the machine: several workers stay resident at once.
        # The engine core runs in this process (no engine-core and worker processes talking through shared
        # memory): on 2 cores their message passing cost 4 ms per token dense and 6 ms sparse (RESULTS.md).
        return argv, {**env, "VLLM_CPU_OMP_THREADS_BIND": _bind_cores(threads),
                      "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
                      "VLLM_ENABLE_V1_MULTIPROCESSING": os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "0")}


class OnnxEngine(Engine):
    """ONNX Runtime or DeepSparse on the ``deepsparse``-format export (fp32, batch 1)."""

    dtypes = ("fp32",)
    batch1_only = True

    def __init__(self, name: str):
        self.name = name

    def python(self) -> str:
        if self.name == "onnxruntime":
            return sys.executable
        python = deepsparse_python()
        if python is None:
            raise LosaError("engine deepsparse needs the DeepSparse venv: run `make deepsparse-venv` or set "
                            "LOSA_DEEPSPARSE_PYTHON")
        if not os.access(python, os.X_OK):  # else the worker's start fails, after the other cells loaded
            raise LosaError(f"engine deepsparse: {python} is not executable (LOSA_DEEPSPARSE_PYTHON or "
                            ".venv-deepsparse)")
        if not deepsparse_version(python).get("installed"):  # likewise: a Python without it fails at its import
            raise LosaError(f"engine deepsparse: {python} cannot import deepsparse (LOSA_DEEPSPARSE_PYTHON or "
                            ".venv-deepsparse; `make deepsparse-venv` builds it)")
        return str(python)

    def check(self, model: Path) -> None:
        self.python()
        if adapter_base(model) is not None:
            raise LosaError(f"engine {self.name}: {model} is an unmerged LoRA adapter; bench its merged model")
        if (model / "model.onnx").is_file():
            return
        if is_packed_checkpoint(model):
            raise LosaError(f"engine {self.name} needs a plain HF checkpoint or a deepsparse-format folder, "
                            f"not the packed {model}")
        _check_onnx_family(self.name, model)

    def check_shape(self, model: Path, shape: Shape) -> None:
        from ..engines.onnx_generate import check_onnx_window
        from ..models.checkpoint import read_config

        check_onnx_window(read_config(model), shape.prompt_len + shape.gen_len, f"engine {self.name}: {model}")

    def prepare(self, model: Path, dtype: str, progress: bool) -> Path:
        if (model / "model.onnx").is_file():
            return model
        return packed(model, "deepsparse", "fp32", progress)

    def command(self, folder: Path, dtype: str, threads: int, shape: Shape, work: Path) -> tuple[list[str], dict]:
        # DeepSparse compiles one engine per input length, and its multi-token one takes multiples of 4:
        # the prompt runs as the largest such chunk, its remainder token by token (63 as 60 + 3).
        chunk = max(shape.prompt_len // 4 * 4, 1)
        argv = [self.python(), str(Path(__file__).with_name("onnx_worker.py")), self.name, str(folder),
                "--sequence-length", str(shape.max_len), "--prompt-chunk", str(chunk), "--threads", str(threads),
                "--work-dir", str(work)]
        return argv, {"OMP_NUM_THREADS": str(threads)}


ENGINES: dict[str, Engine] = {e.name: e for e in (TorchEngine(), LosaEngine(), VLLMEngine(),
                                                   OnnxEngine("deepsparse"), OnnxEngine("onnxruntime"))}


def get_engine(name: str) -> Engine:
    try:
        return ENGINES[name]
    except KeyError:
        raise LosaError(f"unknown engine '{name}' (choose from {', '.join(ENGINES)})") from None


# The head sizes vllm-cpu 0.32's attention takes (CPUAttentionBackend.get_supported_head_sizes). Asking
# vLLM costs an import of 10 s or more; not asking, a refusal about 20 s into the engine's start-up.
VLLM_CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


def _check_vllm_cpu_head_size(model: Path) -> None:
    from importlib.metadata import PackageNotFoundError, version

    from ..models.arch import head_size as attention_head_size
    from ..models.checkpoint import read_config

    try:
        version("vllm-cpu")
    except PackageNotFoundError:
        return  # a GPU vLLM build: its attention backends take other sizes, and it checks them itself
    config = read_config(model)
    head_size = attention_head_size(config)
    if head_size is not None and head_size not in VLLM_CPU_HEAD_SIZES:
        raise LosaError(f"engine vllm: {model} has attention head size {head_size}; vLLM's CPU attention takes "
                        f"{', '.join(map(str, VLLM_CPU_HEAD_SIZES))}")


def _check_onnx_family(engine: str, model: Path) -> None:
    """The ONNX export (``prepare`` packs it) covers the llama layout only: refuse another family here, not
    after the earlier cells' workers have loaded."""
    from ..export.onnx_decoder import SUPPORTED_MODEL_TYPES
    from ..models.checkpoint import read_config

    model_type = read_config(model).get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise LosaError(f"engine {engine}: {model} is model_type {model_type}; the ONNX export it runs supports "
                        f"{', '.join(SUPPORTED_MODEL_TYPES)}")


def _refuse_onnx_export(engine: str, model: Path) -> None:
    from ..models.checkpoint import weight_files

    if (model / "model.onnx").is_file() and not weight_files(model):
        raise LosaError(f"engine {engine} runs HF checkpoints; {model} is an ONNX export (bench it with "
                        "--engine onnxruntime or deepsparse)")


def _global_sparsity(model: Path) -> float:
    from ..sparsity.report import inspect_checkpoint
    from ..sparsity.sidecar import read_sidecar

    sidecar = read_sidecar(model)
    return (sidecar or inspect_checkpoint(model))["global_sparsity"]


def packed(model: Path, format: str, dtype: str, progress: bool = True) -> Path:
    """``model`` packed in ``format`` (``dtype``), built once into the cache and reused while the source
    folder is unchanged (keyed by its path and the size and time of every file)."""
    from ..export import pack_checkpoint

    files = sorted(p for p in model.iterdir() if p.is_file())
    stamp = "|".join(f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files)
    key = hashlib.sha256(f"{model.resolve()}|{stamp}".encode()).hexdigest()[:16]
    out = cache_dir() / "bench" / "packed" / f"{model.name}-{key}" / f"{format}-{dtype}"
    if not (out / "config.json").is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        pack_checkpoint(model, out, format=format, dtype=dtype, overwrite=True, progress=progress)
    return out
