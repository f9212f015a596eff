"""The LoRA math notebook runs top to bottom on the CPU (a few steps), exports and reloads the model."""

import pytest
from helpers import execute_notebook


@pytest.mark.slow
def test_lora_math_notebook_executes(tmp_path, monkeypatch):
    printed = execute_notebook("gspo_lora_math.ipynb", tmp_path, monkeypatch, steps=2)
    out = tmp_path / "outputs" / "notebook_lora"
    assert (out / "reward_curve.png").exists()
    assert (out / "export" / "adapter" / "adapter_config.json").exists()
    assert (out / "export" / "merged" / "config.json").exists()
    assert "reward, first and last logged" in printed
    gap = float(printed.split("merged model against the trained policy: ")[1].split()[0])
    assert gap < 1e-4  # LoRA on the CPU: the merged model is the adapted policy
