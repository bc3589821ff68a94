"""``tokenizer.json`` in the layout ``tokenizers < 0.19`` reads, for DeepSparse's text-generation pipeline.

deepsparse 1.8 needs ``transformers < 4.40``, whose ``tokenizers`` (0.15) cannot parse files written by
current ones: BPE merges became ``["a", "b"]`` pairs (were ``"a b"`` strings), BPE gained
``ignore_merges``, and Metaspace replaced ``add_prefix_space`` by ``prepend_scheme`` + ``split``. Current
``tokenizers`` still read the old layout, so the converted file serves both.

The conversion is refused (the caller keeps the modern file) when it would change tokenization: a merge
part containing a space, ``ignore_merges: true``, or a Metaspace with ``split: false`` (old Metaspace
always splits on spaces) over a vocabulary with a piece that spans a space: Llama-2's and Mistral's hold
``"▁▁"``, which the split would never produce.
"""

from __future__ import annotations


def legacy_tokenizer_json(tokenizer: dict) -> dict | None:
    """The old-layout equivalent of a parsed ``tokenizer.json``, or None if it cannot be expressed."""
    model = dict(tokenizer.get("model") or {})
    if model.pop("ignore_merges", False):
        return None
    if _unsplit_metaspace(tokenizer.get("pre_tokenizer")) and _spans_a_space(model.get("vocab")):
        return None
    merges = model.get("merges") or []
    if merges and isinstance(merges[0], list):
        if any(" " in part for pair in merges for part in pair):
            return None
        model["merges"] = [" ".join(pair) for pair in merges]
    return {**tokenizer, "model": model, "pre_tokenizer": _legacy_metaspace(tokenizer.get("pre_tokenizer")),
            "decoder": _legacy_metaspace(tokenizer.get("decoder"))}


def _unsplit_metaspace(component) -> bool:
    if not isinstance(component, dict):
        return False
    if component.get("type") == "Sequence":
        return any(_unsplit_metaspace(c) for c in component.get("pretokenizers", []))
    return component.get("type") == "Metaspace" and component.get("split") is False


def _spans_a_space(vocab, space: str = "\u2581") -> bool:
    """Whether a piece holds the Metaspace mark past its first character (a piece that spans a space)."""
    pieces = vocab.keys() if isinstance(vocab, dict) else (v[0] for v in vocab or [] if isinstance(v, list))
    return any(space in piece[1:] for piece in pieces)


def _legacy_metaspace(component):
    """Rewrite Metaspace entries (possibly inside a Sequence) with ``add_prefix_space``."""
    if not isinstance(component, dict):
        return component
    if component.get("type") == "Sequence":
        key = "pretokenizers" if "pretokenizers" in component else "decoders"
        return {**component, key: [_legacy_metaspace(c) for c in component[key]]}
    if component.get("type") != "Metaspace" or "add_prefix_space" in component:
        return component
    scheme = component.get("prepend_scheme", "always")
    return {"type": "Metaspace", "replacement": component.get("replacement", "\u2581"),
            "add_prefix_space": scheme != "never", "prepend_scheme": scheme}
