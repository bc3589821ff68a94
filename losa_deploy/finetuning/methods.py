"""Fine-tuning methods: they differ only in their schedule and adapter type; the loop is shared.

* ``losa``: masked LoRA on a progressively pruned model. Each of T phases merges, prunes the merged
  weights to the cubic schedule's sparsity with RMI per-block sparsity, unmerges with the new mask,
  re-allocates per-block ranks from the reconstruction error, then trains (losa.md §1, §3-§8).
* ``sparse-lora``: prune once to the target, fixed mask, masked LoRA, merged at the end.
* ``lora``: prune once, plain (unmasked) LoRA, left unmerged: merging a dense update densifies W.
* ``shears``: prune once, an elastic super-adapter trained with a rank sampled per group (NLS), then one
  sub-adapter chosen (``finetuning/shears.py``); masked and merged by default, or unmasked and unmerged.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from ..adapters.config import AdapterConfig
from ..adapters.layer import LoraLinear
from ..adapters.model import adapters_of
from ..adapters.ranks import allocate_ranks, average_rank
from ..errors import LosaError
from ..models.arch import get_architecture
from ..sparsity import allocation as alloc
from ..sparsity.calibration import BlockRunner, ReconstructionError, checkpoint_reference
from ..sparsity.masks import Target, apply_mask
from ..sparsity.prune import PruneConfig, Structure, prune_model, rmi_signal
from ..sparsity.pruners import get_pruner
from .schedule import lambda_for, nm_schedule, sparsity_schedule
from .shears import ShearsConfig

METHODS = ("losa", "sparse-lora", "lora", "shears")
# The dense reference outputs (reconstruction error) are the same in every LoSA phase: kept in memory up
# to this size, else re-run block by block from the checkpoint each phase (one block resident).
REFERENCE_CACHE_BYTES = 1 << 30


# MethodConfig fields only LoSA reads, with their flags.
_LOSA_OPTIONS = {"steps": "--steps", "data_split": "--data-split", "allocation": "--allocation",
                 "lambda_schedule": "--lambda-schedule", "first_rank": "--first-rank", "shrink": "--shrink"}


@dataclass
class MethodConfig:
    method: str = "losa"
    sparsity: float | None = None  # implied by N:M structures
    structure: str = "unstructured"
    pruner: str = "wanda"
    steps: int = 5  # LoSA's T
    allocation: str = "rmi"  # LoSA per-block sparsity: rmi | uniform
    lambda_schedule: str = "banded"
    rmi_samples: int = 64
    first_rank: int = 6  # LoSA's Ω_1: average ranks 6, 7, ..., mean 8 over T = 5
    rank: int = 8  # the baselines' fixed rank
    min_rank: int = 1
    max_rank: int = 16
    alpha: float = 16.0
    scale_rank: int = 8
    dropout: float = 0.0
    shrink: str = "index"  # drop the last components; "svd" keeps the best rank-r approximation
    init: str = "gaussian"
    batch_size: int = 8  # calibration batch
    data_split: str = "even"  # LoSA's token budget per phase: even (the paper's 2K x 5) | final-heavy
    shears: ShearsConfig = field(default_factory=ShearsConfig)  # read by method "shears" only

    def phase_weights(self) -> list[float]:
        """Share of the token budget per phase. ``final-heavy`` is the reference code's 1,1,1,1,6 (of 10)."""
        if self.data_split == "even" or self.phases == 1:
            return [1.0] * self.phases
        return [1.0] * (self.phases - 1) + [1.5 * self.phases - 1.5]

    def checked(self) -> tuple[Structure, float]:
        if self.method not in METHODS:
            raise LosaError(f"unknown fine-tuning method '{self.method}' (choose from {', '.join(METHODS)})")
        if self.pruner not in ("wanda", "sparsegpt", "magnitude"):
            raise LosaError(f"unknown pruner '{self.pruner}' (wanda, sparsegpt or magnitude)")
        if self.allocation not in ("rmi", "uniform"):
            raise LosaError(f"unknown LoSA allocation '{self.allocation}' (rmi or uniform)")
        if self.steps < 1:
            raise LosaError(f"steps must be positive, got {self.steps}")
        if self.data_split not in ("even", "final-heavy"):
            raise LosaError(f"unknown data split '{self.data_split}' (even or final-heavy)")
        if self.shrink not in ("svd", "index"):
            raise LosaError(f"unknown shrink rule '{self.shrink}' (svd or index)")
        structure, target = PruneConfig(method=self.pruner, sparsity=self.sparsity, structure=self.structure,
                                        allocation="uniform").checked()
        self._check_method_options()
        top = average_rank(self.steps, self.first_rank) if self.method == "losa" else self.rank
        if self.method == "shears":
            self.shears.checked(self.max_rank)
            top = self.shears.r_max
        elif self.shears != ShearsConfig():
            raise LosaError("rank choices, groups, sampling, search and --unmasked are Shears options "
                            f"(--method shears), not for method '{self.method}'")
        if not self.min_rank <= top <= self.max_rank:
            raise LosaError(f"the largest rank the schedule asks for ({top}) exceeds max_rank {self.max_rank}: "
                            "raise --max-rank (the adapter capacity must cover every allocated rank)")
        lambda_for(0.5, self.lambda_schedule)  # validates the name
        self.adapter_config()  # validates alpha, dropout and init now, not after pruning
        return structure, target

    def _check_method_options(self) -> None:
        """Refuse an option the method never reads (it would be silently ignored)."""
        changed = [flag for name, flag in _LOSA_OPTIONS.items() if getattr(self, name) != getattr(MethodConfig, name)]
        if self.method != "losa" and changed:
            raise LosaError(f"{', '.join(changed)}: LoSA options (--method losa), not for method '{self.method}'")
        if self.method in ("losa", "shears") and self.rank != MethodConfig.rank:
            raise LosaError(f"--rank is the fixed rank of sparse-lora and lora; method '{self.method}' takes its "
                            "ranks from " + ("--first-rank" if self.method == "losa" else "--rank-choices"))

    @property
    def phases(self) -> int:
        return self.steps if self.method == "losa" else 1

    @property
    def masked(self) -> bool:
        return self.method != "lora" and (self.method != "shears" or self.shears.masked)

    def adapter_config(self) -> AdapterConfig:
        if self.method == "shears":
            # The super-adapter has rank r_max; its scale s = alpha/scale_rank is kept, written as
            # alpha' / r_max with alpha' = s·r_max (PEFT's lora_alpha: 64 for r_max 32 at s = 2).
            r_max = self.shears.r_max
            return AdapterConfig(rank=r_max, max_rank=r_max, alpha=self.alpha / self.scale_rank * r_max,
                                 scale_rank=r_max, dropout=self.dropout, masked=self.masked, init=self.init)
        rank = self.first_rank if self.method == "losa" else self.rank
        return AdapterConfig(rank=rank, max_rank=self.max_rank, alpha=self.alpha, scale_rank=self.scale_rank,
                             dropout=self.dropout, masked=self.masked, init=self.init)


