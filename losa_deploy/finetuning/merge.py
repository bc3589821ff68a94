"""``merge``: fold a saved adapter into the pruned base it was trained on, keeping the zero pattern.

A masked adapter (LoSA, sparse-LoRA, masked Shears) merges as W + s·(B·A)⊙M: the result has exactly the
base's zero pattern (the non-zero count can only drop, by exact cancellations, which are counted). An
unmasked adapter (plain LoRA) would make a sparse base dense; that is refused unless ``allow_dense``.
The adapter is checked against the base's weights first (see :mod:`.adapters.peft_format`).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from .._version import __version__
from ..adapters.model import merge_adapters
from ..adapters.peft_format import load_peft_adapter
from ..errors import LosaError
from ..models import (
    check_checkpoint,
    get_architecture,
    load_model,
    load_tokenizer,
    resolve_model,
    stored_dtype,
)
from ..sparsity import SIDECAR, base_model_record, build_sidecar
from ..sparsity.patterns import global_sparsity
from ..utils.fs import atomic_dir, check_output_dir, json_text

DENSE_BELOW = 0.01  # a base with fewer zeros than this is treated as dense: merging a plain LoRA is fine


def merge_checkpoint(base: str | os.PathLike, adapter: str | os.PathLike, output: str | os.PathLike,
                     allow_dense: bool = False, overwrite: bool = False, trust_remote_code: bool = False) -> dict:
    started = time.perf_counter()
    path = resolve_model(base)
    check_checkpoint(path, trust_remote_code)
    adapter = Path(adapter)
    if not (adapter / "adapter_config.json").is_file():
        raise LosaError(f"{adapter} is not an adapter directory (no adapter_config.json)")
    check_output_dir(output, overwrite, inputs=(path, base, adapter))
    lm = load_model(path, dtype="fp32", trust_remote_code=trust_remote_code)
    weights = {n: m.weight for n, m in get_architecture(lm).linears(lm).items()}
    base_sparsity = global_sparsity(weights.values())
    info = load_peft_adapter(lm, adapter)
    if not info["masked"] and base_sparsity >= DENSE_BELOW and not allow_dense:
        raise LosaError(f"the adapter is unmasked (plain LoRA): merging it would make the {100 * base_sparsity:.1f}% "
                        "sparse base dense; serve it unmerged, or pass --allow-dense")
    # Merged in fp32, written in the dtype the base is stored in (a bf16 base stays bf16).
    stored = stored_dtype(path)
    stats = merge_adapters(lm, dtype=stored)  # refuses a non-zero outside the mask
    lm.to(stored)
    lm.config.dtype = stored
    weights = {n: m.weight for n, m in get_architecture(lm).linears(lm).items()}
    sidecar = build_sidecar(weights.items(), base_model=base_model_record(path),
        method={"merge": "masked" if info["masked"] else "dense", "adapter": str(adapter.resolve()),
                "producer": f"losa-deploy {__version__}"})
    sidecar["checks"]["merged_zero_pattern_equals_mask"] = bool(info["masked"])
    with atomic_dir(output, overwrite=overwrite) as tmp:
        lm.save_pretrained(tmp)
        load_tokenizer(path, trust_remote_code).save_pretrained(tmp)
        (tmp / SIDECAR).write_text(json_text(sidecar))
    return {"output": str(output), "base": str(path), "adapter": str(adapter), "masked": info["masked"],
            "ranks": info["ranks"], "merge": stats, "base_sparsity": base_sparsity,
            "sparsity": sidecar["global_sparsity"], "seconds": time.perf_counter() - started}
