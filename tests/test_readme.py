"""The README's Python quickstart runs as written, in a fresh interpreter, and does what it says."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def python_block(section: str) -> str:
    text = README.read_text(encoding="utf-8")
    body = text.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```python\n(.*?)```", body, re.S).group(1)


def test_the_python_quickstart_runs(tmp_path):
    code = python_block("Python") + "\nprint('RESULT', type(same.encoder.layer[0].intermediate.dense).__name__)\n"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "kernel=int8pack" in done.stdout  # the printed layer runs on the int8 kernel
    assert "RESULT PivotedLowRankLinear" in done.stdout  # and the saved model reloads with its low-rank layers
    assert (tmp_path / "results" / "minilm-python" / "manifest.json").is_file()