def prune_once(model, cfg: MethodConfig, windows: torch.Tensor, progress: bool) -> dict:
    """The baselines' one-shot pruning to the target (uniform per-block sparsity)."""
    return prune_model(model, PruneConfig(method=cfg.pruner, sparsity=cfg.sparsity, structure=cfg.structure,
                                          allocation="uniform", batch_size=cfg.batch_size), windows, progress)


@contextmanager
def adapters_off(block):
    """The block as its plain base linears: the dense reference runs."""
    layers = [m for m in block.modules() if isinstance(m, LoraLinear)]
    for layer in layers:
        layer.enabled = False
    try:
        yield
    finally:
        for layer in layers:
            layer.enabled = True


class LosaSchedule:
    """LoSA's per-phase pruning and rank allocation (losa.md §3-§8), run before each training phase."""

    def __init__(self, cfg: MethodConfig, dense_path, windows: torch.Tensor, progress: bool = True):
        self.cfg = cfg
        self.structure, self.target = cfg.checked()
        self.sparsities = sparsity_schedule(self.target, cfg.steps)
        self.dense_path = dense_path
        self.windows = windows
        self.progress = progress
        self.pruner = get_pruner(cfg.pruner)
        self.block_n: list[int] | None = None  # mixed N:M: the final N of each block, fixed at phase 1
        self.reference_cache: list[torch.Tensor] | None = None  # dense block outputs, when they fit

    def before_phase(self, model, phase: int, previous_lambda: float | None) -> dict:
        s_t = self.sparsities[phase]
        lam = lambda_for(s_t, self.cfg.lambda_schedule, previous_lambda)
        targets, signal = self._targets(model, phase, s_t, lam)
        errors = self._prune(model, targets, phase)
        blocks = _blocks(model)
        ranks = allocate_ranks(errors, average_rank(phase + 1, self.cfg.first_rank), self.cfg.min_rank,
                               self.cfg.max_rank)
        gen = torch.Generator().manual_seed(7 + phase)
        for block_layers, rank in zip(blocks, ranks):
            for layer in block_layers:
                layer.set_rank(rank, shrink=self.cfg.shrink, generator=gen)
        return {"phase": phase + 1, "schedule_sparsity": s_t, "lambda": lam, "redundancy": signal,
                "block_targets": [t.describe() for t in targets],
                "block_sparsity": [_sparsity(b) for b in blocks], "recon_error": errors, "ranks": ranks}

    def _targets(self, model, phase: int, s_t: float, lam: float) -> tuple[list[Target], list[float] | None]:
        blocks = _blocks(model)
        kind, n, m = self.structure.kind, self.structure.n, self.structure.m
        if kind == "nm":  # uniform N:M: RMI is not used (LoSA rebuttal)
            return [Target.nm(nm_schedule(n, m, self.cfg.steps)[phase], m)] * len(blocks), None
        signal = (rmi_signal(model, self.windows, self.cfg.rmi_samples, self.cfg.batch_size, self.progress)
                  if self.cfg.allocation == "rmi" and (kind != "mixed_nm" or phase == 0) else None)
        if kind == "mixed_nm":
            if self.block_n is None:
                self.block_n = alloc.nm_allocation(signal, n, m) if signal is not None else [n] * len(blocks)
            return [Target.nm(nm_schedule(b, m, self.cfg.steps)[phase], m) for b in self.block_n], signal
        current = [_sparsity(b) for b in blocks]
        # A model pruned before LoSA can already be sparser than this phase's mean allows (every block at
        # least s_t - lam and its present sparsity): the LP then has no solution, and, as without RMI, the
        # blocks keep their zeros and the least sparse ones rise together until the mean is s_t.
        floor = sum(max(s_t - lam, c) for c in current) / len(current)
        if signal is None or floor > s_t:
            return [Target.unstructured(min(s, alloc.S_MAX)) for s in alloc.fill_to_mean(current, s_t)], signal
        per_block = alloc.solve_allocation_lp(signal, s_t, lam, lower=current)
        return [Target.unstructured(s) for s in per_block], signal

    def _reference_bytes(self, model) -> int:
        """Memory to keep every block's dense outputs on the calibration windows (fp32)."""
        blocks = len(get_architecture(model).block_list(model))
        return blocks * self.windows.numel() * model.config.hidden_size * 4

    @torch.no_grad()
    def _prune(self, model, targets: list[Target], phase: int) -> list[float]:
        """Merge → prune → unmerge, block by block; returns the per-block reconstruction errors."""
        arch = get_architecture(model)
        errors = ReconstructionError()
        if self.reference_cache is None and self._reference_bytes(model) <= REFERENCE_CACHE_BYTES:
            self.reference_cache = []
        runner = BlockRunner(model, self.windows, self.cfg.batch_size, [errors],
                             reference_weights=checkpoint_reference(self.dense_path, arch),
                             reference_mode=adapters_off, reference_cache=self.reference_cache,
                             progress=self.progress,
                             desc=f"LoSA phase {phase + 1}: {self.pruner.name}")
        for step in runner:
            layers = step.linears()
            stats = step.input_stats(hessian=self.pruner.needs == "hessian", modules=layers) \
                if self.pruner.needs else {}
            for name, target in _layer_targets(layers, targets[step.index]).items():
                prune_merged(layers[name], self.pruner, target, stats.get(name))
        return errors.errors


