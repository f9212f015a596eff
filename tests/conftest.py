"""Test set-up: Triton's interpreter on machines without CUDA, set before anything imports triton."""

import os
import shutil

if shutil.which("nvidia-smi") is None and not os.path.exists("/dev/nvidia0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _tiny(tmp_path_factory, vocab: str):
    from lightning_gspo.tiny import build_tiny_model

    small = dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128)
    return build_tiny_model(tmp_path_factory.mktemp(f"tiny_{vocab}") / "model", vocab, **small)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """The tiny digits model written once per session as a Hugging Face directory."""
    return _tiny(tmp_path_factory, "digits")


@pytest.fixture(scope="session")
def tiny_ascii_dir(tmp_path_factory):
    """The tiny model with the printable-ASCII vocabulary and a chat template."""
    return _tiny(tmp_path_factory, "ascii")
