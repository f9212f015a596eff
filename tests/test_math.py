"""The math task: GSM8K-style data, chat-template prompts, answer extraction and the math rewards."""

import json
import sys
from fractions import Fraction
from importlib.resources import files

import lightning as L
import pytest
from helpers import algo, logged, trainer
from omegaconf import OmegaConf

from lightning_gspo.data import PromptGroupDataModule
from lightning_gspo.module import GSPOModule
from lightning_gspo.rewards import math as math_rewards
from lightning_gspo.rewards.math import (
    answers_match,
    correctness_reward,
    extract_answer,
    format_reward,
    parse_number,
    tag_count_reward,
)
from lightning_gspo.rollout import prompt_text, tokenize_prompts
from lightning_gspo.tasks import gsm8k
from lightning_gspo.tiny import SPECIAL, VOCABS, build_char_tokenizer

# ---- numbers and answers ----

PLAIN = [  # (written answer, gold, expected)
    ("1,250", "1250", True),
    ("1250", "1,250", True),
    ("1,234,567.5", "1234567.5", True),
    ("-3", "-3", True),
    ("- 3", "-3", True),
    ("3", "-3", False),
    ("18.50", "18.5", True),
    ("0.1", "0.10", True),
    (".5", "0.5", True),
    ("$12", "12", True),
    ("-$5", "-5", True),
    ("$-5", "-5", True),
    ("7.", "7", True),
    ("20%", "20", True),
    ("+4", "4", True),
    ("12", "12.01", False),
    ("12.3.4", "12.3", False),  # malformed
    ("1,23", "123", False),  # a comma that is not a thousands separator
    ("--5", "5", False),
    ("5-", "5", False),
    ("", "0", False),
    ("12 13", "13", False),
    ("12; 13", "13", False),  # several answers
    ("12 or 13", "13", False),
    ("twelve", "12", False),
]


@pytest.mark.parametrize("written, gold, expected", PLAIN)
def test_answers_are_compared_as_numbers(written, gold, expected):
    assert answers_match(written, gold) is expected


@pytest.mark.parametrize("written, gold, expected", PLAIN)
def test_the_same_without_math_verify(written, gold, expected, monkeypatch):
    monkeypatch.setitem(sys.modules, "math_verify", None)  # as when it is not installed
    assert answers_match(written, gold) is expected


def test_parse_number_is_exact():
    assert parse_number("0.1") + parse_number("0.2") == parse_number("0.3")
    assert parse_number("-1,000.25") == Fraction(-4001, 4)
    assert parse_number(42) == 42 and parse_number(2.5) == Fraction(5, 2)
    assert parse_number("1e5") is None and parse_number("$") is None and parse_number("-") is None


def test_fractions_and_latex_need_math_verify(monkeypatch):
    monkeypatch.setitem(sys.modules, "math_verify", None)
    assert answers_match("3/4", "0.75") is False
    assert answers_match(r"\frac{3}{4}", "0.75") is False


def test_fractions_and_latex_with_math_verify():
    pytest.importorskip("math_verify")
    assert answers_match("3/4", "0.75") is True
    assert answers_match(r"\frac{3}{4}", "0.75") is True
    assert answers_match(r"\boxed{18}", "18") is True
    assert answers_match("3/4", "0.8") is False


def test_extract_answer_takes_the_last_answer_block():
    assert extract_answer("<reasoning>2+2</reasoning>\n<answer>\n 4 \n</answer>") == "4"
    assert extract_answer("<answer>3</answer> no, <answer>4</answer>") == "4"
    assert extract_answer([{"role": "assistant", "content": "<answer>7</answer>"}]) == "7"
    assert extract_answer("the answer is 4") is None
    assert extract_answer("<answer>4") is None


def test_correctness_reward():
    completions = [
        "<reasoning>7*18=126, 126-95=31</reasoning>\n<answer>31</answer>",
        "<reasoning>...</reasoning><answer>$1,250.</answer>",
        [{"role": "assistant", "content": "<answer>-3</answer>"}],
        "31",  # no answer block: 0, even though the number is right
        "<answer>30</answer>",
        "<answer>31.0.0</answer>",  # malformed
        "<answer></answer>",
    ]
    gold = ["31", "1250", "-3", "31", "31", "31", "31"]
    assert correctness_reward([""] * 7, completions, gold) == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0]


