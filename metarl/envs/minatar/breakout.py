"""Breakout-MinAtar as a batched torch game.

The rules (those of MinAtar's Breakout as gymnax runs it, no sticky actions):

* **Objects.** A paddle on the bottom row (row 9), a ball, and a map of bricks. Rows are
  numbered 0 (top) to 9 (bottom), columns 0 (left) to 9 (right).
* **Actions** (the minimal set, in this order): ``n`` (no-op), ``l`` (paddle one column
  left), ``r`` (paddle one column right); the paddle stops at columns 0 and 9. The paddle
  moves before the ball.
* **Ball.** The ball moves one row and one column per step along a diagonal; its direction
  is one of ``0`` up-left, ``1`` up-right, ``2`` down-right, ``3`` down-left. Within a step,
  in order:

  1. *Side walls.* If the new column leaves the grid it is clamped to 0 or 9 and the
     horizontal direction flips (``0<->1``, ``2<->3``).
  2. *Ceiling.* If the new row is above row 0 it is clamped to 0 and the vertical
     direction flips (``0<->3``, ``1<->2``).
  3. *Bricks.* Otherwise, if the new cell holds a brick: unless the ball struck a brick on
     the previous step as well, the brick is removed, the reward is +1, the ball stays on
     its old row (in its new column) and its vertical direction flips. If the ball did
     strike on the previous step, it passes into the brick's cell without effect.
     The "struck" flag is set exactly when the new cell held a brick.
  4. *Bottom row.* Otherwise, if the new row is 9: if no bricks are left, the three brick
     rows 1-3 are refilled. Then, if the ball's *old* column equals the (moved) paddle's
     column, the ball bounces straight back (vertical flip) and stays on its old row; else
     if the ball's *new* column equals the paddle's column, it is deflected back the way
     it came (``0<->2``, ``1<->3``) and stays on its old row; else the ball is lost and
     the episode terminates (the ball is drawn on row 9).

* **Rewards.** +1 per brick broken; nothing else.
* **Start.** Bricks fill rows 1-3 (30 bricks), the paddle is in column 4, and the ball is
  on row 3 either in column 0 moving down-right or in column 9 moving down-left, each with
  probability 1/2; the trail starts on the ball's cell and the struck flag is clear.
* **Termination.** Only by losing the ball (the episode cap of 1,000 steps is applied by
  :class:`~metarl.envs.minatar.base.MinAtarEnv`). A game that has terminated (ball on
  row 9) stays frozen if stepped again, with reward 0.
* **Difficulty.** Breakout has no difficulty ramp.
* **Channels** (in order): ``paddle`` (the paddle's cell), ``ball`` (the ball's cell),
  ``trail`` (the ball's cell before the last step, which shows its direction), ``brick``.

State fields (all ``[n]`` int64 unless stated): ``ball_y``, ``ball_x``, ``ball_dir``,
``pos`` (paddle column), ``last_y``, ``last_x`` (the trail), ``bricks`` (``[n, 10, 10]``
bool), ``strike`` (``[n]`` bool: the ball's new cell held a brick on the last step).
Stepping draws no random numbers: the only randomness is the ball's start side at reset.
"""

from __future__ import annotations

import torch

from metarl import rng
from metarl.envs.minatar.base import Game

# Per direction 0..3 (up-left, up-right, down-right, down-left): the column and row steps.
_DX = (-1, 1, 1, -1)
_DY = (-1, -1, 1, 1)
# Direction after a horizontal flip, a vertical flip, and a paddle-edge deflection.
_FLIP_X = (1, 0, 3, 2)
_FLIP_Y = (3, 2, 1, 0)
_DEFLECT = (2, 3, 0, 1)
# Paddle motion per action index (n, l, r).
_MOVE = (0, -1, 1)


_TABLES: dict = {}


def _table(values, like: torch.Tensor) -> torch.Tensor:
    """``values`` as an int64 tensor on ``like``'s device (made once per device)."""
    key = (values, like.device)
    if key not in _TABLES:
        _TABLES[key] = torch.tensor(values, dtype=torch.int64, device=like.device)
    return _TABLES[key]


def _any_brick(bricks: torch.Tensor) -> torch.Tensor:
    """``[n]`` bool: the ``[n, 10, 10]`` map holds a brick. The 100 bytes of a row read as
    25 int32 words, whose maximum is non-zero exactly when one byte is: on the CPU this is
    over ten times faster than ``any`` over the flattened map."""
    return bricks.reshape(-1, 100).view(torch.int32).amax(1) != 0


