"""The PPO inner loop's mathematics against independent, one-at-a-time references.

Every reference here is a plain loop over Python floats (one member, one environment, one
step at a time) written from the formulas (purejaxrl's PPO; next-step auto-reset as in
:mod:`metarl.envs.base`), not from the vectorised code of :mod:`metarl.inner.losses`
(``gae``, ``ppo_loss``, ``clip_grads``, ``policy_logp``, which the eager loop in
:mod:`metarl.inner.ppo` and the compiled one call). Inputs are float64 and results are
compared at ``TOL`` (rtol 1e-10, atol 1e-12) unless a test says otherwise.
"""

import math

import numpy as np
import torch

from metarl.configs import config_for
from metarl.families.optim import AgentLayout
from metarl.inner.losses import clip_grads, gae, policy_logp, ppo_loss
from metarl.inner.ppo import resolve_slots
from metarl.nets import ActorCritic

TOL = {"rtol": 1e-10, "atol": 1e-12}
CFG = config_for("CartPole-v1")  # clip_eps 0.2, vf_coef 0.5, ent_coef 0.01
_, DRIFT, _ = resolve_slots("ppo-clip")
OBS, A = 3, 2  # observation size and number of actions of the linear stub policy


def t64(x):
    return torch.as_tensor(np.asarray(x, dtype=np.float64))


def run_gae(r, v, term, done, gamma, lam):
    """``gae`` on numpy arrays (float rewards/values, boolean flags)."""
    return gae(t64(r), t64(v), torch.as_tensor(term), torch.as_tensor(done), gamma, lam)


# -- references ---------------------------------------------------------------------------


def ref_gae(r, v, term, done, gamma, lam):
    """Backwards over each environment: delta and the (1 - done)-gated recursion."""
    P, T, N = r.shape
    out = np.zeros((P, T, N))
    for p in range(P):
        for n in range(N):
            a_next = 0.0
            for t in reversed(range(T)):
                nt, nd = 0.0 if term[p, t, n] else 1.0, 0.0 if done[p, t, n] else 1.0
                delta = float(r[p, t, n]) + gamma * float(v[p, t + 1, n]) * nt - float(v[p, t, n])
                a_next = delta + gamma * lam * nd * a_next
                out[p, t, n] = a_next
    return out


def stub_forward(params, obs):
    """A linear actor-critic: logits = obs @ W, value = obs @ w, W and w read from params."""
    P = params.shape[0]
    W = params[:, : OBS * A].reshape(P, OBS, A)
    value = torch.einsum("pbo,po->pb", obs, params[:, OBS * A:])
    return torch.einsum("pbo,poa->pba", obs, W), value


def ref_loss(cfg, params, obs, act, logp_old, val_old, adv, ret, valid):
    """PPO-clip loss per member, masked means over the valid steps only."""
    eps, out = cfg.clip_eps, []
    for p in range(params.shape[0]):
        W = [[float(params[p, o * A + a]) for a in range(A)] for o in range(OBS)]
        w = [float(params[p, OBS * A + o]) for o in range(OBS)]
        idx = [b for b in range(obs.shape[1]) if valid[p, b]]
        n = max(len(idx), 1)
        mu = sum(float(adv[p, b]) for b in idx) / n
        std = math.sqrt(sum((float(adv[p, b]) - mu) ** 2 for b in idx) / n)
        surr = vloss = ent = 0.0
        for b in idx:
            x = [float(obs[p, b, o]) for o in range(OBS)]
            logits = [sum(x[o] * W[o][a] for o in range(OBS)) for a in range(A)]
            m = max(logits)
            lse = m + math.log(sum(math.exp(lg - m) for lg in logits))
            logps = [lg - lse for lg in logits]
            ent -= sum(math.exp(lp) * lp for lp in logps)
            a_n = (float(adv[p, b]) - mu) / (std + 1e-8)
            r = math.exp(logps[int(act[p, b])] - float(logp_old[p, b]))
            surr += min(r * a_n, min(max(r, 1 - eps), 1 + eps) * a_n)
            value = sum(x[o] * w[o] for o in range(OBS))
            vo, R = float(val_old[p, b]), float(ret[p, b])
            v_clip = vo + min(max(value - vo, -eps), eps)
            vloss += 0.5 * max((value - R) ** 2, (v_clip - R) ** 2)
        out.append(-surr / n + cfg.vf_coef * vloss / n - cfg.ent_coef * ent / n)
    return out


