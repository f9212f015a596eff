import pytest
import torch

from lightning_gspo.models import ModelConfig, load_tokenizer
from lightning_gspo.rollout import completion_mask, prompt_text, tokenize_prompts

EOS, PAD = 1, 0


@pytest.mark.parametrize(
    "ids, mask, truncated",
    [
        ([5, 6, EOS, 7], [1, 1, 1, 0], False),  # EOS inside: kept; after it: out
        ([5, EOS, EOS, EOS], [1, 1, 0, 0], False),  # pad == eos: only the first EOS counts
        ([5, 6, 7, 8], [1, 1, 1, 1], True),  # no EOS: truncated, every token scored
        ([EOS, PAD, PAD, PAD], [1, 0, 0, 0], False),  # empty completion: the stop decision alone
        ([5, EOS, 9, EOS], [1, 1, 0, 0], False),  # tokens after EOS never count, even a second EOS
    ],
)
def test_completion_mask(ids, mask, truncated):
    m, t = completion_mask(torch.tensor([ids]), [EOS])
    assert m.tolist() == [[bool(x) for x in mask]]
    assert t.tolist() == [truncated]


def test_completion_mask_several_eos_ids():
    m, t = completion_mask(torch.tensor([[5, 9, 6], [5, 6, 7]]), [9, 7])
    assert m.tolist() == [[True, True, False], [True, True, True]]
    assert t.tolist() == [False, False]


def test_prompts_truncated_from_the_left_and_counted(tiny_dir):
    tok = load_tokenizer(ModelConfig(name_or_path=str(tiny_dir)))
    ids, mask, cut = tokenize_prompts(["1+2=", "11+22="], tok, max_prompt_length=5)
    assert cut == 1
    assert tok.decode(ids[1][mask[1].bool()]) == "1+22="  # the beginning went, the end stayed
    assert mask.tolist()[0] == [0, 1, 1, 1, 1]  # left padding
    assert ids[0, 0].item() == tok.pad_token_id


def test_chat_prompts_use_the_template(tiny_ascii_dir):
    tok = load_tokenizer(ModelConfig(name_or_path=str(tiny_ascii_dir)))
    text = prompt_text([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}], tok)
    assert text == "Be brief.\nQ: 2+2?\nA: "
    assert prompt_text("plain", tok) == "plain"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text and len(ids) == len(text)  # one token per character


# ---- chat templates for models without one ----

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]


def test_chat_prompts_without_a_template_name_the_setting(tiny_dir):
    tok = load_tokenizer(ModelConfig(name_or_path=str(tiny_dir)))  # the digits tokenizer has no template
    with pytest.raises(ValueError, match=r"no chat_template.*model.chat_template.*'chatml'"):
        prompt_text(CHAT, tok)


def test_a_named_chat_template_is_set_on_the_tokenizer(tiny_dir):
    tok = load_tokenizer(ModelConfig(name_or_path=str(tiny_dir), chat_template="chatml"))
    assert prompt_text(CHAT, tok) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"
    )
    gemma = load_tokenizer(ModelConfig(name_or_path=str(tiny_dir), chat_template="gemma"))
    assert (
        prompt_text(CHAT, gemma)
        == "<bos><start_of_turn>user\nBe brief.\n\n2+2?<end_of_turn>\n<start_of_turn>model\n"
    )


def test_a_jinja_chat_template_replaces_the_models_own(tiny_ascii_dir):
    template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }} {% endfor %}=> "
    tok = load_tokenizer(ModelConfig(name_or_path=str(tiny_ascii_dir), chat_template=template))
    assert prompt_text(CHAT, tok) == "[system] Be brief. [user] 2+2? => "


@pytest.mark.parametrize(
    "value, message",
    [
        ("chatlm", r"model.chat_template='chatlm' is neither a named template \('chatml', 'gemma'\)"),
        ("{% for m in messages %}", r"model.chat_template is not a valid Jinja template"),
        (3, r"model.chat_template must be a string"),
    ],
)
def test_a_bad_chat_template_is_refused_at_construction(value, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(chat_template=value)


# ---- BOS for models that expect it ----


def _rows(ids, mask):
    return [row[m.bool()].tolist() for row, m in zip(ids, mask)]


def test_plain_prompts_get_exactly_one_bos_when_the_tokenizer_adds_it():
    from lightning_gspo.tiny import build_char_tokenizer

    tok = build_char_tokenizer("digits", add_bos=True)
    bos, plain = tok.bos_token_id, build_char_tokenizer("digits")
    rows = _rows(*tokenize_prompts(["1+2=", "11+22="], tok, max_prompt_length=None)[:2])
    assert rows == [[bos, *plain("1+2=")["input_ids"]], [bos, *plain("11+22=")["input_ids"]]]
    # Cut from the left, the BOS stays first: BOS + the last four characters make five tokens.
    ids, mask, cut = tokenize_prompts(["1+2=", "11+22="], tok, max_prompt_length=5)
    assert cut == 1 and _rows(ids, mask)[1] == [bos, *plain("+22=")["input_ids"]]
    assert _rows(ids, mask)[0] == [bos, *plain("1+2=")["input_ids"]]
    # A tokenizer that adds no BOS (Qwen's, the tiny model's) is left as it was.
    assert _rows(*tokenize_prompts(["1+2="], plain, None)[:2]) == [plain("1+2=")["input_ids"]]


def test_a_chat_template_that_writes_bos_gets_no_second_one():
    from lightning_gspo.tiny import build_char_tokenizer

    tok = build_char_tokenizer("ascii", add_bos=True)
    bos = tok.bos_token_id
    messages = [{"role": "user", "content": "2+2?"}]
    own = tokenize_prompts([prompt_text(messages, tok)], tok, None)[0][0].tolist()  # the template has no BOS
    tok.chat_template = "{{ bos_token }}" + tok.chat_template
    text = prompt_text(messages, tok)
    assert text.startswith("<bos>Q: ")
    written = tokenize_prompts([text], tok, max_prompt_length=4)[0][0].tolist()
    assert own[0] == bos and own.count(bos) == 1
    assert written == [bos, *tok("A: ", add_special_tokens=False)["input_ids"]]  # kept through the cut too


def test_the_tiny_model_can_expect_bos_like_llama(tmp_path):
    from lightning_gspo.rollout import leading_bos

    small = {"num_hidden_layers": 1, "hidden_size": 32, "intermediate_size": 64}
    cfg = ModelConfig(name_or_path="tiny:digits", tiny_dir=str(tmp_path), tiny={**small, "add_bos": True})
    tok = load_tokenizer(cfg)  # written to a directory and read back through AutoTokenizer
    assert leading_bos(tok) == tok.bos_token_id is not None
    assert (
        leading_bos(
            load_tokenizer(ModelConfig(name_or_path="tiny:digits", tiny_dir=str(tmp_path / "b"), tiny=small))
        )
        is None
    )
