"""Data: text sources from files or from the model itself, token windows, instruction examples."""

from .calibration import SELF, calibration_windows
from .instruct import IGNORE_INDEX, TokenizedExample, collate, tokenize_examples
from .selfgen import self_generate
from .sources import Example, TextSource, parse_slice, read_source, slice_source
from .templates import ALPACA, TEMPLATES, PromptTemplate
from .windows import eval_windows, sample_windows, tokenize_text

__all__ = [
    "SELF",
    "calibration_windows",
    "ALPACA",
    "Example",
    "IGNORE_INDEX",
    "PromptTemplate",
    "TEMPLATES",
    "TextSource",
    "TokenizedExample",
    "collate",
    "eval_windows",
    "parse_slice",
    "read_source",
    "sample_windows",
    "self_generate",
    "slice_source",
    "tokenize_examples",
    "tokenize_text",
]
