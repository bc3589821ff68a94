"""What each main-venv engine worker runs (:mod:`.worker`): the model of one engine, loaded once, and a
timed greedy generation from token ids.

* ``torch``: the plain Hugging Face model (our safe loader; dense ``F.linear`` in the chosen dtype). A PEFT
  adapter folder runs as PEFT runs it, unmerged: ``x·Wᵀ + s·B(A(x))`` on every adapted linear.
* ``losa``: our runtime. A ``losa``/``vllm``-packed folder through :func:`losa_deploy.load`; a plain
  checkpoint through :func:`losa_deploy.sparsify_` (every linear with >= 30% zeros on the sparse kernels);
  an adapter folder: its base sparsified under the unmerged PEFT adapter.
* ``vllm``: vLLM's offline ``LLM`` (CPU backend) on the folder the harness prepared: a ``vllm``-format
  checkpoint runs through our ``losa_sparse`` plugin, a dense one through stock vLLM.

Prefill is the time from the prompt to the first generated token, decode the time of the other
``gen_len - 1`` tokens; generation is greedy and never stops at EOS.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from ..errors import LosaError

VLLM_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}

# How a vllm answer was timed (its "timing"): from vLLM's per-request timestamps, or the fallback.
TIMED_BY_METRICS = "vllm request metrics"
TIMED_BY_SUBTRACTION = "subtraction"


def adapter_base(path: Path) -> Path | None:
    """The base checkpoint of a PEFT adapter folder (None for anything else). An adapter that names no
    base (finetune writes null for a masked adapter saved without it) or an unreadable config is refused."""
    config = path / "adapter_config.json"
    if not config.is_file():
        return None
    try:
        fields = json.loads(config.read_text())
    except ValueError as exc:  # UnicodeDecodeError included
        raise LosaError(f"{config} is not valid JSON ({exc})") from None
    if not isinstance(fields, dict):
        raise LosaError(f"{config} is not a JSON object")
    base = fields.get("base_model_name_or_path")
    if not isinstance(base, str) or not base:
        raise LosaError(f"adapter {path} names no base model (base_model_name_or_path in adapter_config.json "
                        f"is {json.dumps(base) if 'base_model_name_or_path' in fields else 'missing'}): bench "
                        "the merged model, or an adapter saved with its base (finetune --save-base)")
    base = Path(base)
    return base if base.is_absolute() else (path / base).resolve()


class HFRunner:
    """The ``torch`` and ``losa`` engines: one Hugging Face model in this process."""

    def __init__(self, engine: str, path: Path, dtype: str, threads: int | None, device: str = "cpu"):
        self.engine, self.path, self.dtype, self.threads, self.device = engine, path, dtype, threads, device
        self.model = None

    def load(self) -> dict:
        import torch

        from ..api import load, load_model, sparsify_, use_fast_attention
        from ..models.checkpoint import is_packed
        from ..runtime.loader import packing_block
        from ..runtime.serving import kernel_path
        from ..runtime.sparse_linear import SparseLinear

        if self.threads:
            torch.set_num_threads(self.threads)
        config = json.loads((self.path / "config.json").read_text()) if (self.path / "config.json").is_file() else {}
        base = adapter_base(self.path)
        if is_packed(config):
            if self.engine != "losa":
                raise ValueError(f"{self.path} is a packed checkpoint: only the losa engine runs it")
            packing_block(config, self.path)
            model = load(self.path, dtype=self.dtype)
        else:
            model = load_model(base or self.path, dtype=self.dtype)
            if base is not None:
                from peft import PeftModel

                model = PeftModel.from_pretrained(model, str(self.path), is_trainable=False)
            if self.engine == "losa":
                sparsify_(model, progress=False)
        self.model = model.eval().to(self.device)
        if self.engine == "losa":  # our runtime decodes on our attention kernel (CPU), as ld.load sets up
            use_fast_attention(self.model)
        modules = list(model.modules())
        sparse = [m for m in modules if isinstance(m, SparseLinear)]
        dense = sum(type(m) is torch.nn.Linear for m in modules)
        path = kernel_path(model)
        if base is not None:
            path += ", unmerged PEFT LoRA adapter"
        attention = getattr(model.config, "_attn_implementation", None)
        if self.engine == "losa":
            path += ", in-place KV cache"
        names = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
        loaded = model.get_input_embeddings().weight.dtype  # dense on every path: the dtype the model runs
        return {"version": torch.__version__, "dtype": self.dtype, "weights_dtype": names.get(loaded, str(loaded)),
                "kernel_path": path, "device": self.device, "sparse_linears": len(sparse), "dense_linears": dense,
                "threads": torch.get_num_threads(), "attention": attention}

    def measure(self, request: dict) -> dict:
        import torch

        ids = torch.tensor(request["prompts"], dtype=torch.long, device=self.device)
        sync = torch.cuda.synchronize if self.device == "cuda" else (lambda: None)
        with torch.inference_mode():
            sync()
            start = time.perf_counter()
            out = self.model(input_ids=ids, past_key_values=self._new_cache(), use_cache=True, logits_to_keep=1)
            token = out.logits[:, -1].argmax(-1)
            sync()
            prefilled = time.perf_counter()
            tokens = [token]
            for _ in range(request["gen_len"] - 1):
                out = self.model(input_ids=token[:, None], past_key_values=out.past_key_values, use_cache=True,
                                 logits_to_keep=1)
                token = out.logits[:, -1].argmax(-1)
                tokens.append(token)
            sync()
            done = time.perf_counter()
        return {"prefill_s": prefilled - start, "decode_s": done - prefilled,
                "tokens": torch.stack(tokens, 1)[0].tolist()}

    def _new_cache(self):
        """Our runtime decodes into the in-place cache; ``torch`` keeps transformers' default (None)."""
        if self.engine != "losa":
            return None
        from ..runtime.cache import GrowingCache

        return GrowingCache(self.model.config)


