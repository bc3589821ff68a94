"""Greedy generation with vLLM from token ids, run as a script (vLLM starts worker processes, so its
entry point must sit behind ``if __name__ == "__main__":``)::

    python -m losa_deploy.engines.vllm_generate REQUEST.json RESULT.json

REQUEST: a list of runs ``{"model": DIR, "prompts": [[ids], ...], "new_tokens": N, "dtype": "float32",
"max_model_len": 128, "gpu_memory_utilization": 0.1, "enforce_eager": true}``, served one after the other
in this process (each engine is shut down before the next starts). RESULT: per run ``{"tokens": [[ids],
...], "logprobs": [[logprob of each chosen token], ...], "workers": [...]}``, where ``workers`` is what
:func:`losa_deploy.engines.vllm_plugin.describe` reports from inside each model process (the engine core):
the process id and how many layers run through the ``losa_sparse`` method. Generation never stops at EOS
(``ignore_eos``), like the other engines in the tests. On vLLM's CPU backend ``gpu_memory_utilization`` is
the share of CPU memory it may take.
"""

from __future__ import annotations

import json
import os
import sys


def generate(request: dict) -> dict:
    # LLM.apply_model sends `describe` (a function of this package) to the engine core; vLLM's msgpack
    # IPC carries functions only through its pickle fallback, between its own local processes.
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from .vllm_plugin import describe

    llm = LLM(model=request["model"], dtype=request.get("dtype", "auto"),
              max_model_len=request.get("max_model_len", 128),
              gpu_memory_utilization=request.get("gpu_memory_utilization", 0.1),
              enforce_eager=request.get("enforce_eager", True), seed=0)
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
