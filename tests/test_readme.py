"""The README's Python examples run as written: each ```python block in a fresh interpreter, as a user would paste
it (nothing imported or built by other tests beforehand)."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_readme_has_its_python_examples():
    # quick start, the operators, CoAtNet, ParC models: a broken fence would silently drop a block from the test below
    assert len(BLOCKS) >= 4, f"found {len(BLOCKS)} ```python blocks in README.md"


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_python_block_runs(index):
    block = BLOCKS[index]
    run = subprocess.run([sys.executable, "-c", block], capture_output=True, text=True, timeout=600,
                         cwd=README.parent)
    assert run.returncode == 0, f"README python block {index} failed:\n{block}\n--- stderr ---\n{run.stderr[-3000:]}"
