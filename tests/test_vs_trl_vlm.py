"""The VLM benchmark against TRL (benchmarks/vs_trl_vlm.py): TRL's processing class built without torchvision gives
the reference ids and pixel values, the data and rewards, and (slow) a short run of both trainers side by side."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.append(str(ROOT / "benchmarks"))  # last: its file names must not shadow anything

import vs_trl_vlm  # noqa: E402

from lightning_gspo.tiny_vlm import build_tiny_vlm  # noqa: E402


@pytest.fixture(scope="module")
def vlm_dir(tmp_path_factory):
    return str(build_tiny_vlm(tmp_path_factory.mktemp("vlm") / "model", vs_trl_vlm.VOCAB))


def test_trl_gets_the_reference_processing_without_torchvision(vlm_dir):
    from transformers import ProcessorMixin

    try:
        import torchvision  # noqa: F401
    except (ImportError, RuntimeError):  # not installed, or PyPI's CUDA build beside the CPU torch
        pass
    else:
        pytest.skip(
            "torchvision loads: TRL builds the model's own processor, the shim is for machines without it"
        )

    proc = vs_trl_vlm.image_only_processor(vlm_dir)
    # what GRPOTrainer checks before it calls the processor a VLM's
    assert isinstance(proc, ProcessorMixin) and not hasattr(proc, "video_processor")
    assert proc.tokenizer.padding_side == "left"
    # 224 x 224 pictures, resized to the tiny VLM's 112 x 112: 16 image tokens each
    assert "matches the reference on 4 prompts" in vs_trl_vlm.check_processor(vlm_dir)


def test_trl_inputs_freeze_the_vision_tower(vlm_dir):
    model, _ = vs_trl_vlm.trl_inputs(vlm_dir)
    tower = [p.requires_grad for n, p in model.named_parameters() if ".visual." in n]
    rest = [p.requires_grad for n, p in model.named_parameters() if ".visual." not in n]
    assert tower and not any(tower) and all(rest)


def test_dots_data_and_rewards():
    data = vs_trl_vlm.dots_dataset(6)
    assert data[0]["image"].size == (vs_trl_vlm.IMAGE_SIZE, vs_trl_vlm.IMAGE_SIZE)
    assert all(1 <= c <= 9 for c in data["count"])
    completions = [[{"role": "assistant", "content": t}] for t in ("3 dots", "x7", "12", "")]
    assert vs_trl_vlm.count_reward(completions, [3, 7, 1, 2]) == [1.0, 1.0, 0.0, 0.0]
    assert vs_trl_vlm.digit_reward(completions) == [1 / 6, 0.5, 1.0, 0.0]


@pytest.mark.slow
def test_short_run_reports_both_trainers_and_the_vision_tower(tmp_path):
    env = {**os.environ, "PYTHONSAFEPATH": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-P", str(ROOT / "benchmarks" / "vs_trl_vlm.py"), "--tiny", "--steps", "4",
           "--seeds", "1", "--models", str(tmp_path / "models"), "--out", str(tmp_path / "report.md")]  # fmt: skip
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    report = (tmp_path / "report.md").read_text()
    for row in ("| completions/s |", "| old log-probs (no grad) |", "| backward |", "| images encoded per"):
        assert row in report
    # TRL sends each prompt's image through the tower once per completion: G = 8 copies per prompt, in each of
    # generation, old log-probs and (twice, num_iterations = 2) the policy forward: 4 prompts x 8 x 4 / 2 steps
    images = next(line for line in report.splitlines() if line.startswith("| images encoded per"))
    assert float(images.split("|")[3].replace(",", "")) == 64.0
