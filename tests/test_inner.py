import pytest
import torch

from metarl import rng
from metarl.configs import config_for
from metarl.families.drift import LPO, PPOClip
from metarl.inner.losses import ppo_loss
from metarl.inner.ppo import train
from metarl.nets import ActorCritic, FlatParams, init_population, population_forward


def test_population_equals_one_at_a_time(tiny_cartpole):
    pop = train(tiny_cartpole, "ppo-clip", seeds=[3, 4, 5])
    for i, seed in enumerate([3, 4, 5]):
        alone = train(tiny_cartpole, "ppo-clip", seeds=[seed])
        assert torch.equal(pop.curve[i], alone.curve[0])
        torch.testing.assert_close(pop.agent_params[i], alone.agent_params[0],
                                   rtol=1e-5, atol=1e-6)


def test_same_inputs_same_outputs(tiny_cartpole):
    a = train(tiny_cartpole, "dpo", seeds=[0, 1])
    b = train(tiny_cartpole, "dpo", seeds=[0, 1])
    assert torch.equal(a.agent_params, b.agent_params)
    assert torch.equal(a.curve, b.curve)
    c = train(tiny_cartpole, "dpo", seeds=[2, 3])
    assert not torch.equal(a.agent_params, c.agent_params)


def test_per_member_meta_params_match_member_alone(tiny_cartpole):
    lpo = LPO()
    meta = torch.randn(3, lpo.num_meta_params) * 0.1
    pop = train(tiny_cartpole, lpo, meta, seeds=[7])  # one shared seed, three members
    alone = train(tiny_cartpole, lpo, meta[1], seeds=[7])
    torch.testing.assert_close(pop.agent_params[1], alone.agent_params[0], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(pop.agent_params[0], pop.agent_params[1])


def test_zero_lpo_equals_ppo_clip_up_to_offset(tiny_cartpole):
    """Same rollout, loss within the 1e-4 offset, updates nearly identical."""
    cfg = tiny_cartpole.replace(total_timesteps=128, num_steps=32)
    a = train(cfg, "ppo-clip", seeds=[0, 1])
    b = train(cfg, "lpo", seeds=[0, 1])
    assert torch.equal(a.curve[:, 0], b.curve[:, 0])  # the first rollout precedes learning
    torch.testing.assert_close(a.agent_params, b.agent_params, rtol=0, atol=1e-3)

    model = ActorCritic(4, 2, True)
    layout = FlatParams(model)
    params = init_population(model, rng.seed_keys([0, 1]))
    obs = torch.randn(2, 64, 4)
    act = torch.randint(0, 2, (2, 64))
    logp_old = torch.log_softmax(torch.randn(2, 64, 2), -1).gather(-1, act[..., None])[..., 0]
    args = (lambda p, o: population_forward(model, layout, p, o), params, None, obs, act,
            logp_old, torch.randn(2, 64), torch.randn(2, 64), torch.randn(2, 64),
            torch.ones(2, 64))
    lpo = LPO()
    loss_ppo = ppo_loss(cfg, PPOClip(), torch.zeros(2, 0), *args)
    loss_lpo = ppo_loss(cfg, lpo, torch.zeros(2, lpo.num_meta_params), *args)
    assert (loss_ppo - loss_lpo).abs().max() <= 1e-4 + 1e-6


def test_fused_forward_equals_vmap_functional_call():
    model = ActorCritic(5, 3, True, hidden=16)
    layout = FlatParams(model)
    params = init_population(model, rng.seed_keys([0, 1, 2]))
    obs = torch.randn(3, 7, 5)
    fused = population_forward(model, layout, params, obs, fused=True)
    vmapped = population_forward(model, layout, params, obs, fused=False)
    for x, y in zip(fused, vmapped):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


def test_orthogonal_init():
    model = ActorCritic(4, 2, True)
    layout = FlatParams(model)
    p = layout.unflatten(init_population(model, rng.seed_keys([0, 1])))
    w = p["actor.2.weight"][0]
    torch.testing.assert_close(w @ w.T, 2.0 * torch.eye(64), atol=1e-4, rtol=0)
    assert p["actor.0.bias"].abs().sum() == 0
    assert not torch.equal(p["actor.2.weight"][0], p["actor.2.weight"][1])


def test_continuous_control_with_normalisation_member_alone_equals_population():
    """Pendulum (Gaussian policy, observation and reward normalisation, clipped actions):
    a member trained alone gets its population run's numbers bit for bit, and the
    members differ."""
    cfg = config_for("Pendulum-v1", num_envs=2, num_steps=16, total_timesteps=256,
                     num_minibatches=2, update_epochs=2, backend="torch")
    res = train(cfg, "ppo-clip", seeds=[0, 1, 2])
    assert res.config.normalize_obs and res.config.clip_action
    assert res.curve.shape == (3, 8) and torch.isfinite(res.final_return).all()
    alone = train(cfg, "ppo-clip", seeds=[1])
    assert torch.equal(alone.curve[0], res.curve[1])
    assert torch.equal(alone.agent_params[0], res.agent_params[1])
    assert not torch.equal(res.agent_params[0], res.agent_params[1])


def test_nan_member_fails_alone(tiny_cartpole):
    lpo = LPO()
    meta = torch.zeros(3, lpo.num_meta_params)
    meta[1] = float("nan")
    res = train(tiny_cartpole, lpo, meta, seeds=[0])
    assert res.failed.tolist() == [False, True, False]
    assert torch.isnan(res.final_return[1]) and torch.isfinite(res.final_return[[0, 2]]).all()


def test_learns_cartpole_on_a_small_budget():
    """4 seeds, 40k steps each: well above a random policy's ~22."""
    cfg = config_for("CartPole-v1", total_timesteps=40_960, backend="torch")
    res = train(cfg, "ppo-clip", seeds=[0, 1, 2, 3])
    assert res.mean > 150, res.final_return
    assert res.curve[:, -5:].mean() > 3 * res.curve[:, :2].mean()


# -- bad input fails before work ----------------------------------------------------------


@pytest.mark.parametrize("override, match", [
    (dict(total_timesteps=0), "total_timesteps must be a positive integer"),
    (dict(total_timesteps=-5), "total_timesteps must be a positive integer"),
    (dict(total_timesteps=100), "less than one update"),
    (dict(num_envs=0), "num_envs must be a positive integer"),
    (dict(num_minibatches=3), "not divisible"),
    (dict(lr=0.0), "lr must be positive"),
])
def test_bad_budget(tiny_cartpole, override, match):
    with pytest.raises(ValueError, match=match):
        train(tiny_cartpole.replace(**override), "ppo-clip", seeds=[0])


def test_continuous_option_on_discrete_env(tiny_cartpole):
    with pytest.raises(ValueError, match="--normalize-obs.*discrete action space"):
        train(tiny_cartpole.replace(normalize_obs=True), "ppo-clip", seeds=[0])


def test_mismatched_population(tiny_cartpole):
    with pytest.raises(ValueError, match=r"expected \[P, 1152\]"):
        train(tiny_cartpole, "lpo", torch.zeros(4, 10), seeds=[0])
    with pytest.raises(ValueError, match="4 members but 2 seeds"):
        train(tiny_cartpole, "lpo", torch.zeros(4, 1152), seeds=[0, 1])
    with pytest.raises(ValueError, match=r"pass \[1152\] \(shared\)"):
        train(tiny_cartpole, "lpo", torch.zeros(7), seeds=[0])
    with pytest.raises(ValueError, match="seeds is empty"):
        train(tiny_cartpole, "ppo-clip", seeds=[])


def test_unknown_env(tiny_cartpole):
    with pytest.raises(ValueError, match="unknown environment id"):
        train(tiny_cartpole.replace(env_id="CartPole-v9"), "ppo-clip", seeds=[0])


def test_member_alone_matches_population_over_a_long_run():
    """80 updates: long enough that a kernel rounding differently for a population of one
    (as bmm with one output did, until update 22) would show."""
    cfg = config_for("CartPole-v1", total_timesteps=40_960, backend="torch")
    alone = train(cfg, "ppo-clip", seeds=[5])
    pop = train(cfg, "ppo-clip", seeds=[4, 5, 6])
    assert torch.equal(alone.curve[0], pop.curve[1])
    assert torch.equal(alone.agent_params[0], pop.agent_params[1])
    assert alone.env_steps == pop.env_steps // 3 and alone.final_return.shape == (1,)


@pytest.mark.parametrize("out", [1, 2, 64])
def test_batched_linear_rounds_the_same_for_one_member(out):
    from metarl.nets import batched_linear

    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(8, 512, 64, generator=g), torch.randn(8, out, 64, generator=g)
    b = torch.randn(8, out, generator=g)
    assert torch.equal(batched_linear(x, w, b)[5], batched_linear(x[5:6], w[5:6], b[5:6])[0])
