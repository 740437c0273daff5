"""Shared checks of the MinAtar tests that compare a metarl game with gymnax's (imported
by ``tests/test_minatar_<game>.py``; not a test module itself)."""

from __future__ import annotations

import numpy as np
import torch


def assert_transition_matches(game, new, rew, term, obs_g, st_g, rew_g, done_g,
                              assert_same_state, where: str = "") -> None:
    """One batched transition of ``game`` equals gymnax's: the observation, the reward,
    the terminal flag (with metarl's dtypes) and every state field (the game's own
    ``assert_same_state``)."""
    np.testing.assert_array_equal(game.observe(new).numpy(),
                                  np.asarray(obs_g).astype(bool), err_msg=where)
    np.testing.assert_array_equal(rew.numpy(), np.asarray(rew_g), err_msg=where)
    np.testing.assert_array_equal(term.numpy(), np.asarray(done_g), err_msg=where)
    assert rew.dtype == torch.float32 and term.dtype == torch.bool
    assert_same_state(new, st_g, where)
