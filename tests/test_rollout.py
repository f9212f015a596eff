import pytest
import torch

from lightning_gspo.models import ModelConfig, load_causal_lm, load_tokenizer
from lightning_gspo.rollout import completion_mask, per_token_logps, prompt_text, tokenize_prompts

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


def test_logprobs_match_a_hand_computation(tiny_dir):
    # Independent reference: run the model on each full sequence without padding, take log_softmax of the
    # logits at the position before each completion token, divided by the temperature.
    torch.manual_seed(0)
    model = load_causal_lm(ModelConfig(name_or_path=str(tiny_dir))).eval()
    prompts = [torch.tensor([5, 13, 6, 16]), torch.tensor([7, 16])]
    completions = [torch.tensor([4, 5, EOS]), torch.tensor([8, EOS, PAD])]
    width = 4
    ids = torch.stack(
        [torch.cat([torch.full((width - len(p),), PAD), p, c]) for p, c in zip(prompts, completions)]
    )
    attn = torch.stack(
        [torch.cat([torch.zeros(width - len(p)), torch.ones(len(p) + 3)]) for p in prompts]
    ).long()
    cmask = torch.tensor([[1, 1, 1], [1, 1, 0]]).bool()
    attn[1, -1] = 0
    for impl in ("materialized", "fused"):
        logps, ent = per_token_logps(
            model, ids, attn, cmask, temperature=0.7, impl=impl, compute_entropy=True
        )
        for i, (p, c) in enumerate(zip(prompts, completions)):
            n = int(cmask[i].sum())
            seq = torch.cat([p, c[:n]]).unsqueeze(0)
            with torch.no_grad():
                logits = model(seq).logits[0, len(p) - 1 : -1].double() / 0.7
            ref = logits.log_softmax(-1).gather(-1, c[:n].unsqueeze(-1)).squeeze(-1)
            torch.testing.assert_close(logps[i, :n].double(), ref, rtol=1e-4, atol=1e-5)
            p_ = logits.softmax(-1)
            torch.testing.assert_close(ent[i, :n].double(), -(p_ * p_.log()).sum(-1), rtol=1e-4, atol=1e-5)
        assert logps[1, 2] == 0 and ent[1, 2] == 0  # padding is zero, not garbage