def test_correctness_reward_leaves_out_a_gold_answer_that_is_not_a_number():
    with pytest.warns(UserWarning, match="gold answer 'n/a' is not a number"):
        assert correctness_reward(["q"], ["<answer>5</answer>"], ["n/a"]) == [None]


def test_format_rewards():
    good = "<reasoning>\n7*18 = 126\n</reasoning>\n<answer>\n31\n</answer>\n"
    cases = [
        (good, 1.0, 1.0),
        ("<reasoning>x</reasoning><answer>31</answer>", 1.0, 1.0),
        ("<answer>31</answer><reasoning>x</reasoning>", 0.0, 1.0),  # wrong order
        ("<reasoning></reasoning><answer>31</answer>", 0.0, 1.0),  # empty reasoning
        ("Sure! " + good, 0.0, 1.0),  # text outside the tags
        ("<reasoning>x</reasoning>", 0.0, 0.5),
        ("<answer>1</answer><answer>2</answer>", 0.0, 0.0),
        ("31", 0.0, 0.0),
    ]
    completions = [c for c, _, _ in cases]
    assert format_reward(None, completions) == [f for _, f, _ in cases]
    assert tag_count_reward(None, completions) == [t for _, _, t in cases]


# ---- the GSM8K data ----


def test_extract_hash_answer():
    assert gsm8k.extract_hash_answer("He has 3*4=<<3*4=12>>12.\n#### 12") == "12"
    assert gsm8k.extract_hash_answer("...\n#### 1,250") == "1250"
    assert gsm8k.extract_hash_answer("...\n####  -7.5 ") == "-7.5"
    assert gsm8k.extract_hash_answer("...\n#### $18.") == "18"
    assert gsm8k.extract_hash_answer("no final line") is None
    assert gsm8k.extract_hash_answer("#### eighteen") is None


def test_the_packaged_sample_is_well_formed():
    rows = [json.loads(line) for line in gsm8k.sample_path().read_text().splitlines()]
    assert len(rows) == 50 and len({r["question"] for r in rows}) == 50
    ds = gsm8k.make_dataset()
    assert len(ds) == 50 and set(ds.column_names) == {"prompt", "answer", "question"}
    assert all(parse_number(a) is not None for a in ds["answer"])
    assert {"-3", "18.5", "27500"} <= set(ds["answer"])  # signs, decimals, thousands separators dropped
    first = ds[0]["prompt"]
    assert [m["role"] for m in first] == ["system", "user"]
    assert first[0]["content"] == gsm8k.SYSTEM_PROMPT and "<answer>" in first[0]["content"]
    assert [m["role"] for m in gsm8k.make_dataset(system_prompt=None)[0]["prompt"]] == ["user"]


def test_malformed_rows_are_dropped_with_a_warning(tmp_path):
    rows = [
        {"q": "How many?", "a": "2+2=4\n#### 4"},
        {"q": "And now?", "a": "no final answer"},
        {"q": "", "a": "#### 3"},
        {"q": "Cost?", "a": "#### 1,200"},
    ]
    path = tmp_path / "mini.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.warns(UserWarning, match=r"2 of 4 GSM8K rows .* were dropped \(row indices \[1, 2\]\)"):
        ds = gsm8k.make_dataset(path, question_column="q", answer_column="a")
    assert ds["answer"] == ["4", "1200"]
    with pytest.raises(ValueError, match="has no column 'question'"):
        gsm8k.make_dataset(path)
    with pytest.raises(FileNotFoundError, match="'missing.jsonl' does not exist"):
        gsm8k.make_dataset("missing.jsonl")
    parquet = tmp_path / "mini.parquet"
    ds.rename_columns({"question": "q"}).remove_columns("prompt").map(
        lambda r: {"a": f"#### {r['answer']}"}
    ).to_parquet(parquet)
    assert gsm8k.make_dataset(parquet, question_column="q", answer_column="a")["answer"] == ["4", "1200"]


def test_hydra_configs_match_the_code():
    conf = files("lightning_gspo.conf")
    data = OmegaConf.create(conf.joinpath("data", "gsm8k.yaml").read_text())
    assert data.source.system_prompt == gsm8k.SYSTEM_PROMPT
    reward = OmegaConf.create(conf.joinpath("reward", "math.yaml").read_text())
    assert list(reward.funcs) == [
        "lightning_gspo.rewards.math.correctness_reward",
        "lightning_gspo.rewards.math.format_reward",
    ]


