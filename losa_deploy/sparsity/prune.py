"""One-shot pruning of a loaded model: allocate per-block targets, then prune block by block.

    report = prune_model(model, PruneConfig(method="wanda", sparsity=0.7, allocation="rmi"), windows)

1. **Allocation.** uniform, a JSON file, or from signals of one pass over the dense model (RMI: block-
   input Gram matrices; OWL: outlier ratios of the Wanda score).
2. **Pruning pass.** :class:`~.calibration.BlockRunner` feeds each block the outputs of the blocks
   already pruned; the pruner gets the statistics of what each linear receives (all linears of a block
   from the same pass over the block, as SparseGPT's and Wanda's code do) and returns a mask (and, for
   SparseGPT, updated weights). The reconstruction error of each pruned block against the dense
   block on the dense stream is measured on the way. Magnitude pruning with a uniform or file allocation
   needs no calibration data and walks the weights directly.

The model is modified in place and never copied; the report holds allocated and achieved sparsity.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import asdict, dataclass

import torch

from ..errors import LosaError
from ..models.arch import architecture_for, get_architecture
from . import allocation as alloc
from .calibration import BlockRunner, GramCollector, OutlierRatio, ReconstructionError
from .masks import Target, apply_mask
from .pruners import PRUNERS, Pruner, get_pruner

ALLOCATIONS = ("uniform", "rmi", "owl")
_NM = re.compile(r"^(mixed-)?(\d+):(\d+)$")


@dataclass(frozen=True)
class Structure:
    """``unstructured``, ``N:M`` (one N everywhere) or ``mixed-N:M`` (M fixed, N per block, mean N)."""

    kind: str  # "unstructured" | "nm" | "mixed_nm"
    n: int | None = None
    m: int | None = None

    @classmethod
    def parse(cls, text: str) -> Structure:
        if text == "unstructured":
            return cls("unstructured")
        match = _NM.match(text)
        if not match:
            raise LosaError(f"unknown structure '{text}' (use unstructured, N:M such as 2:4, or mixed-N:M)")
        n, m = int(match.group(2)), int(match.group(3))
        Target.nm(n, m)  # validates 1 <= N < M
        return cls("mixed_nm" if match.group(1) else "nm", n, m)

    def describe(self) -> str:
        return {"unstructured": "unstructured", "nm": f"{self.n}:{self.m}", "mixed_nm": f"mixed-{self.n}:{self.m}"}[
            self.kind]


@dataclass
class PruneConfig:
    """What to prune and how. ``sparsity`` is implied by N:M structures (``1 - N/M``)."""

    method: str = "wanda"
    sparsity: float | None = None
    structure: str = "unstructured"
    allocation: str = "uniform"  # uniform | rmi | owl | path to a JSON file
    lam: float | None = None  # allocation range; default: RMI banded, OWL 0.08, mixed N:M one grid step
    owl_m: float = alloc.OWL_M
    rmi_samples: int = 64  # calibration windows used for the CKA features (LoSA: 64 of 128)
    batch_size: int = 8
    blocksize: int = 128  # SparseGPT
    percdamp: float = 0.01  # SparseGPT

    def checked(self) -> tuple[Structure, float | None]:
        """Validate everything that does not need the model; returns (structure, target sparsity)."""
        if self.method not in PRUNERS:
            raise LosaError(f"unknown pruning method '{self.method}' (choose from {', '.join(PRUNERS)})")
        structure = Structure.parse(self.structure)
        target = self.sparsity
        if target is not None and not 0.0 <= target < 1.0:
            raise LosaError(f"sparsity must be in [0, 1), got {target:g}")
        if structure.kind != "unstructured":
            implied = 1.0 - structure.n / structure.m
            if target is not None and abs(target - implied) > 1e-9:
                raise LosaError(f"--sparsity {target:g} contradicts {structure.describe()} "
                                f"(which means {implied:g}); leave --sparsity out")
            target = implied
        if target is None and not self.is_file_allocation:
            raise LosaError("pass --sparsity (or an N:M structure, or a per-layer allocation file)")
        if structure.kind == "nm" and self.allocation != "uniform":
            raise LosaError(f"{structure.describe()} is one N for every layer; for per-block N use "
                            f"--structure mixed-{structure.n}:{structure.m}")
        if self.lam is not None and not 0.0 <= self.lam < 1.0:
            raise LosaError(f"lambda must be in [0, 1), got {self.lam:g}")
        if not (math.isfinite(self.percdamp) and self.percdamp > 0):
            raise LosaError(f"SparseGPT's percdamp (Hessian dampening) must be a positive number, got {self.percdamp:g}")
        if self.method == "sparsegpt" and structure.m and self.blocksize % structure.m:
            raise LosaError(f"SparseGPT's blocksize {self.blocksize} must be a multiple of M={structure.m}")
        return structure, target

    @property
    def is_file_allocation(self) -> bool:
        return self.allocation not in ALLOCATIONS

    @property
    def needs_calibration(self) -> bool:
        return get_pruner(self.method).needs is not None or self.allocation in ("rmi", "owl")


def prune_model(model, config: PruneConfig, windows: torch.Tensor | None = None, progress: bool = True) -> dict:
    """Prune ``model`` in place; returns the report (per layer and per block, allocated and achieved)."""
    structure, target = config.checked()
    if config.needs_calibration and windows is None:
        raise LosaError(f"{config.method} with {config.allocation} allocation needs calibration windows")
    arch = get_architecture(model)
    linears = arch.linears(model)
    started = time.perf_counter()
    targets, allocation = _plan(model, config, structure, target, windows, progress)
    planned = time.perf_counter()
    options = {"blocksize": config.blocksize, "percdamp": config.percdamp} if config.method == "sparsegpt" else {}
    pruner = get_pruner(config.method, **options)
    errors = _prune_pass(model, pruner, targets, windows, config.batch_size, progress)
    done = time.perf_counter()
    layers = []
    for name, lin in linears.items():
        w = lin.weight
        layers.append({"name": name, "block": int(name[len(arch.blocks_path) + 1:].split(".")[0]),
                       "shape": list(w.shape), "target": targets[name].describe(),
                       "target_sparsity": targets[name].sparsity, "numel": w.numel(),
                       "sparsity": 1.0 - int(torch.count_nonzero(w)) / w.numel()})
    return {
        "method": config.method,
        "method_options": pruner.options(),
        "structure": structure.describe(),
        "allocation": allocation,
        "target_sparsity": _weighted(layers, "target_sparsity"),
        "achieved_sparsity": _weighted(layers, "sparsity"),
        "blocks": _blocks(layers, errors),
        "layers": layers,
        "seconds": {"allocation": planned - started, "pruning": done - planned},
    }


def _plan(model, config: PruneConfig, structure: Structure, target: float | None, windows, progress
          ) -> tuple[dict[str, Target], dict]:
    """Per-linear targets, and how they were allocated (for the report and the sidecar)."""
    arch = get_architecture(model)
    names = list(arch.linears(model))
    num_blocks = len(arch.block_list(model))
    info: dict = {"kind": config.allocation if not config.is_file_allocation else "file"}
    if config.is_file_allocation:
        info["file"] = config.allocation
        per_linear = alloc.read_allocation_file(config.allocation, num_blocks, names, arch.blocks_path)
        return {k: _file_target(v, structure) for k, v in per_linear.items()}, info
    signal = None
    if config.allocation == "rmi":
        signal = rmi_signal(model, windows, config.rmi_samples, config.batch_size, progress)
        info.update(redundancy=signal, samples=min(config.rmi_samples, windows.shape[0]))
    elif config.allocation == "owl":
        collector = OutlierRatio(config.owl_m)
        for _ in BlockRunner(model, windows, config.batch_size, [collector], progress=progress, desc="owl signals"):
            pass
        signal = [-r for r in collector.ratios]  # more outliers: more important, less sparsity
        info.update(outlier_ratios=collector.ratios, outlier_threshold=config.owl_m)
    if structure.kind == "mixed_nm":
        # round(lam M) grid steps, at least one: lam 0 alone means uniform N
        steps = 1 if config.lam is None else 0 if config.lam == 0 else max(1, round(config.lam * structure.m))
        ns = (alloc.nm_allocation(signal, structure.n, structure.m, steps) if signal is not None
              else [structure.n] * num_blocks)
        info.update(lam=steps / structure.m, n_per_block=ns)
        per_block = [Target.nm(n, structure.m) for n in ns]
    elif structure.kind == "nm":
        per_block = [Target.nm(structure.n, structure.m)] * num_blocks
    else:
        if config.allocation == "rmi":
            lam = alloc.banded_lambda(target) if config.lam is None else config.lam
            sparsities = alloc.solve_allocation_lp(signal, target, lam)
        elif config.allocation == "owl":
            lam = alloc.OWL_LAMBDA if config.lam is None else config.lam
            sparsities = alloc.owl_allocation(collector.ratios, target, lam)
        else:
            lam, sparsities = 0.0, alloc.uniform(num_blocks, target)
        info.update(lam=lam, sparsity_per_block=sparsities)
        per_block = [Target.unstructured(s) for s in sparsities]
    block_of = {name: int(name[len(arch.blocks_path) + 1:].split(".")[0]) for name in names}
    return {name: per_block[block_of[name]] for name in names}, info


def rmi_signal(model, windows: torch.Tensor, samples: int, batch_size: int, progress: bool) -> list[float]:
    """LoSA's RMI redundancy of each block, from the block-input Gram matrices of the first ``samples``
    windows (only those run through the blocks: the Gram matrices use no others)."""
    collector = GramCollector()
    for _ in BlockRunner(model, windows[:samples], batch_size, [collector], progress=progress, desc="RMI signals"):
        pass
    return alloc.rmi_redundancy(collector.grams).tolist()


def check_allocation_file(path: str, model_config: dict, structure: Structure) -> None:
    """Read an allocation file against a checkpoint's config and the structure (before the model is
    loaded): every value must fit, e.g. be a whole N of M under mixed N:M."""
    arch = architecture_for(model_config["model_type"])
    blocks = int(model_config["num_hidden_layers"])
    names = [f"{arch.blocks_path}.{i}.{n}" for i in range(blocks) for n in arch.linear_names]
    for sparsity in alloc.read_allocation_file(path, blocks, names, arch.blocks_path).values():
        _file_target(sparsity, structure)


def _file_target(sparsity: float, structure: Structure) -> Target:
    if structure.kind == "unstructured":
        return Target.unstructured(sparsity)
    n = structure.m * (1.0 - sparsity)
    if abs(n - round(n)) > 1e-6 or round(n) < 1 or round(n) >= structure.m:
        raise LosaError(f"sparsity {sparsity:g} in the allocation file is not a whole N of M={structure.m} "
                        f"with 1 <= N < {structure.m}")
    if structure.kind == "nm" and round(n) != structure.n:
        raise LosaError(f"the allocation file gives {round(n)}:{structure.m} where the structure is "
                        f"{structure.describe()}; use mixed-{structure.n}:{structure.m}")
    return Target.nm(round(n), structure.m)


@torch.no_grad()
def _prune_pass(model, pruner: Pruner, targets: dict[str, Target], windows, batch_size: int,
                progress: bool) -> list[float] | None:
    """Prune every linear; returns the per-block reconstruction errors when calibration data was given."""
    arch = get_architecture(model)
    if windows is None:  # magnitude: nothing to calibrate
        for name, lin in arch.linears(model).items():
            _apply(lin, pruner.prune(lin.weight, targets[name], prev_mask=_present_mask(lin)))
        return None
    errors = ReconstructionError()
    for step in BlockRunner(model, windows, batch_size, [errors], progress=progress, desc=f"{pruner.name} pruning"):
        stats = step.input_stats(hessian=pruner.needs == "hessian") if pruner.needs else {}
        for name, lin in step.linears().items():
            _apply(lin, pruner.prune(lin.weight, targets[step.qualified(name)], stats.get(name),
                                     prev_mask=_present_mask(lin)))
    return errors.errors


def _present_mask(linear) -> torch.Tensor | None:
    """The weights a pruned input still has (None: all of them). Pruning nests in it, so an input's zeros
    stay zeros: SparseGPT's update would otherwise revive those it did not choose to prune again, and
    rows already sparser than the target would make the layer overshoot it."""
    present = linear.weight != 0
    return None if bool(present.all()) else present


def _apply(linear, pruned) -> None:
    values = linear.weight if pruned.weight is None else pruned.weight
    linear.weight.copy_(apply_mask(values.to(linear.weight.dtype), pruned.mask))


def _weighted(layers: list[dict], key: str) -> float:
    return sum(r[key] * r["numel"] for r in layers) / max(sum(r["numel"] for r in layers), 1)


def _blocks(layers: list[dict], errors: list[float] | None) -> list[dict]:
    out = []
    for block in sorted({r["block"] for r in layers}):
        rows = [r for r in layers if r["block"] == block]
        out.append({"block": block, "targets": sorted({r["target"] for r in rows}),
                    "target_sparsity": _weighted(rows, "target_sparsity"), "sparsity": _weighted(rows, "sparsity"),
                    "recon_error": None if errors is None else errors[block]})
    return out


def method_record(config: PruneConfig, report: dict, calibration: dict | None) -> dict:
    """The sidecar's ``method`` entry."""
    return {"pruner": config.method, **report["method_options"], "structure": report["structure"],
            "allocation": report["allocation"], "target_sparsity": round(report["target_sparsity"], 6),
            "achieved_sparsity": round(report["achieved_sparsity"], 6), "calibration": calibration,
            "config": asdict(config)}
