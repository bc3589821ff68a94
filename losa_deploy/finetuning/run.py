"""``finetune``: prune + sparse fine-tune + merge, end to end, resumable, single- or multi-process.

    OUT/                  the fine-tuned checkpoint: merged and exactly sparse (losa, sparse-lora), or the
                          pruned base (lora, whose dense adapter must stay unmerged), with its sidecar
    OUT/adapter/          the adapter in PEFT format (per-module ranks), for unmerged use
    OUT/base/             with ``save_base``, the pruned base of a masked method before the merge, with its
                          sidecar (the adapter's base: ``merge OUT/base --adapter OUT/adapter`` rebuilds OUT
                          exactly)
    OUT/finetune.json     the run: per phase sparsity, λ, errors, ranks, losses, timings
    OUT/finetune.png      per-block sparsity and rank across phases, and the loss curve
    OUT/shears.png        shears: adapter size vs validation loss of the scored sub-adapters
    OUT.ckpt/             the checkpoint of the last finished phase while the run is going (``--resume``)
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict
from pathlib import Path

import torch

from .._version import __version__
from ..adapters.model import adapters_of, inject_adapters, merge_adapters, unload_adapters
from ..adapters.peft_format import save_peft_adapter
from ..data import (
    SELF,
    calibration_windows,
    eval_windows,
    parse_slice,
    read_source,
    slice_source,
    tokenize_text,
)
from ..errors import LosaError
from ..eval.perplexity import perplexity
from ..models import (
    check_checkpoint,
    context_length,
    get_architecture,
    load_model,
    load_tokenizer,
    resolve_model,
    stored_dtype,
)
from ..models.tensors import iter_model_tensors
from ..sparsity import SIDECAR, base_model_record, build_sidecar, negative_zeros
from ..sparsity.allocation import check_rmi_windows
from ..sparsity.patterns import detect_pattern, global_sparsity, is_nm
from ..utils.fs import atomic_dir, check_output_dir, json_text
from . import distributed
from .data import split_budget, training_examples
from .methods import LosaSchedule, MethodConfig, prune_once
from .shears import ShearsRun, preflight
from .state import STATE, read_checkpoint, remove_checkpoint, restore_checkpoint, save_checkpoint
from .trainer import TrainConfig, train_phase


def finetune(model: str | os.PathLike, output: str | os.PathLike, data: str, method: MethodConfig,
             train: TrainConfig, calib: str = SELF, nsamples: int = 128, seqlen: int | None = None,
             data_slice: str | None = None, calib_slice: str | None = None, budget_tokens: int | None = None,
             response_only: bool = True, eval_data: str | None = None, eval_slice: str | None = None,
             eval_windows_max: int | None = 64, resume: bool = False, overwrite: bool = False,
             save_base: bool = False, device: str = "cpu", trust_remote_code: bool = False,
             progress: bool = True, search_data: str | None = None, search_slice: str | None = None) -> dict:
    """Fine-tune ``model`` with ``method`` on ``data``; writes ``output`` (see the module docstring).

    ``search_data`` / ``search_slice``: Shears' validation text for choosing the sub-adapter (default:
    the eval data, which then no longer gives an unbiased test of the chosen one).
    """
    dev = distributed.training_device(device)
    rank, world = distributed.init(dev.type)
    progress = progress and rank == 0
    structure, target = method.checked()
    train.checked()
    if method.method == "losa" and method.allocation == "rmi":
        check_rmi_windows(nsamples, method.rmi_samples)
    _check_data_options(method, {"--data-slice": ("--data", data, data_slice),
                                 "--calib-slice": ("--calib", calib, calib_slice),
                                 "--eval-slice": ("--eval-data", eval_data, eval_slice),
                                 "--search-slice": ("--search-data", search_data, search_slice)})
    path = resolve_model(model)
    config = check_checkpoint(path, trust_remote_code)
    if method.method == "shears":
        preflight(method.shears, config["model_type"], search_data is not None or eval_data is not None)
    ckpt = Path(f"{output}.ckpt")
    # Only a run that resumes its own checkpoint may replace OUT without --overwrite (a crash can fall
    # between writing OUT and removing the checkpoint); --resume with nothing to resume is a fresh run.
    resuming = resume and (ckpt / STATE).is_file()
    if not resuming:
        sources = (data, eval_data, calib, search_data)
        check_output_dir(output, overwrite, inputs=(path, model, *(p for p in sources if p not in (None, SELF))))
    ctx = context_length(config)
    seqlen = min(train.max_len, ctx) if seqlen is None else seqlen
    if seqlen < 2:
        raise LosaError(f"--seqlen (calibration windows) must be at least 2, got {seqlen}")
    if max(seqlen, train.max_len) > ctx:
        raise LosaError(f"sequence length {max(seqlen, train.max_len)} is longer than the model's context ({ctx})")
    tokenizer = load_tokenizer(path, trust_remote_code)
    source = slice_source(read_source(data), *parse_slice(data_slice))
    slices = split_budget(training_examples(tokenizer, source, train.max_len, response_only), method.phases,
                          budget_tokens, method.phase_weights())
    ev = None
    if eval_data is not None:
        text = slice_source(read_source(eval_data), *parse_slice(eval_slice)).as_text()
        ev = eval_windows(tokenize_text(tokenizer, text), train.max_len, eval_windows_max)
    search_windows = ev
    if search_data is not None:
        text = slice_source(read_source(search_data), *parse_slice(search_slice)).as_text()
        search_windows = eval_windows(tokenize_text(tokenizer, text), train.max_len, eval_windows_max)
    settings = {"model": str(path), "data": str(data), "slice": data_slice, "method": asdict(method),
                "train": train.to_dict(), "calib": str(calib), "calib_slice": calib_slice, "nsamples": nsamples,
                "seqlen": seqlen, "budget_tokens": budget_tokens, "response_only": response_only,
                "world_size": world, "search_data": search_data, "search_slice": search_slice}
    state = read_checkpoint(ckpt, settings) if resume else None
    if not resume and (ckpt / STATE).is_file():
        raise LosaError(f"{ckpt} holds an interrupted run: pass --resume to continue it, or remove it")
    windows = None
    if calib != SELF:
        windows = calibration_windows(None, tokenizer, calib, nsamples, seqlen, train.seed, calib_slice, progress)
    lm = load_model(path, dtype="fp32", trust_remote_code=trust_remote_code).to(dev)
    weights = [m.weight for m in get_architecture(lm).linears(lm).values()]
    current = global_sparsity(weights)
    _check_not_unpruning(current, target)
    kept = _kept_mask(weights, current, structure, target) if state is None and method.method != "losa" else None
    # Only pruning reads calibration windows: LoSA's phases, or the one-shot prune of a fresh run.
    if windows is None and (method.method == "losa" or (state is None and kept is None)):
        windows = calibration_windows(lm, tokenizer, SELF, nsamples, seqlen, train.seed, progress=progress)
    started = time.perf_counter()
    history, one_shot = [], None
    if state is None and method.method != "losa":
        one_shot = prune_once(lm, method, windows, progress) if kept is None else kept
    inject_adapters(lm, method.adapter_config(), seed=train.seed)
    if state is not None:
        restore_checkpoint(ckpt, lm)
        history = state["history"]
    schedule = LosaSchedule(method, path, windows, progress) if method.method == "losa" else None
    shears = ShearsRun(method.shears, lm, train.seed) if method.method == "shears" else None
    if schedule is not None and state is not None:
        schedule.block_n = state.get("extra", {}).get("block_n")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for phase in range(len(history), method.phases):
        record = {"phase": phase + 1}
        t0 = time.perf_counter()
        if schedule is not None:
            previous = history[-1]["lambda"] if history else None
            record.update(schedule.before_phase(lm, phase, previous))
        record["prune_seconds"] = time.perf_counter() - t0
        layers = adapters_of(lm).values()
        record["sparsity"] = global_sparsity(layer.weight for layer in layers)
        record["average_rank"] = round(sum(layer.rank for layer in layers) / len(layers), 3)
        params = [p for layer in layers for p in (layer.lora_A, layer.lora_B)]
        result = train_phase(lm, params, slices[phase], train, phase, pad, progress,
                             desc=f"{method.method} phase {phase + 1}/{method.phases}",
                             before_micro_batch=shears.sampler.before_micro_batch if shears else None)
        record.update(losses=result["losses"], tokens=result["tokens"], updates=result["updates"],
                      train_seconds=result["seconds"])
        if shears is not None:
            record["sampler"] = shears.sampler.finish()  # the whole super-adapter is active again
        if ev is not None:
            record["eval_ppl"] = perplexity(lm, ev, progress=False)["ppl"]
        history.append(record)
        if rank == 0:
            save_checkpoint(ckpt, lm, phase + 1, settings, history,
                            extra={"block_n": schedule.block_n if schedule else None})
        distributed.barrier()
    chosen = shears.select(lm, search_windows, train.seed) if shears is not None else None
    report = {"method": asdict(method), "train": train.to_dict(), "phases": history, "one_shot": one_shot,
              "seconds": time.perf_counter() - started, "world_size": world, "rank": rank, "device": str(dev),
              "train_seconds": sum(r["train_seconds"] for r in history),
              "prune_seconds": sum(r["prune_seconds"] for r in history)}
    if chosen is not None:
        report["shears"] = chosen
        if ev is not None:
            chosen["eval_ppl"] = perplexity(lm, ev, progress=False)["ppl"]
    if ev is not None:  # before the write, so that OUT/finetune.json has it too
        report["final_eval_ppl"] = history[-1]["eval_ppl"] if shears is None else chosen["eval_ppl"]
    if rank == 0:
        report.update(_write_output(lm, tokenizer, path, output, method, report, settings, overwrite or resuming,
                                    save_base))
        remove_checkpoint(ckpt)
    distributed.barrier()
    return report


def _check_data_options(method: MethodConfig, slices: dict[str, tuple[str, str | None, str | None]]) -> None:
    """Every slice parses and has a file to select from (one without was ignored silently), and the
    search's data goes with the search: ``slices`` maps a slice flag to (its file's flag, file, slice)."""
    for flag, (file_flag, source, spec) in slices.items():
        if spec is None:
            continue
        parse_slice(spec)
        if source is None or source == SELF:
            given = "not given" if source is None else "self"
            raise LosaError(f"{flag} selects part of the {file_flag} file, and {file_flag} is {given}")
    _, search_data, search_slice = slices["--search-slice"]
    if method.method != "shears" and (search_data is not None or search_slice is not None):
        raise LosaError(f"--search-data and --search-slice choose Shears' sub-adapter; --method {method.method} "
                        "has no search")


# How far a model's sparsity may sit from the target and still count as pruned to it: rounding per row.
AT_TARGET = 0.005


def _check_not_unpruning(current: float, target: float) -> None:
    """Pruning only removes weights: a target below the model's present sparsity cannot be reached."""
    if current > target + AT_TARGET:
        raise LosaError(f"the model is already {100 * current:.2f}% sparse: a target of {100 * target:.2f}% "
                        "would un-prune it (give a target at least as high)")


