"""Every Python block of QUICKSTART.md runs as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[4] / "QUICKSTART.md"
BLOCKS = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)


def test_quickstart_has_blocks():
    assert len(BLOCKS) >= 4


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_quickstart_block_runs(index, capsys):
    exec(compile(BLOCKS[index], f"QUICKSTART.md[block {index}]", "exec"), {"__name__": "__qs__"})
    out = capsys.readouterr().out
    if "custom/largest_update" in BLOCKS[index]:
        assert "{'custom/largest_update': 0.25}" in out
    if "print(step" in BLOCKS[index]:
        assert out.splitlines()[0].startswith("20 ")
