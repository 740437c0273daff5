"""Every registered strategy on a shifted sphere and a Rosenbrock, and exact resume."""

import io

import pytest
import torch

from metarl.meta.es import STRATEGIES, centered_ranks, make_strategy

# Stated settings, generations and tolerances per strategy (10 dimensions, population 32).
SETTINGS = {
    "openai-es": dict(sigma=0.1, lr=0.05, sigma_decay=0.995, lr_decay=0.995,
                      sigma_min=0.005, lr_min=0.002),
    "cma-es": dict(sigma=0.3),
}
BUDGET = {  # (generations, tolerance) for sphere, then Rosenbrock
    "openai-es": ((500, 1e-3), (800, 1e-2)),
    "cma-es": ((200, 1e-8), (400, 1e-6)),
}


def shifted_sphere(x):  # minimum 0 at x = 0.5
    return ((x - 0.5) ** 2).sum(-1)


def negated_rosenbrock(x):  # maximum 0 at x = 1
    return -(100 * (x[:, 1:] - x[:, :-1] ** 2) ** 2 + (1 - x[:, :-1]) ** 2).sum(-1)


def run(strategy, state, fn, generations):
    for _ in range(generations):
        candidates, state = strategy.ask(state)
        state = strategy.tell(state, candidates, fn(candidates.double()))
    return state


def test_registry_is_complete():
    assert set(STRATEGIES) == set(SETTINGS) == set(BUDGET)


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_minimises_shifted_sphere(name):
    (gens, tol), _ = BUDGET[name]
    s = make_strategy(name, 10, 32, maximize=False, seed=1, **SETTINGS[name])
    state = run(s, s.init(), shifted_sphere, gens)
    assert shifted_sphere(s.mean(state)[None].double()).item() < tol


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_maximises_negated_rosenbrock(name):
    _, (gens, tol) = BUDGET[name]
    s = make_strategy(name, 10, 32 if name == "cma-es" else 64, maximize=True, seed=0,
                      **SETTINGS[name])
    state = run(s, s.init(), negated_rosenbrock, gens)
    assert negated_rosenbrock(s.mean(state)[None].double()).item() > -tol


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_resumes_exactly_from_a_saved_state(name):
    s = make_strategy(name, 10, 16, maximize=False, seed=3, **SETTINGS[name])
    state = run(s, s.init(), shifted_sphere, 5)
    buf = io.BytesIO()
    torch.save(s.state_dict(state), buf)
    straight = run(s, state, shifted_sphere, 5)
    # A fresh strategy object, as after a restart, continues from the saved bytes.
    s2 = make_strategy(name, 10, 16, maximize=False, seed=3, **SETTINGS[name])
    buf.seek(0)
    resumed = run(s2, s2.load_state(torch.load(buf)), shifted_sphere, 5)
    assert torch.equal(s.mean(straight), s2.mean(resumed))
    c1, _ = s.ask(straight)
    c2, _ = s2.ask(resumed)
    assert torch.equal(c1, c2)


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_sense_is_explicit_and_fitness_checked(name):
    with pytest.raises(TypeError, match="maximize"):
        make_strategy(name, 4, 8, maximize=None)
    s = make_strategy(name, 4, 8, maximize=True)
    state = s.init()
    candidates, state = s.ask(state)
    with pytest.raises(ValueError, match="NaN"):
        s.tell(state, candidates, torch.tensor([float("nan")] * 8))
    with pytest.raises(ValueError, match="expects 8"):
        s.tell(state, candidates, torch.zeros(3))


def test_openai_es_antithetic_and_odd_popsize():
    s = make_strategy("openai-es", 5, 8, maximize=True)
    c, _ = s.ask(s.init())
    torch.testing.assert_close(c[:4], -c[4:])
    with pytest.raises(ValueError, match="must be even"):
        make_strategy("openai-es", 5, 7, maximize=True)


def test_openai_es_paper_defaults():
    s = make_strategy("openai-es", 3, maximize=True)
    st = s.init()
    assert s.popsize == 64 and float(st.sigma) == 0.03 and float(st.lr) == 0.03
    assert s.beta1 == 0.99 and torch.count_nonzero(st.mean) == 0
    for _ in range(500):
        c, st = s.ask(st)
        st = s.tell(st, c, torch.randn(64))
    assert float(st.sigma) == pytest.approx(0.01) and float(st.lr) == pytest.approx(0.001)


def test_centered_ranks():
    r = centered_ranks(torch.tensor([3.0, -1.0, 10.0]))
    assert r.tolist() == [0.0, -0.5, 0.5]


def test_unknown_strategy():
    with pytest.raises(ValueError, match="choose one of openai-es, cma-es"):
        make_strategy("openai_es", 3, 8, maximize=True)


@pytest.mark.parametrize("name, bad", [
    ("openai-es", dict(sigma=0.0)), ("openai-es", dict(lr=-1.0)),
    ("openai-es", dict(sigma=float("nan"))), ("cma-es", dict(sigma=-0.1)),
])
def test_bad_settings_are_refused(name, bad):
    with pytest.raises(ValueError, match="must be a positive finite number"):
        make_strategy(name, 4, 8, maximize=True, **bad)
