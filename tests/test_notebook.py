"""The quick-start notebook runs top to bottom (fewer steps than on a user's machine) and plots the reward."""

import pytest
from helpers import execute_notebook


@pytest.mark.slow
def test_quickstart_notebook_executes(tmp_path, monkeypatch):
    printed = execute_notebook("quickstart.ipynb", tmp_path, monkeypatch, steps=4)
    assert (tmp_path / "outputs" / "notebook" / "reward_curve.png").exists()
    assert "correctness, first and last logged" in printed
