"""What an optimiser proposal costs in the sandbox, against the same update in-process.

Trains PPO on CartPole-v1 (the paper's configuration, ``--total-timesteps`` each, 8 seeds as
one population) with the optimiser slot filled three ways, for each signature:

- the warm start written as proposal source and run through
  :class:`~metarl.families.optim.proposal.SandboxedOptimizer` (one request to a sandboxed
  child per optimiser step, with the population's ``[P, D]`` inputs): SGD for ``open-ff``
  (and ``no-features``), Adam for ``open``;
- **the same update in-process** (the baseline): the same member and stepper (the same
  momenta, inputs, noise and checks) with the proposal's function called directly in
  this process instead of through the sandbox; the difference is what the sandbox costs;
- metarl's handcrafted member (``sgd``, ``adam``), which builds none of the signature's
  inputs, for reference. The ``open`` signature reads dormancy, so its runs also record
  the per-layer activations (as an in-process OPEN would).

Reports the sandbox's share of an inner run, ``1 - t_same_in_process / t_sandboxed``, the
ratio to the handcrafted member, the share of the sandboxed run spent in its optimiser step
(inputs, the call, the checks; measured within the run, so less sensitive to other load on
the machine than the difference of two runs), and one call of each signature on its own
(the best of ``--repeats`` runs each). The final returns of the two runs are
the same for SGD (bit for bit) and close for Adam (float32 rounding of the momentum
update differs; RL amplifies it).

    python benchmarks/sandbox_optim.py
    python benchmarks/sandbox_optim.py --total-timesteps 65536 --seeds 8

Ends with one JSON line of the headline figures.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from types import SimpleNamespace

import torch

from metarl.configs import config_for
from metarl.families.optim.proposal import PROPOSALS, call_update
from metarl.inner.ppo import train


def time_call(member, n: int, repeats: int = 100) -> float:
    """Seconds per call of a started member's proposal on inputs of ``n`` elements."""
    spec = member.spec
    values = {x: torch.randn(n) for x in spec.inputs}
    values.update(training_proportion=0.5, batch_proportion=0.5, lr=1e-3, step=1)
    values = {k: v for k, v in values.items() if k in spec.params}
    for _ in range(5):
        call_update(member.sandbox, spec, values)
    t0 = time.perf_counter()
    for _ in range(repeats):
        call_update(member.sandbox, spec, values)
    return (time.perf_counter() - t0) / repeats


class Timed:
    """Wraps a stepper's ``step`` to add up the seconds spent in it (building the inputs,
    the sandbox call, the checks and the update)."""

    def __init__(self, stepper):
        self.stepper, self.seconds = stepper, 0.0
        self.needs_activations = stepper.needs_activations

    def init(self, params):
        return self.stepper.init(params)

    def step(self, *args):
        t0 = time.perf_counter()
        self.stepper.step(*args)
        self.seconds += time.perf_counter() - t0


class InProcess:
    """The proposal's function called directly in this process, with the sandbox's calling
    convention (flat float32 tensors and numbers in, float32 arrays out). Benchmark only:
    it runs the warm start, trusted code written here."""

    def __init__(self, code: str, function: str):
        namespace = {"torch": torch, "math": math}
        exec(compile(code, "<warm start>", "exec"), namespace)  # noqa: S102 - our own code
        self.fn = namespace[function]

    def call(self, inputs, constants, outputs=1):
        flat = {k: torch.as_tensor(v, dtype=torch.float32).reshape(-1) for k, v in
                inputs.items()}
        shape = next(iter(inputs.values())).shape
        out = self.fn(**flat, **constants)
        outs = out if outputs > 1 else (out,)
        return SimpleNamespace(outputs=tuple(o.detach().reshape(shape).numpy() for o in outs))


