"""The optimiser family: features by hand, the update rule, the slot in the inner loop."""

import math

import pytest
import torch

from metarl import rng
from metarl.configs import config_for
from metarl.families import get_family, make_member
from metarl.families.optim import AgentLayout, StepContext
from metarl.families.optim.features import DECAYS, no_features, open_features, update_momenta
from metarl.families.optim.learned import LearnedUpdate
from metarl.inner.losses import clip_grads
from metarl.inner.ppo import train
from metarl.nets import ActorCritic, FlatParams

OPTIM = get_family("optim")


def tiny_model(discrete=True):
    # actor: 0 (2x3), 2 (2x2); critic: 0 (2x3), 2 (1x2); log_std (2,) if continuous
    return ActorCritic(3, 2, discrete, hidden=2, layers=1)


def test_meta_parameter_counts_are_the_papers():
    assert {n: make_member(n).num_meta_params for n in OPTIM.learned} == {
        "open": 1227, "open-ff": 707, "no-features": 514}
    assert make_member("adam").num_meta_params == 0 == make_member("sgd").num_meta_params


def test_layout_of_the_actor_critic():
    model = tiny_model(discrete=False)
    layout = AgentLayout.for_actor_critic(model)
    flat = FlatParams(model)
    assert layout.names == flat.names and layout.numel == flat.numel
    parts = dict(zip(flat.names, torch.split(layout.layer_proportion, flat.sizes)))
    # actor layers: hidden, output, log_std -> 0, 1/2, 1; critic: hidden, output -> 0, 1
    assert parts["actor.0.weight"].unique().tolist() == [0.0]
    assert parts["actor.2.bias"].unique().tolist() == [0.5]
    assert parts["log_std"].unique().tolist() == [1.0]
    assert parts["critic.2.weight"].unique().tolist() == [1.0]
    mask = dict(zip(flat.names, torch.split(layout.actor_mask, flat.sizes)))
    assert mask["log_std"].all() and mask["actor.0.bias"].all()
    assert not mask["critic.0.weight"].any()
    # a weight [out, in] feeds its output row's neuron: row-major entries -> 0,0,0,1,1,1
    neuron = dict(zip(flat.names, torch.split(layout.neuron, flat.sizes)))
    base = int(neuron["actor.0.weight"][0])
    assert (neuron["actor.0.weight"] - base).tolist() == [0, 0, 0, 1, 1, 1]
    assert (neuron["actor.0.bias"] - base).tolist() == [0, 1]
    assert (neuron["actor.2.weight"] - base).tolist() == [2, 2, 3, 3]
    assert len(set(neuron["log_std"].tolist()) | set(neuron["critic.2.bias"].tolist())) == 3


def _hand_features(params, grad_steps, activations, ctx, layout, model):
    """OPEN's 19 features for one agent, computed entry by entry with Python floats."""
    names = FlatParams(model).names
    sizes = FlatParams(model).sizes
    p = params.tolist()
    moms = [[0.0] * 6 for _ in p]
    for g in grad_steps:
        for i, gi in enumerate(g.tolist()):
            for k, b in enumerate(DECAYS):
                moms[i][k] = b * moms[i][k] + (1 - b) * gi
    g = grad_steps[-1].tolist()

    def sign(x):
        return (x > 0) - (x < 0)

    raw = []
    for i in range(len(p)):
        raw.append([p[i]] + [sign(m) for m in moms[i]]
                   + [math.log(abs(m) + 1e-13) for m in moms[i]]
                   + [sign(g[i]), math.log(abs(g[i]) + 1e-13)])
    # RMS over each tensor, per feature
    out, start = [], 0
    for name, n in zip(names, sizes):
        rows = raw[start:start + n]
        rms = [math.sqrt(1e-5 + sum(r[f] ** 2 for r in rows) / n) for f in range(15)]
        tower, *rest = name.split(".")
        layer = {"0": 0, "2": 1}[rest[0]]
        group = f"{tower}.{rest[0]}"
        acts = [a + 1e-11 for a in activations[group].tolist()]
        width = len(acts)
        for j, r in enumerate(rows):
            neuron = j // (n // width) if rest[1] == "weight" else j
            dormancy = acts[neuron] / sum(acts) * width
            out.append([r[f] / rms[f] for f in range(15)]
                       + [ctx.update / (ctx.num_updates - 1), layer / 1,
                          ctx.epoch / (ctx.num_epochs - 1), dormancy])
        start += n
    return torch.tensor(out)


