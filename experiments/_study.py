"""What the studies in ``experiments/`` share: cells, resume, W&B, statistics, the report.

A *study* is a matrix of *cells*. A cell is one library call (a meta-training, a
distillation, a symbolic regression, an LLM proposal loop, an evaluation) that writes its
own run directory under ``OUT/cells/NAME`` and ends by writing ``results.json`` there. The
study runs its cells in order:

- a cell whose ``results.json`` exists is finished: it is read, never run again, so a rerun
  of a finished study trains nothing;
- a cell whose directory exists without ``results.json`` was interrupted: it resumes where
  the library call can resume (a meta-training from its checkpoint, a proposal loop from its
  conversation), and otherwise starts again in a clean directory (the study owns it);
- every finished cell is logged once to W&B (offline unless ``--wandb online``): one run per
  cell in one group per study and scale, its configuration, its ``metrics.jsonl`` lines,
  its ``results.json`` figures and its artifacts (``*.pt``). JSONL is always written.

``OUT/study.json`` names the study and scale a directory holds; another study or scale is
refused there. The report (:func:`write_report`) is rebuilt from the cells' files every
time, so it can be regenerated at any point.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from _report import write_report

from metarl.logging import write_json_atomic

SCALES = ("smoke", "small", "paper")
#: the paper's meta-training environment, and its generalisation set, for both studies
META_ENV = "Breakout-MinAtar"
GENERAL = ["CartPole-v1", "Asterix-MinAtar", "Freeway-MinAtar", "SpaceInvaders-MinAtar",
           "Ant-v4"]


def main(name: str, doc: str, scales: dict, argv=None, **study) -> int:
    """The command line both studies share; ``study`` is :func:`run_study`'s keywords
    (``learned`` may be a function of the scale's settings)."""
    import argparse

    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--scale", choices=list(scales), default="smoke")
    ap.add_argument("--out", default=None, help="study directory (default "
                    f"runs/experiments/{name}-SCALE)")
    ap.add_argument("--wandb", default="offline", choices=["offline", "online", "off"])
    ap.add_argument("--model", default="o3-mini", help="the LLM's model name")
    ap.add_argument("--base-url", default=None, help="an OpenAI-compatible endpoint; "
                    "without one the LLM steps are skipped (smoke: a scripted local "
                    "server answers them)")
    ap.add_argument("--api-key-env", default="OPENAI_API_KEY",
                    help="the environment variable that holds the endpoint's key")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    scale = scales[args.scale]
    s = Study(name, args.scale, args.out or f"runs/experiments/{name}-{args.scale}",
              wandb=args.wandb)
    learned = study.pop("learned")
    run_study(s, scale=scale, meta_env=META_ENV, general=GENERAL, args=args,
              learned=learned(scale) if callable(learned) else learned, **study)
    return 0


def _read(path: Path) -> dict:
    return json.loads(path.read_text())


class Study:
    """The cells of one study at one scale, under ``out``."""

    def __init__(self, name: str, scale: str, out: str | os.PathLike | None = None,
                 wandb: str = "offline", echo=print):
        if scale not in SCALES:
            raise ValueError(f"--scale must be one of {', '.join(SCALES)}; got {scale!r}")
        if wandb not in ("offline", "online", "off"):
            raise ValueError(f"--wandb must be offline, online or off; got {wandb!r}")
        self.name, self.scale, self.wandb, self.echo = name, scale, wandb, echo
        self.out = Path(out) if out else Path("runs/experiments") / name
        marker = self.out / "study.json"
        if marker.exists():
            held = _read(marker)
            if (held.get("study"), held.get("scale")) != (name, scale):
                raise ValueError(
                    f"{self.out} holds the {held.get('study')} study at scale "
                    f"{held.get('scale')}; rerun that command to continue it, or choose "
                    f"another --out")
        elif self.out.exists() and any(self.out.iterdir()):
            raise ValueError(f"{self.out} is not empty and holds no study; choose another "
                             f"--out so that nothing there is overwritten")
        else:
            self.out.mkdir(parents=True, exist_ok=True)
            write_json_atomic(marker, {"study": name, "scale": scale})
        self.cells: dict[str, dict] = {}
        self.wall: dict[str, float] = {}  # seconds each cell took when it ran

    @property
    def group(self) -> str:
        return f"{self.name}-{self.scale}"

    def cell_dir(self, name: str) -> Path:
        return self.out / "cells" / name

    def cell(self, name: str, run: Callable[[Path, bool], dict], config: dict,
             resumable: str | bool | None = None) -> dict:
        """Run (or reuse, or resume) the cell ``name``: ``run(directory, resume) ->
        results``. ``resumable`` names the file whose presence lets an interrupted cell
        resume (``checkpoint.pt``, ``state.json``), or is True when ``run`` picks up
        whatever an interrupted run left (an evaluation's finished environments);
        without it, an interrupted cell starts again in a clean directory.

        ``config`` (JSON-able: the call's settings and the fingerprints of the cells it
        reads, :func:`fingerprint`) is written to ``cell.json`` before the cell runs; a
        cell whose recorded configuration differs (the scale's settings or the code
        changed, or a cell it reads was run again) is refused, never silently reused or
        overwritten."""
        d = self.cell_dir(name)
        done = d / "results.json"
        record = d / "cell.json"
        config = json.loads(json.dumps(config, default=str))
        if record.exists():
            held = _read(record).get("config")
            if held != config:
                diff = sorted(k for k in set(held or {}) | set(config)
                              if (held or {}).get(k) != config.get(k))
                raise ValueError(
                    f"cell {name} in {self.out} was run with another configuration "
                    f"(differs in: {', '.join(diff)}); delete {d} (and the cells that read "
                    f"it) to run it again, or choose another --out")
        elif done.exists():
            raise ValueError(f"{d} holds results but no cell.json; delete it or choose "
                             f"another --out")
        if done.exists():
            self.echo(f"[{self.name}] {name}: finished earlier, reused")
            results = _read(done)
        else:
            resume = d.exists() and (resumable is True or (
                bool(resumable) and (d / str(resumable)).exists()))
            if d.exists() and not resume:
                shutil.rmtree(d)  # an interrupted cell that cannot resume: start again
            self.echo(f"[{self.name}] {name}: {'resuming' if resume else 'running'}")
            d.mkdir(parents=True, exist_ok=True)
            write_json_atomic(record, {"config": config})
            t0 = time.time()
            run(d, resume)
            if not done.exists():
                raise RuntimeError(f"cell {name} ended without writing {done}")
            results = _read(done)
            write_json_atomic(record, {"config": config,
                                      "wall_time_this_call_s": time.time() - t0})
        self.cells[name] = results
        self.wall[name] = _read(record).get("wall_time_this_call_s", 0.0)
        self._log_wandb(name, d, config, results)
        return results

    def skip(self, name: str, why: str) -> None:
        """Record a cell that is not run (an LLM step without an endpoint)."""
        self.echo(f"[{self.name}] {name}: skipped ({why})")
        self.cells[name] = {"skipped": why}

    # -- W&B --------------------------------------------------------------------------

    def _log_wandb(self, name: str, d: Path, config: dict, results: dict) -> None:
        if self.wandb == "off" or (d / "wandb-logged.json").exists():
            return
        try:
            import wandb
        except ImportError:
            self.echo("wandb is not installed: the cells are logged to JSONL only")
            self.wandb = "off"
            return
        run = wandb.init(project="metarl", group=self.group, name=name, job_type=name.split(
            "-")[0], dir=str(d), mode=self.wandb, config={"study": self.name,
                                                          "scale": self.scale, **config},
            reinit="create_new", settings=wandb.Settings(silent=True))
        metrics = d / "metrics.jsonl"
        if metrics.exists():
            for line in metrics.read_text().splitlines():
                row = _numbers(json.loads(line))
                if row:
                    run.log(row)
        for k, v in _numbers(results).items():
            run.summary[k] = v
        files = sorted(d.glob("*.pt"))
        if files:
            art = wandb.Artifact(f"{self.group}-{name}".replace("/", "-"), type="algorithm")
            for f in files:
                art.add_file(str(f))
            run.log_artifact(art)
        run.finish()
        write_json_atomic(d / "wandb-logged.json", {"run": run.id})


def _numbers(row: dict, prefix: str = "") -> dict:
    """The scalar numbers of a JSON row, nested dicts flattened (``Ant-v4/mean``): what a
    W&B chart can show."""
    out = {}
    for k, v in row.items():
        if isinstance(v, dict):
            out.update(_numbers(v, f"{prefix}{k}/"))
        elif isinstance(v, list) and v and all(isinstance(e, dict) for e in v):
            for i, e in enumerate(v):
                out.update(_numbers(e, f"{prefix}{k}/{i}/"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out[prefix + k] = v
    return out


def fingerprint(path: Path) -> str:
    """A cell's identity for the cells that read it: a hash of its ``results.json``."""
    import hashlib

    return hashlib.sha256((path / "results.json").read_bytes()).hexdigest()[:16]


# -- the pipeline both studies run ------------------------------------------------------


def _slug(label: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in label.lower()).strip("-").replace(
        "--", "-")


def budget(steps: dict, env_id: str) -> dict:
    """The evaluation's inner-loop overrides for ``env_id`` from a scale's ``eval_steps``:
    a number is ``total_timesteps``, a dict any configuration fields (``"*MinAtar"``
    matches every MinAtar game; nothing: the environment's own configuration)."""
    n = steps.get(env_id) or (steps.get("*MinAtar") if env_id.endswith("-MinAtar") else None)
    if isinstance(n, dict):
        return dict(n)
    return {"total_timesteps": n} if n else {}


def evaluation_seeds(sources: list[str], count: int) -> list[int]:
    """The ``count`` smallest seeds on which none of the ``sources`` was selected (an LLM
    proposal is selected on its scoring seeds), as ``metarl evaluate`` picks them for the
    whole set at once: every method is then evaluated on the same seeds, so their results
    pair by seed, and none on a seed that chose it."""
    from metarl.artifact import load
    from metarl.evaluate import choose_seeds

    return choose_seeds(count, [load(source) for source in sources])[0]


def _reads(study: Study, source: str) -> dict:
    """The fingerprint of the cell whose artifact ``source`` is (nothing for a name)."""
    path = Path(source)
    if path.suffix != ".pt" or not (path.parent / "results.json").exists():
        return {}
    return {path.parent.name: fingerprint(path.parent)}


class _endpoint:
    """The LLM endpoint of a proposal cell: ``--base-url``, or a scripted server on
    127.0.0.1 answering ``script`` (with a placeholder key, restored afterwards)."""

    def __init__(self, args, script):
        self.args, self.script, self.server, self.saved = args, script, None, None

    def __enter__(self) -> str | None:
        if self.script is None:
            return self.args.base_url
        from metarl.testing.llm_server import ScriptedLLMServer, answer

        self.server = ScriptedLLMServer([answer(code, n) for n, code in self.script])
        self.server.start()
        key = self.args.api_key_env
        self.saved = (key, os.environ.get(key))
        os.environ[key] = os.environ.get(key) or "scripted"
        return self.server.url

    def __exit__(self, *exc):
        if self.server is not None:
            self.server.stop()
            key, old = self.saved
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old


def run_study(study: Study, *, scale: dict, meta_env: str, general: list[str],
              learned: list[dict], handcrafted: list[str], baseline: str,
              findings: list[dict], scripted: dict[str, list], args) -> dict:
    """Meta-train, distil, regress and propose every ``learned`` algorithm, evaluate them
    with the ``handcrafted`` ones, and write the report. ``learned``: dicts with ``member``
    (the ES member), ``prefix`` (of its methods' labels), ``distill`` (student widths:
    ``"same"`` and/or a number), ``symbolic`` and ``propose`` (the proposal family, or
    None)."""

    from metarl.evaluate import evaluate
    from metarl.meta.distill import DistillConfig, distill
    from metarl.meta.evolve import EvolveConfig, meta_train
    from metarl.meta.propose import ProposeConfig, propose
    from metarl.meta.symbolic import SymbolicConfig, symbolic_distill

    progress = not args.no_progress
    algos: dict[str, str] = {}  # method label -> artifact file or member name
    costs: dict[str, dict] = {}
    for spec in learned:
        m, pre = spec["member"], spec.get("prefix", "")
        es_cfg = EvolveConfig(algorithm=m, strategy="openai-es", envs=[meta_env],
                              wandb="off", **scale["es"])
        r = study.cell(f"es-{m}", lambda d, resume, c=es_cfg: meta_train(
            c, out=d, resume=resume, progress=progress, echo=study.echo),
            config=vars(es_cfg), resumable="checkpoint.pt")
        teacher = str(study.cell_dir(f"es-{m}") / "best.pt")
        upstream = {"reads": {f"es-{m}": fingerprint(study.cell_dir(f"es-{m}"))}}
        es_label = f"{pre}ES (black box)"
        algos[es_label] = teacher
        costs[es_label] = {"env_steps": r["env_steps"], "wall_time": r["wall_time"]}
        for width in spec.get("distill", []):
            hidden = None if width == "same" else int(width)
            label = f"{pre}distilled ({'same width' if hidden is None else 'smaller'})"
            name = f"distill-{m}-{'same' if hidden is None else f'h{hidden}'}"
            d_cfg = DistillConfig(teacher=teacher, hidden=hidden, wandb="off",
                                  **scale["distill"][spec["family"]])
            r = study.cell(name, lambda d, resume, c=d_cfg: distill(
                c, out=d, resume=resume, progress=progress, log=study.echo),
                config={**vars(d_cfg), **upstream}, resumable="checkpoints/last.ckpt")
            algos[label] = r["artifact"]
            costs[label] = {"env_steps": costs[es_label]["env_steps"],
                            "wall_time": costs[es_label]["wall_time"] + r["wall_time_s"],
                            "note": f"width {r['hidden']}, {r['student_params']} parameters"}
        if spec.get("symbolic"):
            s_cfg = SymbolicConfig(teacher=teacher, backend="gplearn",
                                   **scale["symbolic"][spec["family"]])
            r = study.cell(f"symbolic-{m}", lambda d, resume, c=s_cfg: symbolic_distill(
                c, out=d, log=study.echo), config={**vars(s_cfg), **upstream})
            label = f"{pre}symbolic"
            algos[label] = r["artifacts"]["best-score"]
            costs[label] = {"env_steps": costs[es_label]["env_steps"],
                            "wall_time": costs[es_label]["wall_time"] + r["wall_time_s"],
                            "formula_size": r["best_score_complexity"],
                            "note": f"`{r['best_score_formula']}`"}
        if spec.get("propose"):
            label, name = f"{pre}LLM proposal", f"propose-{spec['propose']}"
            scripted_run = args.base_url is None and study.scale == "smoke"
            finished = (study.cell_dir(name) / "results.json").exists()
            if args.base_url is None and not scripted_run and not finished:
                study.skip(name, "no LLM endpoint: pass --base-url (and --model)")
                continue
            with _endpoint(args, scripted[spec["propose"]] if scripted_run else None) as url:
                p_cfg = ProposeConfig(family=spec["propose"], model=args.model,
                                      base_url=url, api_key_env=args.api_key_env,
                                      envs=[meta_env], **scale["propose"])
                # the endpoint is not part of the cell's identity (a finished loop is
                # reused without one; a resumed loop may continue on another server)
                r = study.cell(name, lambda d, resume, c=p_cfg: propose(
                    c, out=d, resume=resume, log=study.echo),
                    config={k: v for k, v in vars(p_cfg).items() if k != "base_url"},
                    resumable="state.json")
            algos[label] = r["best"]
            costs[label] = {"env_steps": r["env_steps"], "wall_time": r["wall_time"],
                            "note": f"{r['proposals']} proposals, {r['valid']} valid, best "
                                    f"`{r['best_name']}`"}
    for name in handcrafted:
        algos[name] = name
        costs[name] = {"env_steps": 0, "wall_time": 0.0, "note": "handcrafted"}

    envs = [meta_env, *general]
    seeds = evaluation_seeds(list(algos.values()), scale["eval_seeds"])
    slugs = [_slug(label) for label in algos]
    if len(set(slugs)) != len(slugs):
        raise ValueError(f"two methods share an evaluation cell name: {slugs}")
    evals = {}
    for label, source in algos.items():
        def run_eval(d: Path, resume: bool, source=source, label=label):
            rows, wall = None, 0.0
            for e in envs:  # one evaluation per environment: each its own budget
                sub = d / e
                if not (sub / "results.json").exists():
                    evaluate([source], [e], seeds=seeds,
                             meta_train_envs=[meta_env], out=sub, overwrite=True,
                             progress=progress, echo=lambda *a: None,
                             **budget(scale["eval_steps"], e))
                sub_results = _read(sub / "results.json")
                wall += sub_results["wall_time"]
                row = sub_results["algorithms"][0]
                if rows is None:
                    rows = row
                else:
                    rows["envs"].update(row["envs"])
            rows["algorithm"] = label
            res = {"algorithms": [rows], "envs": envs, "seeds": seeds,
                   "meta_train_envs": [meta_env], "wall_time": wall}
            write_json_atomic(d / "results.json", res)

        evals[label] = study.cell(f"eval-{_slug(label)}", run_eval,
                                  config={"algorithm": label, "source": source,
                                          "envs": envs, "seeds": seeds,
                                          "budgets": {e: budget(scale["eval_steps"], e)
                                                      for e in envs},
                                          "reads": _reads(study, source)},
                                  resumable=True)
        costs[label]["eval_wall_time"] = evals[label]["wall_time"]
    return write_report(study, evals, costs, meta_env, general, baseline, findings,
                        sum(study.wall.values()))
