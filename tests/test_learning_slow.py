"""Learning at the paper's budgets. Slow: run with `python -m pytest -m slow`."""

import pytest
import torch

from metarl.configs import config_for
from metarl.inner import train

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def all_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_ppo_clip_solves_cartpole_with_the_paper_configuration():
    """4 envs x 128 steps, 5e5 steps, 8 seeds: mean final return at least 475."""
    res = train(config_for("CartPole-v1"), "ppo-clip", seeds=range(8))
    assert res.mean >= 475, res.final_return


def test_dpo_learns_cartpole():
    res = train(config_for("CartPole-v1"), "dpo", seeds=range(8))
    assert res.mean >= 400, res.final_return


def test_ppo_improves_pendulum_well_past_random():
    """A random policy scores about -1200 on Pendulum-v1."""
    res = train(config_for("Pendulum-v1"), "ppo-clip", seeds=range(4))
    first = res.curve[:, 0].mean()
    assert first < -900, first
    assert res.mean > -500, res.final_return


def test_ppo_learns_breakout_minatar_with_the_papers_row():
    """The paper's Breakout-MinAtar row (64 envs x 128 steps, 4 x 8 minibatches, a 64-wide
    ReLU MLP, Adam 1e-2) at 1e6 of its 1e7 steps, 4 seeds. A random policy scores 0.43;
    measured on 2 cores (2 seeds, one thread): 19.1 and 15.1 in 51 s."""
    res = train(config_for("Breakout-MinAtar", total_timesteps=1_000_000), "ppo-clip",
                seeds=range(4))
    assert bool((res.final_return > 5).all()) and res.mean >= 10, res.final_return
