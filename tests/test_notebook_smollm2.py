"""The real-model notebook runs top to bottom on SmolLM2-135M-Instruct (two optimizer steps) and scores held-out
sums before training."""

from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "smollm2_arithmetic.ipynb"


@pytest.mark.slow
def test_smollm2_notebook_executes(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    monkeypatch.setenv("LIGHTNING_GSPO_NOTEBOOK_STEPS", "2")
    monkeypatch.setenv("PYTHONSAFEPATH", "1")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(
        nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    assert (tmp_path / "outputs" / "smollm2" / "reward_curve.png").exists()
    printed = "".join(
        o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
    )
    assert "held-out correctness (step, value), before and during training: [(0," in printed
    assert printed.count(" -> ") == 3  # three held-out questions answered
