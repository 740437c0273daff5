"""``metarl evaluate``: algorithms x environments x seeds -> a table and learning curves.

Each algorithm (an artifact file or a handcrafted name) trains a population of agents, one
per seed, on each environment through the same inner loop. The table reports raw and
reference-normalised final returns (mean and standard error over seeds), split into the
environments the algorithm was meta-trained on (in distribution) and the others
(generalisation), with what each algorithm cost to find (from its provenance).
"""

from __future__ import annotations

import csv
import dataclasses
import math
import time
import warnings
from pathlib import Path

import torch

from metarl import __version__
from metarl.artifact import load
from metarl.configs import normalization, normalized_return
from metarl.inner.ppo import prepare_configs, train
from metarl.logging import RunDir, refuse_other_run
from metarl.train import parse_seeds


def _stats(x: torch.Tensor) -> tuple[float, float]:
    x = x[torch.isfinite(x)]
    if x.numel() == 0:
        return float("nan"), float("nan")
    se = float(x.std(unbiased=True) / math.sqrt(x.numel())) if x.numel() > 1 else 0.0
    return float(x.mean()), se


LR_FACTORS = (0.25, 0.5, 1.0, 2.0, 4.0)
TUNE_SEED_OFFSET = 10_000


def lr_field(member) -> str | None:
    """The configuration field of the learning rate the algorithm trains with: that of the
    optimiser slot (``lr`` for Adam, the default; ``sgd_lr`` for SGD); None for a learned
    optimiser, whose output is the step."""
    from metarl.inner.ppo import resolve_slots

    return resolve_slots(member)[2].lr_field


def tune_lr(config, member, params, seeds: list[int], factors=LR_FACTORS,
            progress: bool = False) -> tuple[float | None, dict]:
    """The agent learning rate, from ``factors`` x the environment's, with the highest mean
    final return on tuning seeds (``seeds`` shifted by 10,000, so the seeds that are
    reported were not used to choose it). A rate where any tuning seed failed or diverged
    is disqualified (its score is None). An algorithm without a learning rate (a learned
    optimiser) returns ``(None, None)``."""
    name = lr_field(member)
    if name is None or getattr(config, name) is None:
        return None, None
    tune_seeds = [s + TUNE_SEED_OFFSET for s in seeds]
    scores = {}
    for f in factors:
        lr = getattr(config, name) * f
        res = train(dataclasses.replace(config, **{name: lr}), member, params, tune_seeds,
                    progress=progress)
        # A rate where any seed diverged is disqualified: a lone survivor must not win.
        ok = bool(torch.isfinite(res.final_return).all()) and not bool(res.failed.any())
        scores[lr] = float(res.final_return.mean()) if ok else None  # None: disqualified
    clean = {lr: v for lr, v in scores.items() if v is not None}
    if not clean:
        return getattr(config, name), scores  # nothing trained cleanly: keep the configured rate
    return max(clean, key=clean.get), scores


