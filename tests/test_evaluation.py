"""Held-out evaluation: pass@k, the held-out split, validation and test steps, the evaluate command."""

import copy
import json
import math

import lightning as L
import pytest
import torch
from helpers import REWARDS, algo, logged, module_and_data, trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_gspo.data import PromptGroupDataModule, hold_out
from lightning_gspo.evaluate import main as evaluate_main
from lightning_gspo.evaluation import pass_at_k
from lightning_gspo.module import GSPOModule
from lightning_gspo.tasks.arithmetic import make_dataset


@pytest.mark.parametrize(
    "n, c, k, expected",
    [
        (5, 2, 1, 2 / 5),  # pass@1 is the fraction correct
        (5, 2, 2, 1 - 3 / 10),  # 1 - C(3,2)/C(5,2)
        (10, 3, 5, 1 - 21 / 252),  # 1 - C(7,5)/C(10,5)
        (8, 0, 8, 0.0),  # nothing correct
        (8, 8, 1, 1.0),  # everything correct
        (4, 1, 4, 1.0),  # k = n draws the correct one for sure
        (100, 1, 1, 0.01),
    ],
)
def test_pass_at_k_against_hand_computed_values(n, c, k, expected):
    assert math.isclose(pass_at_k(n, c, k), expected, rel_tol=1e-12, abs_tol=1e-15)


@pytest.mark.parametrize("n, c, k", [(4, 5, 1), (4, 1, 0), (4, 1, 5), (4, -1, 1)])
def test_pass_at_k_refuses_impossible_counts(n, c, k):
    with pytest.raises(ValueError, match="pass@k needs"):
        pass_at_k(n, c, k)


def _data(cfg, **kwargs):
    return PromptGroupDataModule(make_dataset(256, seed=3), algorithm=cfg, eval_batch_size=6, **kwargs)


def test_held_out_split_is_disjoint_and_stable():
    def split(seed):
        dm = _data(algo(), val_fraction=0.25, seed=seed)
        dm.setup("fit")
        return {p for p in dm.dataset["prompt"]}, list(dm.val_dataset["prompt"])

    distinct = set(make_dataset(256, seed=3)["prompt"])
    train, val = split(7)
    assert len(val) == len(set(val)) == round(len(distinct) / 4)  # a quarter of the distinct sums, each once
    assert not train & set(val) and train | set(val) == distinct  # no row of a held-out sum is trained on
    assert split(7) == (train, val)  # the same seed, the same split
    assert set(split(8)[1]) != set(val)
    # The same rule on any source: rows of one prompt stay together.
    rows = make_dataset(64, seed=1)
    kept, held = hold_out(rows, 0.5, seed=0)
    assert not set(kept["prompt"]) & set(held["prompt"]) and len(kept) + sum(
        rows["prompt"].count(p) for p in held["prompt"]
    ) == len(rows)


def test_bad_held_out_settings_are_named():
    with pytest.raises(ValueError, match="val_fraction=1.5 must be between 0 and 1"):
        _data(algo(), val_fraction=1.5)
    with pytest.raises(ValueError, match="val_source or data.val_fraction, not both"):
        _data(algo(), val_fraction=0.2, val_source=[{"prompt": "1+1="}])
    with pytest.raises(ValueError, match="leaving none to train on"):
        _data(algo(), val_fraction=0.999).setup("fit")
    with pytest.raises(ValueError, match="is empty"):
        _data(algo(), val_source=[{"prompt": "1+1="}], val_max_samples=0).setup("fit")
    with pytest.raises(ValueError, match="trainer.test needs test prompts"):
        dm = _data(algo())
        dm.setup("fit")
        dm.test_dataloader()


def test_success_reward_must_name_a_reward_function(tiny_dir):
    with pytest.raises(ValueError, match="eval_success_reward='nope' is not one of the reward functions"):
        module_and_data(tiny_dir, eval_success_reward="nope")


def _validate(module, dm, tmp_path):
    (metrics,) = trainer(tmp_path, max_steps=1).validate(module, datamodule=dm, verbose=False)
    return metrics


