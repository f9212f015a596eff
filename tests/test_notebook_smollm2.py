"""The real-model notebook runs top to bottom on SmolLM2-135M-Instruct (two optimizer steps) and scores held-out
sums before training."""

import pytest
from helpers import execute_notebook


@pytest.mark.slow
def test_smollm2_notebook_executes(tmp_path, monkeypatch):
    printed = execute_notebook("smollm2_arithmetic.ipynb", tmp_path, monkeypatch, steps=2, timeout=900)
    assert (tmp_path / "outputs" / "smollm2" / "reward_curve.png").exists()
    assert "held-out correctness (step, value), before and during training: [(0," in printed
    assert printed.count(" -> ") == 3  # three held-out questions answered
