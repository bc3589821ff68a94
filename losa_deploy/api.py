"""The public Python API: each step of the pipeline as one function (the CLI is a thin layer over it).

    dense checkpoint -> prune -> finetune -> merge -> pack -> load / serve / bench

Model arguments accept a checkpoint directory, a ``.gguf`` file or ``"smollm2-135m"`` (the embedded
default), or an already loaded model where noted.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path

from .data import (
    SELF,
    calibration_windows,
    eval_windows,
    parse_slice,
    read_source,
    self_generate,
    slice_source,
    tokenize_text,
)
from .errors import LosaError
from .eval.perplexity import perplexity
from .kernels.attention import use_fast_attention
from .kernels.masked_lora import masked_lora_linear
from .models import (
    check_checkpoint,
    context_length,
    get_architecture,
    load_model,
    load_tokenizer,
    parse_dtype,
    resolve_model,
    save_model,
)
from .runtime import SparseLinear, sparsify_
from .runtime.cache import use_growing_cache
from .sparsity import SIDECAR, base_model_record, build_sidecar, negative_zeros
from .sparsity.allocation import check_rmi_windows
from .sparsity.prune import PruneConfig, check_allocation_file, method_record, prune_model
from .sparsity.report import inspect_checkpoint
from .utils.fs import check_output_dir, json_text
from .utils.plots import check_plot_file


def inspect(model: str | os.PathLike, trust_remote_code: bool = False) -> dict:
    """Per-layer sparsity and pattern of a checkpoint (see :func:`inspect_checkpoint`)."""
    return inspect_checkpoint(resolve_model(model), trust_remote_code)


def evaluate(model: str | os.PathLike, data: str, seqlen: int | None = None, max_windows: int | None = None,
             data_slice: str | None = None, text_field: str | None = None, nsamples: int = 16,
             batch_size: int = 4, dtype: str = "fp32", seed: int = 0, trust_remote_code: bool = False,
             progress: bool = True) -> dict:
    """Perplexity of ``model`` on a data file (or ``data="self"``: on text it samples itself).

    Every input is checked before the model is loaded, so bad input fails in a second.
    """
    if data == SELF and (data_slice is not None or text_field is not None):
        raise LosaError("--slice and --text-field select from a data file; they do not apply to --data self")
    if max_windows is not None and max_windows < 1:
        raise LosaError(f"max-windows must be positive, got {max_windows}")
    path = resolve_model(model)
    config = check_checkpoint(path, trust_remote_code)
    ctx = context_length(config)
    seqlen = min(2048, ctx) if seqlen is None else seqlen
    if not 2 <= seqlen <= ctx:
        raise LosaError(f"seqlen {seqlen} must be between 2 and the model's context ({ctx} tokens)")
    tokenizer = load_tokenizer(path, trust_remote_code)
    windows = None
    if data != SELF:
        source = slice_source(read_source(data, text_field=text_field), *parse_slice(data_slice))
        windows = eval_windows(tokenize_text(tokenizer, source.as_text()), seqlen, max_windows)
    lm = load_model(path, dtype=dtype, trust_remote_code=trust_remote_code)
    if windows is None:
        n = nsamples if max_windows is None else min(nsamples, max_windows)
        windows = self_generate(lm, tokenizer, n, seqlen, seed=seed, progress=progress)
    result = perplexity(lm, windows, batch_size=batch_size, progress=progress)
    return {**result, "model": str(path), "data": str(data), "slice": None if data == SELF else (data_slice or "0:1"),
            "dtype": dtype}


def prune(model: str | os.PathLike, output: str | os.PathLike, sparsity: float | None = None,
          method: str = "wanda", structure: str = "unstructured", allocation: str = "uniform",
          calib: str = SELF, nsamples: int = 128, seqlen: int | None = None, data_slice: str | None = None,
          seed: int = 0, lam: float | None = None, batch_size: int = 8, blocksize: int = 128,
          percdamp: float = 0.01, overwrite: bool = False, plot: str | os.PathLike | None = None,
          trust_remote_code: bool = False, progress: bool = True) -> dict:
    """Prune a checkpoint one-shot and write it to ``output`` with its ``losa_sparsity.json`` sidecar.

    ``method``: magnitude | wanda | sparsegpt. ``structure``: unstructured | N:M (e.g. ``"2:4"``) |
    mixed-N:M (M fixed, N per block from the allocation). ``allocation``: uniform | rmi | owl | a JSON
    file of per-block or per-linear sparsities. ``calib``: a text file (its ``data_slice``) or ``"self"``
    (windows the model samples itself). Every input is checked before the model is loaded; the output
    directory appears only when complete. Returns the report of :func:`~.sparsity.prune.prune_model`.
    """
    config = PruneConfig(method=method, sparsity=sparsity, structure=structure, allocation=allocation, lam=lam,
                         batch_size=batch_size, blocksize=blocksize, percdamp=percdamp)
    parsed_structure, _ = config.checked()
    if calib == SELF and data_slice is not None:
        raise LosaError("--slice selects part of a calibration file; it does not apply to --calib self")
    if allocation == "rmi":
        check_rmi_windows(nsamples, config.rmi_samples)
    path = resolve_model(model)
    model_config = check_checkpoint(path, trust_remote_code)
    # model too: for a .gguf file, path is its imported copy in the cache
    inputs = (path, model, *([] if calib == SELF else [calib]), *([allocation] if config.is_file_allocation else []))
    check_output_dir(output, overwrite, inputs=inputs)
    if plot is not None:
        check_plot_file(plot, inputs=inputs)
    ctx = context_length(model_config)
    seqlen = seqlen or min(2048, ctx)
    if not 2 <= seqlen <= ctx:
        raise LosaError(f"seqlen {seqlen} must be between 2 and the model's context ({ctx} tokens)")
    if config.is_file_allocation:
        check_allocation_file(allocation, model_config, parsed_structure)
        if sparsity is not None and parsed_structure.kind == "unstructured":
            raise LosaError(f"--sparsity {sparsity:g} does not apply with an allocation file: {allocation} sets "
                            "every layer's sparsity; leave --sparsity out")
    tokenizer = load_tokenizer(path, trust_remote_code)
    started = time.perf_counter()
    windows = None
    if config.needs_calibration and calib != SELF:
        windows = calibration_windows(None, tokenizer, calib, nsamples, seqlen, seed, data_slice, progress)
    elif calib != SELF:  # not read (magnitude, fixed allocation), but a wrong path is still a mistake to report
        parse_slice(data_slice)
        if not Path(calib).is_file():
            raise LosaError(f"calibration file {calib} does not exist")
    lm = load_model(path, trust_remote_code=trust_remote_code)
    if config.needs_calibration and calib == SELF:
        windows = calibration_windows(lm, tokenizer, SELF, nsamples, seqlen, seed, progress=progress)
    calibrated = time.perf_counter()
    report = prune_model(lm, config, windows, progress)
    calibration = None if windows is None else {"source": str(calib), "slice": data_slice if calib != SELF else None,
                                                "nsamples": nsamples, "seqlen": seqlen, "seed": seed}
    weights = {name: lin.weight for name, lin in get_architecture(lm).linears(lm).items()}
    sidecar = build_sidecar(weights.items(), base_model=base_model_record(path),
                            method=method_record(config, report, calibration))
    sidecar["checks"]["negative_zeros"] = negative_zeros(weights.values())
    if sidecar["checks"]["negative_zeros"]:
        raise RuntimeError("pruned weights hold -0.0: apply_mask should have scrubbed them")
    save_model(lm, output, tokenizer=tokenizer, overwrite=overwrite,
               extra_files={SIDECAR: json_text(sidecar)})
    if plot is not None:
        from .utils.plots import plot_layer_sparsity

        plot_layer_sparsity(report["layers"], plot, title=f"{path.name}: {method} {report['structure']}, "
                            f"{report['allocation']['kind']} allocation")
    report["seconds"]["calibration_data"] = calibrated - started
    report["seconds"]["total"] = time.perf_counter() - started
    return {"output": str(output), "model": str(path), "calibration": calibration, **report}


def finetune(model: str | os.PathLike, output: str | os.PathLike, data: str | os.PathLike, method: str = "losa",
             sparsity: float | None = None, pruner: str = "wanda", structure: str = "unstructured", steps: int = 5,
             data_split: str = "even", allocation: str = "rmi", lambda_schedule: str = "banded", rank: int = 8,
             first_rank: int = 6, max_rank: int = 16, alpha: float = 16.0, dropout: float = 0.0,
             shrink: str = "index", lr: float = 2e-4, warmup_ratio: float = 0.3, batch_size: int = 4,
             grad_accum: int = 2, max_len: int = 256, autocast: str = "auto", seed: int = 0, calib: str = SELF,
             calib_slice: str | None = None, nsamples: int = 128, seqlen: int | None = None,
             data_slice: str | None = None, budget_tokens: int | None = None, response_only: bool = True,
             eval_data: str | None = None, eval_slice: str | None = None, save_base: bool = False,
             device: str = "cpu", resume: bool = False, overwrite: bool = False, trust_remote_code: bool = False,
             progress: bool = True, rank_choices: str | Sequence[int] = (16, 12, 8), groups: str = "block",
             sample_per: str = "step", search: str = "heuristic", search_evals: int = 16, masked: bool = True,
             search_data: str | os.PathLike | None = None, search_slice: str | None = None) -> dict:
    """Prune and fine-tune ``model`` on ``data`` with LoSA, static sparse-LoRA, plain LoRA or Shears.

    LoSA runs ``steps`` phases on the cubic sparsity schedule (merge → prune → unmerge, RMI per-block
    sparsity, ranks from reconstruction error, then training); ``sparse-lora`` prunes once and trains a
    masked adapter; ``lora`` prunes once and trains a dense adapter that stays unmerged. Masked methods
    write the merged model, exactly as sparse as the final mask. Every method on the same
    ``budget_tokens`` sees the same examples. A run killed mid-way continues with ``resume=True`` to the
    same final weights. Under ``torchrun`` it trains data-parallel. Returns the run's report (also in
    ``OUT/finetune.json``); see :mod:`losa_deploy.finetuning.run` for the output layout.

    ``shears`` prunes once and trains an elastic super-adapter of rank max(``rank_choices``) (``"32,24,16"``
    or a sequence), sampling one rank per group (``groups``) per update or micro-batch (``sample_per``),
    then keeps one sub-adapter (``search``: heuristic, hill-climb, max, min; ``search_evals`` bounds the
    hill-climb) scored on ``search_data``/``search_slice`` (default: the eval data). ``masked=False`` is
    the original unmasked Shears, left unmerged. See :mod:`losa_deploy.finetuning.shears`.
    """
    from .adapters.elastic import parse_choices
    from .finetuning.methods import MethodConfig
    from .finetuning.run import finetune as run_finetune
    from .finetuning.shears import ShearsConfig
    from .finetuning.trainer import TrainConfig

    method_cfg = MethodConfig(method=method, sparsity=sparsity, structure=structure, pruner=pruner, steps=steps,
                              allocation=allocation, lambda_schedule=lambda_schedule, first_rank=first_rank,
                              rank=rank, max_rank=max_rank, alpha=alpha, dropout=dropout, shrink=shrink,
                              data_split=data_split,
                              shears=ShearsConfig(
                                  rank_choices=parse_choices(rank_choices) if isinstance(rank_choices, str)
                                  else tuple(rank_choices), groups=groups, sample_per=sample_per, search=search,
                                  search_evals=search_evals, masked=masked))
    train = TrainConfig(lr=lr, warmup_ratio=warmup_ratio, batch_size=batch_size, grad_accum=grad_accum,
                        max_len=max_len, seed=seed, autocast=autocast)
    return run_finetune(model, output, str(data), method_cfg, train, calib=calib, nsamples=nsamples, seqlen=seqlen,
                        data_slice=data_slice, calib_slice=calib_slice, budget_tokens=budget_tokens,
                        response_only=response_only, eval_data=eval_data, eval_slice=eval_slice, resume=resume,
                        overwrite=overwrite, save_base=save_base, device=device, trust_remote_code=trust_remote_code,
                        progress=progress, search_data=None if search_data is None else str(search_data),
                        search_slice=search_slice)


def merge(base: str | os.PathLike, adapter: str | os.PathLike, output: str | os.PathLike, allow_dense: bool = False,
          overwrite: bool = False, trust_remote_code: bool = False) -> dict:
    """Merge the adapter saved at ``adapter`` into ``base`` (the pruned model it was trained on).

    Masked adapters keep the zero pattern exactly; an unmasked one is refused on a sparse base unless
    ``allow_dense``. The adapter must match the base's weights (checked by hash).
    """
    from .finetuning.merge import merge_checkpoint

    return merge_checkpoint(base, adapter, output, allow_dense=allow_dense, overwrite=overwrite,
                            trust_remote_code=trust_remote_code)


def pack(model: str | os.PathLike, out: str | os.PathLike, format: str = "hf", dtype: str | None = None,
         overwrite: bool = False, trust_remote_code: bool = False, progress: bool = True) -> dict:
    """Pack a checkpoint for serving: ``format`` is hf, nm-vllm, losa, vllm or deepsparse.

    Streams tensor by tensor into a temporary directory renamed to ``out`` when complete. ``dtype``
    (bf16, fp16, fp32) converts floating tensors; None keeps the stored dtype. Returns the files written,
    their sizes and the sparsity of the written weights (see :mod:`losa_deploy.export`).
    """
    from .export import pack_checkpoint

    return pack_checkpoint(model, out, format=format, dtype=dtype, overwrite=overwrite,
                           trust_remote_code=trust_remote_code, progress=progress)


def load(path: str | os.PathLike, device: str = "cpu", dtype: str | None = None, backend: str | None = None,
         trust_remote_code: bool = False, verify: bool = True):
    """A ``losa`` or ``vllm`` packed checkpoint as a ready Hugging Face model (eval mode, on ``device``)
    whose packed linears are :class:`SparseLinear` modules running our kernels: the serving API.

    ``dtype`` converts (None: as stored); ``backend`` picks the sparse kernel (None: the best available);
    ``verify`` checks every packed zero pattern against the checkpoint's ``losa_sparsity.json``.
    On the CPU the model decodes on our attention kernel too (:func:`use_fast_attention`), and its
    ``generate`` appends to an in-place KV cache (:func:`use_growing_cache`).
    """
    from .runtime.loader import load_packed

    model = load_packed(path, device=device, dtype=dtype, backend=backend, trust_remote_code=trust_remote_code,
                        verify=verify)
    use_fast_attention(model)
    use_growing_cache(model)
    return model


def generate(model: str | os.PathLike, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0,
             top_p: float = 1.0, seed: int = 0, chat: bool = False, ignore_eos: bool = False,
             dtype: str | None = None, device: str = "cpu", trust_remote_code: bool = False, stream=None,
             echo_prompt: bool = False, progress: bool = True) -> dict:
    """Continue ``prompt`` with ``model`` on our runtime: a packed checkpoint through :func:`load`, any
    other through ``load_model`` and :func:`sparsify_` (see :mod:`losa_deploy.runtime.serving`).

    Greedy at ``temperature`` 0, else sampled (``top_p``, ``seed``); ``chat`` wraps the prompt in the
    tokenizer's chat template; ``ignore_eos`` always decodes ``max_new_tokens``; ``stream`` (a text file
    such as ``sys.stdout``) receives the text as it is decoded (after the prompt's, with ``echo_prompt``).
    Returns the text, token counts, prefill seconds, decode tokens/s and the kernel path.
    """
    from .runtime.generate import check_sampling, generate_text, prompt_ids
    from .runtime.loader import check_device
    from .runtime.serving import kernel_path, open_model

    check_sampling(max_new_tokens, temperature, top_p)
    dtype = None if dtype == "auto" else dtype
    parse_dtype(dtype)
    check_device(device)
    path = resolve_model(model)
    tokenizer = load_tokenizer(path, trust_remote_code)
    ids = prompt_ids(tokenizer, prompt, chat)  # an empty prompt or a missing chat template: before loading
    lm = open_model(path, dtype=dtype, device=device, trust_remote_code=trust_remote_code, progress=progress)
    result = generate_text(lm, tokenizer, ids, max_new_tokens=max_new_tokens, temperature=temperature,
                           top_p=top_p, seed=seed, ignore_eos=ignore_eos, out=stream, echo_prompt=echo_prompt)
    return {"model": str(path), **result, "kernel_path": kernel_path(lm), "dtype": str(lm.dtype).removeprefix("torch.")}


def bench(models: list[str], engines: str | list[str] = "torch,losa", device: str = "cpu",
          batches: str | list[int] = (1,), prompt_len: int = 128, gen_len: int = 128, repeats: int = 5,
          warmup: int = 1, threads: int | None = None, dtype: str = "bf16", seed: int = 0,
          plot: str | os.PathLike | None = None, command: str | None = None,
          pairs: list[tuple[str, str]] | None = None, progress: bool = True) -> dict:
    """Prefill and decode tokens/s of ``models`` (paths, adapters or standard ``NAME@VARIANT`` specs) on
    ``engines`` (torch, losa, vllm, deepsparse, onnxruntime; ``name:dtype`` overrides ``dtype``), or of
    exactly the (model, engine) ``pairs``; every cell in its own worker process, interleaved
    round-robin. Returns settings, machine,
    per-cell rows (medians, quartiles, extremes, speed-ups against the first cell) and greedy agreement
    (see :mod:`losa_deploy.throughput.harness`)."""
    from .throughput import run_bench

    return run_bench(models, engines=engines, device=device, batches=batches, prompt_len=prompt_len,
                     gen_len=gen_len, repeats=repeats, warmup=warmup, threads=threads, dtype=dtype, seed=seed,
                     plot=plot, command=command, pairs=pairs, progress=progress)



__all__ = ["SparseLinear", "bench", "evaluate", "finetune", "generate", "inspect", "load", "load_model", "load_tokenizer",
           "masked_lora_linear", "merge", "pack", "prune", "sparsify_", "use_fast_attention",
           "use_growing_cache"]
