"""``metarl train``: train one algorithm on some environments over some seeds.

The Python API behind the command: :func:`run_train` resolves the configuration, trains
the whole population of seeds at once per environment, and writes the run directory.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

from metarl import __version__
from metarl.artifact import load
from metarl.configs import normalized_return
from metarl.inner.ppo import TrainResult, prepare_configs, train
from metarl.logging import RunDir, refuse_other_run


def parse_seeds(seeds) -> list[int]:
    """``8`` -> seeds 0..7; ``"3,5,9"`` or ``[3, 5, 9]`` -> those seeds."""
    if isinstance(seeds, int):
        if seeds <= 0:
            raise ValueError(f"--seeds must be a positive count or a list of seeds, got {seeds}")
        return list(range(seeds))
    if isinstance(seeds, str):
        try:
            parts = [int(s) for s in seeds.split(",") if s.strip()]
        except ValueError:
            raise ValueError(
                f"--seeds takes a count (8) or comma-separated integers (0,1,2); got {seeds!r}"
            ) from None
        if len(parts) == 1 and "," not in seeds:
            return parse_seeds(parts[0])
        if not parts:
            raise ValueError("--seeds is empty")
        return parts
    return [int(s) for s in seeds]


def format_table(env_id: str, result: TrainResult) -> str:
    slots = f"drift {result.drift}, optimiser {result.optimizer}"
    lines = [f"{env_id}  ({result.algorithm}: {slots}; "
             f"{result.config.total_timesteps:,} steps per seed)",
             "| seed | final return |", "|---:|---:|"]
    for s, r in zip(result.seeds, result.final_return.tolist()):
        lines.append(f"| {s} | {r:.2f} |" if math.isfinite(r) else f"| {s} | failed |")
    lines.append(f"| **mean ± s.e.** | **{result.mean:.2f} ± {result.stderr:.2f}** |")
    return "\n".join(lines)


def run_train(
    algorithm: str = "ppo-clip",
    envs: list[str] = ("CartPole-v1",),
    seeds=8,
    out: str | Path | None = None,
    progress: bool = True,
    echo=print,
    **overrides,
) -> dict:
    """Train ``algorithm`` on each of ``envs`` for every seed; write the run directory.

    ``algorithm`` is any family's member name (``ppo-clip``, ``dpo``, ``lpo``, ``adam``,
    ``sgd``, ``open``, ``open-ff``, ``no-features``) or an artifact file; it fills its
    family's slot and the other slot keeps its default (PPO clip, Adam).
    ``overrides`` are :class:`metarl.configs.PPOConfig` fields (``total_timesteps=...``).
    Returns the headline results (also written to ``results.json``).
    """
    art = load(algorithm)
    seeds = parse_seeds(seeds)
    configs = prepare_configs(envs, **overrides)  # every check before any work starts
    for c in configs.values():
        art.check_config(c)
    if out is not None:
        refuse_other_run(out)
    run = RunDir(out or RunDir.default_path("train", art.name), append=False)
    run.write_config({
        "command": "train", "algorithm": algorithm, "seeds": seeds, "version": __version__,
        "envs": {e: c.to_dict() for e, c in configs.items()},
    })
    results = {"algorithm": algorithm, "family": art.family, "seeds": seeds, "envs": {}}
    tables = []
    t0 = time.perf_counter()
    member, params = art.build()
    try:
        for env_id, cfg in configs.items():
            def log(stats, env_id=env_id):
                run.log(env=env_id, update=stats["update"], timesteps=stats["timesteps"],
                        mean_return=float(stats["returns"].nanmean()),
                        returns=stats["returns"], loss=stats["loss"])

            result = train(cfg, member, params, seeds=seeds, progress=progress, callback=log)
            table = format_table(env_id, result)
            tables.append(table)
            echo(table + "\n")
            results["envs"][env_id] = {
                "final_return": result.final_return, "mean": result.mean,
                "stderr": result.stderr, "failed": int(result.failed.sum()),
                "wall_time": result.wall_time, "env_steps": result.env_steps,
                "agent_steps_per_second": result.env_steps / result.wall_time,
                "reference_return": cfg.reference_return,
                "random_return": cfg.random_return,
                "normalized_mean": (normalized_return(result.mean, cfg)
                                    if cfg.reference_return else None),
            }
        results["wall_time"] = time.perf_counter() - t0
        run.write_results(results)
        run.write_summary(
            f"# metarl train: {algorithm}\n\nmetarl {__version__}, seeds {seeds}, "
            f"device {configs[envs[0]].device}, {results['wall_time']:.1f} s.\n\n"
            + "\n\n".join(tables) + "\n"
        )
    finally:
        run.close()
        if hasattr(member, "close"):
            member.close()  # a code artifact's sandbox
    echo(f"run directory: {run.path}")
    results["out"] = str(run.path)
    return results


__all__ = ["run_train", "parse_seeds", "format_table"]
