"""Shears: sparsify once, train an elastic super-adapter (NLS), then pick one sub-adapter (shears.md).

Training is the shared loop with ``adapters.elastic.RankSampler`` as its ``before_micro_batch``
callback. After training, :func:`select_sub_adapter` picks the sub-adapter:

* ``heuristic``: the median choice in every group (Shears' released models; no evaluation needed);
* ``max`` / ``min``: the largest / smallest choice everywhere;
* ``hill-climb``: start at the best-scoring uniform configuration (the heuristic on ties), try
  configurations one group one notch away in a seeded order, move to the first with a lower validation
  loss, stop at a local optimum or after ``search_evals`` evaluations beyond the uniform ones. The result
  is the best configuration scored.

With validation data, the uniform configurations (every group at the same choice: max, heuristic,
min for three choices) are always scored, so the report shows the size / loss trade-off.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..adapters.elastic import (
    Config,
    ElasticSpace,
    RankSampler,
    activate,
    block_groups,
    build_space,
    check_choices,
    extract,
)
from ..adapters.model import adapters_of
from ..errors import LosaError
from ..eval.perplexity import perplexity
from ..models.arch import architecture_for

SEARCHES = ("heuristic", "hill-climb", "max", "min")


@dataclass
class ShearsConfig:
    rank_choices: tuple[int, ...] = (16, 12, 8)  # r_max = the largest; the scale stays s at every rank
    groups: str = "block"  # block | layer | module | "q_proj,k_proj,v_proj;gate_proj,up_proj;down_proj"
    sample_per: str = "step"  # step | micro-batch (the reference samples per micro-batch)
    search: str = "heuristic"  # heuristic | hill-climb | max | min
    search_evals: int = 16  # hill-climb: validation evaluations beyond the uniform configurations
    masked: bool = True  # SQFT's SparsePEFT, merged exactly; False: the original Shears, kept unmerged

    def checked(self, max_rank: int) -> None:
        self.rank_choices = check_choices(self.rank_choices)
        if self.rank_choices[0] > max_rank:
            raise LosaError(f"rank choice {self.rank_choices[0]} is above r_max = --max-rank {max_rank} "
                            "(raise --max-rank)")
        if self.sample_per not in ("step", "micro-batch"):
            raise LosaError(f"unknown sampling unit '{self.sample_per}' (step or micro-batch)")
        if self.search not in SEARCHES:
            raise LosaError(f"unknown sub-adapter search '{self.search}' (choose from {', '.join(SEARCHES)})")
        if self.search_evals < 1:
            raise LosaError(f"search evaluations must be positive, got {self.search_evals}")

    @property
    def r_max(self) -> int:
        return max(self.rank_choices)


def preflight(cfg: ShearsConfig, model_type: str, has_validation: bool) -> None:
    """Reject what would only fail after pruning and training: a bad grouping, a search with no data."""
    arch = architecture_for(model_type)
    block_groups(arch, arch.linear_names, cfg.groups)
    if cfg.search == "hill-climb" and not has_validation:
        raise LosaError("the hill-climb search needs validation data (--search-data or --eval-data)")


class ShearsRun:
    """Shears' part of a fine-tune: the rank sampler while training, the sub-adapter choice after it."""

    def __init__(self, cfg: ShearsConfig, model, seed: int):
        self.cfg = cfg
        self.layers = adapters_of(model)
        self.space = build_space(model, self.layers, cfg.rank_choices, cfg.groups)
        self.sampler = RankSampler(self.space, self.layers, seed=seed * 7907 + 11, per=cfg.sample_per)

    def select(self, model, windows: torch.Tensor | None, seed: int) -> dict:
        """Score, choose and keep the sub-adapter (factors cut to their ranks); returns the report."""
        def validation_loss(config: Config) -> float:
            activate(self.layers, self.space, config)
            return perplexity(model, windows, progress=False)["nll"]

        selection = select_sub_adapter(self.space, self.cfg.search, validation_loss if windows is not None else None,
                                       self.cfg.search_evals, seed)
        activate(self.layers, self.space, None)
        report = describe(self.space, self.layers, selection)
        extract(self.layers, self.space, selection["chosen"])
        report.update(search=self.cfg.search, choices=list(self.space.choices), groups=self.cfg.groups,
                      n_groups=len(self.space.groups), masked=self.cfg.masked)
        return report


def select_sub_adapter(space: ElasticSpace, search: str, evaluate: Callable[[Config], float] | None,
                       budget: int, seed: int = 0) -> dict:
    """Choose a configuration; ``evaluate(config)`` is the validation loss (None: no validation data).

    Returns ``chosen`` (the configuration), ``candidates`` (every scored configuration with its loss,
    in evaluation order) and ``evaluations`` (how many the search itself spent).
    """
    scores: dict[Config, float] = {}

    def score(config: Config) -> float:
        if config not in scores:
            scores[config] = evaluate(config)
        return scores[config]

    if search == "hill-climb" and evaluate is None:
        raise LosaError("the hill-climb search needs validation data")
    if evaluate is not None:
        for rank in space.choices:
            score(space.uniform(rank))
    anchors = len(scores)
    if search == "max":
        chosen = space.uniform(space.choices[0])
    elif search == "min":
        chosen = space.uniform(space.choices[-1])
    else:
        chosen = space.uniform(space.heuristic_rank)
    if search == "hill-climb":
        start = min(scores, key=lambda c: (scores[c], c != chosen))
        chosen = _hill_climb(space, start, score, lambda: len(scores) - anchors < budget, seed)
    return {"chosen": chosen, "evaluations": len(scores) - anchors,
            "candidates": [{"config": c, "loss": loss} for c, loss in scores.items()]}


def _hill_climb(space: ElasticSpace, start: Config, score, budget_left: Callable[[], bool], seed: int) -> Config:
    """First-improvement local search on the validation loss (the paper's cheap search)."""
    order = random.Random(seed)
    current, best = start, score(start)
    while True:
        neighbours = space.neighbours(current)
        order.shuffle(neighbours)
        for config in neighbours:
            if not budget_left():
                return current
            loss = score(config)
            if loss < best:
                current, best = config, loss
                break
        else:
            return current  # no neighbour improves: a local optimum


def describe(space: ElasticSpace, layers, selection: dict) -> dict:
    """The JSON report of a selection: each candidate's ranks, adapter size and validation loss / ppl."""
    def entry(config: Config, loss: float | None) -> dict:
        out = {"ranks": space.named(config), "adapter_params": space.parameters(config, layers),
               "uniform": len(set(config)) == 1}
        if loss is not None:
            out.update(val_loss=loss, val_ppl=math.exp(loss))
        return out

    losses = {tuple(c["config"]): c["loss"] for c in selection["candidates"]}
    chosen = selection["chosen"]
    return {"chosen": entry(chosen, losses.get(chosen)),
            "super_adapter_params": space.parameters(space.uniform(space.choices[0]), layers),
            "evaluations": selection["evaluations"],
            "candidates": [entry(c, loss) for c, loss in losses.items()]}
