"""The inner loop reads nothing back to the host per environment step.

On an accelerator a host read (``.item()``, ``bool(t)``, ``.cpu()``, a boolean mask as an
index...) makes Python wait for the device, once per step of a rollout that should run
ahead. A ``TorchFunctionMode`` records every such call with the library function it came
from; training with 16 and with 32 steps per rollout (the same number of updates and
minibatch steps) shows which calls happen per step. On the CPU the only ones allowed are
the reads that are cheap there and guarded to the CPU in the code (the torch-native
environments' "is the block of drawn reset states used up?", MinAtar's rows to reset, and
the discrete action range check); on CUDA none is.

The probe sees reads made through Python (the calls below); a synchronisation inside a C++
kernel is not seen. On CUDA, ``torch.cuda.set_sync_debug_mode`` would see those too.
"""

from __future__ import annotations

import collections
import os
import sys

import pytest
import torch
from torch.overrides import TorchFunctionMode

import metarl
from metarl.artifact import load
from metarl.inner.ppo import prepare_configs, train

READS = {"item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__",
         "nonzero", "masked_select", "unique", "argwhere"}

#: (call, library function) pairs that read per step on the CPU only (each behind a
#: ``device.type == "cpu"`` test: the torch-native environments' block of reset states,
#: MinAtar's rows to reset, the discrete action range)
CPU_ONLY = {("__bool__", "_next_initial"), ("nonzero", "_restart"),
            ("__int__", "check_actions")}
PACKAGE = os.path.dirname(os.path.abspath(metarl.__file__)) + os.sep


class HostReads(TorchFunctionMode):
    """Counts host reads by (call, the innermost metarl function on the stack)."""

    def __init__(self):
        super().__init__()
        self.calls = collections.Counter()

    def _where(self) -> str:
        f = sys._getframe(2)
        while f is not None:
            if os.path.abspath(f.f_code.co_filename).startswith(PACKAGE):
                return f.f_code.co_name
            f = f.f_back
        return "?"

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in READS:
            self.calls[name, self._where()] += 1
        elif name in ("__getitem__", "__setitem__") and len(args) > 1:
            index = args[1] if isinstance(args[1], tuple) else (args[1],)
            if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in index):
                self.calls["boolean index", self._where()] += 1
        return func(*args, **(kwargs or {}))


def per_step_reads(algorithm: str, env_id: str, device: str, short: int = 16,
                   compile: bool = False) -> dict:
    counts = []
    member, params = load(algorithm).build()
    # compiled: first runs of both lengths unprobed, which build the graphs of their shapes
    for steps in ((short, 2 * short) if compile else ()) + (short, 2 * short):
        num_envs = 4
        cfg = prepare_configs([env_id], num_envs=num_envs, num_steps=steps,
                              total_timesteps=2 * num_envs * steps, backend="torch",
                              device=device, compile=compile)[env_id]
        with HostReads() as probe:
            train(cfg, member, params, seeds=[0, 1], progress=False)
        counts.append(probe.calls)
    counts = counts[-2:]
    return {k: counts[1][k] - counts[0][k] for k in counts[0] | counts[1]
            if counts[1][k] != counts[0][k]}


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("algorithm, env_id", [
    ("ppo-clip", "CartPole-v1"),
    ("open", "CartPole-v1"),  # a learned optimiser in the optimiser slot
    ("ppo-clip", "Pendulum-v1"),  # continuous actions, normalised observations and rewards
    ("ppo-clip", "Breakout-MinAtar"),  # the paper's meta-training game
])
def test_no_host_read_per_step(algorithm, env_id, device):
    # Pendulum's episodes end at step 200: rollouts of 112 and 224 steps cross it
    short = 112 if env_id == "Pendulum-v1" else 16
    reads = per_step_reads(algorithm, env_id, device, short)
    if device != "cpu":
        assert reads == {}, f"host reads per step: {reads}"
        return
    assert set(reads) <= CPU_ONLY, f"host reads per step: {reads}"
    # and the probe saw the CPU-only ones: `short` more steps in each of 2 updates, one reset
    # check per step (the block for CartPole and Pendulum, the rows for MinAtar), and for
    # discrete actions two range reads (lowest and highest)
    extra = 2 * short
    if env_id.endswith("MinAtar"):
        expected = {("nonzero", "_restart"): extra}
    else:
        expected = {("__bool__", "_next_initial"): extra}
    if env_id != "Pendulum-v1":
        expected["__int__", "check_actions"] = 2 * extra
    assert reads == expected


@pytest.mark.parametrize("device", DEVICES)
def test_the_compiled_loop_reads_nothing_per_step(device):
    """With ``compile=True`` (the environment's step a traced graph, which also skips the
    action check: the policy's actions are valid by construction), CartPole's rollout
    reads nothing back to the host per step, on the CPU too."""
    assert per_step_reads("ppo-clip", "CartPole-v1", device, compile=True) == {}


def test_the_probe_sees_a_host_read():
    # the check above cannot pass by seeing nothing: an .item() per step is counted
    with HostReads() as probe:
        x = torch.ones(3)
        for _ in range(5):
            x.sum().item()
            _ = x[x > 0]
    assert probe.calls["item", "?"] == 5 and probe.calls["boolean index", "?"] == 5