def test_open_features_match_values_computed_by_hand():
    torch.manual_seed(0)
    model = tiny_model()
    layout = AgentLayout.for_actor_critic(model)
    D = layout.numel
    params = torch.randn(1, D)
    grads = [torch.randn(1, D) * 0.3, torch.randn(1, D) * 0.3]
    grads[1][0, 3] = 0.0  # a zero gradient: sign 0, log(1e-13)
    momenta = torch.zeros(1, D, 6)
    for g in grads:
        update_momenta(momenta, g)
    acts = {"actor.0": torch.tensor([[0.5, 0.1]]), "actor.2": torch.tensor([[0.02, 0.3]]),
            "critic.0": torch.tensor([[0.0, 0.7]]), "critic.2": torch.tensor([[1.3]])}
    ctx = StepContext(update=3, num_updates=7, epoch=2, num_epochs=4, minibatch=1,
                      num_minibatches=2, activations=acts)
    got = open_features(params, grads[-1], momenta, layout, ctx)[0]
    want = _hand_features(params[0], [g[0] for g in grads],
                          {k: v[0] for k, v in acts.items()}, ctx, layout, model)
    assert got.shape == (D, 19)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # spot checks a reader can follow: the proportions and a dead neuron's dormancy
    assert got[0, 15] == pytest.approx(0.5) and got[0, 17] == pytest.approx(2 / 3)
    critic0 = FlatParams(model).names.index("critic.0.weight")
    start = sum(FlatParams(model).sizes[:critic0])
    assert got[start, 18] == pytest.approx(0.0, abs=1e-9)  # feeds neuron 0 (dead)
    assert got[start + 3, 18] == pytest.approx(2.0)  # feeds neuron 1 (all the activity)


def test_no_features_inputs_by_hand():
    model = tiny_model()
    layout = AgentLayout.for_actor_critic(model)
    D = layout.numel
    torch.manual_seed(1)
    params, g = torch.randn(1, D), torch.randn(1, D)
    momenta = torch.zeros(1, D, 6)
    update_momenta(momenta, g)
    x = no_features(params, g, momenta, layout)[0]
    # first tensor (actor.0.weight, 6 entries): column f divided by its RMS over them
    raw = torch.cat([params[0, :6, None], momenta[0, :6], g[0, :6, None]], dim=1)
    for f in range(8):
        col = raw[:, f].tolist()
        rms = math.sqrt(1e-5 + sum(v * v for v in col) / 6)
        assert x[:6, f].tolist() == pytest.approx([v / rms for v in col], rel=1e-5)
    assert momenta[0, 0, 0] == pytest.approx(0.9 * g[0, 0].item())  # (1 - 0.1) * g


@pytest.mark.parametrize("name", ["open", "open-ff", "no-features"])
def test_population_step_matches_the_module_and_the_update_rule(name):
    """The batched update of P optimisers equals each optimiser's own module (nn.Linear,
    nn.LayerNorm, nn.GRUCell) applied to the same features, then the update rule."""
    member = make_member(name)
    model = tiny_model(discrete=False)
    layout = AgentLayout.for_actor_critic(model)
    P, D = 3, layout.numel
    torch.manual_seed(2)
    meta = torch.stack([OPTIM.initial_params(name, s) for s in range(P)])
    meta[:, -3:] += 1.0  # a sizeable output bias, so that every output term matters
    keys = rng.seed_keys([10, 11, 12])
    stepper = LearnedUpdate(member, meta, layout, keys)
    params = torch.randn(P, D)
    state = stepper.init(params)
    acts = {"actor.0": torch.rand(P, 2), "actor.2": torch.rand(P, 2),
            "critic.0": torch.rand(P, 2), "critic.2": torch.rand(P, 1),
            "log_std": torch.rand(P, 2)}
    hidden = torch.zeros(P, D, 8)
    for step in range(2):
        ctx = StepContext(step, 4, 1, 4, 0, 2, acts)
        grads = torch.randn(P, D)
        before = params.clone()
        mom = state["momenta"].transpose(1, 2).clone()  # the stepper's is [P, 6, D]
        update_momenta(mom, grads)
        stepper.step(params, grads, state, ctx)
        noise = rng.normal(rng.fold(keys, 0x0E9, step, 1, 0), (D,))
        for i in range(P):
            one = make_member(name).load_flat(meta[i])
            ctx_i = StepContext(step, 4, 1, 4, 0, 2, {k: v[i:i + 1] for k, v in acts.items()})
            x = member.inputs(before[i:i + 1], grads[i:i + 1], mom[i:i + 1], layout, ctx_i)[0]
            if one.recurrent:
                out, hidden[i] = one(x, hidden[i])
            else:
                out = one(x)
            u = out[:, 0] * 1e-3 * torch.exp(out[:, 1] * 1e-3)
            if out.shape[1] == 3:
                u = u + out[:, 2] * 1e-3 * noise[i] * layout.actor_mask
            u = u - u.mean()
            torch.testing.assert_close(params[i], before[i] - u, rtol=1e-5, atol=1e-7)
        assert not torch.equal(params, before)


