"""Algorithm families: one call signature per slot of the RL pipeline."""

from metarl.algorithms.drift import DPO, DRIFTS, LPO, Drift, PPOClip, make_drift

__all__ = ["Drift", "PPOClip", "DPO", "LPO", "DRIFTS", "make_drift"]
