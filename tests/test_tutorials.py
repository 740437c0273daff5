"""Run the code of every tutorial in docs/tutorials at a small budget."""

import re
from pathlib import Path

import pytest

TUTORIALS = sorted((Path(__file__).parent.parent / "docs" / "tutorials").glob("*.md"))


def python_blocks(path: Path) -> str:
    return "\n".join(re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S))


@pytest.mark.parametrize("path", TUTORIALS, ids=[p.stem for p in TUTORIALS])
def test_tutorial_runs(path, capsys):
    code = python_blocks(path)
    assert code, f"{path} has no python code"
    # The budget the tests use: a few updates instead of the tutorial's full run.
    code = re.sub(r"total_timesteps=[\d_]+", "total_timesteps=2048", code)
    exec(compile(code, str(path), "exec"), {"__name__": "__tutorial__"})
    assert capsys.readouterr().out.strip()