def make_batch(P=2, B=12, seed=0):
    """Random batch for the stub policy, a third of the steps invalid, ratios near the clip."""
    g = torch.Generator().manual_seed(seed)
    params = torch.randn(P, OBS * A + OBS, generator=g, dtype=torch.float64)
    obs = torch.randn(P, B, OBS, generator=g, dtype=torch.float64)
    act = torch.randint(0, A, (P, B), generator=g)
    logp, _ = policy_logp(stub_forward(params, obs)[0], None, act)
    logp_old = logp + 0.4 * torch.randn(P, B, generator=g, dtype=torch.float64)
    val_old = torch.randn(P, B, generator=g, dtype=torch.float64)
    adv = torch.randn(P, B, generator=g, dtype=torch.float64) * torch.tensor([[1.0], [30.0]])
    ret = torch.randn(P, B, generator=g, dtype=torch.float64)
    valid = (torch.arange(B) % 3 != 2).repeat(P, 1).double()
    return params, obs, act, logp_old, val_old, adv, ret, valid


def loss_of(batch, cfg=CFG, drift=DRIFT):
    params, *rest = batch
    meta = torch.zeros(params.shape[0], 0)
    return ppo_loss(cfg, drift, meta, stub_forward, params, None, *rest)


# -- 1. GAE -------------------------------------------------------------------------------


def test_gae_matches_backward_walk_with_terminations_and_truncations():
    rng = np.random.default_rng(0)
    P, T, N = 2, 7, 3
    r, v = rng.normal(size=(P, T, N)), rng.normal(size=(P, T + 1, N))
    term = rng.random((P, T, N)) < 0.2
    trunc = (rng.random((P, T, N)) < 0.2) & ~term
    term[0, 2, 0], trunc[1, 3, 2], term[1, 3, 2] = True, True, False
    done = term | trunc
    for gamma, lam in ((0.99, 0.95), (0.9, 0.5), (1.0, 1.0)):
        torch.testing.assert_close(run_gae(r, v, term, done, gamma, lam),
                                   t64(ref_gae(r, v, term, done, gamma, lam)), **TOL)


def test_gae_truncation_bootstraps_and_episode_end_stops_the_flow():
    gamma, lam = 0.9, 0.8
    r, v = np.array([1.0, 2.0, 3.0]), np.array([0.5, 0.25, 4.0, 8.0])
    no, at1 = np.zeros(3, dtype=bool), np.array([False, True, False])

    def run(r, v, term, done):  # one member, one environment
        return run_gae(*(x.reshape(1, -1, 1) for x in (r, v, term, done)), gamma, lam).view(3)

    # Hand-computed: truncated at t=1 bootstraps from V(final obs) = v[2]; terminated does not.
    trunc = run(r, v, no, at1)
    torch.testing.assert_close(trunc, t64([0.725 + 0.72 * 5.35, 2 + 0.9 * 4.0 - 0.25, 6.2]), **TOL)
    term = run(r, v, at1, at1)
    torch.testing.assert_close(term, t64([0.725 + 0.72 * 1.75, 1.75, 6.2]), **TOL)
    # After the end, rewards and values of the next episode do not reach steps <= 1 ...
    r2, v2 = r + np.array([0, 0, 5.0]), v + np.array([0, 0, 0, 7.0])
    for flags in ((no, at1), (at1, at1)):
        torch.testing.assert_close(run(r2, v2, *flags)[:2], run(r, v, *flags)[:2], **TOL)
    # ... while without an end they do.
    assert (run(r2, v2, no, no)[:2] - run(r, v, no, no)[:2]).abs().min() > 1.0