def test_validate_without_fit_is_deterministic_and_greedy_samples_nothing(tiny_dir, tmp_path, monkeypatch):
    module, _ = module_and_data(tiny_dir, num_generations_eval=0)
    dm = _data(module.config, val_fraction=0.2)

    def no_sampling(*args, **kwargs):
        raise AssertionError("greedy evaluation drew a sample")

    monkeypatch.setattr(torch, "multinomial", no_sampling)
    first, second = _validate(module, dm, tmp_path), _validate(module, dm, tmp_path)
    assert first == second
    assert set(first) == {
        "eval/reward", "eval/rewards/correctness_reward/mean", "eval/rewards/format_reward/mean",
        "eval/completions/mean_length", "eval/completions/clipped_ratio",
    }  # fmt: skip
    # The greedy reward is the mean over the 20 held-out prompts of the weighted sum of both functions.
    per_fn = first["eval/rewards/correctness_reward/mean"] + first["eval/rewards/format_reward/mean"]
    assert math.isclose(first["eval/reward"], per_fn, rel_tol=1e-6)


def test_sampled_metrics_follow_the_success_threshold(tiny_dir, tmp_path):
    module, _ = module_and_data(tiny_dir, num_generations_eval=4, eval_success_reward="format_reward",
                                eval_success_threshold=0.5)  # fmt: skip
    dm = _data(module.config, val_fraction=0.2)
    m = _validate(module, dm, tmp_path)
    assert {"eval/sampled/reward", "eval/pass@1", "eval/pass@4"} <= set(m)
    assert 0 <= m["eval/pass@1"] <= m["eval/pass@4"] <= 1
    module.config.eval_success_threshold = 10.0  # no completion can reach it
    assert _validate(module, dm, tmp_path)["eval/pass@4"] == 0
    module.config.eval_success_threshold = -10.0  # every completion does
    assert _validate(module, dm, tmp_path)["eval/pass@1"] == 1


def test_evaluation_changes_nothing_training_uses(tiny_dir, tmp_path):
    """A run that evaluates before training and after every optimizer step trains exactly as one that does not:
    the same weights, optimizer state and training metrics."""
    runs = {}
    for evaluating in (False, True):
        L.seed_everything(0)
        module, data = module_and_data(tiny_dir, num_iterations=2, eval_on_start=evaluating,
                                       num_generations_eval=4)  # fmt: skip
        data.val_fraction, data.eval_batch_size = 0.1, 4
        extra = {"val_check_interval": 2, "check_val_every_n_epoch": None} if evaluating else {}
        t = trainer(tmp_path / str(evaluating), max_steps=4, **extra)
        t.fit(module, datamodule=data)
        rows = logged(tmp_path / str(evaluating))
        runs[evaluating] = (module, t.optimizers[0].state_dict(), rows)
    (plain, opt_plain, rows_plain), (evaluated, opt_eval, rows_eval) = runs[False], runs[True]
    for k, v in plain.policy.state_dict().items():
        assert torch.equal(evaluated.policy.state_dict()[k], v), k
    for p, q in zip(opt_plain["state"].values(), opt_eval["state"].values()):
        assert all(torch.equal(p[k], q[k]) for k in p)
    evals = [r for r in rows_eval if r.get("eval/reward")]
    assert [int(r["step"]) for r in evals] == [0, 1, 2, 3, 4]  # the baseline, then every optimizer step
    train_keys = [k for k in rows_plain[0] if k and not k.startswith("eval/") and k != "epoch"]
    trained = [r for r in rows_eval if r.get("reward")]
    assert [[r[k] for k in train_keys] for r in trained] == [[r[k] for k in train_keys] for r in rows_plain]


def _ddp_validate(rank, world, port, tiny_dir, out_path):
    import torch.distributed as dist

    from lightning_gspo.data import PromptGroupDataModule

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        cfg = algo(num_generations_eval=4)
        module = GSPOModule({"name_or_path": tiny_dir}, REWARDS, cfg)
        dm = PromptGroupDataModule(
            make_dataset(256, seed=3), algorithm=cfg, val_fraction=0.2, eval_batch_size=6
        )
        dm.setup("fit")
        dm.rank, dm.world_size = rank, world  # as the trainer's setup sets them
        module.evaluator.reset()
        batches = list(dm._eval_loader(dm.val_dataset))
        for batch in batches:
            module.evaluator.add_batch(module.policy, batch, torch.device("cpu"))

        class Strategy:  # what EvalTotals.reduce uses of Lightning's DDP strategy
            world_size, root_device = world, torch.device("cpu")

            @staticmethod
            def reduce(x, reduce_op):
                dist.all_reduce(x)
                return x

        module.evaluator.totals.reduce(Strategy)
        if rank == 0:
            torch.save((module.evaluator.totals.metrics("eval"), len(batches)), out_path)
    finally:
        dist.destroy_process_group()


