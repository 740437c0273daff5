"""Run directories: the resolved configuration, metrics as JSONL, headline results.

Every command that runs for long writes one directory holding ``config.json``,
``metrics.jsonl`` (one JSON object per line, appended as the run goes), ``results.json``
(the headline figures, for scripts) and ``summary.md`` (for people). JSON files are written
atomically: a crash while writing leaves the previous version intact.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import torch


def _jsonable(x):
    if isinstance(x, torch.Tensor):
        return _jsonable(x.tolist())
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


def write_json_atomic(path: str | os.PathLike, obj) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        json.dump(_jsonable(obj), f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def keep_metrics(path: str | os.PathLike, key: str, below: int) -> None:
    """Keep the lines of ``metrics.jsonl`` whose ``key`` is below ``below`` (those a
    checkpoint holds), atomically: on resume, lines written after the last checkpoint by a
    killed run are dropped so that they are not logged twice."""
    path = Path(path)
    if path.exists():
        keep = [ln for ln in path.read_text().splitlines()
                if ln.strip() and json.loads(ln).get(key, 0) < below]
        write_text_atomic(path, "".join(ln + "\n" for ln in keep))


def refuse_other_run(run_path: str | os.PathLike) -> None:
    """Refuse to start a new run in a directory that already holds one."""
    if (Path(run_path) / "config.json").exists():
        raise ValueError(f"{run_path} already holds another run (config.json); choose "
                         f"another --out so that it is not overwritten")


class RunDir:
    """A run directory. ``log(**metrics)`` appends one line to ``metrics.jsonl``."""

    def __init__(self, path: str | os.PathLike, append: bool = True):
        self.path = Path(path)
        if self.path.exists() and not self.path.is_dir():
            raise ValueError(f"--out {self.path} is a file; give a directory for the run")
        self.path.mkdir(parents=True, exist_ok=True)
        self._metrics = open(self.path / "metrics.jsonl", "a" if append else "w")

    @staticmethod
    def default_path(command: str, name: str) -> Path:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        return Path("runs") / f"{command}-{name}-{stamp}"

    def write_config(self, config: dict) -> None:
        write_json_atomic(self.path / "config.json", config)

    def log(self, **metrics) -> None:
        metrics.setdefault("time", time.time())
        self._metrics.write(json.dumps(_jsonable(metrics)) + "\n")
        self._metrics.flush()

    def sync(self) -> None:
        """Make the metrics written so far durable (before a checkpoint refers to them)."""
        self._metrics.flush()
        os.fsync(self._metrics.fileno())

    def write_results(self, results: dict) -> None:
        write_json_atomic(self.path / "results.json", results)

    def write_summary(self, text: str) -> None:
        write_text_atomic(self.path / "summary.md", text)

    def close(self) -> None:
        self._metrics.close()
