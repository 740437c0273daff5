"""Symbolic distillation of the learned optimisers: OPEN-FF and No-Features into formulas."""

import importlib.util
import json
import math
import shutil
import time

import numpy as np
import pytest
import sympy as sp
import torch
from torch import nn

from metarl import LearnedOptimizer, rng
from metarl.artifact import code_artifact, load, network_artifact, save, symbolic_artifact
from metarl.cli import main
from metarl.configs import config_for
from metarl.expression import (
    EXP_MAX,
    OPTIM_OPERATORS,
    ExpressionError,
    check_tree,
    compile_tree,
    from_sympy,
    size,
    sympy_relu,
    to_sympy,
)
from metarl.families import get_family, make_member
from metarl.families.drift import DriftGrid
from metarl.families.optim import AgentLayout, StepContext, TensorInfo
from metarl.families.optim.features import open_features, update_momenta
from metarl.families.optim.learned import _S_NOISE, LearnedUpdate
from metarl.families.optim.symbolic import (
    NO_FEATURES_INPUTS,
    OPEN_FF_INPUTS,
    OptimSymbolic,
    SymbolicData,
    SymbolicOptimizer,
)
from metarl.inner.ppo import train
from metarl.meta import symbolic as S

QUIET = {"log": lambda *a: None}
#: 1 - training proportion: the linear anneal, written over OPEN-FF's inputs
ANNEAL = ["add", ["num", 1], ["mul", ["num", -1], ["sym", "training_proportion"]]]
#: signed momentum, annealed: u = 1e-3 * sign(m_0.9) * (1 - t), Adam-like steps of ~1e-3
SIGNED_MOMENTUM = ["mul", ["sym", "sign_m0_9"], ANNEAL]


def optim_formula(tmp_path, tree, inputs=OPEN_FF_INPUTS, name="formula"):
    art = symbolic_artifact(tree, {"method": "hand"}, name=name, family="optim", inputs=inputs)
    return str(save(art, tmp_path / f"{name}.pt"))


def r2(pred, target):
    return float(1 - ((pred - target) ** 2).sum() / ((target - target.mean()) ** 2).sum())


