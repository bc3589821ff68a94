"""Prune with llm-compressor's WandaPruningModifier / SparseGPTModifier, on the exact calibration windows
losa-deploy used (read from a safetensors file), and save a plain checkpoint that `losa-deploy eval` reads.

Runs in its own venv (llmcompressor pins its own transformers), driven by benchmarks/prune_quality.py:

    /work/scratch-llmc/venv/bin/python benchmarks/llmcompressor_prune.py MODEL WINDOWS.safetensors OUT \\
        --method wanda --sparsity 0.5 [--structure 2:4] [--owl]
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch
from datasets import Dataset
from llmcompressor import oneshot
from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

COPY = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
        "special_tokens_map.json", "tokenizer.model")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("windows")
    p.add_argument("out")
    p.add_argument("--method", choices=["wanda", "sparsegpt"], required=True)
    p.add_argument("--sparsity", type=float, required=True)
    p.add_argument("--structure", default="0:0", help="N:M, or 0:0 for unstructured (llm-compressor's spelling)")
    p.add_argument("--owl", action="store_true", help="OWL layer-wise sparsity (M=5, lambda=0.08)")
    args = p.parse_args()

    windows = load_file(args.windows)["input_ids"]
    data = Dataset.from_dict({"input_ids": windows.tolist(), "attention_mask": torch.ones_like(windows).tolist()})
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    cls = WandaPruningModifier if args.method == "wanda" else SparseGPTModifier
    owl = {"sparsity_profile": "owl", "owl_m": 5, "owl_lmbda": 0.08} if args.owl else {}
    modifier = cls(sparsity=args.sparsity, mask_structure=args.structure, targets=["Linear"], ignore=["re:.*lm_head"],
                   **owl)
    started = time.perf_counter()
    oneshot(model=model, dataset=data, recipe=[modifier], num_calibration_samples=windows.shape[0],
            max_seq_length=windows.shape[1], shuffle_calibration_samples=False)
    seconds = time.perf_counter() - started
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=False)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    for name in COPY:
        if (Path(args.model) / name).is_file():
            shutil.copy(Path(args.model) / name, out / name)
    print(json.dumps({"seconds": seconds}))


if __name__ == "__main__":
    main()
