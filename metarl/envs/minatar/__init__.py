"""The MinAtar games as batched torch environments (gymnax's ids and semantics).

Each game is a :class:`~metarl.envs.minatar.base.Game` written from its rules (the rules are
in each module's docstring) and validated transition by transition against gymnax's
MinAtar in the tests; :class:`~metarl.envs.minatar.base.MinAtarEnv` makes it a
:class:`~metarl.envs.base.VecEnv` on the agents' device. ``metarl.envs.make`` provides
them through the ``torch`` backend.
"""

from __future__ import annotations

import importlib
from functools import partial

from metarl.envs.minatar.base import Game, MinAtarEnv

#: env id -> (module, class) of the games
GAMES = {
    "Asterix-MinAtar": ("asterix", "Asterix"),
    "Breakout-MinAtar": ("breakout", "Breakout"),
    "Freeway-MinAtar": ("freeway", "Freeway"),
    "Seaquest-MinAtar": ("seaquest", "Seaquest"),
    "SpaceInvaders-MinAtar": ("space_invaders", "SpaceInvaders"),
}


def game(env_id: str) -> Game:
    """A new instance of the game ``env_id``."""
    module, cls = GAMES[env_id]
    return getattr(importlib.import_module(f"metarl.envs.minatar.{module}"), cls)()


def _make(env_id: str, num_envs: int, env_seeds: list[int], device) -> MinAtarEnv:
    return MinAtarEnv(game(env_id), num_envs, env_seeds, device)


#: env id -> constructor ``(num_envs, env_seeds, device) -> VecEnv``, for the registry
MINATAR_ENVS = {env_id: partial(_make, env_id) for env_id in GAMES}

__all__ = ["GAMES", "MINATAR_ENVS", "Game", "MinAtarEnv", "game"]
