"""What a run shows: metric windows averaged between logs, and the table of sampled completions."""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)


class MetricWindow:
    """Running means of named metrics since the last log (NaN values, e.g. an undefined min, are skipped)."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)

    def add(self, metrics: dict[str, float | torch.Tensor]) -> None:
        for key, value in metrics.items():
            value = float(value)
            if value == value:  # not NaN
                self.sums[key] += value
                self.counts[key] += 1

    def means(self) -> dict[str, float]:
        return {k: self.sums[k] / self.counts[k] for k in self.sums if self.counts[k]}

    def reset(self) -> None:
        self.sums.clear()
        self.counts.clear()


def reduce_mean(metrics: dict[str, float], strategy) -> dict[str, float]:
    """Average every metric over ranks in one collective (same keys on every rank, in sorted order)."""
    if strategy is None or strategy.world_size == 1 or not metrics:
        return metrics
    keys = sorted(metrics)
    values = torch.tensor([metrics[k] for k in keys], dtype=torch.float64, device=strategy.root_device)
    values = strategy.reduce(values, reduce_op="mean")
    return dict(zip(keys, values.tolist()))


def completion_rows(
    prompts, completions, rewards_per_func, names, advantages, limit: int
) -> list[dict[str, Any]]:
    rows = []
    for i in range(min(limit, len(completions))):
        row = {"prompt": _short(prompts[i]), "completion": _short(completions[i])}
        row.update({n: round(float(rewards_per_func[i, j]), 4) for j, n in enumerate(names)})
        row["advantage"] = round(float(advantages[i]), 4)
        rows.append(row)
    return rows


def show_completions(rows: list[dict[str, Any]], step: int, loggers) -> None:
    """A rich table in the terminal, and the same rows in each logger that keeps tables or files."""
    if not rows:
        return
    try:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"completions at step {step}")
        for col in rows[0]:
            table.add_column(col)
        for row in rows:
            table.add_row(*(str(v) for v in row.values()))
        Console().print(table)
    except ImportError:  # rich is a dependency; this only guards stripped-down installs
        log.info("completions at step %d: %s", step, rows)
    for logger in loggers:
        name = type(logger).__name__
        if name == "WandbLogger":
            logger.log_table(key="completions", columns=list(rows[0]), data=[list(r.values()) for r in rows])
        elif name == "TensorBoardLogger":
            text = "\n".join("| " + " | ".join(str(v) for v in r.values()) + " |" for r in rows)
            logger.experiment.add_text("completions", text, global_step=step)
        elif getattr(logger, "log_dir", None):
            path = Path(logger.log_dir) / "completions.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("a") as f:
                for row in rows:
                    f.write(json.dumps({"step": step, **row}) + "\n")


def _short(x: Any, width: int = 80) -> str:
    s = _readable(x)
    return s if len(s) <= width else s[: width - 1] + "…"


def _readable(x: Any) -> str:
    """Plain text as it is; of chat messages, the last user message: cut to the table's width, a whole
    conversation would show its system prompt and never the question. A completion (one assistant message)
    shows its text."""
    if isinstance(x, list) and x and all(isinstance(m, dict) and "role" in m for m in x):
        users = [m for m in x if m["role"] == "user"]
        content = (users or x)[-1].get("content", "")
        if isinstance(content, list):  # content parts: keep the text ones
            content = " ".join(p.get("text", "") for p in content if isinstance(p, dict))
        return content if isinstance(content, str) else json.dumps(content)
    return x if isinstance(x, str) else json.dumps(x)