class VLLMRunner:
    """The ``vllm`` engine: vLLM's offline LLM, eager mode, no prefix caching (the repeats reuse prompts),
    engine core and model in this worker process (``VLLMEngine.command`` sets the environment).

    One ``gen_len``-token generation, timed by vLLM's own per-request timestamps (``RequestOutput.metrics``,
    kept because the LLM is made with ``disable_log_stats=False``): prefill from the call to the batch's
    last first token, decode from there to the batch's last token (:func:`batch_times`). If a vLLM returns
    no usable timestamps, a fallback: prefill is a generation of one token, decode the ``gen_len``
    generation minus that (two runs' noise; refused when it comes out non-positive). Each answer's
    ``timing`` says which was used.
    """

    def __init__(self, path: Path, dtype: str, threads: int | None, max_batch: int, prompt_len: int,
                 max_len: int):
        self.path, self.dtype, self.threads = path, dtype, threads
        self.max_batch, self.prompt_len, self.max_len = max_batch, prompt_len, max_len
        self.llm = None

    def load(self) -> dict:
        # LLM.apply_model sends `describe` to the engine core, which vLLM's IPC carries only through its
        # pickle fallback (between its own local processes).
        os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
        import vllm
        from vllm import LLM

        from ..engines.vllm_plugin import describe

        self.llm = LLM(model=str(self.path), dtype=VLLM_DTYPES[self.dtype], max_model_len=self.max_len,
                       enforce_eager=True, enable_prefix_caching=False, skip_tokenizer_init=True,
                       gpu_memory_utilization=0.1, max_num_seqs=self.max_batch,
                       max_num_batched_tokens=max(self.max_batch * self.prompt_len, self.max_len), seed=0,
                       distributed_executor_backend="uni",  # the model runs in the engine core's process
                       disable_log_stats=False)  # keeps the per-request timestamps that measure() reads
        # The timestamps need only the stats; vLLM's default stat loggers would add Prometheus work each step
        # and an "Avg prompt throughput" line every 10 s to the worker log (which a failure quotes from).
        self.llm.llm_engine.logger_manager = None
        workers = self.llm.apply_model(describe)
        layers = sum(w["losa_layers"] for w in workers)
        path = (f"vLLM + losa_sparse plugin ({layers} layers, {sum(w['packed_parts'] for w in workers)} packed "
                f"parts)" if layers else "stock vLLM (dense)")
        return {"version": vllm.__version__, "dtype": self.dtype, "kernel_path": path, "workers": workers,
                "threads": self.threads}

    def measure(self, request: dict) -> dict:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        prompts = [TokensPrompt(prompt_token_ids=p) for p in request["prompts"]]

        def params(tokens):
            return SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True, detokenize=False)

        # time.monotonic: the clock of vLLM's engine-core timestamps (the engine core runs in this process).
        start = time.monotonic()
        outputs = self.llm.generate(prompts, params(request["gen_len"]), use_tqdm=False)
        done = time.monotonic()
        tokens = list(outputs[0].outputs[0].token_ids)
        times = batch_times(outputs, start, done)
        if times is not None:
            return {"prefill_s": times[0], "decode_s": times[1], "tokens": tokens, "timing": TIMED_BY_METRICS}
        # No timestamps: decode is the long run minus a prefill-only run. With few tokens, noise can make
        # that negative: an error, not a made-up number (it printed 1.5e9 tokens/s).
        again = time.monotonic()
        self.llm.generate(prompts, params(1), use_tqdm=False)
        prefill = time.monotonic() - again
        decode = done - start - prefill
        if decode <= 0:
            raise ValueError(f"vllm: {request['gen_len'] - 1} decode steps took no measurable time "
                             f"({decode * 1e3:.2f} ms after subtracting the prefill); raise --gen-len")
        return {"prefill_s": prefill, "decode_s": decode, "tokens": tokens, "timing": TIMED_BY_SUBTRACTION}

    def close(self) -> None:
        self.llm.llm_engine.engine_core.shutdown()


def batch_times(outputs: list, start: float, done: float) -> tuple[float, float] | None:
    """(prefill_s, decode_s) of one batched generation from vLLM's per-request timestamps, as the other
    engines time a batch: prefill from ``start`` (``time.monotonic()`` before the call) until every request
    has its first token, decode from then until the last request's last token. None when a request lacks
    its timestamps (``metrics`` None, or 0: stats off) or they do not fit between ``start`` and ``done``
    (another clock): the caller falls back.

    The timestamps are taken by vLLM's engine core (time.monotonic) when a step's outputs are ready, so
    both times come from this one run. The bench's token budget prefills the whole batch in one step; a
    batch prefilled over several steps counts the decode steps of its early requests into prefill.
    """
    firsts, lasts = [], []
    for output in outputs:
        metrics = getattr(output, "metrics", None)
        first, last = getattr(metrics, "first_token_ts", 0.0), getattr(metrics, "last_token_ts", 0.0)
        if not first or not last:
            return None
        firsts.append(first)
        lasts.append(last)
    if not outputs or min(firsts) <= start or max(lasts) > done:
        return None  # not the clock of this process
    prefill, decode = max(firsts) - start, max(lasts) - max(firsts)
    return (prefill, decode) if decode > 0 else None