def measure(cfg, signature: str, baseline: str, seeds, repeats: int) -> dict:
    prop = PROPOSALS.for_algorithm(signature)
    base, same, boxed, in_step = [], [], [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        ref = train(cfg, baseline, None, seeds)
        base.append(time.perf_counter() - t0)
        member = prop.build(prop.warm_start_code)
        box = member.sandbox
        member.sandbox = InProcess(prop.warm_start_code, prop.spec.function)
        try:
            t0 = time.perf_counter()
            mine = train(cfg, member, None, seeds)
            same.append(time.perf_counter() - t0)
        finally:
            member.sandbox = box
            member.close()
        member = prop.build(prop.warm_start_code)
        population, timers = member.population, []

        def timed(*args, population=population, timers=timers):
            timers.append(Timed(population(*args)))
            return timers[-1]

        member.population = timed
        try:
            t0 = time.perf_counter()
            res = train(cfg, member, None, seeds)
            boxed.append(time.perf_counter() - t0)
            in_step.append(timers[0].seconds / boxed[-1])
        finally:
            member.close()
    member = prop.build(prop.warm_start_code)
    try:
        n = len(seeds) * int(ref.agent_params.shape[1])
        call_s = time_call(member, n)
    finally:
        member.close()
    steps = cfg.num_updates * cfg.update_epochs * cfg.num_minibatches
    t_in, t_same, t_box = min(base), min(same), min(boxed)
    return {"signature": signature, "baseline": baseline, "handcrafted_s": t_in,
            "in_process_s": t_same, "sandboxed_s": t_box, "ratio": t_box / t_same,
            "share": 1.0 - t_same / t_box, "ratio_to_handcrafted": t_box / t_in,
            "optimiser_steps": steps, "call_ms": call_s * 1e3, "call_elements": n,
            "inputs": len(prop.spec.inputs),
            "overhead_per_step_ms": (t_box - t_same) / steps * 1e3,
            "step_share": in_step[boxed.index(t_box)],
            "same_returns": bool(torch.equal(mine.final_return, res.final_return)),
            "same_as_handcrafted": bool(torch.equal(ref.final_return, res.final_return)),
            "mean_returns": [float(ref.final_return.mean()), float(res.final_return.mean())]}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--total-timesteps", type=int, default=32_768)
    p.add_argument("--seeds", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads of this process (the sandboxed child uses one); one "
                        "keeps the figures stable on a machine shared with other work")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = config_for("CartPole-v1", total_timesteps=args.total_timesteps)
    seeds = list(range(args.seeds))

    # Warm-up: the fork server's one-time start (it imports torch) and the first train.
    prop = PROPOSALS.for_algorithm("open-ff")
    prop.build(prop.warm_start_code).close()
    train(cfg, "sgd", None, seeds)

    rows = [measure(cfg, "open-ff", "sgd", seeds, args.repeats),
            measure(cfg, "open", "adam", seeds, args.repeats)]
    for r in rows:
        print(f"{r['signature']:8s} warm start in-process: {r['in_process_s']:.2f} s; "
              f"sandboxed: {r['sandboxed_s']:.2f} s ({r['ratio']:.3f}x, sandbox share "
              f"{100 * r['share']:.1f}%) for {r['optimiser_steps']} optimiser steps; "
              f"{r['overhead_per_step_ms']:.2f} ms more per step; handcrafted "
              f"{r['baseline']}: {r['handcrafted_s']:.2f} s ({r['ratio_to_handcrafted']:.3f}x); "
              f"within the sandboxed run {100 * r['step_share']:.1f}% in the optimiser step; "
              f"one call of {r['inputs']} inputs x {r['call_elements']} elements "
              f"{r['call_ms']:.2f} ms; same final returns in and out of the sandbox: "
              f"{r['same_returns']}, and as {r['baseline']}: {r['same_as_handcrafted']}")
    out = {"env": "CartPole-v1", "total_timesteps": cfg.total_timesteps, "seeds": args.seeds,
           "threads": args.threads,
           **{f"{r['signature']}_{k}": r[k] for r in rows
              for k in ("handcrafted_s", "in_process_s", "sandboxed_s", "ratio", "share",
                        "ratio_to_handcrafted", "step_share", "call_ms", "same_returns")},
           "optimiser_steps": rows[0]["optimiser_steps"],
           "call_elements": rows[0]["call_elements"]}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
