"""metarl.LearnedOptimizer: the optimiser family as a torch.optim.Optimizer."""

import io
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

from metarl import LearnedOptimizer, rng
from metarl.artifact import network_artifact, save
from metarl.families import get_family, make_member
from metarl.families.optim import AgentLayout, StepContext, TensorInfo
from metarl.families.optim.learned import LearnedUpdate

OPTIM = get_family("optim")


def mlp(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(),
                         nn.Linear(32, 1)).to(dtype)


def regression(dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(256, 4, generator=g)
    y = x[:, :1] * x[:, 1:2] + torch.sin(x[:, 2:3])
    return x.to(dtype), y.to(dtype)


def fit(model, opt, steps, data=None):
    """``steps`` optimiser steps of full-batch MSE regression; the losses before each."""
    x, y = data or regression(next(model.parameters()).dtype)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


# -- handcrafted members follow torch.optim --------------------------------------------------


@pytest.mark.parametrize("dtype,lr,betas,eps,tol", [
    (torch.float32, 1e-3, (0.9, 0.999), 1e-8, dict(rtol=1e-5, atol=1e-6)),
    (torch.float32, 1e-3, (0.8, 0.99), 1e-5, dict(rtol=1e-5, atol=1e-6)),
    (torch.float64, 1e-2, (0.9, 0.999), 1e-8, dict(rtol=1e-10, atol=1e-12)),
])
def test_adam_matches_torch_adam(dtype, lr, betas, eps, tol):
    """metarl's Adam puts eps outside the square root, like torch's: 100 steps agree.

    (Only the rounding differs: metarl computes sqrt(v / bc2), torch sqrt(v) / sqrt(bc2).
    In float32 at lr 1e-2 the two drift apart by ~1e-5 over 100 steps, as any two
    roundings of a chaotic trajectory do; at lr 1e-3, or in float64, they agree tightly.)"""
    a, b = mlp(dtype=dtype), mlp(dtype=dtype)
    la = fit(a, LearnedOptimizer(a.parameters(), "adam", lr=lr, betas=betas, eps=eps), 100)
    lb = fit(b, torch.optim.Adam(b.parameters(), lr=lr, betas=betas, eps=eps), 100)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, **tol)
    assert la[-1] < 0.7 * la[0]
    torch.testing.assert_close(torch.tensor(la), torch.tensor(lb), rtol=1e-4, atol=0)


def test_adam_defaults_and_param_groups_match_torch():
    a, b = mlp(), mlp()

    def groups(m):
        return [{"params": m[0].parameters(), "lr": 3e-3},
                {"params": list(m[2].parameters()) + list(m[4].parameters())}]

    opt = LearnedOptimizer(groups(a), "adam")
    assert opt.param_groups[1]["lr"] == 1e-3 and opt.param_groups[1]["eps"] == 1e-8
    fit(a, opt, 50)
    fit(b, torch.optim.Adam(groups(b)), 50)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert opt.state[a[0].weight]["step"] == 50


def test_sgd_matches_torch_sgd_exactly():
    a, b = mlp(), mlp()
    fit(a, LearnedOptimizer(a.parameters(), "sgd", lr=0.1), 100)
    fit(b, torch.optim.SGD(b.parameters(), lr=0.1), 100)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


def test_lr_scheduler_drives_the_group_lr():
    a, b = mlp(), mlp()
    oa = LearnedOptimizer(a.parameters(), "sgd", lr=0.1)
    ob = torch.optim.SGD(b.parameters(), lr=0.1)
    sa = torch.optim.lr_scheduler.StepLR(oa, 3, 0.5)
    sb = torch.optim.lr_scheduler.StepLR(ob, 3, 0.5)
    x, y = regression()
    for _ in range(10):
        for m, o, s in ((a, oa, sa), (b, ob, sb)):
            o.zero_grad()
            ((m(x) - y) ** 2).mean().backward()
            o.step()
            s.step()
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


def test_closure_is_called_with_gradients_enabled():
    model = mlp()
    opt = LearnedOptimizer(model.parameters(), "adam", lr=1e-2)
    x, y = regression()

    def closure():
        opt.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        return loss

    first = opt.step(closure)
    for _ in range(20):
        last = opt.step(closure)
    assert last < first


# -- learned members ----------------------------------------------------------------------------