@pytest.mark.ddp
def test_ddp_evaluation_equals_one_process(tiny_dir, tmp_path):
    module, _ = module_and_data(tiny_dir, num_generations_eval=4)
    single = _validate(module, _data(module.config, val_fraction=0.2), tmp_path)
    torch.multiprocessing.spawn(_ddp_validate, args=(2, 29731, str(tiny_dir), tmp_path / "m.pt"), nprocs=2)
    metrics, per_rank = torch.load(tmp_path / "m.pt")
    assert per_rank == 2  # 20 prompts in 4 batches of 6: two each, the last one short
    assert metrics.keys() == single.keys()
    for key, value in single.items():
        assert math.isclose(metrics[key], value, rel_tol=1e-6, abs_tol=1e-9), (key, metrics[key], value)


def test_padding_batches_keep_ranks_in_step():
    dm = _data(algo(), val_fraction=0.2)
    dm.setup("fit")
    dm.world_size, dm.eval_batch_size = 3, math.ceil(len(dm.val_dataset) / 4)
    loaders = []  # 4 batches over 3 ranks: one rank gets a second, the others a weight-0 copy
    for rank in range(3):
        dm.rank = rank
        loaders.append(list(dm._eval_loader(dm.val_dataset)))
    assert [len(b) for b in loaders] == [2, 2, 2]
    assert sorted(b.index for bs in loaders for b in bs if b.weight) == [0, 1, 2, 3]
    assert sum(b.weight == 0 for bs in loaders for b in bs) == 2


def test_best_checkpoint_keeps_its_score_across_a_resume(tiny_dir, tmp_path):
    def fit(max_steps, ckpt_path=None):
        L.seed_everything(0)
        module, data = module_and_data(tiny_dir, num_iterations=1, num_generations_eval=2)
        data.val_fraction, data.eval_batch_size = 0.1, 5
        best = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="eval/reward", mode="max", save_top_k=1)
        last = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0, every_n_train_steps=1)
        t = trainer(tmp_path, max_steps=max_steps, callbacks=[best, last], enable_checkpointing=True,
                    val_check_interval=2, check_val_every_n_epoch=None)  # fmt: skip
        t.fit(module, datamodule=data, ckpt_path=ckpt_path)
        return best

    fit(3)
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)["callbacks"]
    (state,) = [v for k, v in saved.items() if "eval/reward" in k]
    assert state["best_model_score"] is not None and state["best_model_path"]
    after = fit(3, ckpt_path=tmp_path / "ckpt" / "last.ckpt")  # nothing left to train: only the restore
    assert after.best_model_score == state["best_model_score"]  # a new callback would hold None
    assert after.best_model_path == state["best_model_path"]


def test_evaluate_command_scores_a_checkpoint_and_a_model_directory(tiny_dir, tmp_path, capsys):
    module, data = module_and_data(tiny_dir, num_iterations=1)
    t = trainer(tmp_path, max_steps=2, enable_checkpointing=True)
    t.fit(module, datamodule=data)
    ckpt = tmp_path / "run.ckpt"
    t.save_checkpoint(ckpt)
    before = copy.deepcopy(module.policy.state_dict())
    overrides = ["algorithm.num_generations_eval=2", "data.eval_batch_size=10"]
    metrics = evaluate_main(["--ckpt", str(ckpt), *overrides])
    out = capsys.readouterr().out
    assert "eval/reward" in out and "written:" in out
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert saved["metrics"] == metrics and saved["split"] == "val"
    # The checkpoint's own settings win over the groups the overrides do not name: its trained weights are
    # what was scored, the same numbers as validating the module itself on the default task's held-out sums.
    module.policy.load_state_dict(before)
    module.config.num_generations_eval = 2
    dm = PromptGroupDataModule(make_dataset(4096, seed=0), algorithm=module.config, val_fraction=0.2,
                               eval_batch_size=10, seed=module.config.seed)  # fmt: skip
    direct = _validate(module, dm, tmp_path)
    assert metrics == pytest.approx(direct, abs=1e-6)
    # An exported model directory, with the configs' settings (the run's seed, so the same held-out sums): its
    # greedy completions score as the module's did.
    module.policy.save_pretrained(tmp_path / "merged")
    module.tokenizer.save_pretrained(tmp_path / "merged")
    from_dir = evaluate_main(["--model", str(tmp_path / "merged"), "--out", str(tmp_path / "m.json"),
                              f"algorithm.seed={module.config.seed}", *overrides])  # fmt: skip
    for key in ("eval/rewards/correctness_reward/mean", "eval/rewards/format_reward/mean"):
        assert from_dir[key] == pytest.approx(direct[key], abs=1e-6)
