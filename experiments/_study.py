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
import random
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path

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


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


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
            _write_atomic(marker, json.dumps({"study": name, "scale": scale}) + "\n")
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
            _write_atomic(record, json.dumps({"config": config}, indent=1) + "\n")
            t0 = time.time()
            run(d, resume)
            if not done.exists():
                raise RuntimeError(f"cell {name} ended without writing {done}")
            results = _read(done)
            _write_atomic(record, json.dumps({"config": config, "wall_time_this_call_s":
                                              time.time() - t0}, indent=1) + "\n")
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
        _write_atomic(d / "wandb-logged.json", json.dumps({"run": run.id}) + "\n")


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


# -- statistics ---------------------------------------------------------------------------


def mean_se(x: Sequence[float]) -> tuple[float, float]:
    x = [v for v in x if math.isfinite(v)]
    if not x:
        return math.nan, math.nan
    m = sum(x) / len(x)
    if len(x) < 2:
        return m, math.nan
    return m, math.sqrt(sum((v - m) ** 2 for v in x) / (len(x) - 1) / len(x))


def bootstrap_ci(x: Sequence[float], level: float = 0.95, n: int = 10_000,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean (``n`` resamples, fixed seed)."""
    x = [v for v in x if math.isfinite(v)]
    if len(x) < 2:
        return math.nan, math.nan
    rnd = random.Random(seed)
    k = len(x)
    means = sorted(sum(rnd.choice(x) for _ in range(k)) / k for _ in range(n))
    tail = round((1 - level) / 2 * n)  # resamples below the interval, and above it
    return means[tail], means[n - 1 - tail]


def paired_sign_flip(diffs: Sequence[float], n: int = 20_000, seed: int = 0) -> float:
    """Two-sided p-value that paired differences have mean zero: the share of sign flips
    whose mean is at least as far from zero as the observed one (exact enumeration up to
    16 pairs, else ``n`` random flips with a fixed seed). Assumes nothing about the
    distribution beyond symmetry under the null."""
    d = [v for v in diffs if math.isfinite(v)]
    if not d:
        return math.nan
    obs = abs(sum(d))
    at_least = obs * (1 - 1e-9)  # "as far as observed", allowing for summation order
    if len(d) <= 16:
        count = total = 0
        for mask in range(1 << len(d)):
            s = sum(-v if mask >> i & 1 else v for i, v in enumerate(d))
            count += abs(s) >= at_least
            total += 1
        return count / total
    rnd = random.Random(seed)
    count = sum(abs(sum(v if rnd.random() < 0.5 else -v for v in d)) >= at_least
                for _ in range(n))
    return (count + 1) / (n + 1)


# -- the report ---------------------------------------------------------------------------


class Matrix:
    """Per-seed returns of every method on every environment, from evaluation cells, on
    the normalised scale: ``(R - R_random) / (R_ref - R_random)`` with the environment's
    PPO reference return. An environment without one (Ant) is normalised by the study's
    own ``baseline`` mean in its place (so the baseline scores 1 there by construction)
    and is left out of the pooled generalisation mean and of the findings' tests; where
    even that is undefined (the baseline not clearly above random) it is not normalised.
    A failed seed (a diverged agent: no final return) scores as a random policy, 0, and is
    counted (:attr:`failed`): dropping it would favour unstable methods."""

    def __init__(self, evals: dict[str, dict], envs: Sequence[str], baseline: str):
        from metarl.configs import config_for, normalization

        self.methods = list(evals)
        self.envs = list(envs)
        self.raw: dict[tuple[str, str], list[float]] = {}
        self.failed: dict[tuple[str, str], int] = {}
        self.seeds: dict[str, list[int]] = {}
        self.curves: dict[tuple[str, str], tuple[list, list]] = {}
        for m, res in evals.items():
            row = res["algorithms"][0]
            self.seeds[m] = list(res["seeds"]) if isinstance(res["seeds"], list) else []
            for e in self.envs:
                cell = row["envs"][e]
                raw = [float(v) if v is not None else math.nan for v in cell["final_return"]]
                self.raw[m, e] = raw
                self.failed[m, e] = sum(not math.isfinite(v) for v in raw)
                if "curve" in cell:
                    self.curves[m, e] = (cell["timesteps"], cell["curve"])
        self.scale: dict[str, tuple[float, float]] = {}
        self.scale_source: dict[str, str] = {}
        self.referenced: list[str] = []  # environments with a PPO reference return
        for e in self.envs:
            c = config_for(e)
            if (s := normalization(c)) is not None:
                self.scale[e] = s
                self.scale_source[e] = f"reference {c.reference_return:g}"
                self.referenced.append(e)
                continue
            rand = c.random_return or 0.0
            ppo = mean_se(self.raw[baseline, e])[0]
            span = ppo - rand
            if math.isfinite(span) and span > 1e-6 * max(1.0, abs(rand)):
                self.scale[e] = (rand, span)
                self.scale_source[e] = (f"no reference return: {baseline}'s mean in this "
                                        f"study ({ppo:.4g}) as 1, so {baseline} scores 1 "
                                        f"by construction")
            else:
                self.scale[e] = (rand, math.nan)
                self.scale_source[e] = (f"no reference return, and {baseline}'s mean "
                                        f"({ppo:.4g}) is not above random ({rand:.4g}): "
                                        f"not normalised")

    def norm(self, m: str, e: str) -> list[float]:
        rand, span = self.scale[e]
        return [0.0 if not math.isfinite(v) else (v - rand) / span for v in self.raw[m, e]]

    def pooled(self, m: str, envs: Sequence[str]) -> list[float]:
        return [v for e in envs for v in self.norm(m, e)]

    def compare(self, a: str, b: str, envs: Sequence[str]) -> dict:
        """``a`` against ``b`` on the referenced ``envs``, paired by environment and seed
        (every method is evaluated on the same seeds; checked)."""
        if self.seeds[a] != self.seeds[b]:
            raise ValueError(f"{a} and {b} were evaluated on different seeds "
                             f"({self.seeds[a]} and {self.seeds[b]}): they cannot be paired")
        envs = [e for e in envs if e in self.referenced]
        diffs = [x - y for e in envs for x, y in zip(self.norm(a, e), self.norm(b, e))
                 if math.isfinite(x - y)]
        return {"a": a, "b": b, "mean_a": mean_se(self.pooled(a, envs))[0],
                "mean_b": mean_se(self.pooled(b, envs))[0],
                "diff": mean_se(diffs)[0], "n": len(diffs), "p": paired_sign_flip(diffs)}


def _fmt(x: float, nd: int = 2) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.{nd}f}"


def table(mx: Matrix, in_dist: Sequence[str], general: Sequence[str]) -> str:
    envs = [*in_dist, *general]
    pooled = [e for e in general if e in mx.referenced]
    head = ["method", *(f"{e} (in dist.)" for e in in_dist), *general,
            "generalisation mean"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in mx.methods:
        cells = []
        for e in envs:
            mean, se = mean_se(mx.norm(m, e))
            lo, hi = bootstrap_ci(mx.norm(m, e))
            failed = f" ({mx.failed[m, e]} failed)" if mx.failed[m, e] else ""
            cells.append(f"{_fmt(mean)} ± {_fmt(se)} [{_fmt(lo)}, {_fmt(hi)}]{failed}")
        gm, gse = mean_se(mx.pooled(m, pooled))
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {_fmt(gm)} ± {_fmt(gse)} |")
    return "\n".join(lines)


def raw_table(mx: Matrix, envs: Sequence[str]) -> str:
    lines = ["| method | " + " | ".join(envs) + " |", "|" + "---|" * (len(envs) + 1)]
    for m in mx.methods:
        lines.append(f"| {m} | " + " | ".join(
            "{:.4g} ± {:.2g}".format(*mean_se(mx.raw[m, e])) for e in envs) + " |")
    return "\n".join(lines)


def plots(mx: Matrix, out: Path) -> list[str]:
    """``bars.png`` (normalised return per environment, mean and standard error per
    method) and ``curves.png`` (each method's learning curve, mean over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(mx.envs)
    fig, axes = plt.subplots(1, n, figsize=(3.2 * n, 3.4), squeeze=False)
    for ax, e in zip(axes[0], mx.envs):
        stats = [mean_se(mx.norm(m, e)) for m in mx.methods]
        ax.bar(range(len(mx.methods)), [s[0] for s in stats],
               yerr=[0 if math.isnan(s[1]) else s[1] for s in stats], capsize=3,
               color=[f"C{i}" for i in range(len(mx.methods))])
        ax.set_xticks(range(len(mx.methods)), mx.methods, rotation=60, ha="right",
                      fontsize=7)
        ax.set_title(e, fontsize=9)
        ax.axhline(1.0, color="grey", lw=0.6, ls="--")
    axes[0][0].set_ylabel("normalised return")
    fig.tight_layout()
    fig.savefig(out / "bars.png", dpi=110)
    plt.close(fig)
    fig, axes = plt.subplots(1, n, figsize=(3.2 * n, 3.0), squeeze=False)
    for ax, e in zip(axes[0], mx.envs):
        for i, m in enumerate(mx.methods):
            if (m, e) in mx.curves:
                steps, curve = mx.curves[m, e]
                ax.plot(steps, curve, color=f"C{i}", label=m, lw=1)
        ax.set_title(e, fontsize=9)
        ax.set_xlabel("environment steps", fontsize=8)
    axes[0][0].set_ylabel("return")
    axes[0][-1].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=110)
    plt.close(fig)
    return ["bars.png", "curves.png"]


def verdict(scale: str, cmp: dict, expect: str) -> str:
    """Whether a comparison bears out a finding that expects ``a`` to be ``"better"``,
    ``"worse"``, ``"not worse"`` or ``"not better"`` than ``b`` (paired sign-flip test,
    5% level). An expected difference needs a significant one in its direction; a "not
    worse" / "not better" finding is only *not contradicted* by the absence of a
    significant difference (which is not evidence of equality)."""
    p, diff = cmp["p"], cmp["diff"]
    if scale == "smoke":
        return "too small to say (smoke scale: a few seeds at a tiny budget)"
    if cmp["n"] < 6 or not math.isfinite(p):
        return f"too small to say ({cmp['n']} pairs; 6 or more are needed)"
    significant = p < 0.05
    if expect in ("better", "worse"):
        if significant and (diff > 0) == (expect == "better"):
            return "supported"
        return "contradicted" if significant else \
            "not shown (no significant difference at this scale)"
    against = diff < 0 if expect == "not worse" else diff > 0
    if significant and against:
        return "contradicted"
    if significant:
        return "supported (significantly " + ("better" if diff > 0 else "worse") + ")"
    return "not contradicted (no significant difference)"


def findings_section(scale: str, mx: Matrix, findings: Sequence[dict],
                     skipped: dict) -> str:
    """``findings``: dicts with ``text`` (the paper's finding), ``a``, ``b`` (methods),
    ``envs``, ``expect`` and optionally ``note``."""
    out = ["| finding | comparison | a | b | a - b | pairs | p (sign flip) | verdict |",
           "|---|---|---:|---:|---:|---:|---:|---|"]
    notes = []
    for i, f in enumerate(findings, 1):
        missing = [m for m in (f["a"], f["b"]) if m not in mx.methods]
        if missing:
            why = "; ".join(skipped.values()) or "not run"
            out.append(f"| {i}. {f['text']} | {f['a']} vs {f['b']} | | | | | | "
                       f"{', '.join(missing)} not run: {why} |")
            continue
        c = mx.compare(f["a"], f["b"], f["envs"])
        out.append(f"| {i}. {f['text']} | {f['a']} vs {f['b']} ({f['expect']}) | "
                   f"{_fmt(c['mean_a'])} | {_fmt(c['mean_b'])} | {_fmt(c['diff'])} | "
                   f"{c['n']} | {_fmt(c['p'], 3)} | {verdict(scale, c, f['expect'])} |")
        if f.get("note"):
            notes.append(f"{i}. {f['note']}")
    return "\n".join(out) + ("\n\n" + "\n".join(notes) if notes else "")


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
    proposal is selected on its scoring seeds): every method is evaluated on the same
    seeds, so their results pair by seed, and none on a seed that chose it."""
    from metarl.artifact import load
    from metarl.evaluate import selection_seeds

    used = set()
    for source in sources:
        used |= selection_seeds(load(source).provenance)
    seeds, s = [], 0
    while len(seeds) < count:
        if s not in used:
            seeds.append(s)
        s += 1
    return seeds


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
            _write_atomic(d / "results.json", json.dumps(res, default=str) + "\n")

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


def write_report(study: Study, evals: dict, costs: dict, meta_env: str,
                 general: list[str], baseline: str, findings: list[dict],
                 wall: float) -> dict:
    """``report.md``, ``bars.png``, ``curves.png`` and ``results.json`` in the study's
    directory, from the cells' results."""
    mx = Matrix(evals, [meta_env, *general], baseline)
    figures = plots(mx, study.out)
    seeds = next(iter(evals.values()))["seeds"]
    skipped = {k: v["skipped"] for k, v in study.cells.items() if "skipped" in v}
    pooled = [e for e in general if e in mx.referenced]
    lines = [f"# The {study.name} study at the {study.scale} scale", "",
             f"Meta-trained on {meta_env}; evaluated there (in distribution) and on "
             f"{', '.join(general)} (generalisation), on seeds "
             f"{', '.join(map(str, seeds))} for every method and environment (none of "
             f"them a seed any method was selected on). Its cells took "
             f"{wall / 60:.1f} minutes in all (each cell's last run; the time of an "
             f"interrupted attempt is not counted).", ""]
    if study.scale != "paper":
        lines += [f"At the {study.scale} scale the budgets are far below the paper's; the "
                  f"numbers show the pipeline, not the paper's result.", ""]
    lines += ["## Normalised return", "",
              "Mean ± standard error [95% percentile-bootstrap interval of the mean] over "
              "seeds; 0 is a random policy, 1 the PPO reference. A failed seed (a "
              "diverged agent) counts as 0 and is marked. The generalisation mean pools "
              f"the seeds of {', '.join(pooled)} (the generalisation environments with a "
              "reference return). With fewer than about 8 seeds the bootstrap interval "
              "is narrower than the truth: read it as a rough range.", "",
              table(mx, [meta_env], general), "",
              "Normalised by: " + "; ".join(f"{e}: {s}" for e, s in
                                            mx.scale_source.items()) + ".", "",
              "## Raw returns (mean ± standard error)", "", raw_table(mx, mx.envs), "",
              "## Cost", "",
              "Environment steps and wall time spent *finding* each algorithm (a "
              "distillation or formula adds its own time to its teacher's), and the "
              "evaluation's wall time.", "",
              "| method | env steps to find | wall time to find (s) | formula size | "
              "evaluation (s) | notes |", "|---|---:|---:|---:|---:|---|"]
    for label in mx.methods:
        c = costs[label]
        lines.append(f"| {label} | {c['env_steps']:,} | {c['wall_time']:.0f} | "
                     f"{c.get('formula_size', '')} | {c.get('eval_wall_time', 0):.0f} | "
                     f"{c.get('note', '')} |")
    lines += ["", "## Figures", "", *(f"![{f}]({f})" for f in figures), "",
              "## The paper's findings", "",
              "Each finding is tested on the generalisation environments with a reference "
              f"return ({', '.join(pooled)}), paired by environment and seed: the "
              "two-sided p-value of a sign-flip permutation test of the mean paired "
              "difference (exact up to 16 pairs, else 20,000 random flips). An expected "
              "difference is *supported* by p < 0.05 in its direction; an expected "
              "absence of difference is only *not contradicted* when p >= 0.05. No "
              "verdict at the smoke scale or with fewer than 6 pairs.", "",
              findings_section(study.scale, mx, [{**f, "envs": general} for f in findings],
                               skipped)]
    if skipped:
        lines += ["", "## Not run", ""] + [f"- {k}: {v}" for k, v in skipped.items()]
    (study.out / "report.md").write_text("\n".join(lines) + "\n")
    results = {"study": study.name, "scale": study.scale, "meta_env": meta_env,
               "general": general, "seeds": seeds, "wall_time": wall, "skipped": skipped,
               "normalized": {m: {e: mean_se(mx.norm(m, e))[0] for e in mx.envs}
                              for m in mx.methods},
               "generalisation_mean": {m: mean_se(mx.pooled(m, pooled))[0]
                                       for m in mx.methods},
               "failed_seeds": {m: {e: mx.failed[m, e] for e in mx.envs}
                                for m in mx.methods},
               "costs": costs}
    _write_atomic(study.out / "results.json", json.dumps(_finite(results), indent=1,
                                                          default=str) + "\n")
    study.echo((study.out / "report.md").read_text())
    return results


def _finite(x):
    """``x`` with NaN and infinities as None (JSON has no NaN)."""
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x
