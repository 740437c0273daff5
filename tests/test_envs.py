import gymnasium
import numpy as np
import pytest
import torch

from metarl import envs


@pytest.mark.parametrize("backend", ["envpool", "torch", "gymnasium"])
def test_cartpole_backends_return_tensors(backend):
    env = envs.make("CartPole-v1", 3, seed=1, backend=backend)
    obs = env.reset()
    assert env.spec.discrete and env.spec.num_actions == 2 and env.spec.obs_shape == (4,)
    assert isinstance(obs, torch.Tensor) and obs.shape == (3, 4) and obs.dtype == torch.float32
    step = env.step(torch.zeros(3, dtype=torch.long))
    for name in ("obs", "reward", "terminated", "truncated", "valid", "episode_return"):
        assert isinstance(getattr(step, name), torch.Tensor)
    assert step.terminated.dtype == torch.bool and step.valid.all()
    env.close()


@pytest.mark.parametrize("backend", ["envpool", "torch", "gymnasium"])
def test_next_step_autoreset_is_flagged(backend):
    """The step after an episode ends resets, pays 0 and is flagged invalid."""
    env = envs.make("CartPole-v1", 2, seed=0, backend=backend)
    env.reset()
    seen_done = False
    for _ in range(200):
        step = env.step(torch.ones(2, dtype=torch.long))  # always push right: falls quickly
        if seen_done:
            assert not step.valid[0] and step.reward[0] == 0
            assert step.obs[0].abs().max() <= 0.05  # a fresh initial state
            break
        if step.done[0]:
            seen_done = True
            assert step.valid[0]
            assert step.episode_return[0] == step.episode_length[0] > 5
    assert seen_done


@pytest.mark.parametrize("backend", ["envpool", "torch"])
def test_environment_depends_only_on_its_seed(backend):
    a = envs.make("CartPole-v1", 3, backend=backend, seeds=[11, 22, 33]).reset()
    b = envs.make("CartPole-v1", 1, backend=backend, seeds=[22]).reset()
    assert torch.equal(a[1], b[0])
    assert not torch.equal(a[0], a[1])


def synced_pair(env_id):
    """gymnasium's env and a one-copy torch-native env started in the same state."""
    genv = gymnasium.make(env_id).unwrapped
    genv.reset(seed=0)
    tenv = envs.make(env_id, 1, backend="torch")
    tenv.reset()
    tenv.state = torch.from_numpy(np.asarray(genv.state, dtype=np.float32)).unsqueeze(0)
    return genv, tenv


def test_torch_cartpole_matches_gymnasium_dynamics():
    genv, tenv = synced_pair("CartPole-v1")
    rng = np.random.default_rng(0)
    for _ in range(30):
        a = int(rng.integers(2))
        gobs, grew, gterm, _, _ = genv.step(a)
        step = tenv.step(torch.tensor([a]))
        np.testing.assert_allclose(step.obs[0].numpy(), gobs, rtol=1e-4, atol=1e-5)
        assert bool(step.terminated[0]) == gterm and float(step.reward[0]) == grew
        if gterm:
            break


def test_torch_pendulum_matches_gymnasium_dynamics():
    genv, tenv = synced_pair("Pendulum-v1")
    for u in np.linspace(-2, 2, 20):
        gobs, grew, *_ = genv.step(np.array([u], dtype=np.float32))
        step = tenv.step(torch.tensor([[u]], dtype=torch.float32))
        np.testing.assert_allclose(step.obs[0].numpy(), gobs, rtol=1e-4, atol=1e-4)
        assert abs(float(step.reward[0]) - grew) < 1e-3


def test_truncation_at_time_limit():
    env = envs.make("Pendulum-v1", 2, backend="torch")
    env.reset()
    for _ in range(200):
        step = env.step(torch.zeros(2, 1))
    assert step.truncated.all() and not step.terminated.any()
    assert (step.episode_length == 200).all()


def test_continuous_spec_from_envpool():
    env = envs.make("Pendulum-v1", 2, backend="envpool")
    assert not env.spec.discrete and env.spec.action_shape == (1,)
    assert env.spec.action_low == (-2.0,) and env.spec.action_high == (2.0,)
    env.reset()
    step = env.step(torch.zeros(2, 1))
    assert step.obs.shape == (2, 3)


def test_unknown_id_names_closest_ids():
    with pytest.raises(ValueError, match="CartPole-v1") as e:
        envs.make("CartPol-v1", 2)
    assert "metarl envs" in str(e.value)


def test_backend_that_lacks_the_id_is_refused():
    with pytest.raises(ValueError, match="available from: envpool"):
        envs.make("Hopper-v4", 2, backend="torch")
    with pytest.raises(ValueError, match="unknown backend"):
        envs.make("CartPole-v1", 2, backend="jax")


def test_bad_num_envs():
    with pytest.raises(ValueError, match="positive integer"):
        envs.make("CartPole-v1", 0)


@pytest.mark.parametrize("backend", ["envpool", "torch"])
def test_wrong_action_shape_or_dtype_says_what_was_expected(backend):
    env = envs.make("CartPole-v1", 4, backend=backend)
    env.reset()
    with pytest.raises(ValueError, match=r"integer actions of shape \(4,\)"):
        env.step(torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="integer actions"):
        env.step(torch.zeros(4))
    for bad in ((0, 1, 2, 1), (0, -1, 1, 1)):  # CartPole has actions 0 and 1
        with pytest.raises(ValueError, match=r"actions must be in \[0, 2\)"):
            env.step(torch.tensor(bad))
    cont = envs.make("Pendulum-v1", 2, backend=backend)
    cont.reset()
    with pytest.raises(ValueError, match=r"float actions of shape \(2, 1\)"):
        cont.step(torch.zeros(2))
    with pytest.raises(TypeError, match="torch.Tensor"):
        cont.step(np.zeros((2, 1)))


def test_list_envs_has_the_issue_ids():
    ids = envs.list_envs()
    for env_id in ("CartPole-v1", "Acrobot-v1", "MountainCar-v0", "Pendulum-v1", "Hopper-v4",
                   "Ant-v4", "MiniGrid-Empty-5x5-v0"):
        assert "envpool" in ids[env_id], env_id


def test_minigrid_dict_observation_is_flattened():
    env = envs.make("MiniGrid-Empty-5x5-v0", 2)
    obs = env.reset()
    assert obs.shape == (2, 7 * 7 * 3 + 4) and env.spec.num_actions == 7


def test_mujoco_through_envpool():
    env = envs.make("Hopper-v4", 2)
    obs = env.reset()
    assert obs.dtype == torch.float32 and obs.shape == (2, 11)
    step = env.step(torch.zeros(2, 3))
    assert step.reward.shape == (2,)