def sign_descent_params(step: float = 2.0) -> torch.Tensor:
    """OPEN-FF meta-parameters that make it sign descent: ``o1 = step * sign(g)``, o2 = o3
    = 0, so the update is ``step * 1e-3 * sign(g)``, then mean-centred.

    Feature 13 is sign(g), RMS-normalised over the tensor (so its sign is sign(g)).
    Layer 1 writes it to units 0 and 1 with weights +1 and -1 (all other units 0); the
    LayerNorm over 16 units (mean 0, variance x^2 / 8) scales them to +-sqrt(8) sign(g),
    whatever the magnitude of x; ReLU keeps one of them. Layer 2 computes unit0 - unit1
    and its negation, the same LayerNorm and ReLU give sqrt(8) on the unit of sign(g);
    the output weights (c, -c) with c = step / sqrt(8) give o1 = step * sign(g). A zero
    gradient gives all-zero units, which LayerNorm keeps at zero: o1 = 0.
    """
    member = make_member("open-ff")
    p = {n: torch.zeros_like(t) for n, t in member.named_parameters()}
    p["ln1.weight"] = torch.ones(16)
    p["ln2.weight"] = torch.ones(16)
    p["l1.weight"][0, 13], p["l1.weight"][1, 13] = 1.0, -1.0
    p["l2.weight"][0, :2] = torch.tensor([1.0, -1.0])
    p["l2.weight"][1, :2] = torch.tensor([-1.0, 1.0])
    c = step / 8**0.5
    p["l3.weight"][0, :2] = torch.tensor([c, -c])
    return torch.cat([p[n].reshape(-1) for n, _ in member.named_parameters()])


def test_sign_descent_parameters_do_what_the_docstring_says():
    member = make_member("open-ff").load_flat(sign_descent_params(2.0))
    x = torch.randn(6, 19)
    x[:, 13] = torch.tensor([1.0, -1.0, 0.0, 0.3, -2.5, 1e-3])
    out = member(x).detach()
    torch.testing.assert_close(out[:, 0], torch.tensor([2.0, -2.0, 0.0, 2.0, -2.0, 2.0]),
                               rtol=0, atol=1e-3)
    assert out[:, 1:].abs().max() == 0


def test_learned_artifact_trains_a_regression_mlp(tmp_path):
    """A saved open-ff artifact (sign descent, see above) trains an MLP: loss < 0.5x."""
    path = save(network_artifact("open-ff", sign_descent_params(2.0), {"method": "hand"},
                                 name="sign-descent"), tmp_path / "sign.pt")
    model = mlp()
    opt = LearnedOptimizer(model.parameters(), str(path), model=model, total_steps=100)
    assert opt.algorithm == "open-ff" and opt.artifact_name == "sign-descent"
    losses = fit(model, opt, 100)
    x, y = regression()
    final = ((model(x) - y) ** 2).mean().item()
    assert final < 0.5 * losses[0], (losses[0], final)  # measured: 1.569 -> 0.209


def test_learned_step_is_the_familys_update_with_the_documented_inputs():
    """One OPEN-FF step equals LearnedUpdate with a hand-built layout: layer proportion
    by Linear index, dormancy from the pre-activation mean |output| over every leading
    dim, training proportion step / (total_steps - 1), noise keyed by seed, group, step."""
    meta = OPTIM.initial_params("open-ff", 3)
    meta[-3:] += 1.0  # every output term matters, the noise included
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    x = torch.randn(5, 7, 3)
    art = network_artifact("open-ff", meta, {"method": "test"})
    opt = LearnedOptimizer(model.parameters(), art, model=model, total_steps=5, seed=9)
    layout = AgentLayout([
        TensorInfo("0.weight", (4, 3), "actor", 0, 2, "0", "rows"),
        TensorInfo("0.bias", (4,), "actor", 0, 2, "0", "elements"),
        TensorInfo("2.weight", (2, 4), "actor", 1, 2, "2", "rows"),
        TensorInfo("2.bias", (2,), "actor", 1, 2, "2", "elements"),
    ])
    ref = LearnedUpdate(make_member("open-ff"), meta[None], layout,
                        rng.fold(rng.seed_keys([9]), 0))
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])[None].clone()
    state = ref.init(flat)
    for t in range(3):
        opt.zero_grad()
        h = model[0](x)
        out = model[2](torch.relu(h))
        with torch.no_grad():
            model(x)  # forwards without gradients are not recorded
        out.square().mean().backward()
        acts = {"0": h.detach().abs().mean((0, 1))[None],
                "2": out.detach().abs().mean((0, 1))[None]}
        grads = torch.cat([p.grad.reshape(-1) for p in model.parameters()])[None]
        ref.step(flat, grads, state, StepContext(t, 5, 0, 1, t, t + 1, acts))
        opt.step()
        got = torch.cat([p.detach().reshape(-1) for p in model.parameters()])[None]
        torch.testing.assert_close(got, flat, rtol=1e-6, atol=1e-8)
    mom = torch.cat([opt.state[p]["momenta"].reshape(-1, 6) for p in model.parameters()])
    torch.testing.assert_close(mom.T[None], state["momenta"])  # the stepper: [1, 6, D]