# ---- chat templates ----


def _char_ids(text: str) -> list[int]:
    """Ids of the tiny character tokenizer, worked out from its alphabet, not by the tokenizer."""
    return [len(SPECIAL) + VOCABS["ascii"].index(c) for c in text]


def test_chat_prompts_go_through_the_template_with_the_generation_prompt(tiny_ascii_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_ascii_dir)
    messages = gsm8k.chat_prompt("What is 2+3?", system_prompt="Be brief.")
    text = prompt_text(messages, tok)
    assert text == "Be brief.\nQ: What is 2+3?\nA: "  # the template's layout, ending in the generation prompt
    ids, mask, cut = tokenize_prompts([text, "Q: 1+1?\nA: "], tok, max_prompt_length=None)
    assert ids[0].tolist() == _char_ids(text) and cut == 0
    assert mask[1].tolist() == [0] * (len(text) - 11) + [1] * 11  # left-padded
    assert ids[1, -11:].tolist() == _char_ids("Q: 1+1?\nA: ")
    assert prompt_text("plain text", tok) == "plain text"
    with pytest.raises(ValueError, match="no chat_template"):
        prompt_text(messages, build_char_tokenizer("digits"))


def test_the_data_module_adds_the_system_prompt(tiny_ascii_dir):
    rows = [
        {"prompt": [{"role": "user", "content": f"What is {i}+1?"}], "answer": str(i + 1)} for i in range(8)
    ]
    rows[0]["prompt"] = [{"role": "system", "content": "Own system."}, *rows[0]["prompt"]]
    dm = PromptGroupDataModule(rows, algorithm=algo(), system_prompt="Be brief.", shuffle=False)
    dm.setup("fit")
    prompts = dm.dataset["prompt"]
    assert prompts[0][0] == {"role": "system", "content": "Own system."}  # an existing one is kept
    assert all(p[0] == {"role": "system", "content": "Be brief."} and len(p) == 2 for p in prompts[1:])


# ---- a GSPO run on the task ----


def test_gspo_with_lora_runs_on_the_math_task(tiny_ascii_dir, tmp_path):
    L.seed_everything(0)
    cfg = algo(max_prompt_length=512, max_completion_length=8, per_device_train_batch_size=8, num_iterations=2,
               reward_weights=[1.0, 0.5, 0.5], importance_sampling_level="sequence", loss_type="grpo")  # fmt: skip
    rewards = [
        f"lightning_gspo.rewards.math.{f}"
        for f in ("correctness_reward", "format_reward", "tag_count_reward")
    ]
    module = GSPOModule({"name_or_path": str(tiny_ascii_dir), "lora": {"r": 4, "alpha": 8}}, rewards, cfg)
    data = PromptGroupDataModule(gsm8k.make_dataset(max_samples=8), algorithm=cfg)
    seen = []
    real = math_rewards.correctness_reward
    module.reward_funcs[0] = lambda prompts, completions, answer, **kw: (
        seen.append(prompts[0]) or real(prompts, completions, answer, **kw)
    )
    trainer(tmp_path, max_steps=4).fit(module, datamodule=data)
    assert seen and seen[0][0]["role"] == "system"  # rewards see the chat messages, as in TRL
    rows = [r for r in logged(tmp_path) if r.get("rewards/correctness_reward/mean")]
    assert rows and all(float(r["completions/mean_length"]) > 0 for r in rows)
    # From random weights hardly any completion earns a reward yet; what this checks is the path: chat prompts
    # through the template, generation, scoring against the answer column, logging.
    assert all(0.0 <= float(r["rewards/correctness_reward/mean"]) <= 1.0 for r in rows)


def test_the_math_verify_extra_is_spelled_as_math_verify_declares_it():
    """Extras are matched by their normalised name only by newer installers; older ones drop an extra spelled
    otherwise, and with it the ANTLR runtime Hydra needs."""
    import re
    from importlib.metadata import metadata
    from pathlib import Path

    tomllib = pytest.importorskip("tomllib")
    declared = set(metadata("math-verify").get_all("Provides-Extra"))
    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
    specs = [
        s for group in project["optional-dependencies"].values() for s in group if s.startswith("math-verify")
    ]
    assert len(specs) == 2
    for spec in specs:
        (extra,) = re.fullmatch(r"math-verify\[([^\]]+)\].*", spec).groups()
        assert extra in declared, (spec, sorted(declared))
