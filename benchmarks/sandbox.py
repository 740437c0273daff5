"""What scoring a proposal in the sandbox costs, against the same drift run in-process.

Trains PPO on CartPole-v1 (the paper's configuration, ``--total-timesteps`` each, 8 seeds as
one population) twice: with PPO's clip as a metarl member in this process (the baseline),
and with the same clip written as proposal source and run through
:class:`~metarl.families.drift.proposal.SandboxedDrift` (one request to a sandboxed child per
minibatch). Also times starting a sandbox (a fork of the fork server) and one call.

    python benchmarks/sandbox.py
    python benchmarks/sandbox.py --total-timesteps 65536 --seeds 8

Ends with one JSON line of the headline figures.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from metarl.configs import config_for
from metarl.families.drift.proposal import PROPOSAL, DriftSandbox, SandboxedDrift
from metarl.inner.ppo import train


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--total-timesteps", type=int, default=32_768)
    p.add_argument("--seeds", type=int, default=8)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args(argv)
    cfg = config_for("CartPole-v1", total_timesteps=args.total_timesteps)
    seeds = list(range(args.seeds))
    code = PROPOSAL.warm_start_code

    # Warm-up: the fork server's one-time start (it imports torch) and the first train.
    with DriftSandbox(code) as box:
        box.drift(torch.ones(4), torch.ones(4), 0.2)
    train(cfg, "ppo-clip", None, seeds)

    t0 = time.perf_counter()
    for _ in range(20):
        with DriftSandbox(code) as box:
            pass
    start_s = (time.perf_counter() - t0) / 20

    n = cfg.num_envs * cfg.num_steps // cfg.num_minibatches * args.seeds
    r, a = torch.rand(n) + 0.5, torch.randn(n)
    with DriftSandbox(code) as box:
        for _ in range(20):
            box.drift(r, a, 0.2)
        t0 = time.perf_counter()
        for _ in range(200):
            box.drift(r, a, 0.2)
        call_s = (time.perf_counter() - t0) / 200

    base, boxed = [], []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        ref = train(cfg, "ppo-clip", None, seeds)
        base.append(time.perf_counter() - t0)
        with DriftSandbox(code) as box:
            t0 = time.perf_counter()
            res = train(cfg, SandboxedDrift(box), None, seeds)
            boxed.append(time.perf_counter() - t0)
    calls = (cfg.total_timesteps // (cfg.num_envs * cfg.num_steps)) * cfg.update_epochs * \
        cfg.num_minibatches
    out = {
        "env": "CartPole-v1", "total_timesteps": cfg.total_timesteps, "seeds": args.seeds,
        "in_process_s": min(base), "sandboxed_s": min(boxed),
        "slowdown": min(boxed) / min(base), "drift_calls": calls,
        "call_ms": call_s * 1e3, "call_elements": n, "sandbox_start_ms": start_s * 1e3,
        "same_returns": bool(torch.allclose(ref.final_return, res.final_return, atol=1e-3)),
    }
    print(f"in-process ppo-clip: {out['in_process_s']:.2f} s; sandboxed source of the same "
          f"drift: {out['sandboxed_s']:.2f} s ({out['slowdown']:.3f}x) for {calls} drift "
          f"calls of {n} elements")
    print(f"one call {out['call_ms']:.3f} ms; starting a sandbox "
          f"{out['sandbox_start_ms']:.1f} ms; same final returns: {out['same_returns']}")
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