def test_without_a_model_layer_proportion_is_the_tensor_index_and_dormancy_is_one():
    meta = OPTIM.initial_params("open-ff", 1)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    with pytest.warns(UserWarning, match="training proportion is 0.*dormancy is 1"):
        opt = LearnedOptimizer(model.parameters(), network_artifact("open-ff", meta, {}))
    sizes = [(4, 3), (4,), (2, 4), (2,)]
    layout = AgentLayout([TensorInfo(f"t{i}", s, "actor", i, 4) for i, s in enumerate(sizes)])
    ref = LearnedUpdate(make_member("open-ff"), meta[None], layout,
                        rng.fold(rng.seed_keys([0]), 0))
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])[None].clone()
    state = ref.init(flat)
    x = torch.randn(8, 3)
    for t in range(2):
        opt.zero_grad()
        model(x).square().mean().backward()
        grads = torch.cat([p.grad.reshape(-1) for p in model.parameters()])[None]
        ref.step(flat, grads, state, StepContext(0, 1, 0, 1, t, t + 1, None))
        opt.step()
    got = torch.cat([p.detach().reshape(-1) for p in model.parameters()])[None]
    torch.testing.assert_close(got, flat, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("name", ["adam", "sgd", "open", "open-ff", "no-features"])
def test_state_dict_round_trip_continues_identically(name):
    """Save after 7 steps, load into a fresh optimiser (built with another seed: the seed
    is part of the saved state), 8 more steps: the same parameters as 15 uninterrupted."""
    lr = {"adam": 1e-2, "sgd": 0.1}.get(name)

    def make(model, seed):
        return quiet(LearnedOptimizer, model.parameters(), name, lr, model=model,
                     total_steps=15, seed=seed)

    straight = mlp()
    fit(straight, make(straight, 5), 15)

    first = mlp()
    opt = make(first, 5)
    fit(first, opt, 7)
    buf = io.BytesIO()
    torch.save({"model": first.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf)
    resumed = mlp(seed=1)
    opt2 = make(resumed, 123)
    resumed.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    assert opt2.seed == 5
    fit(resumed, opt2, 8)
    for p, q in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(p, q)
    if name == "open":
        assert opt2.state[resumed[0].weight]["hidden"].abs().sum() > 0


def test_noise_depends_on_the_seed():
    a, b = mlp(), mlp()
    fit(a, quiet(LearnedOptimizer, a.parameters(), "open-ff", seed=0), 3)
    fit(b, quiet(LearnedOptimizer, b.parameters(), "open-ff", seed=1), 3)
    assert not torch.equal(a[0].weight, b[0].weight)


def test_learned_state_dict_refuses_another_algorithm():
    model = mlp()
    opt = quiet(LearnedOptimizer, model.parameters(), "open-ff")
    fit(model, opt, 1)
    other = quiet(LearnedOptimizer, model.parameters(), "open")
    with pytest.raises(ValueError, match="state is of 'open-ff'"):
        other.load_state_dict(opt.state_dict())


# -- non-finite gradients, missing gradients, schedule end ---------------------------------------


@pytest.mark.parametrize("name", ["adam", "open"])
def test_non_finite_gradient_skips_the_step(name):
    model = mlp()
    opt = quiet(LearnedOptimizer, model.parameters(), name, 1e-2 if name == "adam" else None,
                model=model, total_steps=10)
    fit(model, opt, 2)
    params = [p.detach().clone() for p in model.parameters()]
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    x, y = regression()
    opt.zero_grad()
    ((model(x) - y) ** 2).mean().backward()
    model[2].weight.grad[0, 0] = float("nan")
    model[4].bias.grad[0] = float("inf")
    with pytest.warns(UserWarning, match="non-finite gradient.*skipped"):
        opt.step()
    for p, q in zip(model.parameters(), params):
        assert torch.equal(p, q)
    buf.seek(0)
    before = torch.load(buf)
    after = opt.state_dict()
    assert before.keys() == after.keys()
    for i, s in before["state"].items():
        for k, v in s.items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(after["state"][i][k])), k
    assert opt.state[model[0].weight]["step"] == 2
    fit(model, opt, 1)  # a finite step afterwards proceeds
    assert opt.state[model[0].weight]["step"] == 3
    assert not torch.equal(model[0].weight, params[0])


def test_a_group_without_gradients_is_skipped():
    model = mlp()
    head = nn.Linear(1, 1)
    opt = LearnedOptimizer([{"params": model.parameters()}, {"params": head.parameters()}],
                           "adam", lr=1e-2)
    before = head.weight.detach().clone()
    fit(model, opt, 2)
    assert torch.equal(head.weight, before) and not opt.state[head.weight]


def test_past_total_steps_warns_once_and_holds_the_proportion():
    model = mlp()
    opt = LearnedOptimizer(model.parameters(), "open-ff", model=model, total_steps=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(model, opt, 4)
    assert sum("past total_steps" in str(w.message) for w in caught) == 1
    assert opt._context(3, None).training_proportion == 1.0
    assert opt._context(0, None).training_proportion == 0.0


# -- bad input --------------------------------------------------------------------------------


def test_drift_family_algorithms_are_refused(tmp_path):
    model = mlp()
    for name in ("ppo-clip", "lpo", "dpo"):
        with pytest.raises(ValueError, match=f"'{name}' is a drift-family algorithm.*not "
                                             f"the optimiser.*adam, sgd, open, open-ff"):
            LearnedOptimizer(model.parameters(), name)
    zeros = torch.zeros(make_member("lpo").num_meta_params)
    lpo = save(network_artifact("lpo", zeros, {"method": "test"}, name="my-lpo"),
               tmp_path / "lpo.pt")
    with pytest.raises(ValueError, match="'my-lpo' is a drift-family algorithm"):
        LearnedOptimizer(model.parameters(), lpo)


def test_unknown_names_and_bad_arguments_are_refused():
    model = mlp()
    with pytest.raises(ValueError, match="unknown algorithm 'adamw'.*Did you mean 'adam'"):
        LearnedOptimizer(model.parameters(), "adamw")
    with pytest.raises(ValueError, match="must be a name, a path or an Artifact"):
        LearnedOptimizer(model.parameters(), 3)
    with pytest.raises(ValueError, match="pass model.parameters()"):
        LearnedOptimizer(model, "adam")
    with pytest.raises(ValueError, match="no parameters"):
        LearnedOptimizer([], "adam")
    frozen = mlp().requires_grad_(False)
    with pytest.raises(ValueError, match="none of them trainable"):
        LearnedOptimizer(frozen.parameters(), "adam")
    with pytest.raises(ValueError, match="learned optimiser.*lr must be None"):
        LearnedOptimizer(model.parameters(), "open-ff", lr=1e-3)
    with pytest.raises(ValueError, match="cannot set lr"):
        quiet(LearnedOptimizer, [{"params": model.parameters(), "lr": 0.1}], "open")
    with pytest.raises(ValueError, match="'sgd' needs a learning rate"):
        LearnedOptimizer(model.parameters(), "sgd")
    with pytest.raises(ValueError, match="betas and eps are Adam's"):
        LearnedOptimizer(model.parameters(), "sgd", lr=0.1, eps=1e-8)
    with pytest.raises(ValueError, match="total_steps must be a positive integer"):
        LearnedOptimizer(model.parameters(), "adam", total_steps=0)
    with pytest.raises(ValueError, match="lr must be a non-negative"):
        LearnedOptimizer(model.parameters(), "adam", lr=-1.0)


def test_import_metarl_stays_light():
    code = ("import sys, metarl; assert 'torch' not in sys.modules, 'torch imported'; "
            "assert metarl.LearnedOptimizer.__module__ == 'metarl.optimizer'; "
            "assert 'LearnedOptimizer' in dir(metarl)")
    subprocess.run([sys.executable, "-c", code], check=True)
