"""Greedy generation on a ``deepsparse``-format folder, with ONNX Runtime (in process) or DeepSparse (in
its own venv, driven through ``.npz`` files by :mod:`.onnx_decode` run as a script)."""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from ..envinfo import deepsparse_python
from ..errors import LosaError
from . import onnx_decode

ENGINES = ("onnxruntime", "deepsparse")


def onnx_generate(model_dir: str | os.PathLike, prompts: list[list[int]], new_tokens: int,
                  engine: str = "onnxruntime", sequence_length: int | None = None, chunk_length: int = 4,
                  timeout: float = 900) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per prompt: (generated ids, logits [new_tokens, vocab]) of greedy decoding.

    ``sequence_length`` is the context window every call sees (default: the longest prompt plus
    ``new_tokens``, rounded up to 16); the prompt runs in chunks of ``chunk_length`` tokens (1 or a
    multiple of 4, as DeepSparse's pipeline requires).
    """
    if engine not in ENGINES:
        raise LosaError(f"unknown ONNX engine '{engine}' (choose from {', '.join(ENGINES)})")
    if not (Path(model_dir) / "model.onnx").is_file():
        raise LosaError(f"{model_dir} has no model.onnx (pack it with --format deepsparse)")
    if chunk_length != 1 and chunk_length % 4:
        raise LosaError(f"chunk_length must be 1 or a multiple of 4, got {chunk_length}")
    context = _check_request(model_dir, [len(p) for p in prompts], new_tokens, sequence_length)
    longest = max(len(p) for p in prompts) + new_tokens
    sequence_length = sequence_length or min(-(-longest // 16) * 16, context)
    arrays = [np.asarray(p, dtype=np.int64) for p in prompts]
    if engine == "onnxruntime":
        decoder = onnx_decode.open_decoder(engine, str(model_dir), sequence_length, chunk_length)
        return [decoder.generate(ids, new_tokens) for ids in arrays]
    return _in_deepsparse_venv("deepsparse", Path(model_dir), arrays, new_tokens, sequence_length, chunk_length,
                               timeout)


def deepsparse_pipeline_generate(model_dir: str | os.PathLike, texts: list[str], new_tokens: int,
                                 sequence_length: int = 64, chunk_length: int = 4,
                                 timeout: float = 900) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per prompt text: (generated ids, logits) from DeepSparse's own ``TextGeneration`` pipeline (greedy,
    internal KV cache). Needs ``transformers`` in the DeepSparse venv (``make deepsparse-venv`` installs it)."""
    if not (Path(model_dir) / "model.onnx").is_file():
        raise LosaError(f"{model_dir} has no model.onnx (pack it with --format deepsparse)")
    _check_request(model_dir, [len(t) for t in texts], new_tokens, sequence_length)
    prompts = [np.array(text) for text in texts]
    return _in_deepsparse_venv("pipeline", Path(model_dir), prompts, new_tokens, sequence_length, chunk_length,
                               timeout)


def _check_request(model_dir, prompt_lengths: list[int], new_tokens: int, sequence_length: int | None) -> int:
    """Refuse what would otherwise fail deep inside an engine: no prompt, an empty one, no new token, or
    more positions than the model has. Returns the model's context length."""
    from ..models.arch import context_length
    from ..models.checkpoint import read_config

    if not prompt_lengths or min(prompt_lengths) < 1:
        raise LosaError("onnx generation needs at least one prompt, and no empty one")
    if new_tokens < 1:
        raise LosaError(f"new_tokens must be at least 1, got {new_tokens}")
    config = read_config(Path(model_dir))
    context = context_length(config)
    needed = sequence_length or max(prompt_lengths) + new_tokens
    if needed > context:
        raise LosaError(f"sequence length {needed} exceeds the model's {context} positions")
    check_onnx_window(config, max(prompt_lengths) + new_tokens, str(model_dir))
    return context


def check_onnx_window(config: dict, tokens: int, what: str) -> None:
    """Refuse a sequence longer than a sliding window the ONNX graph does not apply (its logits would be
    those of full attention: wrong, silently)."""
    from ..models.arch import attention_window

    window = attention_window(config)
    if window and tokens > window:
        raise LosaError(f"{what}: {tokens} tokens exceed the model's {window}-token sliding window, which the "
                        "ONNX graph does not apply (its results would be wrong past it)")


def _in_deepsparse_venv(mode: str, model_dir: Path, prompts: list[np.ndarray], new_tokens: int,
                        sequence_length: int, chunk_length: int, timeout: float) -> list[tuple[np.ndarray, np.ndarray]]:
    """Run :mod:`.onnx_decode` as a script under the DeepSparse venv's interpreter, through ``.npz`` files."""
    python = deepsparse_python()
    if python is None:
        raise LosaError("the DeepSparse venv is missing: run `make deepsparse-venv` or set LOSA_DEEPSPARSE_PYTHON")
    with tempfile.TemporaryDirectory(prefix="losa-deepsparse-") as work:
        request, result = Path(work) / "request.npz", Path(work) / "result.npz"
        np.savez(request, new_tokens=new_tokens, sequence_length=sequence_length, chunk_length=chunk_length,
                 **{f"prompt_{i}": p for i, p in enumerate(prompts)})
        cmd = [str(python), onnx_decode.__file__, mode, str(model_dir.resolve()), str(request), str(result)]
        done = subprocess.run(cmd, capture_output=True, timeout=timeout)
        if done.returncode != 0 or not result.is_file():
            lines = done.stderr.decode("utf-8", "replace").strip().splitlines() or ["no output"]
            raise LosaError(f"DeepSparse failed (exit {done.returncode}): {lines[-1]}")
        with np.load(result) as out:
            return [(out[f"tokens_{i}"], out[f"logits_{i}"]) for i in range(len(prompts))]
