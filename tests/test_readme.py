"""Every ```python block of README.md runs as is, each in a fresh interpreter, in under a minute."""

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_python_examples():
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_python_block_runs(index, tmp_path):
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", BLOCKS[index]], cwd=tmp_path, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, f"README python block {index} failed:\n{BLOCKS[index]}\n{result.stderr[-3000:]}"
    assert time.perf_counter() - start < 60