def test_gae_edge_cases_lambda_zero_and_undiscounted_monte_carlo():
    rng = np.random.default_rng(1)
    P, T, N = 2, 7, 3
    r, v = rng.normal(size=(P, T, N)), rng.normal(size=(P, T + 1, N))
    term = rng.random((P, T, N)) < 0.3
    done = term | (rng.random((P, T, N)) < 0.3)
    delta = r + 0.97 * v[:, 1:] * ~term - v[:, :-1]
    torch.testing.assert_close(run_gae(r, v, term, done, 0.97, 0.0), t64(delta), **TOL)
    none = np.zeros((P, T, N), dtype=bool)
    expected = np.zeros((P, T, N))
    for p in range(P):
        for n in range(N):
            for t in range(T):  # sum of the remaining rewards + V(last obs) - V(s_t)
                expected[p, t, n] = sum(r[p, t:, n]) + v[p, T, n] - v[p, t, n]
    torch.testing.assert_close(run_gae(r, v, none, none, 1.0, 1.0), t64(expected), **TOL)


# -- 2. and 3. the masked loss and per-minibatch advantage normalisation -----------------


def test_ppo_loss_equals_the_masked_reference():
    batch = make_batch()
    params, obs, act, logp_old = batch[:4]
    ratio = torch.exp(policy_logp(stub_forward(params, obs)[0], None, act)[0] - logp_old)
    assert ((ratio - 1).abs() > CFG.clip_eps).any()  # the clip branch is exercised
    for cfg in (CFG, CFG.replace(clip_eps=0.1, vf_coef=1.3, ent_coef=0.2)):
        torch.testing.assert_close(loss_of(batch, cfg), t64(ref_loss(cfg, *batch)), **TOL)


def test_invalid_steps_contribute_nothing():
    batch = make_batch()
    params, obs, act, logp_old, val_old, adv, ret, valid = batch
    params.requires_grad_(True)
    loss = loss_of(batch)
    (grad,) = torch.autograd.grad(loss.sum(), params)
    bad = valid == 0
    g = torch.Generator().manual_seed(5)
    junk = [x.clone() for x in (obs, act, logp_old, val_old, adv, ret)]
    junk[0][bad] = 10 * torch.randn(int(bad.sum()), OBS, generator=g, dtype=torch.float64)
    junk[1][bad] = A - 1 - junk[1][bad]
    for x, scale in zip(junk[2:], (3.0, 50.0, 1e3, 50.0)):
        x[bad] = scale * torch.randn(int(bad.sum()), generator=g, dtype=torch.float64)
    loss2 = loss_of((params, *junk, valid))
    (grad2,) = torch.autograd.grad(loss2.sum(), params)
    torch.testing.assert_close(loss2, loss, **TOL)
    torch.testing.assert_close(grad2, grad, **TOL)
    # A member with no valid step has loss 0 (no NaN from an empty mean).
    none_valid = valid.clone()
    none_valid[1] = 0
    assert loss_of((params, *junk, none_valid))[1].item() == 0.0


def test_auto_reset_step_after_an_episode_end_is_masked_through_gae_and_loss():
    """Rollout shape of next-step auto-reset: done at t=3, the reset step t=4 is invalid."""
    rng = np.random.default_rng(2)
    P, T, N = 2, 6, 2
    r, v = rng.normal(size=(P, T, N)), rng.normal(size=(P, T + 1, N))
    term, done, valid = np.zeros_like(r, bool), np.zeros_like(r, bool), np.ones_like(r)
    term[0, 3], done[:, 3], valid[:, 4] = True, True, 0.0  # member 0 terminates, 1 truncates
    batch, ok, out = make_batch(P, T * N, seed=3), t64(valid) > 0, []
    for bonus in (0.0, 100.0):  # whatever the reset step pays
        adv = run_gae(r + bonus * (valid == 0), v, term, done, 0.99, 0.95)
        flat = [x.reshape(P, T * N) for x in (t64(v[:, :T]), adv, adv + t64(v[:, :T]), ok)]
        out.append((adv, loss_of((*batch[:4], *flat[:3], flat[3].double()))))
    assert torch.equal(out[1][0][ok], out[0][0][ok])  # no valid step sees the reset's reward
    assert (out[1][0][~ok] != out[0][0][~ok]).all()  # (the reset step's own estimate moved)
    torch.testing.assert_close(out[1][1], out[0][1], **TOL)


