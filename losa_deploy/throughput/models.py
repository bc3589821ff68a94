"""The standard benchmark models, built on the fly into ``$LOSA_CACHE/bench/models`` (once).

A model spec is ``NAME`` or ``NAME@VARIANT`` for a standard model, else a checkpoint directory (or
anything :func:`losa_deploy.models.resolve_model` accepts), or a PEFT adapter folder.

Standard models:

* ``smollm2-135m``: SmolLM2-135M-Instruct, real weights (the embedded default).
* ``llama2-7b-2blocks``: LLaMA-2-7B's layer dimensions (hidden 4096, FFN 11008, 32 heads of 128, no
  GQA) with 2 decoder blocks and a 2048-token vocabulary, random weights (bf16, seed 0). Weight values do
  not change the speed of a kernel, only its bytes do, and each block moves exactly what a 7B block
  moves, so decode runs in the kernel-bound regime of the real model. The vocabulary is cut so that the
  dense lm_head keeps the share of the bytes it has in the real 32-block model (32000 x 4096 against 32
  blocks: 2%; 2048 x 4096 against 2 blocks: 2%); with the real 32000 it would be a third of a 2-block
  model and hide the blocks' speed-up. Two blocks keep the fp32 ONNX export under protobuf's 2 GiB.

Variants (every prunable linear; embeddings, norms and lm_head stay dense): ``dense``; ``50``, ``70``
(magnitude, unstructured per row: speed depends on the count of zeros, not on which); ``2:4``;
``70-lora``: a rank-16 LoRA adapter (alpha 32, all seven projections, random A and B, PEFT format) on
the 70% model, left unmerged; ``70-losa``: that adapter merged the LoSA way, ``M ⊙ (W + s·B·A)``, so
the merged model keeps the 70% mask exactly.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import LosaError
from ..models.zoo import cache_dir, resolve_model
from ..utils.fs import json_text

LLAMA2_7B_BLOCKS = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008,
                    "num_attention_heads": 32, "num_key_value_heads": 32, "num_hidden_layers": 2,
                    "vocab_size": 2048, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
                    "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2}
STANDARD = ("smollm2-135m", "llama2-7b-2blocks")
VARIANTS = ("dense", "50", "70", "2:4", "70-lora", "70-losa")
LORA_RANK, LORA_ALPHA = 16, 32
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def parse_spec(spec: str) -> tuple[str, str] | None:
    """(standard name, variant) for a standard spec, None for a path; bad standard specs raise."""
    name, _, variant = spec.partition("@")
    if name not in STANDARD:
        if variant and not Path(spec).exists():
            raise LosaError(f"unknown standard model '{name}' (choose from {', '.join(STANDARD)})")
        return None
    variant = variant or "dense"
    if variant not in VARIANTS:
        raise LosaError(f"unknown variant '{variant}' of {name} (choose from {', '.join(VARIANTS)})")
    return name, variant


def check_model_spec(spec: str) -> None:
    """Fail fast on a spec that names nothing, before anything is built or loaded."""
    if parse_spec(spec) is not None:
        return
    path = Path(spec)
    if path.suffix == ".gguf" or path.is_dir() and ((path / "config.json").is_file()
                                                    or (path / "adapter_config.json").is_file()):
        return
    raise LosaError(f"model {spec} is neither a standard model ({', '.join(STANDARD)}, with @VARIANT) nor a "
                    "checkpoint or adapter directory")


def resolve_bench_model(spec: str, progress: bool = True) -> Path:
    """The directory of a model spec, building a standard model (and the variants it needs) on first use."""
    parsed = parse_spec(spec)
    if parsed is None:
        return resolve_model(spec)
    return standard_model(*parsed, progress=progress)


def standard_model(name: str, variant: str = "dense", progress: bool = True) -> Path:
    if variant == "dense":
        return resolve_model(name) if name == "smollm2-135m" else _dense_llama(progress)
    out = cache_dir() / "bench" / "models" / name / variant.replace(":", "of")
    if (out / "config.json").is_file() or (out / "adapter_config.json").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    if variant == "70-lora":
        _write_lora(standard_model(name, "70", progress), out)
    elif variant == "70-losa":
        _merge_losa(standard_model(name, "70-lora", progress), out)
    else:
        from ..api import prune

        structure = "2:4" if variant == "2:4" else "unstructured"
        prune(standard_model(name, "dense", progress), out, sparsity=None if variant == "2:4" else int(variant) / 100,
              method="magnitude", structure=structure, progress=progress)
    return out


def _dense_llama(progress: bool) -> Path:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..models import save_model

    out = cache_dir() / "bench" / "models" / "llama2-7b-2blocks" / "dense"
    if (out / "config.json").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**LLAMA2_7B_BLOCKS), dtype=torch.bfloat16)
    return save_model(model, out, tokenizer=_word_tokenizer(LLAMA2_7B_BLOCKS["vocab_size"]))


def _word_tokenizer(vocab_size: int):
    """A word-level tokenizer over ``vocab_size`` made-up words (``w3`` ...), so that the random model is a
    complete checkpoint every stage opens (the benchmark itself feeds token ids)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab_size)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def _write_lora(base: Path, out: Path) -> None:
    """A PEFT LoRA adapter on ``base`` with random A and B (PEFT starts B at zero, which would make the
    merge a no-op), saved unmerged."""
    import torch
    from peft import LoraConfig, get_peft_model

    from ..models import load_model
    from ..utils.fs import atomic_dir

    model = load_model(base, dtype="bf16")
    config = LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules=TARGETS)
    model = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(0.02 * torch.randn(param.shape, generator=generator))
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        adapter_config = json.loads((tmp / "adapter_config.json").read_text())
        adapter_config["base_model_name_or_path"] = str(base.resolve())
        (tmp / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2) + "\n")


def _merge_losa(adapter: Path, out: Path) -> None:
    """The adapter merged into its sparse base inside the base's mask (LoSA's merge), with a sidecar."""
    import torch
    from safetensors.torch import load_file

    from ..kernels.masked_lora import effective_weight
    from ..models import get_architecture, load_model, save_model
    from ..sparsity import SIDECAR, build_sidecar
    from .runners import adapter_base

    config = json.loads((adapter / "adapter_config.json").read_text())
    scale = config["lora_alpha"] / config["r"]
    lora = load_file(adapter / "adapter_model.safetensors")
    base = adapter_base(adapter)
    model = load_model(base, dtype="fp32")
    linears = get_architecture(model).linears(model)
    with torch.no_grad():
        for name, linear in linears.items():
            a, b = (lora.get(f"base_model.model.{name}.lora_{x}.weight") for x in "AB")
            if a is not None:
                linear.weight.copy_(effective_weight(linear.weight, linear.weight != 0, a, b, scale))
    model.to(torch.bfloat16)
    sidecar = build_sidecar(((n, lin.weight) for n, lin in linears.items()), base_model={"name_or_path": str(base)},
                            method={"merge": "masked", "adapter": str(adapter), "rank": config["r"],
                                    "alpha": config["lora_alpha"]})
    save_model(model, out, extra_files={SIDECAR: json_text(sidecar)})