def held_out(teacher: str, n=4096, seed=123):
    """``(X, y)`` on points the search never saw (another generator seed)."""
    art = load(teacher)
    method = OptimSymbolic().for_teacher(art)
    return method.sample_data(art, n, torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------- (a) planted


@pytest.mark.parametrize("tree", [
    ["add", ["relu", ["sym", "sign_m0_9"]], ["tanh", ["sym", "eps"]]],
    ["add", ["exp", ["sym", "sign_m0_9"]], ["mul", ["num", -1], ["sym", "training_proportion"]]],
], ids=["relu-tanh-eps", "exp-training"])
def test_planted_formula_teacher_is_recovered(tree, tmp_path):
    """A formula over OPEN-FF's 20 inputs, as teacher, is found again by gplearn at the
    defaults (1000 x 20, 4,096 points), with the optimiser operators (exp, relu)."""
    teacher = optim_formula(tmp_path, tree, name="planted")
    cfg = S.SymbolicConfig(teacher=teacher)
    assert isinstance(cfg.grid, SymbolicData) and (cfg.max_size, cfg.max_depth) == (60, 9)
    res = S.symbolic_distill(cfg, out=tmp_path / "run", **QUIET)
    assert res["env_steps"] == 0 and res["grid_points"] == 4096
    X, y = held_out(teacher)
    for label in ("lowest-loss", "best-score"):
        art = load(tmp_path / "run" / f"{label}.pt")
        assert art.family == "optim" and art.representation["reads"] == "open-ff"
        member, params = art.build()
        assert isinstance(member, SymbolicOptimizer) and params.numel() == 0
        pred = member.formula_value(torch.as_tensor(X[:, :19]), torch.as_tensor(X[:, 19]))
        # measured: R^2 1.0000 for both formulas and both choices (found exactly)
        assert r2(pred.numpy(), y) > 0.9999, (label, member.formula())
        assert size(art.representation["tree"]) <= 60


# ---------------------------------------------------------------------------- (b) networks


def sign_gradient_network(step: float = 2.0, noise: float = 1.0) -> torch.Tensor:
    """OPEN-FF meta-parameters whose update is ``step * 1e-3 * sign(g) + noise * 1e-3 *
    eps``: the first layer reads sign(g) alone (feature 13) into two units of opposite
    sign; LayerNorm and ReLU make them (sqrt 8, 0) or (0, sqrt 8); the second layer keeps
    their difference; the output o1 is ``step`` times its sign, o2 is 0 and o3 is the
    constant ``noise`` (a bias)."""
    member = make_member("open-ff")
    p = {n: torch.zeros_like(t) for n, t in member.named_parameters()}
    p["ln1.weight"] = torch.ones(16)
    p["ln2.weight"] = torch.ones(16)
    p["l1.weight"][0, 13], p["l1.weight"][1, 13] = 1.0, -1.0
    p["l2.weight"][0, :2] = torch.tensor([1.0, -1.0])
    p["l2.weight"][1, :2] = torch.tensor([-1.0, 1.0])
    c = step / 8**0.5
    p["l3.weight"][0, :2] = torch.tensor([c, -c])
    p["l3.bias"][2] = noise
    return torch.cat([p[n].reshape(-1) for n, _ in member.named_parameters()])


@pytest.mark.parametrize("teacher_kind", ["open-ff network", "no-features by name"])
def test_network_teacher_artifacts_reproduce_the_reported_loss(teacher_kind, tmp_path):
    """An OPEN-FF network artifact (a function of sign(g) and the noise) and No-Features
    by name (its seed-0 network) give two formula artifacts; each one's module, rebuilt
    from the file, has the loss the run reported on the run's data (500 x 10 search)."""
    if teacher_kind == "open-ff network":
        teacher = str(save(network_artifact("open-ff", sign_gradient_network(), {}, "sgn"),
                           tmp_path / "sgn.pt"))
        reads, width = "open-ff", 20
    else:
        teacher, reads, width = "no-features", "no-features", 8
    cfg = S.SymbolicConfig(teacher=teacher, population=500, generations=10)
    res = S.symbolic_distill(cfg, out=tmp_path / "run", **QUIET)
    teacher_art = load(teacher)
    method = OptimSymbolic().for_teacher(teacher_art)
    assert method.reads == reads and len(method.inputs) == width
    X, y = method.data(teacher_art, SymbolicData(), seed=cfg.seed)
    assert X.shape == (4096, width)
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["grid"] == {"points": 4096} and config["max_size"] == 60
    for label, key in (("lowest-loss", "lowest_loss"), ("best-score", "best_score")):
        art = load(tmp_path / "run" / f"{label}.pt")
        member, _ = art.build()
        assert member.reads == reads and list(art.representation["inputs"]) == list(
            method.inputs)
        features = torch.as_tensor(X[:, :member.num_inputs])
        eps = torch.as_tensor(X[:, -1]) if member.stochastic else None
        loss = float(((member.formula_value(features, eps).numpy() - y) ** 2).mean())
        assert loss == pytest.approx(art.provenance["loss"], rel=1e-9, abs=1e-12)
        assert loss == pytest.approx(res[f"{key}_loss"], rel=1e-9, abs=1e-12)
    if teacher_kind == "open-ff network":
        # y = 2 sign(g) + eps, found as such: measured "eps + 2.0*sign_g" for both
        # choices, R^2 1.0000 on held-out points
        Xh, yh = held_out(teacher)
        for label in ("lowest-loss", "best-score"):
            best, _ = load(tmp_path / "run" / f"{label}.pt").build()
            pred = best.formula_value(torch.as_tensor(Xh[:, :19]),
                                      torch.as_tensor(Xh[:, 19]))
            assert r2(pred.numpy(), yh) > 0.9999, best.formula()


# ---------------------------------------------------------------------------- (c) the member


def test_formula_member_step_is_the_formula_on_the_features():
    """One step of the formula member in a population equals the formula evaluated
    independently (sympy's numpy printer) on the inner loop's features, with the noise
    ``eps * actor_mask``, times 1e-3, mean-centred over all of each agent's parameters."""
    x, e = sp.Symbol("sign_m0_9"), sp.Symbol("eps")
    expr = (sympy_relu()(x - sp.Float(0.5) * sp.Symbol("log_g")) * sp.exp(
        sp.Float(0.1) * sp.Symbol("dormancy")) + sp.tanh(sp.Symbol("p")) * e
        - sp.Max(sp.Symbol("batch_proportion"), sp.Symbol("sign_g"))
        + sp.Symbol("training_proportion") * sp.Symbol("layer_proportion"))
    tree = from_sympy(expr, OPEN_FF_INPUTS, OPTIM_OPERATORS)
    member = SymbolicOptimizer(tree, "open-ff")
    f = sp.lambdify([sp.Symbol(n) for n in OPEN_FF_INPUTS], expr, "numpy")
    layout = AgentLayout([TensorInfo("actor.w", (3, 4), "actor", 0, 2, "actor.0", "rows"),
                          TensorInfo("actor.b", (3,), "actor", 0, 2, "actor.0", "elements"),
                          TensorInfo("actor.out", (2, 3), "actor", 1, 2),
                          TensorInfo("critic.w", (5,), "critic", 0, 1)])
    P, D = 2, layout.numel
    keys = rng.seed_keys([3, 4])
    stepper = member.population(torch.zeros(P, 0), layout, None, keys)
    assert isinstance(stepper, LearnedUpdate) and stepper.needs_activations
    torch.manual_seed(0)
    params = torch.randn(P, D)
    state = stepper.init(params)
    momenta = torch.zeros(P, D, 6)
    for step in range(3):
        ctx = StepContext(step, 5, 1, 3, step, 4, {"actor.0": torch.rand(P, 3)})
        grads = torch.randn(P, D)
        before = params.clone()
        update_momenta(momenta, grads)
        feats = open_features(before, grads, momenta.clone(), layout, ctx).double()
        noise = rng.normal(rng.fold(keys, _S_NOISE, step, 1, step), (D,)).double()
        cols = [c.numpy() for c in feats.unbind(-1)] + [(noise * layout.actor_mask).numpy()]
        u = 1e-3 * torch.as_tensor(f(*cols))
        u = u - u.mean(dim=1, keepdim=True)
        stepper.step(params, grads, state, ctx)
        torch.testing.assert_close(params.double(), before.double() - u, rtol=0, atol=2e-7)
        assert (params - before).abs().max() > 1e-4  # it moved
    # The noise acts on actor entries only: a formula of eps alone leaves every critic
    # entry with the same (mean-centring) update.
    noise_only = SymbolicOptimizer(["sym", "eps"]).population(torch.zeros(P, 0), layout,
                                                               None, keys)
    params = torch.zeros(P, D)  # so that the step is read exactly
    noise_only.step(params, torch.randn(P, D), noise_only.init(params), ctx)
    critic = params[:, ~layout.actor_mask]
    assert torch.equal(critic, critic[:, :1].expand_as(critic))
    assert params[:, layout.actor_mask].std() > 1e-4


def test_symbolic_openff_formula_trains_cartpole(tmp_path):
    """The must-show: a formula artifact over OPEN-FF's inputs (signed momentum, annealed)
    in the inner loop's optimiser slot learns CartPole, far above a random policy (~22)."""
    path = optim_formula(tmp_path, SIGNED_MOMENTUM, name="signed-momentum")
    member, params = load(path).build()
    cfg = config_for("CartPole-v1", total_timesteps=20_480, backend="torch")
    res = train(cfg, member, params, seeds=[0, 1, 2, 3])
    assert res.optimizer == "symbolic" and res.drift == "ppo-clip"
    assert res.config.separate_grad_clip  # the optimiser slot's own clipping
    # measured (one thread): 490.5, 277.25, 450.25, 419.0 (mean 409), 20,480 steps per seed
    assert float(res.final_return.min()) > 150 and res.mean > 300, res.final_return


def test_symbolic_formula_as_a_torch_optimizer(tmp_path):
    """The same artifact as a torch.optim.Optimizer on a small regression: the loss falls
    by more than 8x in 500 steps (measured 0.708 -> 0.0616, 11.5x)."""
    path = optim_formula(tmp_path, SIGNED_MOMENTUM, name="signed-momentum")
    g = torch.Generator().manual_seed(0)
    X = torch.randn(256, 8, generator=g)
    y = torch.tanh(X @ torch.randn(8, 1, generator=g))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1))
    opt = LearnedOptimizer(model.parameters(), path, model=model, total_steps=500)
    assert opt.learned and opt.algorithm == "symbolic"
    with torch.no_grad():
        first = float(((model(X) - y) ** 2).mean())
    for _ in range(500):
        opt.zero_grad()
        ((model(X) - y) ** 2).mean().backward()
        opt.step()
    with torch.no_grad():
        last = float(((model(X) - y) ** 2).mean())
    assert last < first / 8, (first, last)
    with pytest.raises(ValueError, match="it has no learning rate"):
        LearnedOptimizer(model.parameters(), path, lr=1e-3, model=model, total_steps=5)


