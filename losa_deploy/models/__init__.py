"""Checkpoints in and out, GGUF import, the embedded default model, and the architecture adapter."""

from .arch import ARCHITECTURES, Architecture, context_length, get_architecture
from .checkpoint import check_checkpoint, load_model, load_tokenizer, parse_dtype, save_model, stored_dtype
from .gguf import import_gguf, load_gguf
from .zoo import DEFAULT_MODEL, default_model, resolve_model

__all__ = [
    "ARCHITECTURES",
    "Architecture",
    "DEFAULT_MODEL",
    "check_checkpoint",
    "context_length",
    "default_model",
    "get_architecture",
    "import_gguf",
    "load_gguf",
    "load_model",
    "load_tokenizer",
    "parse_dtype",
    "resolve_model",
    "save_model",
    "stored_dtype",
]
