"""The towers' hand-written backward (:mod:`metarl.inner.towers`) against autograd through
the whole network, and the acting forward against the tower forward."""

import pytest
import torch

from metarl.configs import config_for
from metarl.inner import compiled
from metarl.inner.ppo import resolve_slots
from metarl.inner.towers import Towers
from metarl.nets import ActorCritic, FlatParams, init_population, population_tower


def _batch(P, B, obs_dim, A, discrete, seed=0):
    g = torch.Generator().manual_seed(seed)
    obs = torch.randn(P, B, obs_dim, generator=g)
    act = (torch.randint(0, A, (P, B), generator=g) if discrete
           else torch.randn(P, B, A, generator=g))
    logp_old = -torch.rand(P, B, generator=g) - 0.3 - (0 if discrete else A)
    val_old = torch.randn(P, B, generator=g)
    adv = torch.randn(P, B, generator=g)
    valid = (torch.rand(P, B, generator=g) > 0.1).float()
    return obs, act, logp_old, val_old, adv, val_old + adv, valid


@pytest.mark.parametrize("algorithm", ["ppo-clip", "lpo"])
@pytest.mark.parametrize("discrete,A,activation", [(True, 3, "tanh"), (False, 2, "tanh"),
                                                   (False, 1, "relu")])
def test_hand_written_backward_equals_autograd(algorithm, discrete, A, activation):
    """Loss and gradient of every parameter (log_std included), and the per-layer
    activations the learned optimisers read, equal autograd's through the whole network
    to float rounding (1e-5 relative). A = 1 covers the width-one actor head."""
    cfg = config_for("CartPole-v1", total_timesteps=1024, backend="torch")
    cfg = cfg.replace(activation=activation)
    _, drift, _ = resolve_slots(algorithm)
    model = ActorCritic(5, A, discrete, 16, 2, activation)
    layout = FlatParams(model)
    P = 3
    params = init_population(model, torch.arange(P))
    params = params + 0.05 * torch.randn(params.shape, generator=torch.Generator().manual_seed(2))
    meta = (0.1 * torch.randn(P, drift.num_meta_params,
                              generator=torch.Generator().manual_seed(1))
            if drift.num_meta_params else torch.zeros(P, 0))
    log_std_slice = None
    if not discrete:
        i = layout.names.index("log_std")
        start = sum(layout.sizes[:i])
        log_std_slice = slice(start, start + layout.sizes[i])
    obs, *rest = _batch(P, 40, 5, A, discrete)

    ref = compiled.minibatch_loss(model, layout, cfg, drift, log_std_slice, True)
    p = params.clone().requires_grad_(True)
    loss_ref, taps_ref = ref(p, meta, obs, *rest)
    (grad_ref,) = torch.autograd.grad(loss_ref.sum(), p)

    head = compiled.loss_head(cfg, drift, discrete, "cpu", compile=False)
    grads = torch.full_like(params, float("nan"))
    taps = {}
    loss = Towers(model, layout).loss_and_grads(params, head, log_std_slice, grads, obs, meta,
                                                *rest, taps=taps)
    torch.testing.assert_close(loss, loss_ref.detach(), rtol=1e-6, atol=1e-7)
    assert torch.isfinite(grads).all()  # every entry written
    torch.testing.assert_close(grads, grad_ref, rtol=1e-5, atol=1e-7)
    assert taps.keys() == taps_ref.keys()
    for k in taps:
        torch.testing.assert_close(taps[k], taps_ref[k], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("A", [2, 1])
def test_acting_forward_equals_the_tower(A):
    """The rollout's actor forward on pre-transposed weights gives the tower's numbers to
    float rounding (its matmul kernel differs), and a member's numbers do not depend on
    the population's size or on the bias's layout (bit for bit)."""
    model = ActorCritic(4, A, A > 1, 64, 2)
    layout = FlatParams(model)
    towers = Towers(model, layout)
    params = init_population(model, torch.arange(5))
    obs = torch.randn(5, 4, 4, generator=torch.Generator().manual_seed(0))
    ref = population_tower(model, layout, params, "actor", obs)
    acted = towers.act(towers.actor_weights(params), obs)
    torch.testing.assert_close(acted, ref, rtol=1e-6, atol=1e-7)
    one = towers.act(towers.actor_weights(params[2:3]), obs[2:3])
    assert torch.equal(one, acted[2:3])
    # The bias laid out per row (the rollout's layout) changes nothing.
    assert torch.equal(towers.act(towers.actor_weights(params, rows=4), obs), acted)
