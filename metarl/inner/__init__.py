"""Inner loops: train a population of agents with a (learned) algorithm in one slot."""

from metarl.inner.ppo import TrainResult, train

__all__ = ["train", "TrainResult"]