def test_no_features_formula_runs_in_the_slot_without_noise_or_activations(tmp_path,
                                                                          tiny_cartpole):
    path = optim_formula(tmp_path, ["mul", ["num", 0.5], ["sym", "m0_9"]],
                         inputs=NO_FEATURES_INPUTS, name="momentum")
    member, params = load(path).build()
    assert member.reads == "no-features" and not member.stochastic
    assert not member.reads_activations and member.feature_set == "raw"
    res = train(tiny_cartpole.replace(fused=False), member, params, seeds=[0, 1])
    assert int(res.failed.sum()) == 0 and torch.isfinite(res.agent_params).all()


def test_show_prints_the_formula_and_source_that_runs(tmp_path, capsys):
    tree = ["add", ["mul", ["sym", "sign_m0_9"], ["exp", ["mul", ["num", -1],
                                                          ["sym", "training_proportion"]]]],
            ["mul", ["relu", ["sym", "eps"]], ["pow", ["sym", "log_g"], -1]]]
    path = optim_formula(tmp_path, tree, name="f")
    assert main(["show", path]) == 0
    out = capsys.readouterr().out
    assert "family: optim" in out and "formula: u = 1e-3 * (" in out
    assert "open-ff's inputs" in out and "def update(x, eps):" in out
    member, _ = load(path).build()
    ns = {}
    exec(member.source(), ns)  # the printed source computes the same update
    x = torch.randn(64, 19)
    eps = torch.randn(64)
    torch.testing.assert_close(ns["update"](x, eps), 1e-3 * member.formula_value(x, eps))
    nf = SymbolicOptimizer(["max", ["sym", "g"], ["num", 0.1]], "no-features")
    exec(nf.source(), ns)
    x8 = torch.randn(10, 8)
    torch.testing.assert_close(ns["update"](x8), 1e-3 * nf.formula_value(x8))


