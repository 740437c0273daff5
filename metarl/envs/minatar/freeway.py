"""Freeway-MinAtar as a batched torch game.

The rules (those of MinAtar's Freeway as gymnax runs it, no sticky actions):

* **Objects.** A chicken that always stands in column 4 and moves between rows 0 (top) and
  9 (bottom), and eight cars, car ``i`` (``i = 0..7``) driving along row ``i + 1``. Each car
  has a column, a velocity ``v`` (a direction -1 = left or +1 = right times a speed from 1
  to 5) and a countdown timer.
* **Actions** (the minimal set, in this order): ``n`` (no-op), ``u`` (one row up), ``d``
  (one row down, not below row 9). The chicken may move only when its move timer is 0;
  moving sets the timer to 3, and the timer counts down by one at the end of every step,
  so the chicken moves at most once every 3 steps. At the start the timer is 3.
* **Crossing.** If the chicken reaches row 0 it scores +1 and goes back to row 9, and every
  car gets a new random speed (uniform in 1..5) and direction (left or right with
  probability 1/2 each); the cars keep their columns and each car's timer is set to its
  new speed.
* **Cars.** After the chicken's move, for every car: if the car is on the chicken's cell
  (column 4, the chicken's row), the chicken is sent back to row 9. Then, if the car's
  timer is 0, the car moves one column in its direction, wrapping around the edges
  (column -1 becomes 9, column 10 becomes 0), its timer restarts at its speed, and if it
  is now on the chicken's cell the chicken is sent back to row 9; otherwise its timer
  counts down by one. A car of speed ``s`` therefore moves once every ``s + 1`` steps.
  Collisions cost nothing but the trip back to row 9.
* **Rewards.** +1 per crossing; nothing else.
* **Start.** The chicken is on row 9 with its move timer at 3; every car is in column 0
  with a random speed and direction (as after a crossing) and its timer at its speed.
* **Termination.** Never: an episode ends only at the cap of 2,500 steps, applied by
  :class:`~metarl.envs.minatar.base.MinAtarEnv` as a truncation.
* **Difficulty.** Freeway has no difficulty ramp (speeds are redrawn at each crossing).
* **Channels** (in order): ``chicken``; ``car`` (each car's cell); ``speed1`` ..
  ``speed5``: the trail of each car, the cell behind it (one column against its direction,
  wrapping around the edges), drawn in the channel of the car's speed.

State fields: ``pos`` (``[n]``, the chicken's row), ``move_timer`` (``[n]``), and per car
``car_x``, ``car_timer``, ``car_v`` (``[n, 8]``, all int64). The random choices of a step
(the speeds and directions a crossing would give) are drawn first from the keys
(:meth:`Freeway._draws`), then the step is a function of the state, the action and those
draws (:meth:`Freeway._transition`).
"""

from __future__ import annotations

import torch

from metarl import rng
from metarl.envs.minatar.base import Game

#: the chicken's column
_COLUMN = 4
#: steps the chicken waits after moving
_PLAYER_SPEED = 3
_CARS = 8


class Freeway(Game):
    """Freeway-MinAtar: cross a road of eight cars as often as possible (rules above)."""

    env_id = "Freeway-MinAtar"
    channels = ("chicken", "car", "speed1", "speed2", "speed3", "speed4", "speed5")
    actions = ("n", "u", "d")
    max_steps = 2500

    # -- random draws -----------------------------------------------------------------
    def _draws(self, keys: torch.Tensor) -> dict[str, torch.Tensor]:
        """A fresh set of car velocities, ``velocity [n, 8]``: speed uniform in 1..5 times
        direction -1 or +1 with probability 1/2 each. A step uses them only on a crossing;
        a reset always does."""
        b = rng.bits(keys, (_CARS,))  # one 32-bit draw per car: bit 0 the direction
        speed = (b >> 1) % 5 + 1
        direction = (b & 1) * 2 - 1
        return {"velocity": speed * direction}

    # -- reset ------------------------------------------------------------------------
    def _initial(self, draws: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The initial states given the reset draws (see :meth:`_draws`)."""
        v = draws["velocity"]
        n, dev = v.shape[0], v.device
        return {
            "pos": torch.full((n,), 9, dtype=torch.int64, device=dev),
            "move_timer": torch.full((n,), _PLAYER_SPEED, dtype=torch.int64, device=dev),
            "car_x": torch.zeros(n, _CARS, dtype=torch.int64, device=dev),
            "car_timer": v.abs(),
            "car_v": v.clone(),
        }

    def reset(self, keys: torch.Tensor) -> dict[str, torch.Tensor]:
        return self._initial(self._draws(keys))

    # -- step -------------------------------------------------------------------------
    def step(self, state, action, keys):
        return self._transition(state, action, self._draws(keys))

    def _transition(self, state: dict[str, torch.Tensor], action: torch.Tensor,
                    draws: dict[str, torch.Tensor]):
        """The step given its random draws: ``(new_state, reward, terminated)``."""
        pos, move_timer = state["pos"], state["move_timer"]
        ready = move_timer == 0
        up = ready & (action == 1)
        down = ready & (action == 2)
        pos = (pos - up.long() + down.long()).clamp(0, 9)
        move_timer = torch.where(up | down, _PLAYER_SPEED, move_timer)

        # crossing: score, back to the bottom, new car velocities
        crossed = pos == 0
        pos = torch.where(crossed, 9, pos)
        v = torch.where(crossed[:, None], draws["velocity"], state["car_v"])
        timer = torch.where(crossed[:, None], draws["velocity"].abs(), state["car_timer"])

        # cars: collision, move when due (wrapping), collision again
        x = state["car_x"]
        row = torch.arange(1, _CARS + 1, device=x.device)
        on_row = row == pos[:, None]
        due = timer == 0
        new_x = torch.where(due, (x + torch.where(v > 0, 1, -1)) % 10, x)
        hit = on_row & ((x == _COLUMN) | (due & (new_x == _COLUMN)))
        timer = torch.where(due, v.abs(), timer - 1)
        pos = torch.where(hit.any(1), 9, pos)
        move_timer = (move_timer - 1).clamp(min=0)

        new = {"pos": pos, "move_timer": move_timer, "car_x": new_x, "car_timer": timer,
               "car_v": v}
        return new, crossed.float(), torch.zeros_like(crossed)

    # -- observation ------------------------------------------------------------------
    def observe(self, state: dict[str, torch.Tensor]) -> torch.Tensor:
        n = state["pos"].shape[0]
        dev = state["pos"].device
        obs = torch.zeros(n, 10 * 10 * 7, dtype=torch.bool, device=dev)
        row = torch.arange(1, _CARS + 1, device=dev)
        x, v = state["car_x"], state["car_v"]
        back = (x - torch.where(v > 0, 1, -1)) % 10
        # flat index of (row, column, channel) is (row * 10 + column) * 7 + channel
        chicken = ((state["pos"] * 10 + _COLUMN) * 7).unsqueeze(1)
        cars = (row * 10 + x) * 7 + 1
        trails = (row * 10 + back) * 7 + 1 + v.abs()
        cells = torch.cat([chicken, cars, trails], dim=1)
        return obs.scatter_(1, cells, True).reshape(n, 10, 10, 7)
