"""Text sources from local files: plain text, JSON/JSONL with a text field, Alpaca-style instructions.

A source is either one long text (for perplexity and calibration windows) or a list of instruction
examples (for fine-tuning, optionally with the loss on the response only). ``slice_fraction`` cuts
disjoint train/eval slices out of one file at document boundaries.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import LosaError
from .templates import ALPACA, PromptTemplate

TEXT_FIELDS = ("text", "content", "story", "document")


@dataclass(frozen=True)
class Example:
    """One instruction example, already rendered through the prompt template."""

    prompt: str
    response: str


@dataclass
class TextSource:
    """What a data file holds: one text, or instruction examples (exactly one of the two)."""

    path: str
    text: str | None = None
    examples: list[Example] = field(default_factory=list)

    @property
    def is_instruct(self) -> bool:
        return self.text is None

    def as_text(self) -> str:
        """The whole source as one text (instruction examples are joined prompt + response)."""
        if self.text is not None:
            return self.text
        return "\n\n".join(e.prompt + e.response for e in self.examples)


def read_source(path: str | os.PathLike, text_field: str | None = None,
                template: PromptTemplate = ALPACA) -> TextSource:
    """Read a data file; the format is chosen by extension and by the keys of its records."""
    path = Path(path)
    if not path.is_file():
        raise LosaError(f"data file {path} " + ("is not a regular file" if path.exists() else "does not exist"))
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise LosaError(f"data file {path} is not UTF-8 text") from None
    if not raw.strip():
        raise LosaError(f"data file {path} is empty")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        records = [_parse_json(path, line, n) for n, line in enumerate(raw.splitlines(), 1) if line.strip()]
    elif suffix == ".json":
        records = _parse_json(path, raw)
        if isinstance(records, dict):
            records = next((v for v in records.values() if isinstance(v, list)), [records])
    else:
        return TextSource(str(path), text=raw)
    return _from_records(path, records, text_field, template)


def _parse_json(path: Path, text: str, line: int | None = None):
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        where = f" line {line}" if line else ""
        raise LosaError(f"data file {path}{where} is not valid JSON ({exc.msg})") from None


def _from_records(path: Path, records, text_field: str | None, template: PromptTemplate) -> TextSource:
    if not isinstance(records, list) or not records or not all(isinstance(r, dict) for r in records):
        raise LosaError(f"data file {path} must hold a list of JSON objects")
    if text_field is None and all("instruction" in r and "output" in r for r in records):
        examples = [Example(template.render(r["instruction"], r.get("input") or ""), r["output"])
                    for r in _checked_instructions(path, records) if r["output"].strip()]
        if not examples:
            raise LosaError(f"data file {path} has no usable examples (every output is empty)")
        return TextSource(str(path), examples=examples)
    key = text_field or next((k for k in TEXT_FIELDS if k in records[0]), None)
    if key is None:
        # Only `eval` has --text-field: prune and finetune users can only rename the field.
        raise LosaError(f"data file {path}: no text field found (tried {', '.join(TEXT_FIELDS)}; rename the "
                        "field to one of these, or name it with eval's --text-field)")
    for n, r in enumerate(records, 1):
        if not isinstance(r.get(key), (str, type(None))):
            raise LosaError(f"data file {path}: record {n} has a non-text '{key}' ({type(r[key]).__name__})")
    texts = [r[key] for r in records if (r.get(key) or "").strip()]  # missing or null: no text
    if not texts:
        raise LosaError(f"data file {path} has no non-empty '{key}' field")
    return TextSource(str(path), text="\n\n".join(texts))


def _checked_instructions(path: Path, records: list[dict]) -> list[dict]:
    """Alpaca records whose fields are text: ``instruction`` and ``output`` strings, ``input`` a string,
    null or absent (a null must not train as the text "None")."""
    for n, r in enumerate(records, 1):
        for name, optional in (("instruction", False), ("input", True), ("output", False)):
            value = r.get(name)
            if not isinstance(value, str) and not (optional and value is None):
                kind = "null" if value is None else type(value).__name__
                raise LosaError(f"data file {path}: record {n} has a non-text '{name}' ({kind})")
    return records


def parse_slice(spec: str | None) -> tuple[float, float]:
    """``"0.8:1"`` -> (0.8, 1.0): a fraction range of a source, for disjoint train/eval slices."""
    if spec is None or spec in ("", ":"):
        return 0.0, 1.0
    try:
        lo, hi = (float(x) if x else d for x, d in zip(spec.split(":"), (0.0, 1.0), strict=True))
    except ValueError:
        raise LosaError(f"bad slice '{spec}': expected START:END fractions such as 0:0.8") from None
    if not 0.0 <= lo < hi <= 1.0:
        raise LosaError(f"bad slice '{spec}': need 0 <= START < END <= 1")
    return lo, hi


def slice_source(source: TextSource, lo: float, hi: float) -> TextSource:
    """The ``[lo, hi)`` fraction of a source: whole examples, or text cut at blank-line boundaries.

    Slices ``[a, b)`` and ``[b, c)`` of the same source never share a document.
    """
    if (lo, hi) == (0.0, 1.0):
        return source
    if source.is_instruct:
        n = len(source.examples)
        part = source.examples[round(lo * n): round(hi * n)]
        if not part:
            raise LosaError(f"slice {lo}:{hi} of {source.path} holds no examples")
        return TextSource(source.path, examples=part)
    text = source.text
    start, end = _boundary(text, lo), _boundary(text, hi)
    part = text[start:end].strip("\n")
    if not part.strip():
        raise LosaError(f"slice {lo}:{hi} of {source.path} holds no text")
    return TextSource(source.path, text=part)


_BLANK_LINE = re.compile(r"\n[ \t\r]*\n")  # wikitext's raw files have " \r\n" blank lines


def _boundary(text: str, frac: float) -> int:
    """The first document boundary at or after ``frac``: a blank line (possibly holding spaces or a CR),
    or a line break in a text without blank lines (wikitext2's raw file as read here)."""
    if frac <= 0.0:
        return 0
    if frac >= 1.0:
        return len(text)
    start = int(frac * len(text))
    found = _BLANK_LINE.search(text, start)
    if found is None and _BLANK_LINE.search(text) is None:  # no blank lines at all: each line is a document
        pos = text.find("\n", start)
        return len(text) if pos < 0 else pos
    return len(text) if found is None else found.start()
