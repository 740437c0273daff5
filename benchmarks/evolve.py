"""Share of meta-training wall time spent outside the inner loop.

Runs a few generations of ``metarl meta-train lpo`` at population 64 for each strategy and
splits each generation's wall time (from one generation's metrics line to the next) into
the inner loop (training and evaluating agents: every call of
``Family.score``) and everything else (ask, tell, fitness bookkeeping,
checkpoint, artifacts, JSONL and W&B logging). Target: under 2% outside the inner loop at
population 64. The one-time set-up and wrap-up of the run (configuration checks, W&B
start-up, final artifacts) is reported separately, as the share of the whole call.

    python benchmarks/evolve.py
    python benchmarks/evolve.py --generations 4 --total-timesteps 8192

Ends with one JSON line of the headline figures.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

from metarl.families.base import Family
from metarl.meta import evolve


def measure(strategy: str, args) -> dict:
    inner = {"t": 0.0}
    calls = []  # (start, end) of every inner-loop call, wall clock
    original = Family.score

    def timed(*a, **kw):
        t0 = time.perf_counter()
        w0 = time.time()
        try:
            return original(*a, **kw)
        finally:
            inner["t"] += time.perf_counter() - t0
            calls.append((w0, time.time()))

    cfg = evolve.EvolveConfig(
        strategy=strategy, generations=args.generations, popsize=args.popsize,
        eval_every=args.generations, eval_seeds=8, wandb=args.wandb,
        inner=dict(total_timesteps=args.total_timesteps, backend=args.backend))
    Family.score = timed
    try:
        with tempfile.TemporaryDirectory() as out:
            t0 = time.perf_counter()
            evolve.meta_train(cfg, out=out, progress=False, echo=lambda *a: None)
            total = time.perf_counter() - t0
            stamps = [json.loads(line)["time"]
                      for line in open(f"{out}/metrics.jsonl").read().splitlines()]
    finally:
        Family.score = original
    # Steady state: from one generation's log line to the next there is the previous
    # generation's checkpoint, then this generation's ask, inner loop, tell and logging.
    gen_wall = gen_inner = 0.0
    for a, b in zip(stamps, stamps[1:]):
        gen_wall += b - a
        gen_inner += sum(e - s for s, e in calls if a <= s and e <= b)
    outside = total - inner["t"]
    return {"total_s": total, "inner_s": inner["t"], "outside_s": outside,
            "outside_share": outside / total,
            "generation_outside_share": (gen_wall - gen_inner) / gen_wall,
            "outside_per_generation_s": (gen_wall - gen_inner) / (len(stamps) - 1)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--strategies", default="openai-es,cma-es")
    ap.add_argument("--generations", type=int, default=4)
    ap.add_argument("--popsize", type=int, default=64)
    ap.add_argument("--total-timesteps", type=int, default=4096,
                    help="inner steps per agent (the paper uses 5e5: the share only shrinks)")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--wandb", default="offline", choices=["offline", "off"])
    args = ap.parse_args()
    print(f"lpo on CartPole-v1, population {args.popsize}, {args.generations} generations, "
          f"{args.total_timesteps} inner steps per agent, W&B {args.wandb}")
    headline = {"benchmark": "evolve", "popsize": args.popsize,
                "total_timesteps": args.total_timesteps}
    for name in args.strategies.split(","):
        m = measure(name, args)
        print(f"{name:>10}: per generation {m['generation_outside_share']:.2%} outside the "
              f"inner loop ({m['outside_per_generation_s']:.3f} s); whole run with set-up "
              f"and wrap-up {m['total_s']:.1f} s, {m['outside_share']:.2%} outside")
        headline[f"{name}_generation_outside_share"] = round(m["generation_outside_share"], 4)
        headline[f"{name}_outside_per_generation_s"] = round(m["outside_per_generation_s"], 3)
        headline[f"{name}_run_outside_share"] = round(m["outside_share"], 4)
    print(json.dumps(headline))


if __name__ == "__main__":
    main()