@pytest.mark.parametrize("name", ["open", "open-ff", "no-features"])
def test_network_update_in_blocks_equals_one_pass(name, monkeypatch):
    """A network member's update runs a block of parameters at a time (the network sees
    each parameter on its own): blocks of 256 give one pass's numbers, for every
    parameter, over steps that carry OPEN's hidden state."""
    import metarl.families.optim.learned as learned

    model = ActorCritic(4, 2, True, hidden=64, layers=2)  # D = 9,155: 36 blocks of 256
    layout = AgentLayout.for_actor_critic(model)
    P, D = 2, layout.numel
    meta = torch.stack([OPTIM.initial_params(name, s) for s in range(P)])
    meta[:, -3:] += 1.0
    acts = {k: torch.rand(P, n) for k, n in (("actor.0", 64), ("actor.2", 64),
                                             ("actor.4", 2), ("critic.0", 64),
                                             ("critic.2", 64), ("critic.4", 1))}
    torch.manual_seed(3)
    start, grads = torch.randn(P, D), [torch.randn(P, D) for _ in range(3)]
    runs = {}
    for block_floats in (1 << 40, 1):  # one pass; blocks of the minimum, 256
        monkeypatch.setattr(learned, "BLOCK_FLOATS", block_floats)
        stepper = LearnedUpdate(make_member(name), meta, layout, rng.seed_keys([1, 2]))
        params = start.clone()
        state = stepper.init(params)
        for step, g in enumerate(grads):
            stepper.step(params, g, state, StepContext(step, 4, 0, 4, step, 4, acts))
        runs[block_floats] = (params, state)
    (one, s1), (blocks, s2) = runs[1 << 40], runs[1]
    assert not torch.equal(one, start)
    torch.testing.assert_close(blocks, one, rtol=0, atol=0)
    if "hidden" in s1:
        assert torch.equal(s1["hidden"], s2["hidden"]) and s1["hidden"].abs().sum() > 0


def test_zero_network_makes_no_update():
    """The reference code's ES start (all zeros) is a zero update: LayerNorm with zero
    scale outputs 0, so o1 = 0 and nothing moves."""
    member = make_member("open-ff")
    model = tiny_model()
    layout = AgentLayout.for_actor_critic(model)
    stepper = LearnedUpdate(member, torch.zeros(1, 707), layout, rng.seed_keys([0]))
    params = torch.randn(1, layout.numel)
    before = params.clone()
    state = stepper.init(params)
    stepper.step(params, torch.randn_like(params), state, StepContext(0, 2, 0, 2, 0, 1, {}))
    assert torch.equal(params, before)


def test_clip_grads_actor_and_critic_separately():
    mask = torch.tensor([True, True, False, False])
    g = torch.tensor([[3.0, 4.0, 0.3, 0.4], [0.0, 0.1, 6.0, 8.0]])
    out = clip_grads(g, 0.5, mask)
    torch.testing.assert_close(out[0], torch.tensor([0.3, 0.4, 0.3, 0.4]))  # actor clipped
    torch.testing.assert_close(out[1], torch.tensor([0.0, 0.1, 0.3, 0.4]))  # critic clipped
    joint = clip_grads(g, 0.5)
    assert joint[0].norm() == pytest.approx(0.5)


