"""Dynamic sampling (DAPO): flat groups give way to newly drawn prompts' groups, exactly as many as needed, within
the cap on extra rounds, resumably and in step across DDP ranks."""

from __future__ import annotations

import warnings

import lightning as L
import pytest
import torch
from helpers import algo, logged, trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_gspo.config import GSPOConfig
from lightning_gspo.data import PromptGroupDataModule
from lightning_gspo.dynamic_sampling import DynamicSampler, flat_groups
from lightning_gspo.module import GSPOModule
from lightning_gspo.rollout import Rollout
from lightning_gspo.tasks.arithmetic import make_dataset

G = 4
PAD = 0


# ---- a scripted world: a record's "flat" field decides whether its group's rewards are all equal ----
def fake_sample_and_score(records):
    """A rollout whose widths depend on the batch (so joining parts must pad), rows tagged by record id, and
    scores that are flat for records marked flat."""
    n = len(records) * G
    p = 2 + max(r["id"] % 3 for r in records)  # prompt widths differ between parts
    c = 3 + len(records) % 2
    ids = torch.tensor([r["id"] for r in records for _ in range(G)])
    lengths = 2 + ids % 3  # each prompt left-padded to its part's widest
    prompt_mask = (torch.arange(p)[None, :] >= p - lengths[:, None]).long()
    prompt_ids = torch.where(prompt_mask.bool(), ids[:, None] + 100, PAD)
    completion_ids = ids[:, None].repeat(1, c) + 1000 + torch.arange(n)[:, None] % G
    rollout = Rollout(
        prompt_ids,
        prompt_mask,
        completion_ids,
        torch.ones(n, c, dtype=torch.bool),
        torch.zeros(n, dtype=torch.bool),
        texts={"prompts": [r["id"] for r in records for _ in range(G)], "completions": list(range(n))},
    )
    scores = [[1.0] if r["flat"] else [float(t % 2)] for r in records for t in range(G)]
    return rollout, torch.tensor(scores)


class Stream:
    """Extra prompts in a fixed order; records how many each draw asked for."""

    def __init__(self, flats: list[bool], first_id: int = 100):
        self.records = [{"id": first_id + i, "flat": f} for i, f in enumerate(flats)]
        self.asked: list[int] = []

    def draw(self, count):
        start = sum(self.asked)
        self.asked.append(count)
        return self.records[start : start + count]


def _batch(flats):
    records = [{"id": i, "flat": f} for i, f in enumerate(flats)]
    return (*fake_sample_and_score(records), records)


def test_flat_groups_use_the_weighted_reward_and_count_unscored_groups_as_flat():
    nan = float("nan")
    scores = torch.tensor(
        [[1, 0], [0, 1], [1, 1], [1, 1], [1, nan], [nan, nan], [2, 0], [0, 1]], dtype=torch.float32
    )  # G=2: rewards weighted [1, 1] -> (1, 1) flat; (2, 2) flat; (1, -) one scored: flat; (2, 1) not flat
    assert flat_groups(scores, 2, None) == [True, True, True, False]
    assert flat_groups(scores, 2, [2.0, 1.0]) == [False, True, True, False]  # weighted: (2, 1) varies


def test_k_flat_groups_draw_exactly_the_prompts_needed():
    rollout, scores, _ = _batch([False, True, False, True, True])
    stream = Stream([False, True, False, False, True])
    out, out_scores, stats = DynamicSampler(G, None, 4, PAD).refill(
        rollout, scores, fake_sample_and_score, stream.draw
    )
    # Round 1 draws 3 for slots 1, 3, 4: ids 100 (informative), 101 (flat), 102 (informative) fill 1 and 3.
    # Round 2 draws the 1 still needed: 103 (informative) fills slot 4.
    assert stream.asked == [3, 1]
    assert (stats.rounds, stats.drawn, stats.new_flat, stats.left) == (2, 4, 1, 0)
    group_ids = out.prompt_ids[:, -1].view(-1, G)[:, 0] - 100
    assert group_ids.tolist() == [0, 100, 2, 102, 103]
    assert flat_groups(out_scores, G, None) == [False] * 5
    m = stats.metrics()
    assert m["dynamic_sampling/prompts_drawn"] == 4 and m["dynamic_sampling/groups_dropped"] == 4
    assert m["dynamic_sampling/first_round_zero_std"] == pytest.approx(3 / 5)
    # Each row came whole from its source, padded: prompts on the left, completions on the right.
    for slot, rid in enumerate(group_ids.tolist()):
        rows = slice(slot * G, (slot + 1) * G)
        width = 2 + rid % 3
        assert out.prompt_mask[rows].sum(1).tolist() == [width] * G
        assert (out.prompt_ids[rows][:, -width:] == rid + 100).all()
        assert (out.prompt_ids[rows][:, :-width] == PAD).all()
        assert out.texts["prompts"][rows] == [rid] * G
        c = out.completion_mask[rows].sum(1)
        assert (out.completion_ids[rows, 0] == rid + 1000 + torch.arange(G)).all()
        assert (out.completion_ids[rows][:, c[0] :] == PAD).all()


