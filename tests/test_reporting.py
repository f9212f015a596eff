"""What a run shows a person: the completion table and the reward curve."""

import torch

from lightning_gspo.reporting import completion_rows

SYSTEM = "You are a careful assistant. Think step by step, then give the answer inside <answer> tags. " * 2


def test_completion_table_shows_the_question_of_a_chat_prompt():
    prompt = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "What is 2+3?"}]
    completion = [{"role": "assistant", "content": "<answer>5</answer>"}]
    rows = completion_rows(
        [prompt, "7+1="], [completion, "8"], torch.tensor([[1.0], [0.0]]), ["r"], [0.5, -0.5], 2
    )
    assert rows[0]["prompt"] == "What is 2+3?" and rows[0]["completion"] == "<answer>5</answer>"
    assert rows[1]["prompt"] == "7+1=" and rows[1]["completion"] == "8"
    few_shot = [*prompt, {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3?" * 20}]
    (row,) = completion_rows([few_shot], ["6"], torch.tensor([[1.0]]), ["r"], [0.0], 1)
    assert (
        row["prompt"].startswith("And 3+3?") and len(row["prompt"]) == 80
    )  # the last question, cut to width


def test_reward_curve_has_a_rolling_mean_beside_the_raw_points_and_keeps_eval_markers(tmp_path):
    import csv
    import random

    import matplotlib.pyplot as plt

    from lightning_gspo.plots import plot_run, read_metrics, reward_figure, rolling_mean

    assert rolling_mean([1.0, 2.0, 3.0, 4.0], 2) == [1.0, 1.5, 2.5, 3.5]
    rng = random.Random(0)
    path = tmp_path / "metrics.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, ["step", "reward", "eval/reward", "entropy"])
        w.writeheader()
        for step in range(1, 201):  # 4 prompts per batch: each step's reward is a mean of 4 groups' 0/1s
            w.writerow(
                {"step": step, "reward": sum(rng.random() < step / 250 for _ in range(4)) / 4, "entropy": 1}
            )
            if step % 50 == 0:
                w.writerow({"step": step, "eval/reward": step / 250})
    fig = reward_figure(read_metrics(path))
    lines = {line.get_label(): line for line in fig.axes[0].lines}
    mean = lines["reward (mean of 20)"]
    raw = next(
        line for line in fig.axes[0].lines if line.get_linestyle() == "None" and len(line.get_xdata()) == 200
    )
    assert raw.get_color() == mean.get_color() and raw.get_alpha() < 1
    y = mean.get_ydata()
    assert (
        abs(y[-1] - 190.5 / 250) < 0.15 and max(abs(a - b) for a, b in zip(y[20:], y[21:])) < 0.06
    )  # smooth
    held_out = lines["reward, held out (greedy)"]  # dashed, in the training reward's colour
    assert list(held_out.get_xdata()) == [50, 100, 150, 200] and held_out.get_color() == mean.get_color()
    plt.close(fig)
    assert plot_run(path, tmp_path / "curve.png").stat().st_size > 10_000
