"""Greedy generation with vLLM from token ids, run as a script (vLLM starts worker processes, so its
entry point must sit behind ``if __name__ == "__main__":``)::

    python -m losa_deploy.engines.vllm_generate REQUEST.json RESULT.json

REQUEST: a list of runs ``{"model": DIR, "prompts": [[ids], ...], "new_tokens": N, "dtype": "float32",
"max_model_len": 128, "kv_cache_bytes": 268435456, "enforce_eager": true}``, served one after the other
in this process (each engine is shut down before the next starts). RESULT: per run ``{"tokens": [[ids],
...], "logprobs": [[logprob of each chosen token], ...], "workers": [...]}``, where ``workers`` is what
:func:`losa_deploy.engines.vllm_plugin.describe` reports from inside each model process (the engine core):
the process id and how many layers run through the ``losa_sparse`` method. Generation never stops at EOS
(``ignore_eos``), like the other engines in the tests.

Memory: the KV cache gets ``kv_cache_bytes`` (default 256 MiB) unless the run gives
``gpu_memory_utilization``. On vLLM's CPU backend that fraction is taken of the memory of the NUMA node
holding the first CPU, minus this process's resident memory: on a VM whose node 0 holds 10 of its 23 GiB,
0.12 left nothing for the KV cache and the engine refused to start. An explicit size does not depend on
the node's size.
"""

from __future__ import annotations

import json
import os
import sys

KV_CACHE_BYTES = 256 << 20  # the KV cache of a run that names no memory: ample for test-sized prompts


def generate(request: dict) -> dict:
    # LLM.apply_model sends `describe` (a function of this package) to the engine core; vLLM's msgpack
    # IPC carries functions only through its pickle fallback, between its own local processes.
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from .vllm_plugin import describe

    memory = ({"gpu_memory_utilization": request["gpu_memory_utilization"]} if "gpu_memory_utilization" in request
              else {"kv_cache_memory_bytes": int(request.get("kv_cache_bytes", KV_CACHE_BYTES))})
    llm = LLM(model=request["model"], dtype=request.get("dtype", "auto"),
              max_model_len=request.get("max_model_len", 128),
              enforce_eager=request.get("enforce_eager", True), seed=0, **memory)
    params = SamplingParams(temperature=0.0, max_tokens=request["new_tokens"], ignore_eos=True, logprobs=0)
    outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in request["prompts"]], params, use_tqdm=False)
    tokens, logprobs = [], []
    for out in outputs:
        completion = out.outputs[0]
        tokens.append(list(completion.token_ids))
        logprobs.append([step[token].logprob for step, token in zip(completion.logprobs, completion.token_ids)])
    result = {"tokens": tokens, "logprobs": logprobs, "workers": llm.apply_model(describe),
              "client_pid": os.getpid()}
    llm.llm_engine.engine_core.shutdown()  # free its processes and memory before the next run
    return result


def main(argv: list[str]) -> int:
    request_path, result_path = argv
    with open(request_path) as handle:
        runs = json.load(handle)
    results = [generate(run) for run in runs]
    with open(result_path, "w") as handle:
        json.dump(results, handle)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
