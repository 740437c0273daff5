"""The compiled inner loop (``PPOConfig.compile``) against the eager one, and its cache."""

import warnings

import pytest
import torch

from metarl.configs import config_for
from metarl.inner import compiled
from metarl.inner.ppo import resolve_slots, train
from metarl.inner.towers import Towers
from metarl.nets import ActorCritic, FlatParams, init_population

TINY = dict(total_timesteps=1024, backend="torch")


def _minibatch(P=3, B=64, obs_dim=4, A=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    obs = torch.randn(P, B, obs_dim, generator=g)
    act = torch.randint(0, A, (P, B), generator=g)
    logp_old = -torch.rand(P, B, generator=g) - 0.3
    val_old = torch.randn(P, B, generator=g)
    adv = torch.randn(P, B, generator=g)
    ret = val_old + adv
    valid = (torch.rand(P, B, generator=g) > 0.1).float()
    return obs, act, logp_old, val_old, adv, ret, valid


@pytest.mark.parametrize("algorithm, discrete", [("ppo-clip", True), ("lpo", True),
                                                  ("ppo-clip", False)])
def test_compiled_loss_head_and_gradient_equal_eager(algorithm, discrete):
    """One minibatch through the towers and the loss head: with the head compiled (its loss
    and gradients one traced graph), the loss and the parameters' gradient equal the eager
    ones to 1e-5 (relative), for a handcrafted drift and a network drift (LPO), and for a
    Gaussian policy, whose ``log_std`` gradient comes from the head."""
    cfg = config_for("CartPole-v1" if discrete else "Pendulum-v1", **TINY)
    member, drift, _ = resolve_slots(algorithm)
    obs_dim, A = (4, 2) if discrete else (3, 1)
    model = ActorCritic(obs_dim, A, discrete, cfg.hidden, cfg.layers, cfg.activation)
    layout = FlatParams(model)
    towers = Towers(model, layout)
    params = init_population(model, torch.arange(3))
    log_std_slice = None
    if not discrete:
        i = layout.names.index("log_std")
        start = sum(layout.sizes[:i])
        log_std_slice = slice(start, start + layout.sizes[i])
        params[:, log_std_slice] = torch.tensor([[-0.3], [0.0], [0.4]])
    meta = (torch.randn(3, drift.num_meta_params, generator=torch.Generator().manual_seed(1))
            * 0.1 if drift.num_meta_params else torch.zeros(3, 0))
    obs, act, *rest = _minibatch(obs_dim=obs_dim, A=A)
    if not discrete:
        act = torch.randn(3, obs.shape[1], A, generator=torch.Generator().manual_seed(2))
    out = {}
    for comp in (False, True):
        head = compiled.loss_head(cfg, drift, discrete, "cpu", compile=comp)
        assert (head.joint is not None) == comp
        grads = torch.zeros_like(params)
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message=".*could not be traced whole")
            loss = towers.loss_and_grads(params, head, log_std_slice, grads, obs, meta, act,
                                         *rest)
        out[comp] = (loss, grads)
    if not discrete:
        assert out[False][1][:, log_std_slice].abs().min() > 0
    torch.testing.assert_close(out[True][0], out[False][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out[True][1], out[False][1], rtol=1e-5, atol=1e-6)


def test_compiled_training_equals_eager_and_reuses_its_compilation():
    """A short CartPole run (3 members, 2 updates): compiled (the environment's step and
    the loss head) and eager agents end within 1e-4 of each other with the same returns; a
    second compiled run with the same member builds nothing new and gives bit-identical
    results."""
    cfg = config_for("CartPole-v1", **TINY)
    member, _, _ = resolve_slots("ppo-clip")
    eager = train(cfg, member, None, [0, 1, 2])
    built = dict(compiled.BUILT)
    with warnings.catch_warnings():  # every compiled piece traced whole (no fallback)
        warnings.filterwarnings("error", message=".*could not be traced whole")
        first = train(cfg.replace(compile=True), member, None, [0, 1, 2])
    assert compiled.BUILT["env"] <= built["env"] + 1
    assert compiled.BUILT["loss"] <= built["loss"] + 1
    built = dict(compiled.BUILT)
    second = train(cfg.replace(compile=True), member, None, [0, 1, 2])
    assert compiled.BUILT == built  # served from the cache
    assert torch.equal(first.agent_params, second.agent_params)
    torch.testing.assert_close(first.agent_params, eager.agent_params, rtol=0, atol=1e-4)
    assert torch.equal(first.final_return, eager.final_return)
    # the compiled population still equals its members trained alone (compiled)
    alone = train(cfg.replace(compile=True), member, None, [2])
    torch.testing.assert_close(alone.agent_params[0], first.agent_params[2], rtol=0,
                               atol=1e-5)


def test_a_member_that_cannot_be_traced_runs_eagerly():
    cfg = config_for("CartPole-v1", **TINY)
    _, drift, _ = resolve_slots("ppo-clip")

    class Opaque(type(drift)):
        compilable = False

    model = ActorCritic(4, 2, True)
    layout = FlatParams(model)
    built = dict(compiled.BUILT)
    head = compiled.loss_head(cfg, Opaque(), True, "cpu", compile=True)
    assert compiled.BUILT == built
    params = init_population(model, torch.arange(3))
    obs, *rest = _minibatch()
    loss = Towers(model, layout).loss_and_grads(params, head, None, torch.zeros_like(params),
                                                obs, torch.zeros(3, 0), *rest)
    assert loss.shape == (3,) and torch.isfinite(loss).all()


@pytest.mark.parametrize("env_id", ["CartPole-v1", "Pendulum-v1", "Breakout-MinAtar"])
def test_fresh_observations_are_not_written_again(env_id):
    """Environments that say ``fresh_obs`` (the loop then keeps their observations without
    a copy) never write an observation they returned: it is unchanged after more steps."""
    from metarl.envs import make

    env = make(env_id, 6, backend="torch", seeds=list(range(6)))
    assert env.fresh_obs
    first = env.reset()
    kept, copy = first, first.clone()
    for _ in range(30):
        a = (torch.zeros(6, dtype=torch.long) if env.spec.discrete
             else torch.zeros(6, *env.spec.action_shape))
        obs = env.step(a).obs
        assert obs.data_ptr() != kept.data_ptr()
    assert torch.equal(kept, copy)


@pytest.mark.parametrize("name", ["open", "open-ff", "no-features"])
def test_compiled_learned_optimiser_step_equals_eager(name, monkeypatch):
    """With ``compile=True`` a learned optimiser's noise draw and its network on each
    block of parameters are compiled: over steps that carry the momenta and OPEN's hidden
    state, in blocks of 256 with a shorter last block, the parameters stay within float32
    rounding of the eager step's (2e-6 relative), the noise is the same bit for bit, and a
    second stepper of the same member and shapes reuses the compiled functions."""
    import metarl.families.optim.learned as learned
    from metarl import rng
    from metarl.families import get_family, make_member
    from metarl.families.optim import AgentLayout, StepContext

    monkeypatch.setattr(learned, "BLOCK_FLOATS", 1)  # blocks of 256: 5,000 = 19 x 256 + 136
    model = ActorCritic(4, 2, True, hidden=48, layers=2)
    layout = AgentLayout.for_actor_critic(model)
    P, D = 2, layout.numel
    member = make_member(name)
    meta = torch.stack([get_family("optim").initial_params(name, s) for s in range(P)])
    meta[:, -3:] += 1.0  # a sizeable output bias, so that every output term matters
    acts = {k: torch.rand(P, w) for k, w in layout.groups.items()}
    g = torch.Generator().manual_seed(4)
    start = torch.randn(P, D, generator=g)
    grads = [torch.randn(P, D, generator=g) for _ in range(3)]
    cfg = config_for("CartPole-v1")
    runs = {}
    for comp in (False, True, True):
        built = dict(compiled.BUILT)
        stepper = member.population(meta, layout, cfg.replace(compile=comp),
                                    rng.seed_keys([5, 6]))
        assert stepper.compile == comp
        params = start.clone()
        state = stepper.init(params)
        for step, grad in enumerate(grads):
            stepper.step(params, grad, state, StepContext(step, 4, 1, 4, step, 4, acts))
        runs.setdefault(comp, (params, state, built, dict(compiled.BUILT)))
    (eager, s_eager, _, _), (comp, s_comp, before, after) = runs[False], runs[True]
    assert not torch.equal(eager, start)
    torch.testing.assert_close(comp, eager, rtol=2e-6, atol=1e-7)
    if "hidden" in s_eager:
        torch.testing.assert_close(s_comp["hidden"], s_eager["hidden"], rtol=2e-6,
                                   atol=1e-6)
    assert after["optim"] > before["optim"]  # this member's network, compiled
    assert compiled.BUILT == runs[True][3]  # the second compiled stepper built nothing
    if name == "open-ff":
        k = rng.fold(rng.seed_keys([5, 6]), learned._S_NOISE, 1, 1, 1)
        assert torch.equal(learned._noise_fn(D)(k), torch.compile(learned._noise_fn(D))(k))


# -- traced graphs (make_fx + inductor, no dynamo) ------------------------------------------


def test_traced_function_keeps_its_writes_and_builds_one_graph_per_shape():
    """A :class:`compiled.Traced` function equals the eager function, writes to its inputs
    in place as the eager one does, and builds one graph per input shape: a second call
    with the same shapes builds nothing, a new shape builds a second graph, and going back
    to the first shape reuses the first."""

    def fn(x, acc, s):
        y = torch.tanh(x) * s[0] + s[1]
        acc.add_(y)
        return (y, acc.sum(dim=1))

    t = compiled.Traced("env", fn)
    built = compiled.BUILT["env"]
    for shape, builds in (((3, 5), 1), ((3, 5), 1), ((4, 7), 2), ((3, 5), 2)):
        x = torch.randn(shape)
        acc, acc_ref = torch.ones(shape), torch.ones(shape)
        s = torch.tensor([2.0, -0.5])
        y, total = t(x, acc, s)
        y_ref, total_ref = fn(x, acc_ref, s)
        torch.testing.assert_close(y, y_ref, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(acc, acc_ref, rtol=1e-6, atol=1e-6)  # written in place
        torch.testing.assert_close(total, total_ref, rtol=1e-6, atol=1e-5)
        assert compiled.BUILT["env"] == built + builds
    assert len(t.graphs) == 2
    # the same shapes in another dtype are another signature: a graph of their own
    x = torch.randn(3, 5, dtype=torch.float64)
    acc = torch.ones(3, 5, dtype=torch.float64)
    y, _ = t(x, acc, torch.tensor([2.0, -0.5], dtype=torch.float64))
    assert y.dtype == torch.float64 and len(t.graphs) == 3
    torch.testing.assert_close(y, torch.tanh(x) * 2.0 - 0.5)


def test_a_function_that_cannot_be_traced_falls_back_to_torch_compile():
    """A function that reads a tensor's value cannot be traced whole: it runs through
    ``torch.compile`` instead, with a warning naming it, and still gives the eager
    numbers."""

    def fn(x):
        if float(x.sum()) > 0:  # data-dependent control flow
            return (x * 2,)
        return (x - 1,)

    t = compiled.Traced("loss", fn)
    with pytest.warns(RuntimeWarning, match="loss function could not be traced whole"):
        (y,) = t(torch.ones(4))
    assert torch.equal(y, torch.full((4,), 2.0))
    (y,) = t(-torch.ones(4))
    assert torch.equal(y, torch.full((4,), -2.0))


@pytest.mark.parametrize("env_id", ["CartPole-v1", "Pendulum-v1"])
def test_traced_environment_step_equals_eager(env_id):
    """The compiled environment step (a traced graph over the environment's tensors) and
    the eager step, from the same state at every step of 420 (12 environments, episode
    ends, truncation and resets included): the same flags, counters, reset draws and
    episode statistics bit for bit, and observations and rewards to float32 rounding
    (inductor's fused arithmetic rounds CartPole's physics differently in the last bit)."""
    from metarl.envs import make

    discrete = env_id == "CartPole-v1"
    cfg = config_for(env_id, backend="torch", compile=True)
    model = ActorCritic(4 if discrete else 3, 2 if discrete else 1, discrete)
    layout = FlatParams(model)
    envs = [make(env_id, 12, backend="torch", seeds=list(range(12))) for _ in range(2)]
    steps = [compiled.rollout_step(model, layout, cfg, e, "cpu", compile=c)
             for e, c in zip(envs, (False, True))]
    obs = envs[0].reset().reshape(3, 4, -1)
    assert torch.equal(obs, envs[1].reset().reshape(3, 4, -1))
    params = init_population(model, torch.arange(3))
    weights = Towers(model, layout).actor_weights(params, 4)
    log_std = None if discrete else params[:, -1:]
    low, high = (None, None) if discrete else envs[0].spec.action_bounds("cpu")
    g = torch.Generator().manual_seed(0)
    stats = (torch.zeros(3, 4), torch.zeros(3, 4), torch.full((3, 4), float("nan")))
    names = [n for n, v in vars(envs[0]).items() if isinstance(v, torch.Tensor)]
    ends = truncations = 0
    for _ in range(420):
        noise = torch.randn(3, 4, model.actor[-1].out_features, generator=g)
        for n in names:  # the same state on both sides
            setattr(envs[1], n, getattr(envs[0], n).clone())
        eager, comp = (step(e, weights, obs, noise * (3.0 if discrete else 1.0), log_std,
                            low, high, *stats) for e, step in zip(envs, steps))
        # (action, out, next_obs, reward, terminated, done, valid, ep_sum, ep_count, last)
        for i, (a, b) in enumerate(zip(eager, comp)):
            tol = 1e-6 if i in (2, 3, 7, 9) else 0  # float results of the physics
            torch.testing.assert_close(b, a, rtol=tol, atol=tol, equal_nan=True)
        for n in names:
            if getattr(envs[0], n).dtype.is_floating_point:
                torch.testing.assert_close(getattr(envs[1], n), getattr(envs[0], n),
                                           rtol=1e-6, atol=1e-6)
            else:
                assert torch.equal(getattr(envs[1], n), getattr(envs[0], n)), n
        obs, stats = eager[2], tuple(eager[-3:])
        ends += int(eager[5].sum())
        truncations += int((eager[5] & ~eager[4]).sum())
    assert ends > 12  # episodes ended and reset along the way
    assert truncations > 0 or discrete  # Pendulum's 200-step limit


def test_compiled_adam_equals_eager_and_alone_equals_population():
    """Adam's fused step (``compile=True``) gives the eager step's parameters and moments
    to float32 rounding over five steps with the learning rate annealed, and a member
    alone gets its population row's numbers bit for bit."""
    from metarl.families.optim import StepContext
    from metarl.families.optim.handcrafted import AdamUpdate

    g = torch.Generator().manual_seed(0)
    P, D = 5, 1001  # not a multiple of the vector width
    start = torch.randn(P, D, generator=g)
    grads = [torch.randn(P, D, generator=g) * 0.1 for _ in range(5)]
    runs = {}
    for comp, rows in ((False, P), (True, P), (True, 1)):
        opt = AdamUpdate(1e-2, 0.9, 0.999, 1e-5, anneal=True, compile=comp)
        params = start[:rows].clone()
        state = opt.init(params)
        for i, grad in enumerate(grads):
            opt.step(params, grad[:rows].clone(), state, StepContext(i, 5, 0, 1, 0, 1, None))
        runs[(comp, rows)] = (params, state["m"], state["v"])
    eager, fused, alone = runs[(False, P)], runs[(True, P)], runs[(True, 1)]
    assert not torch.equal(eager[0], start)
    for a, b in zip(fused, eager):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    for a, b in zip(alone, fused):
        assert torch.equal(a, b[:1])
