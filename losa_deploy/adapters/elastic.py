"""Elastic LoRA (Shears' neural low-rank adapter search): the search space, the rank sampler, sub-adapters.

A super-adapter of rank r_max = max(choices) is trained while, at every optimizer update (or micro-batch),
each *group* of linears gets a rank drawn uniformly from the choices; a rank-r sub-adapter is the first r
components of every factor (``LoraLinear.active_rank``), at the super-adapter's fixed scale. Groups are
per decoder block: every block has its own instance of each group (Shears: [q, k, v], [up], [down]).

A configuration is a tuple of ranks, one per group in ``ElasticSpace.groups`` order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import LosaError
from ..models.arch import get_architecture
from .layer import LoraLinear

GROUPINGS = ("block", "layer", "module")

Config = tuple[int, ...]


@dataclass(frozen=True)
class ElasticSpace:
    """Groups of adapted linears that share one rank, and the ranks each group may take."""

    groups: tuple[tuple[str, tuple[str, ...]], ...]  # (group name, fully qualified module names)
    choices: tuple[int, ...]  # distinct, descending: choices[0] is r_max

    @property
    def heuristic_rank(self) -> int:
        """Shears' heuristic sub-adapter: the median of the descending choices ((n - 1) // 2)."""
        return self.choices[(len(self.choices) - 1) // 2]

    def uniform(self, rank: int) -> Config:
        return (rank,) * len(self.groups)

    def neighbours(self, config: Config) -> list[Config]:
        """Configurations one notch away in one group (a larger or smaller choice)."""
        out = []
        for g, rank in enumerate(config):
            i = self.choices.index(rank)
            for j in (i - 1, i + 1):
                if 0 <= j < len(self.choices):
                    out.append(config[:g] + (self.choices[j],) + config[g + 1:])
        return out

    def ranks(self, config: Config) -> dict[str, int]:
        """The rank of every module under ``config``."""
        return {module: rank for (_, modules), rank in zip(self.groups, config) for module in modules}

    def named(self, config: Config) -> dict[str, int]:
        return {name: rank for (name, _), rank in zip(self.groups, config)}

    def parameters(self, config: Config, layers: dict[str, LoraLinear]) -> int:
        """Adapter parameters of the sub-adapter: Σ r·(in + out) over the modules."""
        return sum(r * (layers[m].in_features + layers[m].out_features) for m, r in self.ranks(config).items())


def build_space(model, layers: dict[str, LoraLinear], choices, grouping: str = "block") -> ElasticSpace:
    """The search space over ``layers`` (the model's adapters) with one group per block and pattern.

    ``grouping``: ``block`` (the architecture's groups: attention q/k/v, attention output, MLP gate/up,
    MLP down), ``layer`` (one rank per decoder block, the newer NLS), ``module`` (every linear alone), or
    explicit groups ``"q_proj,k_proj,v_proj;gate_proj,up_proj;down_proj"`` (linear names inside a block,
    the last component suffices). Every adapted linear must fall in exactly one group.
    """
    arch = get_architecture(model)
    choices = check_choices(choices)
    by_block: dict[int, list[str]] = {}
    for name in layers:
        block, inner = arch.locate(name)
        by_block.setdefault(block, []).append(inner)
    groups = []
    for block, inners in sorted(by_block.items()):
        for members in block_groups(arch, inners, grouping):
            short = ",".join(n.rsplit(".", 1)[-1] for n in members)
            groups.append((f"{block}:{short}", tuple(f"{arch.blocks_path}.{block}.{n}" for n in members)))
    if not groups:
        raise LosaError("the model has no adapters to make elastic")
    for _, modules in groups:
        for m in modules:
            if layers[m].rank < choices[0]:
                raise LosaError(f"{m} has rank {layers[m].rank}, below the largest rank choice {choices[0]}")
    return ElasticSpace(tuple(groups), choices)


def check_choices(choices) -> tuple[int, ...]:
    """Distinct positive integers, returned in descending order."""
    choices = tuple(choices)
    if not choices:
        raise LosaError("the list of rank choices is empty")
    for c in choices:
        if isinstance(c, bool) or not isinstance(c, int) or c < 1:
            raise LosaError(f"rank choices must be positive integers, got {c!r}")
    if len(set(choices)) != len(choices):
        raise LosaError(f"rank choices repeat a value: {list(choices)}")
    return tuple(sorted(choices, reverse=True))


def parse_choices(text: str) -> tuple[int, ...]:
    """``"32,24,16"`` → (32, 24, 16), with a LosaError for anything else."""
    items = [t.strip() for t in str(text).split(",") if t.strip()]
    try:
        values = [int(t) for t in items]
    except ValueError:
        raise LosaError(f"rank choices must be comma-separated integers, got '{text}'") from None
    return check_choices(values)


def activate(layers: dict[str, LoraLinear], space: ElasticSpace, config: Config | None) -> None:
    """Make ``config`` the active sub-adapter (``None``: the whole super-adapter)."""
    if config is None:
        for _, modules in space.groups:
            for m in modules:
                layers[m].active_rank = None
        return
    for module, rank in space.ranks(config).items():
        layers[module].active_rank = rank


def extract(layers: dict[str, LoraLinear], space: ElasticSpace, config: Config) -> None:
    """Keep only the sub-adapter ``config``: each factor cut to its first r components (in place)."""
    for module, rank in space.ranks(config).items():
        layers[module].set_rank(rank, shrink="index")


class RankSampler:
    """Draws one rank per group, uniformly and independently, before each optimizer update (``step``)
    or each micro-batch (``micro-batch``, the reference's schedule), and activates it.

    Seeded, so a run is reproducible; it keeps how often each choice was drawn. Install it as the
    trainer's ``before_micro_batch`` callback: the draw happens before the forward and stays in force
    until the next draw, through the backward and any checkpoint recomputation.
    """

    def __init__(self, space: ElasticSpace, layers: dict[str, LoraLinear], seed: int, per: str = "step"):
        if per not in ("step", "micro-batch"):
            raise LosaError(f"unknown sampling unit '{per}' (step or micro-batch)")
        self.space, self.layers, self.per = space, layers, per
        self.generator = torch.Generator().manual_seed(seed)
        self.counts = {c: 0 for c in space.choices}  # draws per choice, over all groups
        self.draws = 0

    def sample(self) -> Config:
        idx = torch.randint(len(self.space.choices), (len(self.space.groups),), generator=self.generator)
        config = tuple(self.space.choices[i] for i in idx.tolist())
        for r in config:
            self.counts[r] += 1
        self.draws += 1
        return config

    def before_micro_batch(self, update: int, micro: int) -> None:
        if self.per == "micro-batch" or micro == 0:
            activate(self.layers, self.space, self.sample())

    def finish(self) -> dict:
        """Back to the whole super-adapter; returns the sampling statistics."""
        activate(self.layers, self.space, None)
        return {"per": self.per, "draws": self.draws, "counts": {str(c): n for c, n in self.counts.items()}}


def block_groups(arch, inners, grouping: str) -> list[tuple[str, ...]]:
    """The groups of one block's adapted linears ``inners`` (names inside the block), each exactly once."""
    patterns = _group_patterns(arch, grouping)
    if patterns is None:  # one group for the whole block
        return [tuple(inners)]
    groups = [tuple(n for n in inners if any(_matches(n, p) for p in pattern)) for pattern in patterns]
    for inner in inners:
        count = sum(inner in g for g in groups)
        if count != 1:
            where = "no group" if count == 0 else f"{count} groups"
            raise LosaError(f"adapted linear {inner} falls in {where} of grouping '{grouping}' "
                            "(every adapted linear must be in exactly one group)")
    return [g for g in groups if g]


def _group_patterns(arch, grouping: str) -> list[tuple[str, ...]] | None:
    """The linear-name patterns of each group inside one block (None: the whole block); validates."""
    if grouping == "block":
        return [tuple(g) for g in arch.groups]
    if grouping == "layer":
        return None
    if grouping == "module":
        return [(n,) for n in arch.linear_names]
    groups = [tuple(n.strip() for n in g.split(",") if n.strip()) for g in grouping.split(";")]
    groups = [g for g in groups if g]
    if not groups:
        raise LosaError(f"unknown grouping '{grouping}' ({', '.join(GROUPINGS)}, or 'q_proj,k_proj;down_proj')")
    for g in groups:
        for n in g:
            if not any(_matches(full, n) for full in arch.linear_names):
                raise LosaError(f"grouping '{grouping}' names '{n}', not a linear of a {arch.name} block "
                                f"({', '.join(arch.linear_names)})")
    return groups


def _matches(inner: str, pattern: str) -> bool:
    """``inner`` (e.g. ``self_attn.q_proj``) is named by ``pattern`` (``self_attn.q_proj`` or ``q_proj``)."""
    return inner == pattern or inner.endswith("." + pattern)
