"""Prompt groups for GRPO/GSPO: which prompts each rank draws, in what order, and how often each batch is reused;
and the held-out prompts evaluation scores.

Every training step of ``GSPOModule`` is one micro-batch, so the loader yields each generation batch of prompts
``num_iterations x steps_per_generation`` times in a row (TRL's repeat-sampler idea): the module generates on the
first and reuses the rollout for the rest. Under DDP every rank takes its own prompts, so a prompt's whole group
of completions lives on one rank. The order is a seeded permutation per epoch, so runs repeat exactly and a
resumed run picks up where it stopped.

Held-out prompts come from their own source or from a seeded fraction of the training source's *distinct*
prompts: every row of a held-out prompt leaves the training set, so the two are disjoint even when the source
repeats prompts (the demo's sums do). Evaluation batches are dealt to ranks whole (batch b to rank b mod N) and
padded to equal counts with weight-0 batches, so N ranks evaluate exactly the batches one process does.
"""

from __future__ import annotations

import json
import math
import random
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, IterableDataset

from lightning_gspo.config import GSPOConfig

# Our loader runs in the main process (num_workers=0), where the length of the iterable is exact.
warnings.filterwarnings("ignore", message="Your `IterableDataset` has `__len__` defined")

# Offsets the extra-prompt stream's seed from the epoch order's (seed + epoch), so the two orders differ.
_EXTRA_STREAM_SEED = 7_919

FILE_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


@dataclass
class PromptBatch:
    """One rank's prompts for one generation batch, and where it stands in the run."""

    records: list[dict[str, Any]]  # the dataset rows: prompt plus any columns reward functions want
    epoch: int
    index: int  # generation batch index within the epoch
    repeat: int  # 0 .. repeats-1: which micro-batch of this generation batch this step is

    @property
    def is_first(self) -> bool:
        return self.repeat == 0


@dataclass
class EvalBatch:
    """Held-out prompts for one evaluation step."""

    records: list[dict[str, Any]]
    index: int  # the batch's index in the split (seeds its sampling)
    weight: float = 1.0  # 0 for a padding batch that only keeps ranks in step


def load_prompts(source: Any, split: str = "train"):
    """A ``datasets.Dataset`` from a Dataset, a list of dicts, a dict of columns, a local jsonl/json/parquet/csv
    file, a directory saved with ``save_to_disk``, or a hub name (where there is a network)."""
    import datasets

    if isinstance(source, datasets.DatasetDict):
        if split not in source:
            raise ValueError(f"data split {split!r} not in the dataset; it has {list(source)}.")
        return source[split]
    if isinstance(source, datasets.Dataset):
        return source
    if isinstance(source, list):
        return datasets.Dataset.from_list(source)
    if isinstance(source, dict):
        return datasets.Dataset.from_dict(source)
    if isinstance(source, (str, Path)):
        path = Path(source).expanduser()
        if path.is_file():
            fmt = FILE_FORMATS.get(path.suffix)
            if fmt is None:
                raise ValueError(
                    f"data file {path} has suffix {path.suffix!r}; use one of {', '.join(FILE_FORMATS)}."
                )
            return datasets.load_dataset(fmt, data_files=str(path), split="train")
        if path.is_dir():
            return load_prompts(datasets.load_from_disk(str(path)), split)
        if str(source).startswith((".", "/", "~")):
            raise FileNotFoundError(f"data source {source!r} does not exist.")
        return datasets.load_dataset(str(source), split=split)
    raise TypeError(f"cannot read prompts from a {type(source).__name__}; see load_prompts' docstring.")


class _GroupBatches(IterableDataset):
    """Yields this rank's ``PromptBatch`` es for one epoch, each ``repeats`` times."""

    def __init__(self, owner: PromptGroupDataModule):
        self.owner = owner

    def __len__(self) -> int:
        return self.owner.batches_per_epoch * self.owner.repeats

    def __iter__(self) -> Iterator[PromptBatch]:
        o = self.owner
        epoch = o.current_epoch()
        if o.shuffle:
            order = torch.randperm(len(o.dataset), generator=torch.Generator().manual_seed(o.seed + epoch))
        else:
            order = torch.arange(len(o.dataset))
        resume, o._resume_at = o._resume_at, None
        first_index, first_repeat = resume[1:] if resume and resume[0] == epoch else (0, 0)
        per_batch = o.prompts_per_rank * o.world_size
        for index in range(first_index, o.batches_per_epoch):
            base = index * per_batch + o.rank * o.prompts_per_rank
            rows = [o.dataset[int(i)] for i in order[base : base + o.prompts_per_rank]]
            for repeat in range(first_repeat if index == first_index else 0, o.repeats):
                yield PromptBatch(rows, epoch, index, repeat)


