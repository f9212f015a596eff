"""The LoRA math notebook runs top to bottom on the CPU (a few steps), exports and reloads the model."""

from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "gspo_lora_math.ipynb"


@pytest.mark.slow
def test_lora_math_notebook_executes(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    monkeypatch.setenv("LIGHTNING_GSPO_NOTEBOOK_STEPS", "2")
    monkeypatch.setenv("PYTHONSAFEPATH", "1")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    out = tmp_path / "outputs" / "notebook_lora"
    assert (out / "reward_curve.png").exists()
    assert (out / "export" / "adapter" / "adapter_config.json").exists()
    assert (out / "export" / "merged" / "config.json").exists()
    printed = "".join(
        o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
    )
    assert "reward, first and last logged" in printed
    gap = float(printed.split("merged model against the trained policy: ")[1].split()[0])
    assert gap < 1e-4  # LoRA on the CPU: the merged model is the adapted policy