# ---------------------------------------------------------------------------- operators


def test_exp_and_relu_operators_round_trip_and_are_guarded():
    syms = {n: sp.Symbol(n) for n in ("a", "b")}
    a, b = syms["a"], syms["b"]
    expr = sympy_relu()(a - 1) * sp.exp(b) + sympy_relu()(sp.Float(-2.0)) + sp.exp(-a)
    tree = from_sympy(expr, ["a", "b"], OPTIM_OPERATORS)
    check_tree(tree, ["a", "b"], OPTIM_OPERATORS)
    assert sp.simplify(to_sympy(tree, syms) - expr) == 0
    assert size(["relu", ["sym", "a"]]) == 2  # relu is one node
    f = compile_tree(tree, ["a", "b"], operators=OPTIM_OPERATORS)
    av, bv = torch.linspace(-3, 3, 13, dtype=torch.float64), torch.linspace(-2, 2, 13)
    want = torch.relu(av - 1) * torch.exp(bv.double()) + torch.exp(-av)
    torch.testing.assert_close(f(av, bv.double()), want)
    # exp is clamped at EXP_MAX: finite where a plain exp overflows float32
    big = compile_tree(["exp", ["sym", "a"]], ["a"], operators=OPTIM_OPERATORS)
    out = big(torch.tensor([0.0, 50.0, 1e30]))
    assert torch.equal(out, torch.exp(torch.tensor([0.0, EXP_MAX, EXP_MAX])))
    assert float(to_sympy(["exp", ["num", 30]], {})) == pytest.approx(math.exp(EXP_MAX))
    # the drift operators know neither
    for op in ("exp", "relu"):
        with pytest.raises(ExpressionError, match=f"unknown operator '{op}'"):
            check_tree([op, ["sym", "a"]], ["a"])
    with pytest.raises(ExpressionError, match="not allowed"):
        from_sympy(sympy_relu()(a), ["a"])
    # gplearn's protected functions are finite everywhere
    wide = np.array([-1e308, -50.0, 0.0, 50.0, 1e308])
    assert np.isfinite(S._exp(wide)).all() and np.isfinite(S._relu(wide)).all()
    names = [getattr(fn, "name", fn) for fn in S._gplearn_functions(OPTIM_OPERATORS)]
    assert "exp" in names and "relu" in names
    assert "exp" not in [getattr(fn, "name", fn) for fn in S._gplearn_functions()]


