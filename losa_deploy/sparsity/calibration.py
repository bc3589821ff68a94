"""The sequential block-by-block calibration runner that pruning, allocation signals and LoSA share.

:class:`BlockRunner` walks the decoder blocks once. Block ``l`` sees the outputs of blocks ``0..l-1`` as
they are *after* the caller has processed them (pruned, merged, ...), as in SparseGPT and Wanda. Only one
block's activations are alive at a time (its inputs and, while it runs, its outputs), plus the same for
the dense reference stream when a collector asks for one; the model itself is never copied.

    runner = BlockRunner(model, windows, collectors=[ReconstructionError()])
    for step in runner:                      # step.index, step.block, step.inputs [n, T, d]
        stats = step.input_stats(hessian=True)   # runs the block once with hooks on its linears
        ...prune step.linears()...               # the runner then runs the block again for its outputs
                                                 # (not the last block when no collector reads outputs)

How a block is called is captured, not rebuilt: the model runs normally until block 0 and the hidden
states plus every other argument it receives (attention mask, position embeddings, cache position, ...)
are recorded. Those arguments depend on the batch shape only (calibration windows have no padding), so
the first batch of each size runs on through every block once, recording what each receives
(models with both sliding-window and full-attention layers pass each its own mask); the other batches
stop at block 0. This works for every family :func:`~losa_deploy.models.get_architecture` knows.

Block collectors hook in before and after each block: :class:`GramCollector` (block-input Gram
matrices for RMI/CKA), :class:`OutlierRatio` (OWL's signal) and :class:`ReconstructionError` (output
error of each processed block against the dense reference, LoSA's rank-allocation signal).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import LosaError
from ..kernels.attention import fast_attention
from ..models.arch import Architecture, get_architecture
from ..models.tensors import iter_model_tensors
from .stats import InputStats

BlockKwargs = dict[int, list[tuple[tuple, dict]]]  # batch size -> per block: (extra args, kwargs)


class _Stop(Exception):
    """Raised by the capture hook to stop a forward pass at block 0."""


def _hidden(output) -> torch.Tensor:
    # Decoder blocks of current transformers return the hidden states; wrappers may return a tuple.
    return output[0] if isinstance(output, tuple) else output


@torch.no_grad()
def capture_block_inputs(model: nn.Module, windows: torch.Tensor, batch_size: int
                         ) -> tuple[torch.Tensor, BlockKwargs]:
    """(hidden states entering block 0 ``[n, T, d]``, the other arguments of every block per batch size)."""
    blocks = get_architecture(model).block_list(model)
    device = next(model.parameters()).device
    hidden, calls, record_all = [], {}, [False]

    def hook(index):
        def pre_hook(module, args, kwargs):
            if index == 0:
                hidden.append((args[0] if args else kwargs["hidden_states"]).detach())
            if record_all[0]:
                calls[index] = (tuple(args[1:]), {k: v for k, v in kwargs.items() if k != "hidden_states"})
            # Stop before the block runs: at block 0, or at the last block when recording all of them
            # (so neither the last block nor the LM head ever runs here).
            if index == (len(blocks) - 1 if record_all[0] else 0):
                raise _Stop
        return pre_hook

    handles = [b.register_forward_pre_hook(hook(i), with_kwargs=True) for i, b in enumerate(blocks)]
    kwargs_by_size: BlockKwargs = {}
    try:
        for batch in windows.split(batch_size):
            record_all[0] = batch.shape[0] not in kwargs_by_size
            calls.clear()
            with contextlib.suppress(_Stop):
                model(input_ids=batch.to(device), use_cache=False)
            if record_all[0]:
                kwargs_by_size[batch.shape[0]] = [calls[i] for i in range(len(blocks))]
    finally:
        for h in handles:
            h.remove()
    return torch.cat(hidden), kwargs_by_size


class BlockStep:
    """One decoder block during the walk: its inputs, its linears, and ways to run it."""

    def __init__(self, index: int, block: nn.Module, inputs: torch.Tensor, arch: Architecture,
                 calls: BlockKwargs, batch_size: int):
        self.index = index
        self.block = block
        self.inputs = inputs
        self.arch = arch
        self._calls = calls
        self._batch_size = batch_size

    def linears(self) -> dict[str, nn.Linear]:
        """The block's prunable linears, by name relative to the block (``self_attn.q_proj``, ...)."""
        return self.arch.block_linears(self.block)

    def qualified(self, name: str) -> str:
        """The fully qualified module name of a linear of this block."""
        return f"{self.arch.blocks_path}.{self.index}.{name}"

    @torch.no_grad()
    def run(self, inputs: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor | None:
        """Run the block (current weights) over ``inputs`` (default: its inputs), batch by batch.

        Writes into ``out`` when given and returns it; with ``out=None`` the outputs are dropped (a pass
        made for its hooks) and None is returned.
        """
        inputs = self.inputs if inputs is None else inputs
        for start in range(0, inputs.shape[0], self._batch_size):
            y = self._call(inputs[start: start + self._batch_size])
            if out is not None:
                out[start: start + y.shape[0]] = y
        return out

    def _call(self, h: torch.Tensor) -> torch.Tensor:
        args, kwargs = self._calls[h.shape[0]][self.index]
        return _hidden(self.block(h, *args, **kwargs))

    @torch.no_grad()
    def input_stats(self, hessian: bool = False, modules: dict[str, nn.Module] | None = None
                    ) -> dict[str, InputStats]:
        """Statistics of what each linear receives on this block's inputs (one forward pass).

        ``modules`` defaults to :meth:`linears`; pass others (e.g. LoSA's wrapped linears) by name. Each
        batch stops as soon as every module has received its input (the block's outputs are not wanted
        here), which skips the last linear's product; a module called twice in one forward would have
        to be called again before that point to be counted twice (no supported family does that).
        """
        modules = self.linears() if modules is None else modules
        stats = {name: InputStats(mod.in_features, hessian, self.inputs.device) for name, mod in modules.items()}
        seen: set[str] = set()

        def record(name):
            def pre_hook(_module, args):
                stats[name].add(args[0])
                seen.add(name)
                if len(seen) == len(modules):
                    raise _Stop
            return pre_hook

        handles = [mod.register_forward_pre_hook(record(name)) for name, mod in modules.items()]
        try:
            for start in range(0, self.inputs.shape[0], self._batch_size):
                seen.clear()
                with contextlib.suppress(_Stop):
                    self._call(self.inputs[start: start + self._batch_size])
        finally:
            for h in handles:
                h.remove()
        return stats


class BlockCollector:
    """Hooks into the walk. ``needs_reference``: the runner also keeps the dense reference stream."""

    needs_reference = False

    @property
    def needs_outputs(self) -> bool:
        """Whether this collector reads block outputs (when none does, the last block is never run)."""
        return type(self).block_output is not BlockCollector.block_output

    def block_input(self, step: BlockStep) -> None:
        """Called with each block before the caller processes it."""

    def block_output(self, step: BlockStep, outputs: torch.Tensor, reference: torch.Tensor | None) -> None:
        """Called with the block's outputs after processing, and the reference block's outputs."""


ReferenceWeights = Callable[[int], dict[str, torch.Tensor]]


class BlockRunner:
    """Walk the decoder blocks of ``model`` over calibration ``windows [n, T]``, one block at a time.

    ``reference_weights(index)`` gives the state dict of the reference block for the reference stream
    (e.g. :func:`checkpoint_reference` for the original dense checkpoint); without it the reference
    block is the block as it is before the caller processes it (the dense model in one-shot pruning).
    ``reference_mode(block)`` is a context manager entered around each reference run, for state the
    weights do not carry (LoSA switches its adapters off there, so the reference is the plain dense block).
    ``reference_cache``: a list the caller keeps across walks over the same windows with the same
    reference; the first walk fills it with every block's reference outputs, later walks read them
    instead of re-running the reference (the caller only passes one when they fit in memory).
    """

    def __init__(self, model: nn.Module, windows: torch.Tensor, batch_size: int = 8,
                 collectors: Sequence[BlockCollector] = (), reference_weights: ReferenceWeights | None = None,
                 reference_mode: Callable[[nn.Module], contextlib.AbstractContextManager] | None = None,
                 reference_cache: list[torch.Tensor] | None = None, progress: bool = True, desc: str = "blocks"):
        self.model = model
        self.windows = windows
        self.batch_size = batch_size
        self.collectors = list(collectors)
        self.reference_weights = reference_weights
        self.reference_mode = reference_mode or (lambda block: contextlib.nullcontext())
        self.reference_cache = reference_cache
        self.progress = progress
        self.desc = desc

    def __iter__(self) -> Iterator[BlockStep]:
        # No gradient flows in a walk: attention runs on our CPU kernel where it applies (kernels/attention.py),
        # also inside the caller's work between steps (input statistics passes).
        with fast_attention(self.model):
            yield from self._walk()

    def _walk(self) -> Iterator[BlockStep]:
        arch = get_architecture(self.model)
        blocks = arch.block_list(self.model)
        inputs, calls = capture_block_inputs(self.model, self.windows, self.batch_size)
        spare = torch.empty_like(inputs)
        keep_reference = any(c.needs_reference for c in self.collectors)
        cache = self.reference_cache
        cached = cache is not None and len(cache) == len(blocks)
        run_reference = keep_reference and not cached
        ref, ref_spare = (inputs.clone(), torch.empty_like(inputs)) if run_reference else (None, None)
        for index, block in enumerate(tqdm(blocks, desc=self.desc, unit="block", disable=not self.progress)):
            step = BlockStep(index, block, inputs, arch, calls, self.batch_size)
            if run_reference:
                with _weights(block, self.reference_weights(index) if self.reference_weights else None), \
                        self.reference_mode(block):
                    ref, ref_spare = step.run(ref, out=ref_spare), ref
                if cache is not None:
                    cache.append(ref.clone())
            elif keep_reference:
                ref = cache[index]
            for c in self.collectors:
                c.block_input(step)
            yield step
            if index == len(blocks) - 1 and not any(c.needs_outputs for c in self.collectors):
                break  # nothing reads the last block's outputs (RMI, OWL signals)
            inputs, spare = step.run(out=spare), inputs
            for c in self.collectors:
                c.block_output(step, inputs, ref)


@contextlib.contextmanager
def _weights(block: nn.Module, state: dict[str, torch.Tensor] | None):
    """Temporarily load ``state`` into ``block`` (one block's worth of memory), then restore it."""
    if state is None:
        yield
        return
    current = block.state_dict()
    saved = {k: current[k].clone() for k in state}
    block.load_state_dict(state, strict=False)
    try:
        yield
    finally:
        block.load_state_dict(saved, strict=False)


def checkpoint_reference(path: str | os.PathLike, arch: Architecture) -> ReferenceWeights:
    """Reference weights read block by block from a checkpoint directory (memory: one block)."""

    def weights(index: int) -> dict[str, torch.Tensor]:
        prefix = f"{arch.blocks_path}.{index}."
        # Mapped (the default): the block's state is held for the whole block anyway, and mapped pages are
        # clean file pages the kernel may drop, where a read copy would be anonymous memory.
        state = {k[len(prefix):]: v for k, v in iter_model_tensors(path, arch, lambda k: k.startswith(prefix))}
        # An empty state would load nothing and make the reference the block as it is now (pruned): refuse.
        if not state:
            raise LosaError(f"{path} stores no weights of block {index} ({prefix}*) for the dense reference")
        return state

    return weights


class GramCollector(BlockCollector):
    """Linear-kernel Gram matrices ``K_l = F_l F_l^T`` of each block's inputs (RMI / linear CKA).

    ``F_l`` is block ``l``'s input on the first ``nsamples`` windows, one flattened row per window
    (``T * d`` features). Accumulated over column chunks in float32 with float64 partial sums, so the
    flattened features are never materialised in float64.
    """

    def __init__(self, nsamples: int | None = None, chunk: int = 1 << 16):
        self.nsamples = nsamples
        self.chunk = chunk
        self.grams: list[torch.Tensor] = []

    def block_input(self, step: BlockStep) -> None:
        f = step.inputs[: self.nsamples].flatten(1)
        gram = torch.zeros(f.shape[0], f.shape[0], dtype=torch.float64, device=f.device)
        for part in f.split(self.chunk, dim=1):
            part = part.float()
            gram += (part @ part.T).double()
        self.grams.append(gram.cpu())


class OutlierRatio(BlockCollector):
    """OWL's layer-wise outlier distribution: the share of Wanda scores above ``m`` times their mean.

    The scores ``|W_ij| * ||X_j||`` of all the block's linears are pooled (as in OWL's code).
    """

    def __init__(self, m: float = 5.0):
        self.m = m
        self.ratios: list[float] = []

    def block_input(self, step: BlockStep) -> None:
        from .pruners.wanda import wanda_score

        stats = step.input_stats()
        scores = torch.cat([wanda_score(lin.weight, stats[name].norms()).flatten()
                            for name, lin in step.linears().items()])
        self.ratios.append(float((scores > self.m * scores.mean()).double().mean()))


class ReconstructionError(BlockCollector):
    """Per block: ``E_l = mean_c ||Y_c - Yhat_c||^2 / ||Y_c||^2`` over output channels ``c``.

    ``Y`` is the reference block's output on the reference stream, ``Yhat`` the processed block's output
    on the processed stream, so the error is cumulative (LoSA §6.1). Sums are per channel in float64.
    """

    needs_reference = True

    def __init__(self):
        self.errors: list[float] = []

    def block_output(self, step: BlockStep, outputs: torch.Tensor, reference: torch.Tensor | None) -> None:
        num = torch.zeros(outputs.shape[-1], dtype=torch.float64, device=outputs.device)
        den = torch.zeros_like(num)
        for y, y_hat in zip(reference.split(64), outputs.split(64)):
            y, y_hat = y.flatten(0, -2).float(), y_hat.flatten(0, -2).float()
            num += (y - y_hat).square().sum(0, dtype=torch.float64)
            den += y.square().sum(0, dtype=torch.float64)
        self.errors.append(float((num / den.clamp_min(torch.finfo(torch.float64).tiny)).mean()))
