"""Curves from a run's CSV log: what people look at rather than read."""

from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path


def read_metrics(csv_path: str | Path) -> dict[str, list[tuple[int, float]]]:
    """(step, value) series per column of a Lightning CSVLogger metrics.csv; empty cells skipped."""
    series: dict[str, list[tuple[int, float]]] = defaultdict(list)
    with open(csv_path) as f:
        for row in csv.DictReader(f):
            step = int(float(row.get("step") or 0))
            for key, value in row.items():
                if key != "step" and value not in ("", None):
                    series[key].append((step, float(value)))
    return dict(series)


def rolling_mean(values: list[float], window: int) -> list[float]:
    """The mean of each value and the ``window - 1`` before it (fewer at the start)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def mean_window(n: int) -> int:
    """Points averaged per rolling mean: a tenth of the run, between 5 and 50. With 4 prompts per batch a
    step's reward is the mean of 4 groups, so single steps scatter by ~±0.2 and only an average shows a trend."""
    return max(5, min(50, n // 10))


def plot_run(csv_path: str | Path, out: str | Path, title: str = "", keys: list[str] | None = None) -> Path:
    """Reward (and each reward function's mean) against optimizer steps, as faint points with their rolling mean,
    the held-out evaluation's (``eval/``) as dashed markers in the same colours, with entropy and clipping
    beneath."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = reward_figure(read_metrics(csv_path), title, keys)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def reward_figure(series: dict[str, list[tuple[int, float]]], title: str = "", keys: list[str] | None = None):
    import matplotlib.pyplot as plt

    keys = keys or [k for k in series if k == "reward" or (k.startswith("rewards/") and k.endswith("/mean"))]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True, height_ratios=[2, 1])
    for key in keys:
        steps, values = zip(*series[key])
        window = mean_window(len(values))
        (points,) = top.plot(steps, values, ".", markersize=3, alpha=0.3)
        if len(values) > window:
            top.plot(steps, rolling_mean(list(values), window), color=points.get_color(),
                     label=f"{key} (mean of {window})")  # fmt: skip
        else:
            points.set_label(key)
        if f"eval/{key}" in series:  # the same measure on held-out prompts, in the same colour
            steps, values = zip(*series[f"eval/{key}"])
            top.plot(steps, values, "o--", color=points.get_color(), label=f"{key}, held out (greedy)")
    if "eval/pass@1" in series:
        steps, values = zip(*series["eval/pass@1"])
        top.plot(steps, values, "s:", color="black", label="pass@1, held out (sampled)")
    top.set_ylabel("reward")
    top.legend(loc="best", fontsize=7)
    top.grid(alpha=0.3)
    top.set_title(title)
    for key in ("entropy", "clip_ratio/region_mean"):
        if key in series:
            steps, values = zip(*series[key])
            bottom.plot(steps, values, label=key)
    bottom.set_xlabel("optimizer step")
    bottom.legend(loc="upper right")
    bottom.grid(alpha=0.3)
    fig.tight_layout()
    return fig