def test_family_limits_and_operators():
    drift = get_family("drift").method("symbolic")
    optim = get_family("optim").method("symbolic")
    assert (drift.max_size, drift.max_depth) == (40, 8)
    assert (optim.max_size, optim.max_depth) == (60, 9)
    assert set(optim.operators) - set(drift.operators) == {"exp", "relu"}
    assert S.SymbolicConfig(teacher="dpo").max_size == 40
    assert S.SymbolicConfig(teacher="open-ff").max_depth == 9
    assert S.SymbolicConfig(teacher="open-ff", max_size=12).max_size == 12
    assert len(OPEN_FF_INPUTS) == 20 and OPEN_FF_INPUTS[-1] == "eps"
    assert all(n.isidentifier() for n in OPEN_FF_INPUTS + NO_FEATURES_INPUTS)


# ---------------------------------------------------------------------------- (d) refusals


def test_recurrent_open_is_refused_at_once(tmp_path, capsys):
    t0 = time.time()
    with pytest.raises(ValueError, match="depends on a hidden state .* carried across "
                                         "steps.*metarl distill"):
        S.symbolic_distill(S.SymbolicConfig(teacher="open"), out=tmp_path / "x")
    assert time.time() - t0 < 5 and not (tmp_path / "x").exists()
    assert main(["symbolic", "open", "--out", str(tmp_path / "y")]) == 2
    err = capsys.readouterr().err
    assert "recurrent OPEN" in err and "hidden state" in err
    assert not (tmp_path / "y").exists()


