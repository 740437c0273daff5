"""Run the code of every tutorial in docs/tutorials at a small budget."""

import re
from pathlib import Path

import pytest

TUTORIALS = sorted((Path(__file__).parent.parent / "docs" / "tutorials").glob("*.md"))

# The budget the tests use: a few updates and generations instead of the tutorial's run.
SMALL = [
    (r"total_timesteps=[\d_]+", "total_timesteps=1024"),
    (r"generations=\d+", "generations=2"),
    (r"popsize=\d+", "popsize=4"),
    (r"eval_every=\d+", "eval_every=1"),
    (r"eval_seeds=\d+", "eval_seeds=2"),
    (r"seeds=4,", "seeds=2,"),
    (r"\bepochs=\d+", "epochs=1"),
    (r"population=\d+", "population=100"),
    (r"DriftGrid\([^)]*\)", "DriftGrid(log_ratio_step=1 / 8, adv_step=1 / 2)"),
]


def python_blocks(path: Path) -> str:
    return "\n".join(re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S))


@pytest.mark.parametrize("path", TUTORIALS, ids=[p.stem for p in TUTORIALS])
def test_tutorial_runs(path, capsys, tmp_path, monkeypatch):
    code = python_blocks(path)
    assert code, f"{path} has no python code"
    for pattern, small in SMALL:
        code = re.sub(pattern, small, code)
    monkeypatch.chdir(tmp_path)  # tutorials write their run directories under runs/
    exec(compile(code, str(path), "exec"), {"__name__": "__tutorial__"})
    assert capsys.readouterr().out.strip()
