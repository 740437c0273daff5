"""metarl: meta-learning reinforcement-learning algorithms in PyTorch."""

__version__ = "0.1.0"