class Breakout(Game):
    """Breakout-MinAtar: break bricks with a ball bounced off a paddle (rules above)."""

    env_id = "Breakout-MinAtar"
    channels = ("paddle", "ball", "trail", "brick")
    actions = ("n", "l", "r")
    max_steps = 1000
    random_steps = False  # stepping draws no random numbers

    # -- reset ------------------------------------------------------------------------
    def _reset_draws(self, keys: torch.Tensor) -> dict[str, torch.Tensor]:
        """The random choice of a reset: ``right [n]`` bool, True when the ball starts in
        column 9 (moving down-left), False for column 0 (moving down-right)."""
        return {"right": rng.uniform(keys, (1,))[:, 0] < 0.5}

    def _initial(self, draws: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The initial states given the reset draws (see :meth:`_reset_draws`)."""
        right = draws["right"]
        n, dev = right.shape[0], right.device
        ball_x = right.long() * 9
        ball_y = torch.full((n,), 3, dtype=torch.int64, device=dev)
        bricks = torch.zeros(n, 10, 10, dtype=torch.bool, device=dev)
        bricks[:, 1:4, :] = True
        return {
            "ball_y": ball_y,
            "ball_x": ball_x,
            "ball_dir": torch.where(right, 3, 2),
            "pos": torch.full((n,), 4, dtype=torch.int64, device=dev),
            "last_y": ball_y.clone(),
            "last_x": ball_x.clone(),
            "bricks": bricks,
            "strike": torch.zeros(n, dtype=torch.bool, device=dev),
        }

    def reset(self, keys: torch.Tensor) -> dict[str, torch.Tensor]:
        return self._initial(self._reset_draws(keys))

    # -- step -------------------------------------------------------------------------
    def step(self, state, action, keys):
        """One step of every game; ``keys`` are unused (Breakout's steps are
        deterministic)."""
        return self._transition(state, action)

    def _transition(self, state: dict[str, torch.Tensor], action: torch.Tensor):
        """The deterministic step: ``(new_state, reward, terminated)``."""
        old_x, old_y, d = state["ball_x"], state["ball_y"], state["ball_dir"]
        bricks = state["bricks"]
        n = old_x.shape[0]
        over = old_y >= 9  # terminated earlier: stays frozen

        pos = (state["pos"] + _table(_MOVE, action)[action]).clamp(0, 9)
        x = old_x + _table(_DX, d)[d]
        y = old_y + _table(_DY, d)[d]

        # 1. side walls
        side = (x < 0) | (x > 9)
        x = x.clamp(0, 9)
        d = torch.where(side, _table(_FLIP_X, d)[d], d)
        # 2. ceiling
        top = y < 0
        y = y.clamp(min=0)
        d = torch.where(top, _table(_FLIP_Y, d)[d], d)
        # 3. bricks (the row index is clamped only to stay inside the map)
        cell = (y.clamp(max=9) * 10 + x).unsqueeze(1)
        flat = bricks.reshape(n, 100)
        on_brick = ~top & flat.gather(1, cell)[:, 0]
        hit = on_brick & ~state["strike"] & ~over
        bricks = flat.scatter(1, cell, (flat.gather(1, cell)[:, 0] & ~hit).unsqueeze(1))
        bricks = bricks.reshape(n, 10, 10)
        y = torch.where(hit, old_y, y)
        d = torch.where(hit, _table(_FLIP_Y, d)[d], d)
        # 4. bottom row
        bottom = ~on_brick & (y == 9) & ~over
        refill = bottom & ~_any_brick(bricks)
        bricks[:, 1:4, :] |= refill[:, None, None]  # ``bricks`` is the scatter's new tensor
        straight = bottom & (old_x == pos)
        edge = bottom & ~straight & (x == pos)
        d = torch.where(straight, _table(_FLIP_Y, d)[d], d)
        d = torch.where(edge, _table(_DEFLECT, d)[d], d)
        y = torch.where(straight | edge, old_y, y)
        terminated = bottom & ~straight & ~edge

        new = {
            "ball_y": y,
            "ball_x": x,
            "ball_dir": d,
            "pos": pos,
            "last_y": old_y,
            "last_x": old_x,
            "bricks": bricks,
            "strike": on_brick,
        }
        # A terminated game keeps its final state. Its bricks were not touched above (no
        # hit, no refill), so only the [n] fields need the choice.
        new = {k: (v if k == "bricks" else torch.where(over, state[k], v))
               for k, v in new.items()}
        return new, hit.float(), terminated

    # -- observation ------------------------------------------------------------------
    def observe(self, state: dict[str, torch.Tensor]) -> torch.Tensor:
        n = state["pos"].shape[0]
        obs = torch.zeros(n, 10, 10, 4, dtype=torch.bool, device=state["pos"].device)
        obs[..., 3] = state["bricks"]
        # flat indices of the paddle, ball and trail cells in channels 0, 1, 2
        cells = torch.stack([90 + state["pos"], state["ball_y"] * 10 + state["ball_x"],
                             state["last_y"] * 10 + state["last_x"]], dim=1)
        cells = cells * 4 + torch.arange(3, device=obs.device)
        return obs.reshape(n, 400).scatter_(1, cells, True).reshape(n, 10, 10, 4)

    def observe_float(self, state: dict[str, torch.Tensor]) -> torch.Tensor:
        """:meth:`observe` built directly as float32 ``[n, 400]`` (no bool grid to convert:
        one pass less over the observation)."""
        n = state["pos"].shape[0]
        obs = torch.zeros(n, 100, 4, device=state["pos"].device)
        obs[..., 3] = state["bricks"].reshape(n, 100)
        cells = torch.stack([90 + state["pos"], state["ball_y"] * 10 + state["ball_x"],
                             state["last_y"] * 10 + state["last_x"]], dim=1)
        cells = cells * 4 + torch.arange(3, device=obs.device)
        return obs.reshape(n, 400).scatter_(1, cells, 1.0)
