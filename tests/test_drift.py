import pytest
import torch

from metarl.families.drift import DPO, LPO, Drift, PPOClip, lpo_features, make_drift


def grid():
    ratio = torch.exp(torch.linspace(-1.0, 1.0, 101))
    adv = torch.linspace(-3.0, 3.0, 61)
    r, a = torch.meshgrid(ratio, adv, indexing="ij")
    return r.reshape(-1), a.reshape(-1)


def test_ppo_clip_drift_gives_ppo_objective():
    r, a = grid()
    eps = 0.2
    objective = r * a - PPOClip()(r, a, eps)
    expected = torch.minimum(r * a, r.clamp(1 - eps, 1 + eps) * a)
    torch.testing.assert_close(objective, expected)


def test_dpo_closed_form():
    d = DPO()
    r = torch.tensor([1.5, 1.5, 0.5, 0.5])
    a = torch.tensor([2.0, -2.0, 2.0, -2.0])
    pos = (r - 1) * a
    neg = torch.log(r) * a
    expected = torch.where(a >= 0, torch.relu(pos - 2 * torch.tanh(pos / 2)),
                           torch.relu(neg - 0.6 * torch.tanh(neg / 0.6)))
    torch.testing.assert_close(d(r, a), expected)
    out = d(r, a)
    assert out[0] > 0 and out[3] > 0  # moving far in the direction the advantage favours
    assert out[1] == 0 and out[2] == 0  # moving against it is left to r * A


@pytest.mark.parametrize("name", ["ppo-clip", "dpo", "lpo"])
def test_every_member_is_non_negative_and_zero_at_ratio_one(name):
    d = make_drift(name)
    r, a = grid()
    out = d(r, a, 0.2)
    assert out.shape == r.shape and (out >= 0).all()
    ones = torch.ones(50)
    assert d(ones, torch.randn(50), 0.2).abs().max() <= 1e-4


def test_lpo_architecture_and_zero_start():
    lpo = LPO()
    assert lpo.num_meta_params == 8 * 128 + 128 == 1152
    assert torch.count_nonzero(lpo.flat_params()) == 0
    r, a = grid()
    diff = (lpo(r, a, 0.2) - PPOClip()(r, a, 0.2)).abs()
    assert diff.max() <= 1e-4 + 1e-6  # the offset, plus float32 rounding


def test_lpo_features():
    r, a = torch.tensor([2.0]), torch.tensor([3.0])
    f = lpo_features(r, a)[0]
    lr = torch.log(torch.tensor(2.0))
    expected = torch.stack([torch.tensor(1.0), torch.tensor(1.0), lr, lr * lr])
    torch.testing.assert_close(f, torch.cat([expected, 3 * expected]))


def test_lpo_population_matches_vmap_path_and_single_member():
    lpo = LPO()
    meta = torch.randn(5, lpo.num_meta_params) * 0.3
    r = torch.exp(torch.randn(5, 40) * 0.2)
    a = torch.randn(5, 40)
    fast = lpo.population(meta, r, a, 0.2)
    generic = Drift.population(lpo, meta, r, a, 0.2)
    torch.testing.assert_close(fast, generic, rtol=1e-5, atol=1e-6)
    single = LPO().load_flat(meta[3])(r[3], a[3], 0.2)
    torch.testing.assert_close(fast[3], single, rtol=1e-5, atol=1e-6)


def test_flat_params_round_trip():
    lpo = LPO()
    v = torch.randn(lpo.num_meta_params)
    assert torch.equal(LPO().load_flat(v).flat_params(), v)
    assert PPOClip().flat_params().numel() == 0


def test_unknown_drift_names_the_members():
    with pytest.raises(ValueError, match="ppo-clip, dpo, lpo") as e:
        make_drift("ppo_clip")
    assert "Did you mean 'ppo-clip'" in str(e.value)
