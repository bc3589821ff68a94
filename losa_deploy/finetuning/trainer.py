"""The training loop every fine-tuning method shares: AdamW on the adapter parameters only, linear
warm-up then linear decay, gradient accumulation, clipping, bf16 autocast where supported, seeded order.

One call trains one phase (a LoSA step, or the single phase of a baseline) on its slice of the data with
a fresh optimizer and schedule (LoSA's ranks, hence parameter shapes, change between phases).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..data import IGNORE_INDEX, TokenizedExample, collate
from ..errors import LosaError
from . import distributed
from .data import shuffled

AUTOCAST_MODES = ("auto", "bf16", "none")


@dataclass
class TrainConfig:
    lr: float = 2e-4
    weight_decay: float = 0.001
    max_grad_norm: float = 0.3
    warmup_ratio: float = 0.3
    batch_size: int = 4  # examples per micro-batch
    grad_accum: int = 2  # micro-batches per optimizer update (across all processes)
    max_len: int = 256
    seed: int = 0
    autocast: str = "auto"  # "bf16", "none", or "auto" (bf16 where the device runs it natively)

    def checked(self) -> TrainConfig:
        """Validate before any work (a bad value otherwise fails after pruning, deep in the optimizer)."""
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise LosaError(f"learning rate must be a positive number, got {self.lr}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise LosaError(f"weight decay must be >= 0, got {self.weight_decay}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise LosaError(f"warm-up share must be in [0, 1), got {self.warmup_ratio}")
        if self.max_len < 2:
            raise LosaError(f"max_len must be at least 2 tokens (one input, one label), got {self.max_len}")
        if self.batch_size < 1 or self.grad_accum < 1:
            raise LosaError("batch size and gradient accumulation must be positive")
        if self.autocast not in AUTOCAST_MODES:
            raise LosaError(f"unknown autocast mode '{self.autocast}' (choose from {', '.join(AUTOCAST_MODES)})")
        return self

    def to_dict(self) -> dict:
        return asdict(self)


def autocast_context(cfg: TrainConfig, device: torch.device):
    use = cfg.autocast == "bf16" or (cfg.autocast == "auto" and _native_bf16(device))
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=use)


def _native_bf16(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    from ..kernels import extension

    ext = extension()
    return bool(ext is not None and ext.cpu_features().get("avx512bf16", False))


def train_phase(model, params: list[torch.nn.Parameter], examples: list[TokenizedExample], cfg: TrainConfig,
                phase: int, pad_id: int, progress: bool = True, desc: str = "train",
                before_micro_batch: Callable[[int, int], None] | None = None) -> dict:
    """Train ``params`` on ``examples`` (one pass, seeded order); returns the per-update losses.

    ``before_micro_batch(update, micro)`` runs before every micro-batch's forward, on every process
    (also for micro-batches another process computes, so seeded callbacks stay in step): Shears' rank
    sampler sets the active sub-adapter there, outside the forward, so a recomputation sees the same one.
    """
    rank, world = (torch.distributed.get_rank(), torch.distributed.get_world_size()) \
        if torch.distributed.is_initialized() else (0, 1)
    device = next(model.parameters()).device
    order = shuffled(examples, cfg.seed * 7919 + phase)
    micro = [order[i: i + cfg.batch_size] for i in range(0, len(order), cfg.batch_size)]
    updates = [micro[i: i + cfg.grad_accum] for i in range(0, len(micro), cfg.grad_accum)]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _warmup_then_linear(len(updates), cfg.warmup_ratio))
    model.train()
    losses, t0 = [], time.perf_counter()
    bar = tqdm(updates, desc=desc, unit="upd", disable=not (progress and distributed.is_main()))
    for update in bar:
        label_tokens = sum(_label_count(mb) for mb in update)
        for p in params:
            p.grad = torch.zeros_like(p)
        total = torch.zeros((), dtype=torch.float64, device=device)
        for j, mb in enumerate(update):
            if before_micro_batch is not None:
                before_micro_batch(len(losses), j)
            if j % world != rank:
                continue
            # Adapter dropout draws from a seed of this micro-batch's own, not from one stream per process:
            # N processes then draw exactly what one process draws, and no two micro-batches share masks.
            torch.manual_seed(_dropout_seed(cfg.seed, phase, len(losses), j))
            batch = {k: v.to(device) for k, v in collate(mb, pad_id).items()}
            with autocast_context(cfg, device):
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            nll = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch["labels"][:, 1:].flatten(),
                                  ignore_index=IGNORE_INDEX, reduction="sum")
            (nll / label_tokens).backward()
            total += nll.detach().double()
        distributed.all_reduce_grads(params)
        if torch.distributed.is_initialized() and world > 1:
            torch.distributed.all_reduce(total)
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
        schedule.step()
        losses.append(float(total) / label_tokens)
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    tokens = sum(e.input_ids.numel() for e in examples)
    return {"losses": losses, "updates": len(updates), "tokens": tokens, "seconds": time.perf_counter() - t0}


def _dropout_seed(seed: int, phase: int, update: int, micro: int) -> int:
    out = 0
    for part in (seed, phase, update, micro):
        out = (out * 1_000_003 + part) % (1 << 62)
    return out


def _warmup_then_linear(updates: int, warmup_ratio: float):
    """LR factor per update: linear warm-up to 1 over the first ``warmup_ratio``, then linear decay to 0."""
    warmup = max(1, math.ceil(warmup_ratio * updates))
    return lambda u: (u + 1) / warmup if u < warmup else max(0.0, (updates - u) / max(1, updates - warmup))


def _label_count(micro_batch: list[TokenizedExample]) -> int:
    # Labels are shifted by one: the first label of each example is never predicted.
    return sum(int((e.labels[1:] != IGNORE_INDEX).sum()) for e in micro_batch)
