"""The README's own-script example runs as written (with fewer steps)."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _script() -> str:
    text = README.read_text()
    match = re.search(r"<!-- readme-script -->\n```python\n(.*?)```", text, re.S)
    assert match, "the README lost its marked script"
    return match.group(1)


@pytest.mark.slow
def test_readme_script_runs(tmp_path, monkeypatch):
    script = _script()
    assert "MAX_STEPS = " in script
    script = re.sub(r"MAX_STEPS = \d+", "MAX_STEPS = 2", script)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(script, str(README), "exec"), namespace)
    module = namespace["module"]
    assert module.global_step == 2
    assert (tmp_path / "outputs" / "tiny_model" / "digits" / "config.json").exists()
