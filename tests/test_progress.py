"""The progress bar counts optimizer steps out of max_steps, and shows the reward."""

import re

import pytest
from helpers import module_and_data, trainer
from test_conf import _compose

from lightning_gspo.progress import StepProgressBar
from lightning_gspo.train import build


def _last_frame(out: str) -> str:
    return re.split(r"[\r\n]", out.strip())[-1]


@pytest.mark.parametrize("accumulation", [1, 2])
def test_the_bar_counts_optimizer_steps_with_the_reward(tiny_dir, tmp_path, capsys, accumulation):
    module, data = module_and_data(tiny_dir, gradient_accumulation_steps=accumulation, steps_per_generation=2)
    fit = trainer(tmp_path, max_steps=2, enable_progress_bar=True, callbacks=[StepProgressBar()])
    fit.fit(module, datamodule=data)
    assert fit.global_step == 2 and fit.fit_loop.epoch_loop.batch_progress.total.completed == 2 * accumulation
    out = capsys.readouterr().out  # Lightning's bars write to stdout
    frame = _last_frame(out)
    assert re.search(r"step: 100%.* 2/2 \[.*reward=", frame), frame
    assert "Epoch" not in out and "/-" not in out and "4/2" not in out


def test_the_cli_shows_the_step_bar_unless_the_trainer_shows_none(tmp_path):
    cfg = _compose(tmp_path, "logger=none")
    bars = [c for c in build(cfg)[2].callbacks if "ProgressBar" in type(c).__name__]
    assert [type(b) for b in bars] == [StepProgressBar]
    cfg = _compose(tmp_path, "logger=none", "callbacks=none")  # no callbacks configured: the bar all the same
    assert any(isinstance(c, StepProgressBar) for c in build(cfg)[2].callbacks)
    cfg = _compose(
        tmp_path, "logger=none", "trainer.enable_progress_bar=false"
    )  # would be an error otherwise
    assert not [c for c in build(cfg)[2].callbacks if "ProgressBar" in type(c).__name__]