def evaluate(algorithms: list[str], envs: list[str], seeds=8,
             meta_train_envs: list[str] | None = None, out: str | Path | None = None,
             progress: bool = True, echo=print, tune_lr_factors=None, overwrite: bool = False,
             **overrides) -> dict:
    """Train every algorithm on every environment for every seed; write the run directory.

    ``meta_train_envs`` marks the in-distribution columns; by default it is read from the
    artifacts' provenance. ``overrides`` are inner-loop configuration fields.
    ``tune_lr_factors`` (e.g. :data:`LR_FACTORS`) tunes the agent learning rate per
    algorithm and environment first (:func:`tune_lr`), as the paper allows for LLM
    proposals; the chosen rate is in the table and in ``results.json``. A directory
    ``out`` that holds another run is refused unless ``overwrite`` (an evaluation is not
    resumable: a caller that owns the directory, such as ``quickstart --resume``, redoes it).
    """
    if not algorithms:
        raise ValueError("name at least one algorithm: an artifact file or a member name "
                         "(ppo-clip, dpo, lpo, adam, sgd, ...)")
    arts = [load(a) for a in algorithms]  # fails early on unreadable artifacts
    names = [a.name for a in arts]
    for a, spec in zip(arts, algorithms):  # two best.pt of different runs: tell them apart
        if names.count(a.name) > 1:
            a.name = f"{a.name} ({spec})"
    seeds, seed_note = choose_seeds(seeds, arts)
    configs = prepare_configs(envs, **overrides)
    for a in arts:
        for c in configs.values():
            a.check_config(c)
    if out is not None and not overwrite:
        refuse_other_run(out)
    if meta_train_envs is None:
        meta_train_envs = sorted({e for a in arts
                                  for e in a.provenance.get("meta_train_envs", [])})
    in_dist = [e for e in envs if e in meta_train_envs]
    general = [e for e in envs if e not in meta_train_envs]

    default = RunDir.default_path("evaluate", "-".join(a.name for a in arts)[:60])
    run = RunDir(out or default, append=False)
    run.write_config({"command": "evaluate", "version": __version__, "algorithms": algorithms,
                      "envs": envs, "seeds": seeds, "seed_note": seed_note,
                      "meta_train_envs": meta_train_envs,
                      "inner": {e: c.to_dict() for e, c in configs.items()}})
    rows, curves, closers = [], {}, []
    t0 = time.perf_counter()
    try:
        for art, spec in zip(arts, algorithms):
            member, params = art.build()
            closers.append(getattr(member, "close", None))  # a code artifact's sandbox
            row = {"algorithm": art.name, "source": spec, "kind": art.kind,
                   "family": art.family,
                   "method": art.provenance.get("method", ""),
                   "found_by": method_label(art.provenance, art.kind),
                   "find_env_steps": find_cost(art.provenance, "env_steps"),
                   "find_wall_time": find_cost(art.provenance, "wall_time"), "envs": {}}
            lr_name = lr_field(member)
            for env_id, c in configs.items():
                lr_scores = None
                if tune_lr_factors:
                    lr, lr_scores = tune_lr(c, member, params, seeds, tune_lr_factors)
                    if lr is not None:
                        c = dataclasses.replace(c, **{lr_name: lr})
                res = train(c, member, params, seeds, progress=progress)
                mean, se = _stats(res.final_return)
                nmean = nse = None
                if (scale := normalization(c)) is not None:
                    nmean, nse = normalized_return(mean, c), se / scale[1]
                row["envs"][env_id] = {"final_return": res.final_return, "mean": mean,
                                       "stderr": se, "normalized_mean": nmean,
                                       "normalized_stderr": nse,
                                       "in_distribution": env_id in meta_train_envs,
                                       "failed": int(res.failed.sum()),
                                       "lr": getattr(c, lr_name) if lr_name else None,
                                       "lr_name": lr_name,
                                       "lr_scores": lr_scores,
                                       # the learning curve, mean over seeds per update
                                       "timesteps": res.timesteps.tolist(),
                                       "curve": res.curve.nanmean(dim=0).tolist()}
                curves[(art.name, env_id)] = (res.timesteps, res.curve)
                run.log(algorithm=art.name, env=env_id, mean=mean, stderr=se,
                        final_return=res.final_return)
            rows.append(row)
        table = _markdown(rows, in_dist, general, tuned=tune_lr_factors, seed_note=seed_note)
        run.write_summary(f"# metarl evaluate\n\nseeds {seeds}; meta-training environments: "
                          f"{', '.join(meta_train_envs) or 'none'}\n\n{table}\n")
        (run.path / "table.md").write_text(table + "\n")
        _csv(run.path / "table.csv", rows)
        _plot(run.path / "curves.png", curves, envs)
        results = {"algorithms": rows, "envs": envs, "seeds": seeds, "seed_note": seed_note,
                   "meta_train_envs": meta_train_envs,
                   "wall_time": time.perf_counter() - t0}
        run.write_results(results)
    finally:
        run.close()
        for close in closers:
            if close is not None:
                close()
    echo(table)
    echo(f"\nrun directory: {run.path}")
    results["out"] = str(run.path)
    return results


