"""The vision demo (``experiment=tiny_vlm_demo``) learns from the pictures: the same question for every row, so
held-out accuracy can climb from chance to >= 0.8 only through the images, and the control with every picture one
grey square stays at chance. The fast tests check that the task's pictures hold their answers and that the
held-out pictures are never trained on."""

import csv
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from lightning_gspo.rewards.answer import answer_length_reward, exact_answer_reward
from lightning_gspo.tasks.shapes import COLOURS, QUESTION, make_dataset, picture_split

ROOT = Path(__file__).resolve().parents[1]


def _pixels(row) -> np.ndarray:
    return np.asarray(row["image"].convert("RGB"), dtype=np.int32)


def _bytes(ds) -> list[bytes]:
    return [row["bytes"] for row in ds.with_format("arrow")["image"].to_pylist()]


# ---- the task ----
def test_pictures_are_seeded_balanced_and_the_held_out_ones_never_trained_on():
    train, val = make_dataset(512, seed=3), make_dataset(64, seed=3, split="validation")
    assert _bytes(train) == _bytes(make_dataset(512, seed=3))  # the same seed draws the same pictures
    assert _bytes(train) != _bytes(make_dataset(512, seed=4))
    assert not set(_bytes(train)) & set(_bytes(val))
    assert {picture_split(b) for b in _bytes(val)} == {"validation"}
    assert {picture_split(b) for b in _bytes(train)} == {"train"}
    counts = Counter(train["answer"])
    assert set(counts) == set(COLOURS) and min(counts.values()) > 512 / 4 * 0.75, counts
    # One question for every row: nothing but the picture tells the answer.
    assert {str(p) for p in train["prompt"]} == {str([{"role": "user", "content": QUESTION["colour"]}])}


def test_each_picture_shows_its_answer():
    colours = {k: np.array(v) for k, v in COLOURS.items()}
    for row in make_dataset(64, seed=1):
        px = _pixels(row).reshape(-1, 3)
        shape = px[np.ptp(px, axis=1) > 60]  # the background is grey: its channels are equal
        assert len(shape) > 50
        mean = shape.mean(0)
        assert min(colours, key=lambda k: np.abs(colours[k] - mean).sum()) == row["answer"]
    dark = {k: [] for k in COLOURS}
    for row in make_dataset(64, seed=1, kind="dots"):
        dark[row["answer"]].append(int((_pixels(row).sum(-1) < 100).sum()))
    areas = [np.mean(dark[k]) for k in sorted(dark)]
    per_dot = areas[0]
    assert all(abs(a / per_dot - n) < 0.05 * n for n, a in enumerate(areas, start=1)), (
        areas
    )  # dots never overlap


def test_blank_pictures_keep_the_rows_and_drop_the_answer():
    real, blank = make_dataset(32, seed=2), make_dataset(32, seed=2, blank=True)
    assert blank["answer"] == real["answer"] and blank["prompt"] == real["prompt"]
    assert len(set(_bytes(blank))) == 1


def test_bad_arguments_name_the_setting():
    with pytest.raises(ValueError, match="kind='shape' is not a shapes task"):
        make_dataset(4, kind="shape")
    with pytest.raises(ValueError, match="split='val' is not one of"):
        make_dataset(4, split="val")
    with pytest.raises(ValueError, match="size=20 >= 28"):
        make_dataset(4, size=20)


def test_the_rewards_pay_for_exactly_the_answer_and_for_stopping():
    texts = ["3", " 3 ", "33", "31", "4", "", "3x"]
    completions = [[{"role": "assistant", "content": t}] for t in texts]  # chat completions, as in training
    answer = ["3"] * len(texts)
    assert exact_answer_reward(None, completions, answer) == [1.0, 1.0, 0, 0, 0, 0, 0]
    assert answer_length_reward(None, texts, answer) == [1.0, 1.0, 0, 0, 1.0, 0, 0]  # plain text too


# ---- the demo, as a user runs it ----
def _held_out(tmp_path: Path, *overrides: str) -> list[tuple[int, float]]:
    """(step, greedy held-out accuracy) of ``python -m lightning_gspo.train experiment=tiny_vlm_demo``."""
    env = {**os.environ, "PYTHONSAFEPATH": "1", "LIGHTNING_GSPO_CACHE": str(tmp_path)}
    cmd = [sys.executable, "-m", "lightning_gspo.train", "experiment=tiny_vlm_demo", f"hydra.run.dir={tmp_path}",
           "trainer.enable_progress_bar=false", "callbacks=none", *overrides]  # fmt: skip
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, out.stderr[-3000:]
    with open(tmp_path / "csv" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    key = "eval/rewards/exact_answer_reward/mean"
    return [(int(r["step"]), float(r[key])) for r in rows if r.get(key)]


def _commonest_share() -> float:
    """What always giving the commonest held-out answer scores: the most a policy blind to the pictures can."""
    answers = make_dataset(128, split="validation")["answer"]
    return max(Counter(answers).values()) / len(answers)


@pytest.mark.slow
def test_the_demo_learns_the_colours_from_the_pictures(tmp_path):
    held_out = _held_out(tmp_path)
    assert [s for s, _ in held_out] == [0, 50, 100, 150, 200, 250, 300]  # before, during and after
    assert held_out[0][1] <= _commonest_share(), held_out  # the untrained model: no better than chance
    assert held_out[-1][1] >= 0.8, held_out
    assert (tmp_path / "reward_curve.png").exists()


@pytest.mark.slow
def test_with_blank_pictures_it_stays_at_chance(tmp_path):
    # 200 steps, where the demo is past 0.9 (four seeds: 0.97-0.98); evaluated at 100 and 200.
    overrides = [
        "data.source.blank=true",
        "algorithm.max_steps=200",
        "algorithm.eval_steps=100",
        "plot=false",
    ]
    held_out = _held_out(tmp_path, *overrides)
    assert [s for s, _ in held_out] == [0, 100, 200]
    # The same question and the same grey square in every row: greedy answers are all one, right a class's share.
    assert all(acc <= _commonest_share() for _, acc in held_out), held_out
