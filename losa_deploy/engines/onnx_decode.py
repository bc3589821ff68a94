"""Greedy generation over a ``deepsparse``-format ONNX graph, with ONNX Runtime or DeepSparse's Engine.

This file imports only numpy and the standard library (the engines lazily), because it also runs as a
script inside the DeepSparse venv, which has neither torch nor losa_deploy::

    python onnx_decode.py {onnxruntime|deepsparse|pipeline} MODEL_DIR REQUEST.npz RESULT.npz

REQUEST holds ``prompt_0 ... prompt_{n-1}`` (int64 token ids; for ``pipeline``, the prompt texts),
``new_tokens``, ``sequence_length`` and ``chunk_length``; RESULT gets ``tokens_i`` (the generated ids)
and ``logits_i`` ([new_tokens, vocab], the logits each generated token was chosen from).

``pipeline`` runs DeepSparse's own ``TextGeneration`` pipeline (internal KV cache, greedy) instead of our
loop, to show the export is what that pipeline expects.

The protocol is DeepSparse's own (``transformers/utils/helpers.py`` and ``decoder_kv_cache.py`` in
deepsparse 1.8.0), so the graph is exercised exactly as its text-generation pipeline runs it:

* every call sees the whole context window of ``sequence_length`` slots: ``attention_mask`` has ones for
  the tokens processed so far plus the current ones, right-aligned; the cache input holds the last
  ``sequence_length - input_ids_length`` slots, left-padded with zeros;
* the prompt is processed in chunks of ``prompt_chunk`` tokens (the multi-token engine), its remainder
  and every generated token one at a time (the single-token engine);
* ``causal_mask`` is ``attention_mask`` reshaped for one token, else ones over the past, a lower
  triangle over the current chunk, zeros over the padding.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np


class Decoder:
    """Greedy decoding with a fixed context window, on any engine given as ``run(length, feeds) -> list``."""

    def __init__(self, run, num_layers: int, kv_heads: int, head_dim: int, sequence_length: int,
                 prompt_chunk: int):
        self.run = run
        self.num_layers = num_layers
        self.cache_shape = (kv_heads, head_dim)
        self.sequence_length = sequence_length
        self.prompt_chunk = prompt_chunk

    def generate(self, prompt: np.ndarray, new_tokens: int) -> tuple[np.ndarray, np.ndarray]:
        """(generated ids [new_tokens], logits [new_tokens, vocab]) for one prompt (batch 1)."""
        self.check_length(prompt.size, new_tokens)
        logits, cache, done = self.prefill(prompt)
        tokens, chosen = [], []
        for _ in range(new_tokens):
            last = logits[0, -1]
            tokens.append(int(last.argmax()))
            chosen.append(last)
            if len(tokens) == new_tokens:
                break
            logits, cache = self.step(np.array([tokens[-1]]), done, cache)
            done += 1
        return np.array(tokens, dtype=np.int64), np.stack(chosen).astype(np.float32)

    def check_length(self, prompt_length: int, new_tokens: int) -> None:
        if prompt_length + new_tokens > self.sequence_length:
            raise ValueError(f"prompt ({prompt_length}) + new tokens ({new_tokens}) exceed the "
                             f"sequence length {self.sequence_length}")

    def prefill(self, prompt: np.ndarray) -> tuple[np.ndarray, list[np.ndarray], int]:
        """Run the whole prompt: (logits of the last call, the cache, the number of tokens done)."""
        cache: list[np.ndarray] | None = None
        done = 0
        while prompt.size - done >= self.prompt_chunk > 1:
            logits, cache = self.step(prompt[done: done + self.prompt_chunk], done, cache)
            done += self.prompt_chunk
        for token in prompt[done:]:
            logits, cache = self.step(np.array([token]), done, cache)
            done += 1
        return logits, cache, done

    def step(self, ids: np.ndarray, done: int, cache: list[np.ndarray] | None):
        """Run ``ids`` after ``done`` processed tokens; ``cache`` holds only their (unpadded) entries."""
        length, total = ids.size, self.sequence_length
        attention = np.zeros((1, total), dtype=np.int64)
        attention[:, total - (done + length):] = 1
        if length == 1:
            causal = attention.reshape(1, 1, 1, total)
        else:
            causal = np.concatenate([np.ones((1, 1, length, total - length), dtype=np.int64),
                                     np.tril(np.ones((1, 1, length, length), dtype=np.int64))], axis=-1)
            causal[..., : total - (done + length)] = 0
        feeds = {"input_ids": ids.reshape(1, length).astype(np.int64), "attention_mask": attention,
                 "positions": np.arange(done, done + length, dtype=np.int64).reshape(1, length),
                 "causal_mask": causal}
        past_length = total - length
        for i in range(2 * self.num_layers):
            kind = "key" if i % 2 == 0 else "value"
            entries = cache[i] if cache is not None else None
            feeds[f"past_key_values.{i // 2}.{kind}"] = _left_pad(entries, past_length, self.cache_shape)
        logits, *present = self.run(length, feeds)
        cache = [p[:, :, total - (done + length):, :] for p in present]
        return logits, cache


def _left_pad(entries: np.ndarray | None, length: int, heads_dim: tuple[int, int]) -> np.ndarray:
    heads, dim = heads_dim
    out = np.zeros((1, heads, length, dim), dtype=np.float32)
    if entries is not None and entries.shape[2]:
        out[:, :, length - entries.shape[2]:, :] = entries
    return out


def _model_shape(model_dir: str) -> tuple[int, int, int]:
    """(layers, kv heads, head dim) from config.json."""
    with open(os.path.join(model_dir, "config.json")) as handle:
        config = json.load(handle)
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads  # models.arch.head_size's rule
    return config["num_hidden_layers"], config.get("num_key_value_heads", heads), head_dim


def open_decoder(engine: str, model_dir: str, sequence_length: int, prompt_chunk: int,
                 work_dir: str | None = None, threads: int | None = None) -> Decoder:
    """A :class:`Decoder` over ``MODEL_DIR/model.onnx`` on ``onnxruntime`` or ``deepsparse``, running on
    ``threads`` cores (None: the engine's default, all of them)."""
    layers, kv_heads, head_dim = _model_shape(model_dir)
    onnx_path = os.path.join(model_dir, "model.onnx")
    if engine == "onnxruntime":
        run = _onnxruntime_runner(onnx_path, threads)
    elif engine == "deepsparse":
        run = _deepsparse_runner(onnx_path, sequence_length, prompt_chunk, work_dir, threads)
    else:
        raise ValueError(f"unknown engine {engine!r}")
    return Decoder(run, layers, kv_heads, head_dim, sequence_length, prompt_chunk)


def _onnxruntime_runner(onnx_path: str, threads: int | None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    session = ort.InferenceSession(onnx_path, options, providers=["CPUExecutionProvider"])
    return lambda length, feeds: session.run(None, feeds)


def _deepsparse_runner(onnx_path: str, sequence_length: int, prompt_chunk: int, work_dir: str | None,
                       threads: int | None):
    """DeepSparse compiles static shapes: one engine per input length, shaped by its own helper on a copy
    in ``work_dir`` (None: a temporary directory that lives as long as the runner; never the export)."""
    import shutil
    import tempfile

    from deepsparse import Engine
    from deepsparse.utils.onnx import overwrite_onnx_model_inputs_for_kv_cache_models

    scratch = None
    if work_dir is None:
        scratch = tempfile.TemporaryDirectory(prefix="losa-deepsparse-")
        work_dir = scratch.name
    _link_external_data(os.path.dirname(os.path.abspath(onnx_path)), work_dir)
    engines = {}
    for length in sorted({1, prompt_chunk}):
        path = os.path.join(work_dir, f"model-{sequence_length}x{length}.onnx")
        shutil.copyfile(onnx_path, path)
        overwrite_onnx_model_inputs_for_kv_cache_models(path, sequence_length=sequence_length,
                                                        input_ids_length=length)
        engines[length] = Engine(model=path, batch_size=1, num_cores=threads)

    def run(length, feeds, _scratch=scratch):  # holds the scratch directory while the runner lives
        engine = engines[length]
        return engine.run([feeds[name] for name in engine.input_names])

    return run


def _link_external_data(model_dir: str, work_dir: str) -> None:
    """Link the export's other files into ``work_dir``: the shaped copies keep the graph's relative
    external-data locations (an export over 2 GB keeps its initializers in files beside model.onnx)."""
    for name in os.listdir(model_dir):
        link = os.path.join(work_dir, name)
        if name != "model.onnx" and not os.path.lexists(link):
            os.symlink(os.path.join(model_dir, name), link)


def pipeline_generate(model_dir: str, texts: list[str], new_tokens: int, sequence_length: int,
                      prompt_chunk: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Greedy generation through ``deepsparse.TextGeneration`` (its tokenizer, engines and KV cache)."""
    from deepsparse import TextGeneration

    pipeline = TextGeneration(model_path=model_dir, sequence_length=sequence_length,
                              prompt_sequence_length=prompt_chunk, internal_kv_cache=True)
    results = []
    for text in texts:
        out = pipeline(sequences=text, max_new_tokens=new_tokens, do_sample=False, output_scores=True)
        # deepsparse 1.8 returns one token more than max_new_tokens (the prompt's own prediction is not
        # counted): keep the first new_tokens. Greedy: each token is the argmax of its scores.
        scores = np.asarray(out.generations[0].score, dtype=np.float32)[:new_tokens]
        results.append((scores.argmax(-1).astype(np.int64), scores))
    return results


# What DeepSparse's pipeline (over)writes when it reshapes the graph: model.onnx, and model.data when the
# graph is too large for one protobuf.
_REWRITTEN = ("model.onnx", "model.data")


def _writable_view(model_dir: str, view: str) -> str:
    """A folder that reads as ``model_dir``: copies of the files DeepSparse's TextGeneration rewrites in
    place with static shapes (which would break the export for other lengths and for ONNX Runtime), links
    to the rest (the weights need not be copied)."""
    import shutil

    os.makedirs(view)
    for name in os.listdir(model_dir):
        source = os.path.join(os.path.abspath(model_dir), name)
        if name in _REWRITTEN:
            shutil.copyfile(source, os.path.join(view, name))
        else:
            os.symlink(source, os.path.join(view, name))
    return view


def main(argv: list[str]) -> int:
    engine, model_dir, request_path, result_path = argv
    request = np.load(request_path)
    prompts = [request[f"prompt_{i}"] for i in range(sum(k.startswith("prompt_") for k in request.files))]
    new_tokens, sequence_length = int(request["new_tokens"]), int(request["sequence_length"])
    chunk = int(request["chunk_length"])
    if engine == "pipeline":
        copy = _writable_view(model_dir, os.path.join(os.path.dirname(os.path.abspath(result_path)), "model"))
        outputs = pipeline_generate(copy, [str(p) for p in prompts], new_tokens, sequence_length, chunk)
    else:
        decoder = open_decoder(engine, model_dir, sequence_length, chunk,
                               work_dir=os.path.dirname(os.path.abspath(result_path)))
        outputs = [decoder.generate(prompt, new_tokens) for prompt in prompts]
    result = {}
    for i, (tokens, logits) in enumerate(outputs):
        result[f"tokens_{i}"], result[f"logits_{i}"] = tokens, logits
    np.savez(result_path, **result)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