def selection_seeds(provenance: dict) -> set[int]:
    """The inner-loop seeds an algorithm was *selected* on (its fitness was measured there
    and the best kept): ``selection_seeds`` of its provenance, or for a proposal saved
    before that field existed, seeds ``0..seeds-1``; with those of its teacher, for an
    algorithm distilled from one (recursively). Empty when unknown or none."""
    chosen = provenance.get("selection_seeds")
    if chosen is None and provenance.get("method") == "propose" \
            and isinstance(provenance.get("seeds"), int):
        chosen = range(provenance["seeds"])
    own = {int(s) for s in chosen or ()}
    teacher = provenance.get("teacher_provenance")
    return own | selection_seeds(teacher) if isinstance(teacher, dict) else own


def _span(seeds) -> str:
    seeds = sorted(seeds)
    if len(seeds) > 2 and seeds[-1] - seeds[0] == len(seeds) - 1 and len(set(seeds)) == \
            len(seeds):
        return f"{seeds[0]}-{seeds[-1]}"
    return ", ".join(str(s) for s in seeds)


def choose_seeds(seeds, arts) -> tuple[list[int], str]:
    """The evaluation seeds and a sentence saying which they are.

    A count (``8``) gives the smallest seeds that no evaluated algorithm was selected on
    (:func:`selection_seeds`), so that an in-distribution figure is never measured on the
    seeds that chose the algorithm: with a proposal selected on seeds 0-7, the count 8
    gives seeds 8-15. Explicit seeds (``"0,1,2"``) are used as given, and the sentence
    names every algorithm that was selected on some of them."""
    selected = {a.name: selection_seeds(a.provenance) for a in arts}  # names are unique
    used = set().union(*selected.values()) if selected else set()
    explicit = not (isinstance(seeds, int) or (isinstance(seeds, str) and "," not in seeds))
    if explicit:
        seeds = parse_seeds(seeds)
    else:
        count = len(parse_seeds(seeds))
        seeds, s = [], 0
        while len(seeds) < count:
            if s not in used:
                seeds.append(s)
            s += 1
    note = f"Seeds {_span(seeds)}."
    overlap = {n: set(seeds) & sel for n, sel in selected.items() if set(seeds) & sel}
    top = max(seeds)
    left_out = {n: {s for s in sel if s < top} for n, sel in selected.items()}
    left_out = {n: sel for n, sel in left_out.items() if sel}
    if overlap:
        note += " Warning: " + "; ".join(
            f"{n} was selected on seeds {_span(o)}" for n, o in overlap.items()) + \
            ", so its figures there are not held out."
    elif left_out and not explicit:
        note += " Left out: " + "; ".join(
            f"seeds {_span(sel)}, on which {n} was selected" for n, sel in left_out.items()
        ) + "."
    return seeds, note


def find_cost(provenance: dict, key: str):
    """What finding the algorithm cost: its own method's ``key`` plus, for an algorithm
    distilled from a teacher, the teacher's (recursively)."""
    own = provenance.get(key, 0) or 0
    teacher = provenance.get("teacher_provenance")
    return own + (find_cost(teacher, key) if isinstance(teacher, dict) else 0)


def _cell(e: dict, tuned: bool = False) -> str:
    if not math.isfinite(e["mean"]):
        return "failed"
    s = f"{e['mean']:.1f} ± {e['stderr']:.1f}"
    if e["normalized_mean"] is not None:
        s += f" ({e['normalized_mean']:.2f})"
    if tuned:
        s += f" [{e['lr_name']} {e['lr']:.2g}]" if e["lr"] is not None else " [no lr]"
    return s