def test_advantages_are_normalised_per_member_over_valid_entries():
    class Recorder:
        def population(self, meta, ratio, adv, eps):
            self.seen = (ratio.detach(), adv.detach(), eps)
            return torch.zeros_like(ratio)

    batch = make_batch()
    params, obs, act, logp_old, _, adv, _, valid = batch
    rec = Recorder()
    loss_of(batch, drift=rec)
    ratio, adv_n, eps = rec.seen
    assert eps == CFG.clip_eps
    logp, _ = policy_logp(stub_forward(params, obs)[0], None, act)
    torch.testing.assert_close(ratio, torch.exp(logp - logp_old), **TOL)
    expected = torch.zeros_like(adv)
    for p in range(adv.shape[0]):  # member 1's advantages are 30x larger: own statistics
        idx = [b for b in range(adv.shape[1]) if valid[p, b]]
        mu = sum(float(adv[p, b]) for b in idx) / len(idx)
        std = math.sqrt(sum((float(adv[p, b]) - mu) ** 2 for b in idx) / len(idx))  # ddof 0
        for b in idx:
            expected[p, b] = (float(adv[p, b]) - mu) / (std + 1e-8)
    torch.testing.assert_close(adv_n * valid, expected, **TOL)


# -- 4. the clipped value loss ------------------------------------------------------------


def test_clipped_value_loss():
    # (V, V_old, R): unclipped larger; clipped larger; inside the clip; clipped below.
    cases = [(1.0, 0.0, 0.0, 0.5), (1.0, 0.0, 1.0, 0.32), (0.1, 0.0, 0.5, 0.08),
             (-1.0, 0.0, -1.0, 0.32)]
    value = t64([[c[0]] for c in cases])
    P = len(cases)
    cfg = CFG.replace(ent_coef=0.0)  # ratio 1 and a single (normalised to 0) advantage
    loss = ppo_loss(cfg, DRIFT, torch.zeros(P, 0), lambda p, o: (torch.zeros(P, 1, A), value),
                     torch.zeros(P, 1), None, torch.zeros(P, 1, OBS), torch.zeros(P, 1, dtype=int),
                     torch.full((P, 1), math.log(0.5)), t64([[c[1]] for c in cases]),
                     t64([[1.0]] * P), t64([[c[2]] for c in cases]), torch.ones(P, 1))
    eps = cfg.clip_eps
    ref = [0.5 * max((V - R) ** 2, (Vo + min(max(V - Vo, -eps), eps) - R) ** 2)
           for V, Vo, R, _ in cases]
    torch.testing.assert_close(t64(ref), t64([c[3] for c in cases]), **TOL)
    torch.testing.assert_close(loss, cfg.vf_coef * t64(ref), **TOL)


# -- 5. the PPO-clip drift ----------------------------------------------------------------


def test_ppo_clip_drift_population_gives_the_clipped_surrogate():
    ratios = [0.5, 0.79, 0.8, 0.95, 1.0, 1.1, 1.2, 1.21, 2.0, 3.0]
    advs = [-2.0, -0.5, 0.0, 0.5, 2.0]
    pairs = [(r, a) for r in ratios for a in advs]
    ratio, adv = t64([[r for r, _ in pairs]] * 2), t64([[a for _, a in pairs]] * 2)
    adv[1] *= -3.0  # a second member with other advantages
    for eps in (0.2, 0.1):
        drift = DRIFT.population(torch.zeros(2, 0), ratio, adv, eps)
        expected = [[min(float(r) * float(a), min(max(float(r), 1 - eps), 1 + eps) * float(a))
                     for r, a in zip(ratio[p], adv[p])] for p in range(2)]
        torch.testing.assert_close(ratio * adv - drift, t64(expected), **TOL)
        assert (drift >= 0).all()


