"""Fitness across environments: random policy 0, PPO reference 1, order kept for negative
returns."""

import dataclasses

import pytest
import torch

from metarl.configs import RANDOM_RETURNS, config_for, normalized_return
from metarl.envs import random_return
from metarl.families import get_family

TINY = dict(total_timesteps=1024, num_steps=32, num_minibatches=2, update_epochs=2,
            backend="torch")


def test_scale_and_order():
    cart = config_for("CartPole-v1")
    assert normalized_return(cart.random_return, cart) == 0.0
    assert normalized_return(475.0, cart) == pytest.approx(1.0)
    # Pendulum's returns are negative: dividing by a negative reference reversed the order
    # (-300 / -200 = 1.5 > -250 / -200 = 1.25); the normalised score keeps it.
    pend = config_for("Pendulum-v1", reference_return=-200.0)
    assert pend.random_return == RANDOM_RETURNS["Pendulum-v1"] < -1000
    assert normalized_return(-250.0, pend) > normalized_return(-300.0, pend)
    assert -300.0 / -200.0 > -250.0 / -200.0  # the old rule's reversal
    with pytest.raises(ValueError, match="no PPO reference return"):
        normalized_return(1.0, config_for("Pendulum-v1"))
    with pytest.raises(ValueError, match="must be above the random policy's"):
        normalized_return(1.0, config_for("Pendulum-v1", reference_return=-2000.0))


@pytest.mark.parametrize("env_id", ["CartPole-v1", "Breakout-MinAtar", "Pendulum-v1"])
def test_stored_random_returns_are_measured(env_id):
    measured = random_return(env_id, episodes_per_env=4, num_envs=32, seed=1)
    stored = RANDOM_RETURNS[env_id]
    assert measured == pytest.approx(stored, rel=0.15, abs=0.15)


def test_two_environment_fitness_is_ordered_as_returns_are():
    """A population of two LPOs (PPO, and one with large random weights) on CartPole-v1 and
    Pendulum-v1 (negative returns, with a reference set here): each environment's
    normalised score is ordered as its raw returns, and fitness is their mean."""
    family = get_family("drift")
    member = family.make("lpo")
    n = member.num_meta_params
    params = torch.stack([torch.zeros(n), torch.randn(n, generator=torch.Generator()
                                                        .manual_seed(0)) * 3.0])
    configs = {"CartPole-v1": config_for("CartPole-v1", **TINY),
               "Pendulum-v1": dataclasses.replace(config_for("Pendulum-v1", **TINY),
                                                  reference_return=-200.0)}
    fitness, info = family.score(configs, member, params, [0])
    for env_id, c in configs.items():
        raw, norm = info["raw"][env_id], info["per_env"][env_id]
        assert torch.allclose(norm, normalized_return(raw, c))
        assert torch.equal(torch.argsort(raw), torch.argsort(norm))
    assert torch.allclose(fitness, (info["per_env"]["CartPole-v1"]
                                    + info["per_env"]["Pendulum-v1"]) / 2)
