"""The statistics and the report of the studies in ``experiments/`` (see ``_study.py``):
normalised returns per method and environment, bootstrap intervals, the paired sign-flip
test of the paper's findings, the plots, and ``report.md`` with ``results.json``."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from pathlib import Path

from metarl.logging import write_json_atomic

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
            why = "; ".join(dict.fromkeys(skipped.values())) or "not run"  # each once
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


def write_report(study, evals: dict, costs: dict, meta_env: str,
                 general: list[str], baseline: str, findings: list[dict],
                 wall: float) -> dict:
    """``report.md``, ``bars.png``, ``curves.png`` and ``results.json`` in the directory
    of ``study`` (a ``_study.Study``), from the cells' results."""
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
    write_json_atomic(study.out / "results.json", results)
    study.echo((study.out / "report.md").read_text())
    return results
