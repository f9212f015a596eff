"""Reward models as reward functions: a sequence classifier with one output scores each prompt + completion.

``RewardModel(model, tokenizer)`` wraps a built ``...ForSequenceClassification`` model; ``RewardModel.load``
takes what a config gives (a directory, a hub name "org/name", or a mapping with ``model`` and the options
below) and loads it with ``AutoModelForSequenceClassification`` (``num_labels=1``) and its own ``AutoTokenizer``.
Either is called like any reward function, ``fn(prompts, completions, **kwargs) -> list[float]``.

The texts and the score are TRL 1.16's (``GRPOTrainer._calculate_rewards``): a conversational batch (the first
prompt is a list of chat messages) renders ``prompt + completion`` messages with the reward tokenizer's
``apply_chat_template(tokenize=False)``; plain text is ``prompt + completion``. The texts are tokenized with
right padding and ``add_special_tokens=False``, and the reward is ``logits[:, 0]``: the score a sequence
classifier reads at the last token that is not padding (found through the config's ``pad_token_id``, which is
set to the tokenizer's, as TRL sets it).

Where this differs from TRL, and why:
- TRL scores the whole generation batch in one forward; here ``batch_size`` texts at a time, which bounds memory
  for long texts and large batches. The right padding leaves each row's score the same up to float rounding.
- TRL gives a tokenizer without a pad token its EOS token as pad. Here that is an error: with EOS as the pad
  token, a text that ends in EOS (chat templates end turns with it) is scored at the token before it, silently.
- TRL forces ``num_labels=1`` at load, which gives a causal LM's checkpoint a randomly initialised score head.
  Here a checkpoint whose config has ``num_labels != 1`` is refused: its head is not a reward model's.

The wrapped model is frozen (``requires_grad=False``) and in eval mode, and this class is not a
``torch.nn.Module``: a ``GSPOModule`` holding it never registers it, so it is never trained, never in the
optimizer and never in a checkpoint's ``state_dict``. The module moves it to the policy's device.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch

from lightning_gspo.chat_templates import resolve_chat_template

DEFAULT_BATCH_SIZE = 32
# What a config may give for a reward model besides its directory or hub name (``model``).
OPTIONS = ("batch_size", "chat_template", "dtype", "trust_remote_code", "revision")
DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class RewardModel:
    """A sequence-classification model with one label, called as a reward function (see the module docstring).

    Args:
        model: a built ``PreTrainedModel`` for sequence classification with ``config.num_labels == 1``.
        tokenizer: its tokenizer, with a pad token. None loads ``AutoTokenizer`` from the model's
            ``name_or_path``, as TRL does.
        chat_template: a Jinja template or a name from ``lightning_gspo.chat_templates`` to render chat messages
            with, instead of the tokenizer's own.
        batch_size: how many texts one forward scores.
        name: the name in metrics (``rewards/<name>/mean``); default the last part of the model's name or path,
            TRL's name.
    """

    def __init__(
        self,
        model,
        tokenizer=None,
        chat_template: str | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        name: str | None = None,
    ):
        config = getattr(model, "config", None)
        if not isinstance(model, torch.nn.Module) or config is None:
            raise ValueError(
                f"a reward model must be a transformers model for sequence classification, got {type(model).__name__}."
            )
        source = str(getattr(config, "_name_or_path", "") or "")
        self.__name__ = name or source.rstrip("/").split("/")[-1] or type(model).__name__
        if getattr(config, "num_labels", None) != 1:
            raise ValueError(_num_labels_message(self.__name__, config.num_labels))
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(
                f"reward model {self.__name__!r}: batch_size must be a positive integer, got {batch_size!r}."
            )
        if tokenizer is None:
            tokenizer = _auto_tokenizer(source, self.__name__)
        if tokenizer.pad_token_id is None:
            raise ValueError(
                f"reward model {self.__name__!r}: its tokenizer has no pad token, which scoring texts of different "
                "lengths in one batch needs. Set tokenizer.pad_token (e.g. to a token the texts never contain) and "
                "pass RewardModel(model, tokenizer), or save a tokenizer that has one in the model's directory."
            )
        # The classifier reads each row's score at its last token that is not the pad id (TRL sets it so too).
        config.get_text_config().pad_token_id = tokenizer.pad_token_id
        model.requires_grad_(False)
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.chat_template = None if chat_template is None else resolve_chat_template(chat_template)
        self.batch_size = batch_size
        # How to load it again (what a checkpoint records); None for a model built in memory.
        self.source: str | dict[str, Any] | None = None

    @classmethod
    def load(cls, spec: str | Mapping[str, Any]) -> RewardModel:
        """The reward model a config entry names: a directory or hub name, or a mapping with ``model`` (that) and
        any of ``batch_size``, ``chat_template``, ``dtype`` ('auto', 'float32', 'bfloat16', 'float16'),
        ``trust_remote_code``, ``revision``."""
        if isinstance(spec, str):
            return cls.from_pretrained(spec)
        spec = dict(spec)
        unknown = sorted(set(spec) - {"model", *OPTIONS})
        if "model" not in spec or unknown:
            raise ValueError(
                f"reward model entry {spec!r}: give 'model' (a directory or a hub name) and only the options "
                f"{', '.join(OPTIONS)}" + (f"; unknown: {', '.join(unknown)}." if unknown else ".")
            )
        return cls.from_pretrained(spec.pop("model"), **spec)

    @classmethod
    def from_pretrained(
        cls,
        path: str,
        batch_size: int = DEFAULT_BATCH_SIZE,
        chat_template: str | None = None,
        dtype: str = "auto",
        trust_remote_code: bool = False,
        revision: str | None = None,
    ) -> RewardModel:
        """Load ``AutoModelForSequenceClassification`` (``num_labels=1``) and ``AutoTokenizer`` from ``path``."""
        from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

        if dtype not in DTYPES:
            raise ValueError(f"reward model {path!r}: dtype={dtype!r} is not one of {', '.join(DTYPES)}.")
        _check_local(path)
        where = os.path.expanduser(path)  # from_pretrained does not expand '~'
        kwargs = dict(trust_remote_code=trust_remote_code, revision=revision)
        try:
            config = AutoConfig.from_pretrained(where, **kwargs)
        except (OSError, ValueError) as err:
            raise ValueError(_unloadable_message(path, err)) from err
        name = str(path).rstrip("/").split("/")[-1]
        if config.num_labels != 1:
            raise ValueError(_num_labels_message(name, config.num_labels))
        try:
            tokenizer = AutoTokenizer.from_pretrained(where, **kwargs)
            model = AutoModelForSequenceClassification.from_pretrained(
                where, num_labels=1, dtype=DTYPES[dtype], **kwargs
            )
        except (OSError, ValueError) as err:
            raise ValueError(_unloadable_message(path, err)) from err
        rm = cls(model, tokenizer, chat_template=chat_template, batch_size=batch_size, name=name)
        options = dict(
            batch_size=batch_size,
            chat_template=chat_template,
            dtype=dtype,
            trust_remote_code=trust_remote_code,
            revision=revision,
        )
        defaults = dict(
            batch_size=DEFAULT_BATCH_SIZE, chat_template=None, dtype="auto", trust_remote_code=False
        )
        changed = {k: v for k, v in options.items() if v != defaults.get(k)}
        rm.source = {"model": str(path), **changed} if changed else str(path)
        return rm

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device: torch.device | str) -> RewardModel:
        self.model.to(device)
        return self

    def texts(self, prompts: list[Any], completions: list[Any]) -> list[str]:
        """The texts TRL scores: chat messages ``prompt + completion`` through the chat template, or
        ``prompt + completion`` as plain text."""
        if not (prompts and isinstance(prompts[0], list) and prompts[0] and _is_message(prompts[0][0])):
            return [p + c for p, c in zip(prompts, completions, strict=True)]
        if self.chat_template is None and getattr(self.tokenizer, "chat_template", None) is None:
            raise ValueError(
                f"reward model {self.__name__!r}: the prompts are chat messages but its tokenizer has no chat "
                "template. Give one: RewardModel(..., chat_template=...) or {model: ..., chat_template: ...} in "
                "the config (a Jinja template, or 'chatml' / 'gemma')."
            )
        return [
            self.tokenizer.apply_chat_template(p + c, tokenize=False, chat_template=self.chat_template)
            for p, c in zip(prompts, completions, strict=True)
        ]

    @torch.no_grad()
    def __call__(self, prompts: list[Any], completions: list[Any], **kwargs: Any) -> list[float]:
        self.model.eval()
        texts, device, scores = self.texts(prompts, completions), self.device, []
        for start in range(0, len(texts), self.batch_size):
            inputs = self.tokenizer(
                text=texts[start : start + self.batch_size],
                return_tensors="pt",
                padding=True,
                padding_side="right",
                add_special_tokens=False,
            ).to(device)
            scores.extend(self.model(**inputs).logits[:, 0].float().tolist())
        return scores

    def __repr__(self) -> str:
        return f"RewardModel({self.__name__!r}, {type(self.model).__name__}, batch_size={self.batch_size})"


def _is_message(m: Any) -> bool:
    return isinstance(m, dict) and "role" in m


def _auto_tokenizer(source: str, name: str):
    from transformers import AutoTokenizer

    if not source:
        raise ValueError(
            f"reward model {name!r} has no name or path to load its tokenizer from; pass it: "
            "RewardModel(model, tokenizer)."
        )
    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as err:
        raise ValueError(
            f"reward model {name!r}: its tokenizer cannot be loaded from {source!r} ({err}); pass it: "
            "RewardModel(model, tokenizer)."
        ) from err


def _check_local(path: str) -> None:
    """A path that is local by its look must be a model directory; only other names go to the hub."""
    local = os.path.expanduser(path)
    if (path.startswith((".", "/", "~")) or os.path.exists(local)) and not os.path.isfile(
        os.path.join(local, "config.json")
    ):
        raise ValueError(_unloadable_message(path, "no Hugging Face model directory there (no config.json)"))


def _unloadable_message(path: str, err: Any) -> str:
    return (
        f"reward function {path!r} cannot be loaded as a reward model: {err}. A string with '/' or an existing "
        "directory is read as a reward model: give a directory written by save_pretrained or a hub name "
        "'org/name'; a function is given by its import path 'package.module.function'."
    )


def _num_labels_message(name: str, num_labels: Any) -> str:
    return (
        f"reward model {name!r} has num_labels={num_labels}; a reward model has one output, its score "
        "(num_labels=1). A causal LM's or a multi-class classifier's checkpoint is not a reward model: train or "
        "pick a sequence classifier with one label."
    )