def test_bad_settings_for_an_optimiser_teacher_are_refused(tmp_path):
    with pytest.raises(ValueError, match="the optim family has none.*nothing to repair"):
        S.symbolic_distill(S.SymbolicConfig(teacher="open-ff", at_one="repair"),
                           out=tmp_path / "r")
    with pytest.raises(ValueError, match="symbolic data is a SymbolicData"):
        S.symbolic_distill(S.SymbolicConfig(teacher="open-ff", grid=DriftGrid()),
                           out=tmp_path / "g")
    with pytest.raises(ValueError, match=r"points must be an integer in \[1, "):
        S.symbolic_distill(S.SymbolicConfig(teacher="open-ff", grid=SymbolicData(0)),
                           out=tmp_path / "p")
    code = save(code_artifact("def open_ff_update(*args):\n    return 0.0\n",
                              "open_ff_update", {}, family="optim"), tmp_path / "code.pt")
    with pytest.raises(ValueError, match="it is proposed code, whose update reads raw"):
        S.symbolic_distill(S.SymbolicConfig(teacher=str(code)), out=tmp_path / "c")
    assert not any((tmp_path / d).exists() for d in "rgpc")  # before any work
    # an artifact whose inputs say nothing of the member, or whose tree reads other inputs
    art = symbolic_artifact(["sym", "p"], {}, family="optim", inputs=NO_FEATURES_INPUTS)
    art.representation["inputs"] = ["p", "q"]
    torch.save(art.to_dict(), tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="must say whose inputs its formula reads"):
        load(tmp_path / "bad.pt")
    with pytest.raises(ExpressionError, match="unknown input"):
        symbolic_artifact(["sym", "eps"], {}, family="optim", inputs=NO_FEATURES_INPUTS)


def test_pysr_installed_without_julia_fails_within_seconds(monkeypatch, tmp_path):
    """PySR found but no Julia: refused before any work, naming gplearn (which has exp
    and relu too)."""
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "pysr" else real(name, *a))
    monkeypatch.setattr(shutil, "which", lambda *a, **k: None)
    monkeypatch.delenv("PYTHON_JULIAPKG_EXE", raising=False)
    monkeypatch.delenv("JULIA_BINDIR", raising=False)
    t0 = time.time()
    with pytest.raises(S.BackendUnavailable, match="PySR needs Julia.*--backend gplearn"):
        S.symbolic_distill(S.SymbolicConfig(teacher="open-ff", backend="pysr"),
                           out=tmp_path / "p")
    assert time.time() - t0 < 5 and not (tmp_path / "p").exists()


# ---------------------------------------------------------------------------- rejected rows


def test_rejected_candidates_stay_in_candidates_json(tmp_path, monkeypatch):
    """Candidates that break the constraint or are not finite on the data are written to
    candidates.json with valid false and the reason, even when none can be chosen."""
    lr, x, A = (sp.Symbol(n) for n in ("log_r", "r_minus_1", "A"))
    monkeypatch.setattr(S, "fit_gplearn",
                        lambda *a, **k: [A * x + sp.Float(0.3), A ** 400 + x])
    with pytest.raises(ValueError, match="no candidate expression is 0 at r = 1"):
        S.symbolic_distill(S.SymbolicConfig(teacher="ppo-clip"), out=tmp_path / "d")
    rows = json.loads((tmp_path / "d" / "candidates.json").read_text())
    assert [r["valid"] for r in rows] == [False, False]
    by_reason = {r["rejected"].split(" ")[0]: r for r in rows}
    assert by_reason["at_one"]["loss"] > 0 and by_reason["not"]["loss"] is None
    assert by_reason["not"]["rejected"] == "not finite on the data"
    # a family without a constraint: every finite candidate is valid; none finite -> says so
    p = sp.Symbol("p")
    monkeypatch.setattr(S, "fit_gplearn", lambda *a, **k: [p ** 1000])
    with pytest.raises(ValueError, match="no candidate expression is finite on the data"):
        S.symbolic_distill(S.SymbolicConfig(teacher="open-ff"), out=tmp_path / "o")
    rows = json.loads((tmp_path / "o" / "candidates.json").read_text())
    assert len(rows) == 1 and rows[0]["rejected"] == "not finite on the data"
    assert "at_one" not in rows[0]
