import os
import warnings

import pytest
import torch

# Small tensors: one thread avoids OpenMP contention when tests run beside other work.
torch.set_num_threads(int(os.environ.get("METARL_TEST_THREADS", "1")))
warnings.filterwarnings("ignore", message=".*precision lowered.*")


@pytest.fixture
def tiny_cartpole():
    """A CartPole configuration of two updates on the torch-native backend."""
    from metarl.configs import config_for

    return config_for("CartPole-v1", num_envs=4, num_steps=32, total_timesteps=256,
                      num_minibatches=2, update_epochs=2, backend="torch")


@pytest.fixture
def optimiser_teacher(tmp_path):
    """A teacher of the optimiser family: ``adam`` by name, or an open-ff artifact file."""
    from metarl.artifact import Artifact, save

    def make(kind: str) -> str:
        if kind == "adam":
            return "adam"
        art = Artifact("optim", {"kind": "network", "member": "open-ff",
                                 "params": torch.zeros(707)}, {}, "x")
        return str(save(art, tmp_path / "open-ff.pt"))

    return make