class PromptGroupDataModule(L.LightningDataModule):
    """Prompts, grouped for GRPO/GSPO.

    Args:
        source: what ``load_prompts`` reads (a Dataset, rows, a file, a saved directory, a hub name), or a
            zero-argument callable returning one (Hydra builds tasks that way).
        algorithm: the algorithm config (or its dict); it sets prompts per rank and the reuse count.
        prompt_column: the column holding the prompt, plain text or a list of chat messages.
        seed: seed of the per-epoch order; None takes ``config.seed``.
        shuffle: reshuffle every epoch (False keeps the file's order).
        max_samples: use only the first this many rows (quick runs).
        system_prompt: prepended as a system message to chat prompts, and as a line to plain-text prompts.
        val_source: held-out prompts for validation (read like ``source``, split ``val_split``).
        val_fraction: or hold out this fraction (0 to 1) of the training source's distinct prompts, seeded.
        val_max_samples: evaluate at most this many held-out prompts.
        test_source: prompts for ``trainer.test`` (split ``test_split``).
        eval_batch_size: held-out prompts per evaluation step.
    """

    def __init__(
        self,
        source: Any,
        algorithm: GSPOConfig | dict | None = None,
        prompt_column: str = "prompt",
        seed: int | None = None,
        shuffle: bool = True,
        max_samples: int | None = None,
        system_prompt: str | None = None,
        split: str = "train",
        val_source: Any = None,
        val_fraction: float | None = None,
        val_max_samples: int | None = None,
        val_split: str = "validation",
        test_source: Any = None,
        test_split: str = "test",
        eval_batch_size: int = 16,
    ):
        super().__init__()
        if val_source is not None and val_fraction is not None:
            raise ValueError("give data.val_source or data.val_fraction, not both.")
        if val_fraction is not None and not 0 < val_fraction < 1:
            raise ValueError(f"data.val_fraction={val_fraction} must be between 0 and 1 (exclusive).")
        if eval_batch_size < 1:
            raise ValueError(f"data.eval_batch_size={eval_batch_size} must be >= 1.")
        self.val_source, self.val_fraction, self.val_max_samples = val_source, val_fraction, val_max_samples
        self.val_split, self.test_source, self.test_split = val_split, test_source, test_split
        self.eval_batch_size = eval_batch_size
        self.val_dataset = self.test_dataset = None
        self.source = source
        self.config = GSPOConfig.coerce(algorithm)
        self.prompt_column = prompt_column
        self.seed = self.config.seed if seed is None else seed
        self.shuffle = shuffle
        self.max_samples = max_samples
        self.system_prompt = system_prompt
        self.split = split
        self.dataset = None
        self.rank, self.world_size = 0, 1
        self._resume_at: tuple[int, int, int] | None = None

    # ---- set-up ----
    def setup(self, stage: str | None = None) -> None:
        if self.trainer is not None:
            self.rank, self.world_size = self.trainer.global_rank, self.trainer.world_size
        if self.dataset is None:
            self.dataset = self._load(self.source, self.split, self.max_samples)
            self._load_held_out()
        spg = self.config.steps_per_generation_for(self.world_size)
        self.prompts_per_rank = self.config.prompts_per_rank(self.world_size)
        self.repeats = self.config.num_iterations * spg
        per_batch = self.prompts_per_rank * self.world_size
        self.batches_per_epoch = len(self.dataset) // per_batch
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"the dataset has {len(self.dataset)} prompts, fewer than one generation batch needs "
                f"({self.prompts_per_rank} per rank x {self.world_size} ranks); add prompts or lower "
                "per_device_train_batch_size / steps_per_generation."
            )
        left_over = len(self.dataset) - self.batches_per_epoch * per_batch
        if left_over and self.rank == 0:
            warnings.warn(
                f"{left_over} of {len(self.dataset)} prompts do not fill a generation batch of {per_batch} and are "
                "skipped each epoch (a new order each epoch, so different prompts each time).",
                UserWarning,
                stacklevel=2,
            )

    def _load(self, source: Any, split: str, max_samples: int | None):
        ds = load_prompts(source() if callable(source) else source, split)
        if max_samples is not None:
            ds = ds.select(range(min(max_samples, len(ds))))
        if len(ds) == 0:
            raise ValueError(f"the prompt dataset from {source!r} is empty (max_samples={max_samples}).")
        if self.prompt_column not in ds.column_names:
            raise ValueError(
                f"prompt_column={self.prompt_column!r} is not a column of the dataset; its columns are "
                f"{ds.column_names}. Set data.prompt_column."
            )
        if self.prompt_column != "prompt":
            ds = ds.rename_column(self.prompt_column, "prompt") if "prompt" not in ds.column_names else ds
        if self.system_prompt:
            ds = ds.map(lambda row: {"prompt": _with_system(row["prompt"], self.system_prompt)})
        return ds

    def _load_held_out(self) -> None:
        if self.val_source is not None:
            self.val_dataset = self._load(self.val_source, self.val_split, self.val_max_samples)
        elif self.val_fraction is not None:
            self.dataset, self.val_dataset = hold_out(self.dataset, self.val_fraction, self.seed)
            if self.val_max_samples is not None:
                self.val_dataset = self.val_dataset.select(
                    range(min(self.val_max_samples, len(self.val_dataset)))
                )
        if self.test_source is not None:
            self.test_dataset = self._load(self.test_source, self.test_split, self.val_max_samples)

    def current_epoch(self) -> int:
        return self.trainer.current_epoch if self.trainer is not None else 0

    # ---- loaders ----
    def train_dataloader(self) -> DataLoader:
        return DataLoader(_GroupBatches(self), batch_size=None, collate_fn=_identity, num_workers=0)

    def val_dataloader(self) -> DataLoader | list:
        """This rank's evaluation batches of held-out prompts (no validation without a held-out split)."""
        return [] if self.val_dataset is None else self._eval_loader(self.val_dataset)

    def test_dataloader(self) -> DataLoader:
        if self.test_dataset is None:
            raise ValueError("trainer.test needs test prompts: set data.test_source.")
        return self._eval_loader(self.test_dataset)

    def _eval_loader(self, dataset) -> DataLoader:
        size, n = self.eval_batch_size, len(dataset)
        batches = [
            EvalBatch([dataset[i] for i in range(b, min(b + size, n))], b // size) for b in range(0, n, size)
        ]
        mine = batches[self.rank :: self.world_size]
        per_rank = math.ceil(len(batches) / self.world_size)
        mine += [EvalBatch(batches[0].records, batches[0].index, weight=0.0)] * (per_rank - len(mine))
        # Its own generator: iterating a loader draws a base seed, which must not come from training's stream.
        return DataLoader(
            mine, batch_size=None, collate_fn=_identity, num_workers=0, generator=torch.Generator()
        )

    # ---- extra prompts for dynamic sampling ----
    def extra_prompts(self, start: int, count: int) -> list[dict[str, Any]]:
        """Prompts ``start`` to ``start + count`` of this rank's extra-prompt stream (dynamic sampling).

        The stream is its own seeded order of the training prompts, cycle after cycle, dealt to ranks in turn; it
        is a pure function of its position, so the caller keeps the position (and a resumed run continues it) and
        the epoch's order, which counts the training steps, is untouched."""
        n, world = len(self.dataset), self.world_size
        per_cycle = max(1, n // world)  # each rank's share of one cycle through the prompts
        rows, orders = [], {}
        for k in range(start, start + count):
            cycle, at = divmod(k, per_cycle)
            if cycle not in orders:
                generator = torch.Generator().manual_seed(_EXTRA_STREAM_SEED + self.seed * 1_000_003 + cycle)
                orders[cycle] = torch.randperm(n, generator=generator)
            rows.append(self.dataset[int(orders[cycle][(at * world + self.rank) % n])])
        return rows

    # ---- resume: where the next batch starts ----
    def resume_after(self, epoch: int, index: int, repeat: int) -> None:
        """Continue with the batch after micro-batch ``repeat`` of generation batch ``index`` of ``epoch``."""
        self._resume_at = (epoch, index, repeat + 1) if repeat + 1 < self.repeats else (epoch, index + 1, 0)

    @property
    def steps_per_epoch(self) -> int:
        return self.batches_per_epoch * self.repeats

    def optimizer_steps(self, num_epochs: float) -> int:
        """Optimizer steps in ``num_epochs`` epochs (for the learning-rate schedule)."""
        return math.ceil(self.steps_per_epoch * num_epochs / self.config.gradient_accumulation_steps)


def _with_system(prompt: Any, system: str) -> Any:
    if isinstance(prompt, list):
        if prompt and prompt[0].get("role") == "system":
            return prompt
        return [{"role": "system", "content": system}, *prompt]
    return f"{system}\n{prompt}"


def _identity(x):
    return x


def hold_out(dataset, fraction: float, seed: int):
    """(training rows, held-out prompts): a seeded ``fraction`` of the distinct prompts, each once, and every row
    whose prompt is not among them."""
    keys = [json.dumps(p, sort_keys=True) for p in dataset["prompt"]]
    distinct = sorted(set(keys))
    random.Random(seed).shuffle(distinct)
    held = set(distinct[: max(1, round(fraction * len(distinct)))])
    if len(held) == len(distinct):
        raise ValueError(
            f"data.val_fraction={fraction} holds out all {len(distinct)} distinct prompts, leaving none to train on; "
            "lower it or give data.val_source."
        )
    first = {}
    for i, k in enumerate(keys):
        if k in held:
            first.setdefault(k, i)
    train = dataset.select([i for i, k in enumerate(keys) if k not in held])
    val = dataset.select(sorted(first.values()))
    rank_zero_info(
        f"held out {len(held)} of {len(distinct)} distinct prompts (seed {seed}) for validation; "
        f"{len(train)} of {len(dataset)} rows remain for training."
    )
    return train, val