def test_no_flat_group_draws_nothing():
    rollout, scores, _ = _batch([False, False])
    stream = Stream([False])
    out, out_scores, stats = DynamicSampler(G, None, 4, PAD).refill(
        rollout, scores, fake_sample_and_score, stream.draw
    )
    assert out is rollout and out_scores is scores and stream.asked == [] and stats.rounds == 0


def test_the_cap_on_extra_rounds_is_honoured_and_said_once():
    sampler = DynamicSampler(G, None, 3, PAD)
    rollout, scores, _ = _batch([True, False, True])
    stream = Stream([True] * 20)
    with pytest.warns(UserWarning, match="dynamic_sampling_max_rounds=3 extra rounds and 2 of 3 groups"):
        out, out_scores, stats = sampler.refill(rollout, scores, fake_sample_and_score, stream.draw)
    assert stream.asked == [2, 2, 2] and (stats.rounds, stats.left) == (3, 2)
    assert stats.metrics()["dynamic_sampling/groups_left"] == 2
    assert stats.metrics()["dynamic_sampling/groups_dropped"] == 6  # the six drawn, all flat
    assert torch.equal(out.prompt_ids[:, -1], rollout.prompt_ids[:, -1])  # the flat originals stay
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sampler.refill(rollout, scores, fake_sample_and_score, Stream([True] * 20).draw)


def test_a_full_rank_sits_out_rounds_others_still_need():
    rollout, scores, _ = _batch([False, False])
    stream, asked = Stream([False]), []

    def others_short(n):  # another rank keeps needing groups for two rounds
        asked.append(n)
        return len(asked) <= 2

    _, _, stats = DynamicSampler(G, None, 5, PAD).refill(
        rollout, scores, fake_sample_and_score, stream.draw, others_short
    )
    assert stats.rounds == 2 and stream.asked == [] and asked == [0, 0, 0]


# ---- the data module's extra-prompt stream ----
def _dm(n=40, world=1, rank=0, seed=5):
    cfg = algo()
    dm = PromptGroupDataModule(
        [{"prompt": f"p{i}", "answer": str(i)} for i in range(n)], algorithm=cfg, seed=seed
    )
    dm.setup("fit")
    dm.rank, dm.world_size = rank, world
    return dm


def test_extra_prompts_are_a_pure_function_of_the_position():
    dm = _dm()
    whole = [r["prompt"] for r in dm.extra_prompts(0, 95)]
    assert [r["prompt"] for r in dm.extra_prompts(0, 30) + dm.extra_prompts(30, 65)] == whole
    assert sorted(whole[:40]) == sorted(f"p{i}" for i in range(40))  # one cycle: every prompt once
    assert whole[:40] != whole[40:80]  # the next cycle reshuffles
    assert whole[:40] != [f"p{i}" for i in range(40)]
    assert [r["prompt"] for r in _dm(seed=6).extra_prompts(0, 40)] != whole[:40]


def test_ranks_draw_different_extra_prompts():
    a = [r["prompt"] for r in _dm(world=2, rank=0).extra_prompts(0, 20)]
    b = [r["prompt"] for r in _dm(world=2, rank=1).extra_prompts(0, 20)]
    assert not set(a) & set(b) and len(set(a) | set(b)) == 40


# ---- through the module ----
def parity_or_flat(prompts, completions, answer, **kwargs):
    """Flat (0.0) for even answers; otherwise alternating 0/1 within the group, so never flat."""
    return [0.0 if int(a) % 2 == 0 else float(i % 2) for i, a in enumerate(answer)]


def _module(tiny_dir, **overrides):
    cfg = algo(dynamic_sampling=True, **overrides)
    module = GSPOModule({"name_or_path": str(tiny_dir)}, [parity_or_flat], cfg)
    data = PromptGroupDataModule(make_dataset(64, seed=3), algorithm=cfg)
    return module, data