def prune_merged(layer: LoraLinear, pruner, target: Target, stats) -> None:
    """Prune ``W + s·(B·A)⊙M`` and keep the adapter out of the base (losa.md §3).

    Wanda only chooses the new mask, so the kept base entries stay bit-identical. SparseGPT also updates
    the merged weights; the base then absorbs that update: ``W' = (Wm' − s·(B·A)⊙M_new) ⊙ M_new``, one cast.
    """
    old = layer.mask
    pruned = pruner.prune(layer.merged_weight(), target, stats, prev_mask=old)
    mask = pruned.mask & old
    if pruned.weight is None:
        base = apply_mask(layer.weight.detach(), mask)
    else:
        delta = layer.scale * (layer.lora_B.detach().float() @ layer.lora_A.detach().float())
        base = apply_mask((pruned.weight.float() - delta).to(layer.weight.dtype), mask)
    layer.set_base(base, mask)


def _layer_targets(layers: dict[str, LoraLinear], target: Target) -> dict[str, Target]:
    """The block's target for each of its linears. Unstructured: linears already sparser than the block
    (an input pruned per linear) keep their zeros, and the rest rise together so the block ends at the
    target, not above it."""
    if target.is_nm:
        return dict.fromkeys(layers, target)
    current = [_sparsity([layer]) for layer in layers.values()]
    sizes = [layer.mask.numel() for layer in layers.values()]
    per_layer = alloc.fill_to_mean(current, target.sparsity, sizes)
    # (a linear or block sparser than S_MAX keeps its mask whatever the target: nested masks never regrow)
    return {name: Target.unstructured(min(s, alloc.S_MAX)) for name, s in zip(layers, per_layer)}


def _blocks(model) -> list[list[LoraLinear]]:
    arch = get_architecture(model)
    layers = adapters_of(model)
    out = [[] for _ in arch.block_list(model)]
    for name, layer in layers.items():
        out[arch.locate(name)[0]].append(layer)
    return out


def _sparsity(layers: list[LoraLinear]) -> float:
    """The share of the layers' weights their masks prune (what the nested phases have taken; a kept
    weight that happens to be 0 does not count, so blocks and linears are measured alike)."""
    masks = [layer.mask for layer in layers]  # (unpacked once each)
    total = sum(m.numel() for m in masks)
    return sum(int((~m).sum()) for m in masks) / total if total else 0.0