def _kept_mask(weights: list, current: float, structure, target: float) -> dict | None:
    """A model pruned to the target already (say by `prune`, with any allocation) keeps its own zeros: the
    one-shot prune would otherwise re-prune it uniformly and move its mask. None where it must be pruned."""
    if abs(current - target) > AT_TARGET:
        return None
    if structure.kind == "nm" and not all(is_nm(w, structure.n, structure.m) for w in weights):
        return None
    if structure.kind == "mixed_nm" and not all(detect_pattern(w).m == structure.m for w in weights):
        return None
    return {"kept_input_mask": True, "achieved_sparsity": current}


def _cast_shared(state: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """``state`` with floating tensors cast to ``dtype``, tensors that shared memory (tied embeddings) still
    sharing it, so save_pretrained writes them once."""
    cast: dict[tuple, torch.Tensor] = {}
    out = {}
    for key, tensor in state.items():
        if not tensor.is_floating_point():
            out[key] = tensor
            continue
        ident = (tensor.data_ptr(), tuple(tensor.shape), tuple(tensor.stride()))
        out[key] = cast.setdefault(ident, tensor.to(dtype))
    return out


def _set_config_dtype(directory: Path, dtype: torch.dtype) -> None:
    config = json.loads((directory / "config.json").read_text())
    config["dtype"] = str(dtype).removeprefix("torch.")
    (directory / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _adapter_base(lm, output, method: MethodConfig, save_base: bool, base_path: Path) -> str | None:
    """Where the adapter's (pruned) base lives: OUT for lora, OUT/base when saved, the input model when the
    training kept its weights exactly; else nowhere (None: naming the input would send PEFT, which
    follows base_model_name_or_path, to weights the adapter was not trained on)."""
    out = Path(output).resolve()
    if not method.masked:
        return str(out)
    if save_base:
        return str(out / "base")
    return str(base_path) if _base_is_input(lm, base_path) else None


def _base_is_input(lm, base_path: Path) -> bool:
    """Whether every adapted base weight equals the input's stored weight."""
    weights = {f"{name}.weight": layer.weight.detach().cpu() for name, layer in adapters_of(lm).items()}
    seen = 0
    # Read, not mapped: each weight is compared and let go, beside a model that already fills memory.
    for key, stored in iter_model_tensors(base_path, get_architecture(lm), keep=weights.__contains__, mmap=False):
        if stored.shape != weights[key].shape or not torch.equal(stored.to(weights[key].dtype), weights[key]):
            return False
        seen += 1
    return seen == len(weights)


def _method_record(method: MethodConfig, report: dict) -> dict:
    """The sidecar's ``method`` entry, shared by OUT and OUT/base (each adds how it stands to the merge)."""
    return {"finetune": method.method, "pruner": method.pruner, "structure": method.structure,
            "target_sparsity": method.sparsity, "steps": method.phases, "lambda_schedule": method.lambda_schedule,
            "allocation": method.allocation, "ranks_per_block": report["phases"][-1].get("ranks"),
            "alpha": method.alpha, "scale": method.alpha / method.scale_rank, "producer": f"losa-deploy {__version__}"}


def _save_base(lm, tokenizer, directory: Path, stored: torch.dtype, base_path: Path, record: dict) -> None:
    """OUT/base: the adapted model without its adapters, in the stored dtype, with the sidecar of the zeros
    it holds (the final mask), so that it packs, inspects and merges like any pruned model of ours."""
    adapter_keys = ("lora_A", "lora_B", "mask_words")
    state = _cast_shared({k: v for k, v in lm.state_dict().items() if k.rsplit(".", 1)[-1] not in adapter_keys},
                         stored)
    lm.save_pretrained(directory, state_dict=state)
    _set_config_dtype(directory, stored)  # transformers wrote the fp32 model's dtype
    tokenizer.save_pretrained(directory)
    # Described from the tensors just written, not the fp32 ones training left in the model.
    weights = {name: state[f"{name}.weight"] for name in get_architecture(lm).linears(lm)}
    sidecar = build_sidecar(weights.items(), base_model=base_model_record(base_path),
                            method={**record, "merge": "none: the base of adapter/, before the merge"})
    sidecar["checks"]["negative_zeros"] = negative_zeros(weights.values())
    (directory / SIDECAR).write_text(json_text(sidecar))


def _write_output(lm, tokenizer, base_path: Path, output, method: MethodConfig, report: dict, settings: dict,
                  overwrite: bool, save_base: bool = False) -> dict:
    info = {}
    # Trained in fp32; written in the dtype the input is stored in. The adapted bases are rounded to it
    # first, so the adapter's base hashes, OUT/base and `merge OUT/base --adapter OUT/adapter` all see the
    # values OUT was merged from (a SparseGPT base update is not exact in bf16).
    stored = stored_dtype(base_path)
    for layer in adapters_of(lm).values():
        layer.weight.data = layer.weight.data.to(stored).to(layer.weight.dtype)
    lm.config.dtype = stored
    with atomic_dir(output, overwrite=overwrite) as tmp:
        info["adapter_base"] = _adapter_base(lm, output, method, save_base, base_path)
        save_peft_adapter(lm, tmp / "adapter", info["adapter_base"])
        if method.masked and save_base:
            _save_base(lm, tokenizer, tmp / "base", stored, base_path, _method_record(method, report))
        if method.masked:
            info["merge"] = merge_adapters(lm, dtype=stored)  # refuses a non-zero outside the mask
        else:
            unload_adapters(lm)  # a dense update merged would make W dense: the adapter stays separate
        lm.to(stored)
        lm.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        arch = get_architecture(lm)
        weights = {n: m.weight for n, m in arch.linears(lm).items()}
        sidecar = build_sidecar(weights.items(), base_model=base_model_record(base_path),
                                method={**_method_record(method, report),
                                        "merge": "masked" if method.masked else "unmerged (adapter/)"})
        sidecar["checks"]["merged_zero_pattern_equals_mask"] = bool(method.masked)
        sidecar["checks"]["negative_zeros"] = negative_zeros(weights.values())
        (tmp / SIDECAR).write_text(json_text(sidecar))
        info["achieved_sparsity"] = sidecar["global_sparsity"]
        info["pattern"] = sidecar["pattern"]
        full = {**report, **info, "settings": settings}
        (tmp / "finetune.json").write_text(json_text(full))
        from .plots import plot_finetune, plot_shears

        plot_finetune(full, tmp / "finetune.png")
        if "shears" in report:
            plot_shears(report["shears"], tmp / "shears.png")
    return info


__all__ = ["MethodConfig", "TrainConfig", "finetune"]