def method_label(provenance: dict, kind: str) -> str:
    """How an algorithm was found, in a few words: ``handcrafted``, ``ES (openai-es)``,
    ``distilled from ES``, ``symbolic (gplearn) of ES``, ``LLM proposal``; a learned
    member by name (its initial meta-parameters, found by nothing) is ``handcrafted``."""
    method = provenance.get("method", "")
    if not method:
        return "handcrafted" if kind == "handcrafted" else kind
    labels = {"evolve": "ES", "propose": "LLM proposal", "distill": "distilled"}
    if method == "evolve":
        strategy = provenance.get("strategy")
        name = strategy.get("strategy") if isinstance(strategy, dict) else strategy
        label = f"ES ({name})" if name else "ES"
    elif method.startswith("symbolic-"):
        label = f"symbolic ({method.split('-', 1)[1]})"
    else:
        label = labels.get(method, method)
    teacher = provenance.get("teacher_provenance")
    if isinstance(teacher, dict):
        joiner = " from " if method == "distill" else " of "
        label += joiner + method_label(teacher, "network").split(" (")[0]
    return label


def _markdown(rows, in_dist, general, tuned=None, seed_note: str = "") -> str:
    cols = [f"{e} (in dist.)" for e in in_dist] + [f"{e} (generalisation)" for e in general]
    head = ("| algorithm | found by | " + " | ".join(cols)
            + " | env steps to find | time to find |")
    lines = [head, "|---|---|" + "---:|" * (len(cols) + 2)]
    for r in rows:
        cells = [_cell(r["envs"][e], bool(tuned)) for e in in_dist + general]
        lines.append(f"| {r['algorithm']} | {r['found_by']} | " + " | ".join(cells)
                     + f" | {r['find_env_steps']:,} | {r['find_wall_time']:.0f} s |")
    lines.append("")
    if seed_note:
        lines.append(seed_note)
    lines.append("Final return, mean ± standard error over seeds; in parentheses, normalised "
                 "so that a random policy scores 0 and the environment's PPO reference 1. The "
                 "cost to find a distilled algorithm includes its teacher's.")
    if tuned:
        grid = ", ".join(f"x{f:g}" for f in tuned)
        lines.append(f"The agent learning rate [lr] was tuned per algorithm and environment "
                     f"on separate seeds (seed + {TUNE_SEED_OFFSET}) from {grid} of the "
                     f"configured rate.")
    return "\n".join(lines)


def _csv(path: Path, rows) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["algorithm", "found_by", "env", "in_distribution", "mean", "stderr",
                    "normalized_mean", "normalized_stderr", "failed", "find_env_steps",
                    "find_wall_time"])
        for r in rows:
            for env_id, e in r["envs"].items():
                w.writerow([r["algorithm"], r["found_by"], env_id, e["in_distribution"],
                            e["mean"], e["stderr"],
                            e["normalized_mean"], e["normalized_stderr"], e["failed"],
                            r["find_env_steps"], r["find_wall_time"]])


def _plot(path: Path, curves: dict, envs: list[str]) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        warnings.warn("matplotlib is not installed: no curves.png", stacklevel=2)
        return
    fig, axes = plt.subplots(1, len(envs), figsize=(5 * len(envs), 3.6), squeeze=False)
    for ax, env_id in zip(axes[0], envs):
        for (name, e), (steps, curve) in curves.items():
            if e != env_id:
                continue
            mean = curve.nanmean(0)
            n = torch.isfinite(curve).sum(0).clamp(min=1)
            se = torch.nan_to_num(curve.std(0)) / n.sqrt()
            ax.plot(steps, mean, label=name)
            ax.fill_between(steps, mean - se, mean + se, alpha=0.2)
        ax.set_title(env_id)
        ax.set_xlabel("environment steps per agent")
        ax.set_ylabel("return")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