def test_adam_in_the_optimiser_slot_is_todays_ppo_with_adam(tiny_cartpole):
    """``adam`` filling the optimiser slot (PPO clip in the drift slot) equals training
    ``ppo-clip`` (Adam as the default optimiser), returns and parameters, when the
    gradient clipping is the same (joint); the optimiser slot's default clips actor and
    critic separately, which changes the numbers."""
    cfg = tiny_cartpole.replace(total_timesteps=1024)
    ppo = train(cfg, "ppo-clip", seeds=[0, 1, 2])
    adam = train(cfg.replace(separate_grad_clip=False), "adam", seeds=[0, 1, 2])
    assert ppo.algorithm == "ppo-clip" and ppo.optimizer == "adam"
    assert adam.algorithm == "adam" and adam.drift == "ppo-clip"
    assert torch.equal(adam.curve, ppo.curve)
    torch.testing.assert_close(adam.agent_params, ppo.agent_params, rtol=0, atol=0)
    separate = train(cfg, "adam", seeds=[0, 1, 2])
    assert separate.config.separate_grad_clip and not ppo.config.separate_grad_clip
    assert not torch.equal(separate.agent_params, ppo.agent_params)


def test_sgd_uses_its_own_learning_rate(tiny_cartpole):
    a = train(tiny_cartpole, "sgd", seeds=[0])
    b = train(tiny_cartpole.replace(sgd_lr=0.5), "sgd", seeds=[0])
    assert a.config.sgd_lr == 2.5e-4 and not torch.equal(a.agent_params, b.agent_params)
    cfg = config_for("Acrobot-v1", num_envs=2, num_steps=16, total_timesteps=64,
                     num_minibatches=2, update_epochs=1)
    with pytest.raises(ValueError, match="no tuned SGD learning rate; pass --sgd-lr"):
        train(cfg, "sgd", seeds=[0])


def test_learned_optimiser_member_alone_equals_its_population_run(tiny_cartpole):
    meta = torch.stack([OPTIM.initial_params("open", s) for s in range(3)])
    pop = train(tiny_cartpole, "open", meta, seeds=[4])
    alone = train(tiny_cartpole, "open", meta[2], seeds=[4])
    assert torch.equal(pop.curve[2], alone.curve[0])
    torch.testing.assert_close(pop.agent_params[2], alone.agent_params[0], rtol=1e-5,
                               atol=1e-6)
    assert not torch.allclose(pop.agent_params[0], pop.agent_params[2])


def test_learned_optimiser_on_continuous_control():
    cfg = config_for("Pendulum-v1", num_envs=2, num_steps=16, total_timesteps=64,
                     num_minibatches=2, update_epochs=2, backend="torch")
    meta = OPTIM.initial_params("open-ff", 0)
    res = train(cfg, "open-ff", meta, seeds=[0, 1])
    assert torch.isfinite(res.final_return).all() and res.optimizer == "open-ff"
    # Gaussian policy, log_std among the parameters: a member alone trains as in the
    # population, and the two seeds differ
    alone = train(cfg, "open-ff", meta, seeds=[1])
    assert torch.equal(res.curve[1], alone.curve[0])
    torch.testing.assert_close(res.agent_params[1], alone.agent_params[0], rtol=1e-5,
                               atol=1e-6)
    assert not torch.allclose(res.agent_params[0], res.agent_params[1])
    # the learned update moved every parameter, log_std (column 0) included, from where a
    # zero network (which updates nothing) leaves them
    still = train(cfg, "open-ff", torch.zeros_like(meta), seeds=[0, 1])
    assert (res.agent_params != still.agent_params).all()


def test_initial_params_are_seeded():
    a, b = OPTIM.initial_params("open-ff", 0), OPTIM.initial_params("open-ff", 1)
    assert torch.equal(a, OPTIM.initial_params("open-ff", 0)) and not torch.equal(a, b)
    p = make_member("open-ff").unflatten(a)
    assert torch.equal(p["ln1.weight"], torch.ones(16)) and p["l1.weight"].abs().max() < 0.25


def test_a_learned_optimiser_by_name_is_repeatable(tiny_cartpole):
    a = train(tiny_cartpole, "open-ff", seeds=[0])
    b = train(tiny_cartpole, "open-ff", seeds=[0])
    assert torch.equal(a.agent_params, b.agent_params)
    torch.testing.assert_close(make_member("open").flat_params(), OPTIM.initial_params("open"))


def test_adam_in_the_optimiser_slot_learns_cartpole_with_separate_clipping():
    """The optimiser slot's own setting (actor and critic clipped separately) learns too:
    4 seeds, 40k steps each, well above a random policy's ~22."""
    cfg = config_for("CartPole-v1", total_timesteps=40_960, backend="torch")
    res = train(cfg, "adam", seeds=[0, 1, 2, 3])
    assert res.config.separate_grad_clip
    assert res.mean > 150, res.final_return
