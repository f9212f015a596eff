import json

import pytest
from helpers import algo

from lightning_gspo.data import PromptGroupDataModule
from lightning_gspo.tasks.arithmetic import make_dataset


def _batches(data):
    return list(data.train_dataloader())


def test_repeats_and_micro_batch_positions():
    cfg = algo(num_iterations=2)  # 8 x 2 = 16 completions = 4 prompts per generation batch, used 2 x 2 times
    data = PromptGroupDataModule(make_dataset(22), algorithm=cfg)
    with pytest.warns(UserWarning, match="2 of 22 prompts do not fill a generation batch"):
        data.setup("fit")
    batches = _batches(data)
    assert len(batches) == len(data.train_dataloader().dataset) == 5 * 4
    assert [b.repeat for b in batches[:4]] == [0, 1, 2, 3]
    assert all(b.records == batches[0].records for b in batches[:4])
    assert batches[4].records != batches[0].records and len(batches[0].records) == 4


def test_order_is_seeded_and_changes_per_epoch():
    def prompts(seed, epoch=0):
        data = PromptGroupDataModule(make_dataset(64), algorithm=algo(), seed=seed)
        data.setup("fit")
        data.current_epoch = lambda: epoch
        return [r["prompt"] for b in _batches(data) if b.repeat == 0 for r in b.records]

    assert prompts(1) == prompts(1)
    assert prompts(1) != prompts(2)
    assert prompts(1, epoch=0) != prompts(1, epoch=1)
    assert sorted(prompts(1)) == sorted(make_dataset(64)["prompt"])


def test_ranks_take_disjoint_prompts():
    per_rank = []
    for rank in range(2):
        data = PromptGroupDataModule({"prompt": [f"p{i}" for i in range(64)]}, algorithm=algo())
        data.rank, data.world_size = rank, 2
        data.setup("fit")
        per_rank.append([(b.index, r["prompt"]) for b in _batches(data) if b.repeat == 0 for r in b.records])
    prompts = [{p for _, p in rows} for rows in per_rank]
    assert len(per_rank[0]) == len(per_rank[1]) == 32  # 16 generation batches of 2 prompts per rank
    assert not prompts[0] & prompts[1]  # a prompt, and so its whole group, lives on one rank
    assert prompts[0] | prompts[1] == {f"p{i}" for i in range(64)}


def test_resume_after_skips_what_was_trained():
    data = PromptGroupDataModule(make_dataset(64), algorithm=algo(num_iterations=2))
    data.setup("fit")
    full = _batches(data)
    data.resume_after(0, 1, 3)  # the last micro-batch of generation batch 1 was done
    rest = _batches(data)
    assert [(b.index, b.repeat) for b in rest] == [(b.index, b.repeat) for b in full[8:]]
    data.resume_after(0, 2, 1)
    first = _batches(data)[0]
    assert (first.index, first.repeat) == (2, 2)


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_local_files_with_a_custom_prompt_column(tmp_path, fmt):
    rows = [{"question": f"{i}+1=", "answer": str((i + 1) % 10)} for i in range(16)]
    path = tmp_path / f"prompts.{fmt}"
    if fmt == "jsonl":
        path.write_text("\n".join(json.dumps(r) for r in rows))
    else:
        import datasets

        ds = datasets.Dataset.from_list(rows)
        ds.to_csv(str(path)) if fmt == "csv" else ds.to_parquet(str(path))
    data = PromptGroupDataModule(str(path), algorithm=algo(), prompt_column="question", shuffle=False)
    data.setup("fit")
    first = _batches(data)[0].records
    assert first[0]["prompt"] == "0+1=" and str(first[0]["answer"]) == "1"  # csv reads the answer as a number


def test_chat_prompts_get_the_system_prompt():
    rows = [{"prompt": [{"role": "user", "content": f"{i}+1?"}]} for i in range(8)]
    data = PromptGroupDataModule(rows, algorithm=algo(), system_prompt="Answer with a number.", shuffle=False)
    data.setup("fit")
    prompt = _batches(data)[0].records[0]["prompt"]
    assert prompt[0] == {"role": "system", "content": "Answer with a number."}
    assert prompt[1]["content"] == "0+1?"