# -- 6. gradient clipping -----------------------------------------------------------------


def test_clip_grads_global_and_separate_actor_critic():
    model = ActorCritic(4, 2, True)
    mask = AgentLayout.for_actor_critic(model).actor_mask
    assert int(mask.sum()) == sum(p.numel() for p in model.actor.parameters())
    D, max_norm = mask.numel(), 0.5
    g = torch.Generator().manual_seed(0)
    grads = torch.randn(3, D, generator=g, dtype=torch.float64)
    grads[0] *= 0.1 / grads[0].norm()  # small: untouched
    grads[1] *= 10.0 / grads[1].norm()  # large: scaled down to max_norm
    grads[2, mask] *= 0.001  # actor small, critic large
    rows, is_actor = grads.tolist(), mask.tolist()

    def clipped(row, group):  # each group (a label per entry) scaled to norm <= max_norm
        norms = {k: math.sqrt(sum(x * x for x, j in zip(row, group) if j == k)) for k in set(group)}
        return [x * max_norm / max(norms[k], max_norm) for x, k in zip(row, group)]

    joint = [clipped(row, [0] * D) for row in rows]
    torch.testing.assert_close(clip_grads(grads, max_norm), t64(joint), **TOL)
    got = clip_grads(grads, max_norm, mask)
    torch.testing.assert_close(got, t64([clipped(row, is_actor) for row in rows]), **TOL)
    assert not torch.allclose(got[2], t64(joint[2]))  # separate clipping is not joint
    assert torch.equal(got[2, mask], grads[2, mask])  # the small actor part is kept


def test_gaussian_policy_log_prob_and_entropy():
    """(The categorical case is checked inside ``ref_loss`` above.)"""
    g = torch.Generator().manual_seed(0)
    out = torch.randn(2, 5, 3, generator=g, dtype=torch.float64)
    log_std = torch.randn(2, 3, generator=g, dtype=torch.float64)
    x = torch.randn(2, 5, 3, generator=g, dtype=torch.float64)
    logp, ent = policy_logp(out, log_std, x)
    assert policy_logp(out, log_std, x, entropy=False)[1] is None
    for p in range(2):
        s = [float(v) for v in log_std[p]]
        e = sum(si + 0.5 + 0.5 * math.log(2 * math.pi) for si in s)
        for b in range(5):
            lp = sum(-0.5 * ((float(x[p, b, a]) - float(out[p, b, a])) / math.exp(s[a])) ** 2
                     - s[a] - 0.5 * math.log(2 * math.pi) for a in range(3))
            assert math.isclose(float(logp[p, b]), lp, rel_tol=1e-12)
            assert math.isclose(float(ent[p, b]), e, rel_tol=1e-12)


def test_log_probs_of_a_whole_rollout_equal_step_by_step():
    """The loop takes the rollout's log-probabilities once, over the stacked steps
    ``[P, T * N]``: row by row, so bit for bit the same as step by step ``[P, N]``."""
    g = torch.Generator().manual_seed(1)
    P, T, N = 3, 16, 4
    for A, continuous in ((2, False), (6, False), (1, True), (6, True)):
        out = torch.randn(P, T, N, A, generator=g)
        if continuous:
            log_std = torch.randn(P, A, generator=g)
            act = out + torch.randn(P, T, N, A, generator=g)
        else:
            log_std = None
            act = torch.randint(0, A, (P, T, N), generator=g)
        whole = policy_logp(out.view(P, T * N, A), log_std,
                            act.view(P, T * N, *act.shape[3:]), entropy=False)[0]
        steps = torch.stack([policy_logp(out[:, t], log_std, act[:, t], entropy=False)[0]
                             for t in range(T)], dim=1)
        assert torch.equal(whole.view(P, T, N), steps)
