"""Image prompts from files, as ``data=files`` reads them: a parquet file and a ``save_to_disk`` directory whose image
column is a ``datasets`` Image feature, and a jsonl file of image paths; each trains a step on the tiny Qwen2.5-VL
with the pictures it names (the rollout's pixels equal the processor's on the pictures themselves)."""

import json

import numpy as np
import pytest
import torch
from helpers import trainer
from pictures import odd_digits
from PIL import Image

from lightning_gspo.config import GSPOConfig
from lightning_gspo.data import PromptGroupDataModule
from lightning_gspo.models import ModelConfig
from lightning_gspo.module import GSPOModule


def picture(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (28 + 14 * (seed % 3), 56, 3), dtype=np.uint8))


PROMPT = [{"role": "user", "content": "How many dots?"}]


def write_source(kind: str, tmp_path):
    """The same four rows (one picture each) in the file layout ``kind``."""
    import datasets

    paths = []
    for i in range(4):
        paths.append(str(tmp_path / f"p{i}.png"))
        picture(i).save(paths[-1])
    if kind == "jsonl":
        source = tmp_path / "rows.jsonl"
        source.write_text("\n".join(json.dumps({"prompt": PROMPT, "image": p}) for p in paths))
        return str(source)
    ds = datasets.Dataset.from_dict({"prompt": [PROMPT] * 4, "image": paths}).cast_column(
        "image", datasets.Image()
    )
    if kind == "parquet":
        ds.to_parquet(str(tmp_path / "rows.parquet"))
        return str(tmp_path / "rows.parquet")
    ds.save_to_disk(str(tmp_path / "saved"))
    return str(tmp_path / "saved")


@pytest.mark.parametrize("kind", ["parquet", "saved", "jsonl"])
def test_image_prompts_from_files_train(kind, tmp_path):
    cfg = GSPOConfig(num_generations=2, per_device_train_batch_size=4, max_completion_length=3,
                     learning_rate=1e-2, logging_steps=1, seed=1)  # fmt: skip
    model = ModelConfig(name_or_path="tiny-vlm:digits", tiny_dir=str(tmp_path / "tiny"))
    module = GSPOModule(model.to_dict(), [odd_digits], cfg)
    data = PromptGroupDataModule(write_source(kind, tmp_path), algorithm=cfg, shuffle=False)
    trainer(tmp_path / "run", max_steps=1).fit(module, datamodule=data)
    rollout, proc = module.state.rollout, module.tokenizer
    # Pictures 0 and 1 (shuffle off) make the first generation batch, 2 completions each: each row's pixels are
    # its own picture's.
    assert rollout is not None and rollout.images is not None and len(rollout.images) == 4
    for row, picture_index in ((0, 0), (2, 1)):
        _, expected, grid = proc.encode(proc.image_token, [picture(picture_index)])
        got = rollout.images.rows([row]).model_inputs(rollout.prompt_ids[[row]])
        assert torch.equal(got["image_grid_thw"], grid)
        torch.testing.assert_close(got["pixel_values"], expected, rtol=0, atol=0)
