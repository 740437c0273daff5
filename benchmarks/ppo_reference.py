"""PPO (clip, Adam) at an environment's full configured budget, against a reference return.

Trains ``--seeds`` agents with metarl's PPO on the environment's configuration row (every
field as ``metarl train`` resolves it; ``--set FIELD=VALUE`` changes one) and prints the
per-seed final returns, their mean and standard error, and the ratio of the mean to the
reference return: by default the configuration's own (for the MinAtar games, the PPO return
Goldie et al. 2025 report: Breakout 50.08, Asterix 15.04, Freeway 61.84, SpaceInvaders
167.09), or ``--reference`` for another. The run directory (``--out``) is a normal
``metarl train`` run with its ``results.json``.

    python benchmarks/ppo_reference.py --env Breakout-MinAtar --seeds 8
    python benchmarks/ppo_reference.py --env Pendulum-v1 --seeds 8

This is also how the reference returns of rows without a published one are measured: the
mean it prints is the figure to store as ``reference_return``. It ends with one JSON line
of the headline figures.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch

from metarl.configs import config_for
from metarl.train import run_train


def parse_sets(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set takes FIELD=VALUE (total_timesteps=1000000), got {item!r}")
        for cast in (int, float):
            try:
                out[key] = cast(value)
                break
            except ValueError:
                continue
        else:
            out[key] = {"true": True, "false": False}.get(value.lower(), value)
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--env", default="Breakout-MinAtar")
    ap.add_argument("--seeds", default="8", help="a count (8 -> 0..7) or a list (0,3,7)")
    ap.add_argument("--algorithm", default="ppo-clip")
    ap.add_argument("--reference", type=float, default=None,
                    help="the return to compare with (default: the configuration's)")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="a configuration field to change (repeatable)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads")
    ap.add_argument("--out", default=None, help="run directory (default: runs/train-...)")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = parse_sets(args.set)
    cfg = config_for(args.env, **overrides)
    reference = args.reference if args.reference is not None else cfg.reference_return
    t0 = time.perf_counter()
    res = run_train(args.algorithm, [args.env], seeds=args.seeds, out=args.out,
                    progress=not args.no_progress, **overrides)
    env = res["envs"][args.env]
    wall = time.perf_counter() - t0
    ratio = env["mean"] / reference if reference else None
    print(f"{args.env}: {args.algorithm} {env['mean']:.2f} ± {env['stderr']:.2f} over "
          f"{len(res['seeds'])} seeds at {cfg.total_timesteps:,} steps each, "
          f"{wall / 60:.1f} min on {torch.get_num_threads()} threads")
    if reference:
        print(f"reference return {reference:.2f}: ratio {ratio:.3f}")
    headline = {
        "env": args.env, "algorithm": args.algorithm, "seeds": res["seeds"],
        "total_timesteps": cfg.total_timesteps, "mean": env["mean"], "stderr": env["stderr"],
        "final_return": [float(r) if math.isfinite(float(r)) else None
                         for r in env["final_return"]],
        "reference_return": reference, "ratio_to_reference": ratio,
        "random_return": cfg.random_return, "wall_time_s": wall,
        "threads": torch.get_num_threads(), "out": res["out"],
    }
    print(json.dumps(headline))
    return headline


if __name__ == "__main__":
    main()