def test_training_replaces_flat_groups_with_drawn_prompts(tiny_dir, tmp_path):
    module, data = _module(tiny_dir)
    drawn = []
    stream = data.extra_prompts

    def odd_only(start, count):  # the extra prompts the module asked for, answered with informative ones
        drawn.append(count)
        rows = [r for r in stream(0, 64) if int(r["answer"]) % 2]
        return rows[start : start + count]

    data.extra_prompts = odd_only
    t = trainer(tmp_path, max_steps=2)
    t.fit(module, datamodule=data)
    rows = [r for r in logged(tmp_path) if r.get("reward")]
    assert len(rows) == 2 and drawn
    for r in rows:
        first_flat = float(r["dynamic_sampling/first_round_zero_std"]) * 4  # 4 groups per generation batch
        assert float(r["dynamic_sampling/prompts_drawn"]) == pytest.approx(first_flat)
        assert float(r["dynamic_sampling/rounds"]) == (1.0 if first_flat else 0.0)
        assert float(r["frac_reward_zero_std"]) == 0.0 and float(r["dynamic_sampling/groups_left"]) == 0
    assert sum(drawn) == module.state.extra_prompts_drawn > 0


def _run(tiny_dir, out, max_steps, ckpt_path=None, every=None):
    L.seed_everything(7)
    module, data = _module(tiny_dir, num_iterations=2, dynamic_sampling_max_rounds=2)
    callbacks = (
        [ModelCheckpoint(dirpath=out / "ckpt", every_n_train_steps=every, save_top_k=-1)] if every else []
    )
    t = trainer(out, max_steps=max_steps, enable_checkpointing=bool(every), callbacks=callbacks)
    t.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return module, logged(out)


def test_resume_in_the_middle_of_a_refilled_batch_continues_exactly(tiny_dir, tmp_path):
    full_module, full = _run(tiny_dir, tmp_path / "full", max_steps=6)
    assert full_module.state.extra_prompts_drawn > 0
    _run(tiny_dir, tmp_path / "first", max_steps=3, every=3)
    (ckpt,) = (tmp_path / "first" / "ckpt").glob("*step=3.ckpt")
    resumed_module, resumed = _run(tiny_dir, tmp_path / "second", max_steps=6, ckpt_path=str(ckpt))
    after = [r for r in full if int(r["step"]) > 4]
    assert after and len(after) == len(resumed[-len(after) :])
    keys = ("reward", "loss", "grad_norm", "dynamic_sampling/prompts_drawn", "dynamic_sampling/groups_left")
    for a, b in zip(after, resumed[-len(after) :]):
        for key in keys:
            assert float(a[key]) == pytest.approx(float(b[key]), rel=1e-5, abs=1e-7), (a["step"], key)
    assert resumed_module.state.extra_prompts_drawn == full_module.state.extra_prompts_drawn
    for (k, v), w in zip(
        full_module.policy.state_dict().items(), resumed_module.policy.state_dict().values()
    ):
        torch.testing.assert_close(v, w, msg=k)


def test_dynamic_sampling_needs_a_data_module_that_can_draw(tiny_dir, tmp_path):
    module, data = _module(tiny_dir)
    data.setup("fit")
    loader = data.train_dataloader()
    with pytest.raises(ValueError, match="dynamic_sampling=True draws further prompts from the data module"):
        trainer(tmp_path, max_steps=1).fit(module, train_dataloaders=loader)


def test_the_cap_must_allow_a_round():
    with pytest.raises(ValueError, match="dynamic_sampling_max_rounds=0"):
        GSPOConfig(dynamic_sampling=True, dynamic_sampling_max_rounds=0)


# ---- DDP: ranks run the same rounds and end with the same number of groups ----
def _ddp_refill(rank, world, port, out_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        calls = []

        def any_rank_short(n):
            calls.append(n)
            total = torch.tensor(float(n))
            dist.all_reduce(total)
            return total.item() > 0

        # Rank 0 starts with 3 flat groups and its stream gives one informative group per round; rank 1 has none.
        flats = [True, True, False, True] if rank == 0 else [False] * 4
        rollout, scores, _ = _batch(flats)
        stream = Stream([True, True, False, True, False, False] if rank == 0 else [])
        out, _, stats = DynamicSampler(G, None, 5, PAD).refill(
            rollout, scores, fake_sample_and_score, stream.draw, any_rank_short
        )
        torch.save(
            (out.completion_ids.shape[0], stats.rounds, len(calls), stream.asked), f"{out_path}.{rank}"
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.ddp
def test_ddp_ranks_run_equal_rounds_and_end_with_equal_groups(tmp_path):
    torch.multiprocessing.spawn(_ddp_refill, args=(2, 29741, str(tmp_path / "r")), nprocs=2)
    r0, r1 = (torch.load(f"{tmp_path / 'r'}.{k}") for k in (0, 1))
    # Rank 0: round 1 draws 3 (flat, flat, informative), round 2 draws 2 (flat, informative), round 3 draws 1.
    assert r0 == (16, 3, 4, [3, 2, 1])
    assert r1 == (16, 3, 4, [])  # sat out three rounds, answered every check
