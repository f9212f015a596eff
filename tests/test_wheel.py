"""The built wheel installs `kernels/` as `lightning_gspo.kernels` (never as a top-level `kernels`) and ships
`conf/`, so `python -m lightning_gspo.train` works without the source tree."""

import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(out),
            str(ROOT),
        ],
        check=True,
    )
    (whl,) = out.glob("lightning_gspo-*.whl")
    return whl


def test_wheel_layout(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert "lightning_gspo/kernels/policy_loss.py" in names
    assert "lightning_gspo/conf/config.yaml" in names
    assert any(n.startswith("lightning_gspo/conf/algorithm/") and n.endswith("gspo.yaml") for n in names)
    assert not any(n.startswith("kernels/") for n in names), "a top-level 'kernels' would shadow HF's package"
    assert not any(n.startswith("conf/") for n in names)


@pytest.mark.slow
def test_wheel_installs_and_imports_without_source_tree(wheel, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    site = subprocess.check_output(
        [py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True
    )
    site = Path(site.strip())
    # Dependencies come from the test environment's site-packages, listed in a .pth file: a path named there is
    # only appended to sys.path, so the editable install's finder in that directory stays inactive.
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
        check=True,
    )
    probe = (
        "import importlib.util, lightning_gspo, lightning_gspo.kernels as k, torch\n"
        f"assert lightning_gspo.__file__.startswith({str(site)!r}), lightning_gspo.__file__\n"
        "assert importlib.util.find_spec('kernels') is None or 'lightning_gspo' not in "
        "importlib.util.find_spec('kernels').origin\n"
        "loss, _ = k.policy_loss(torch.zeros(2, 3, requires_grad=True), None, torch.ones(2), torch.ones(2, 3))\n"
        "from importlib.resources import files\n"
        "assert files('lightning_gspo.conf').joinpath('config.yaml').is_file()\n"
        "print('ok', float(loss))\n"
    )
    out = subprocess.run([py, "-c", probe], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ok -1.0")  # on-policy, A = 1: the clipped surrogate is -1 per token
    cfg = subprocess.run(
        [py, "-m", "lightning_gspo.train", "--cfg", "job"], cwd=tmp_path, capture_output=True, text=True
    )
    assert cfg.returncode == 0, cfg.stderr
    assert "importance_sampling_level: sequence" in cfg.stdout


def test_repository_root_does_not_shadow_hf_kernels():
    # The Makefile sets PYTHONSAFEPATH so `python -m ...` from the repository root keeps the top-level
    # `kernels/` folder off sys.path; without it, `import kernels` would find our folder.
    probe = "import importlib.util; s = importlib.util.find_spec('kernels'); print(s.origin if s else None)"
    env = {"PYTHONSAFEPATH": "1", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert str(ROOT / "kernels") not in out.stdout
