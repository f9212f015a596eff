"""The vision demo's notebook runs top to bottom (a few steps of the demo and of its blank-picture control), draws
the held-out curve and shows the policy's answers to held-out pictures."""

import pytest
from helpers import execute_notebook


@pytest.mark.slow
def test_vlm_demo_notebook_executes(tmp_path, monkeypatch):
    printed = execute_notebook("tiny_vlm_demo.ipynb", tmp_path, monkeypatch, steps=4)
    assert (tmp_path / "outputs" / "vlm_demo" / "curve.png").exists()
    assert "held-out accuracy (step, value): [(0," in printed
    assert "the control, blank pictures: [(0," in printed
    assert printed.count("answers: [") == 1
