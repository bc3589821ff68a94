"""``deepsparse``: ``model.onnx`` with KV-cache inputs and outputs, plus config.json and the tokenizer.

SparseML (Neural Magic's exporter) is archived, so we export ourselves: the graph of
:class:`~.onnx_decoder.CachedDecoderStep`, traced by ``torch.onnx.export`` (TorchScript exporter) at
opset 14, fp32 weights stored as initializers. DeepSparse finds its sparsity in those initializers, so the
pruned entries stay exact zeros (constant folding only transposes them). The folder is what DeepSparse's
``TextGeneration`` pipeline and our own loop (:mod:`losa_deploy.engines.onnx_decode`) open.

Tracing needs the module, so this format holds the model once (fp32); the weights still arrive through
the same checked, scrubbed stream as every other format, straight into an empty (meta) model.

``tokenizer.json`` is rewritten in the layout old ``tokenizers`` read (:mod:`.legacy_tokenizer`), so that
DeepSparse's own ``TextGeneration`` pipeline (it needs ``transformers < 4.40``) opens the folder too.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch

from ..errors import LosaError
from ..models.arch import attention_window
from ..models.skeleton import assign_weight, empty_model
from .base import Exporter
from .legacy_tokenizer import legacy_tokenizer_json
from .onnx_decoder import INPUTS, SUPPORTED_MODEL_TYPES, CachedDecoderStep, cache_names
from .source import PackSource

ONNX_FILE = "model.onnx"
OPSET = 14  # deepsparse 1.8.0 ships onnx 1.14 (opsets <= 19); 14 is what its LLM exports used


class DeepSparseExporter(Exporter):
    name = "deepsparse"
    description = "model.onnx with KV-cache inputs/outputs (fp32, exact zeros) for DeepSparse and ONNX Runtime"
    dtypes = ("fp32",)
    default_dtype = "fp32"

    def write_weights(self, source: PackSource, out: Path) -> list[Path]:
        model_type = source.config["model_type"]
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise LosaError(f"format deepsparse supports {', '.join(SUPPORTED_MODEL_TYPES)}, not {model_type}")
        window = attention_window(source.config)
        if window:
            source.warn(f"the ONNX graph does not apply sliding-window attention; it is exact for sequence "
                        f"lengths up to {window} (ONNX generation and bench refuse longer ones)")
        step = CachedDecoderStep(_model_from_stream(source))
        past_in, present_out = cache_names(step.num_layers)
        path = out / ONNX_FILE
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer notes
            torch.onnx.export(step, step.example_inputs(), str(path), dynamo=False, opset_version=OPSET,
                              input_names=[*INPUTS, *past_in], output_names=["logits", *present_out],
                              dynamic_axes=step.dynamic_axes(), do_constant_folding=True)
        weights = sorted(p for p in out.iterdir() if p.is_file())
        _write_legacy_tokenizer(source, out)
        _write_legacy_tokenizer_config(source, out)
        return weights


def _write_legacy_tokenizer(source: PackSource, out: Path) -> None:
    """tokenizer.json that DeepSparse's own pipeline (tokenizers 0.15) can read, when it can be expressed."""
    path = source.path / "tokenizer.json"
    if not path.is_file():
        return
    legacy = legacy_tokenizer_json(json.loads(path.read_text()))
    if legacy is None:
        source.warn("tokenizer.json kept in the current layout; DeepSparse's TextGeneration pipeline "
                    "(tokenizers < 0.19) may not read it, our ONNX loop does not need it")
        return
    (out / "tokenizer.json").write_text(json.dumps(legacy, ensure_ascii=False, indent=2))


# transformers 5 writes a generic fast tokenizer as class TokenizersBackend, with keys of its own; the
# DeepSparse venv's transformers 4.39 knows neither, and its TextGeneration pipeline fails on the class.
_V5_TOKENIZER_CLASSES = {"TokenizersBackend": "PreTrainedTokenizerFast"}
_V5_TOKENIZER_KEYS = ("backend", "is_local", "local_files_only")


def _write_legacy_tokenizer_config(source: PackSource, out: Path) -> None:
    path = source.path / "tokenizer_config.json"
    if not path.is_file():
        return
    config = json.loads(path.read_text())
    cls = config.get("tokenizer_class")
    config["tokenizer_class"] = _V5_TOKENIZER_CLASSES.get(cls, cls)
    for key in _V5_TOKENIZER_KEYS:
        config.pop(key, None)
    (out / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False, indent=2))


def _model_from_stream(source: PackSource) -> torch.nn.Module:
    """The HF model, built empty and filled tensor by tensor from the source's checked stream."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(source.path, local_files_only=True)
    model = empty_model(config, dtype=torch.float32)
    for key, tensor in source.tensors():  # complete: PackSource.open checked the stored weights
        assign_weight(model, source.path, key, tensor)
    model.tie_weights()
    return model.eval()
