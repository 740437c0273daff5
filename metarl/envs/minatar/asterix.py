"""Asterix-MinAtar as a batched torch game (gymnax's rules, written as tensor code).

The rules, for ``n`` games at once (rows are numbered 0 at the top to 9 at the bottom,
columns 0 at the left to 9 at the right):

* **Objects.** The player at ``(player_y, player_x)``, confined to rows 1-8; and up to
  eight entities, at most one per row 1-8 (entity ``i`` lives on row ``i + 1``), each an
  enemy or a piece of gold, walking left or right one column per march.
* **The player** moves one cell per step: ``left`` / ``right`` change the column (0-9),
  ``up`` / ``down`` the row (1-8), stopping at the edges; ``noop`` stays.
* **Spawning.** ``spawn_timer`` counts down by one every step; on a step where it is 0 at
  the start it restarts at ``spawn_speed`` and, before anything else in the step, an
  entity appears: it walks right (starting at column 0) or left (starting at column 9)
  with probability 1/2 each, and is gold with probability 1/3, else an enemy. Its row is
  chosen as gymnax does: a random ordering of the eight entity rows is drawn, and the rows
  in places 2 to 8 of that ordering are tried in turn; the entity appears on the first
  free one. When none of those seven is free (even if the row in place 1 is), nothing
  appears and the entity on the row in place 8 is removed.
* **Collisions, then the march.** After the player moves, an entity on the player's cell
  is touched: gold is collected (+1, the gold disappears), an enemy ends the game.
  ``move_timer`` counts down by one every step; on a step where it is 0 at the start it
  restarts at ``move_speed`` and every entity marches one column in its direction (an
  entity leaving the grid disappears), after which an entity that marched onto the
  player's cell is touched again in the same way.
* **Difficulty ramp.** While ``spawn_speed > 1`` or ``move_speed > 1``: ``ramp_timer``
  (100 at the start) counts down by one every step while it is ``>= 0``; on a step where
  it is -1 at the start it restarts at 100 and the game speeds up: ``spawn_speed`` drops
  by one (from 10, not below 1), ``move_speed`` drops by one when ``ramp_index`` is odd
  (from 5), and ``ramp_index`` counts the speed-up. So the game speeds up every 102
  steps, nine times, ending with a spawn and a march every step.
* **Rewards** are +1 per piece of gold collected; **termination** is touching an enemy.
  The episode cap of 1,000 steps is the wrapper's
  (:class:`~metarl.envs.minatar.base.MinAtarEnv`).
* **Actions** (gymnax's minimal set, in order): ``noop``, ``left``, ``up``, ``right``,
  ``down``.
* **Channels** (gymnax's order): ``player``; ``enemy``; ``trail`` (the cell an entity
  just came from, i.e. behind it, when that cell is on the grid: it shows the direction);
  ``gold``.

Randomness: a step's random choices are drawn first from its keys (:meth:`Asterix._draws`:
the direction, the kind and the row ordering of a possible spawn), then applied by
:meth:`Asterix._transition`. ``reset`` has no randomness.

State fields (leading dim ``n``): ``player_x``, ``player_y``, ``spawn_speed``,
``spawn_timer``, ``move_speed``, ``move_timer``, ``ramp_timer``, ``ramp_index`` (int64
``[n]``); per entity row, ``ent_x`` (int64 ``[n, 8]``), ``ent_right``, ``ent_gold``,
``ent_alive`` (bool ``[n, 8]``; a dead entity's other fields are meaningless).
"""

from __future__ import annotations

import torch

from metarl import rng
from metarl.envs.minatar.base import Game

SPAWN_SPEED = 10        # steps between two spawns, at the start
MOVE_SPEED = 5          # steps between two marches, at the start
RAMP_INTERVAL = 100     # the ramp timer's restart value (a speed-up every 102 steps)
GOLD_PROBABILITY = 1 / 3
NOOP, LEFT, UP, RIGHT, DOWN = range(5)
_S_RIGHT, _S_GOLD, _S_ORDER = 1, 2, 3      # random streams of a step's draws


class Asterix(Game):
    """Asterix-MinAtar; the rules are in the module docstring."""

    env_id = "Asterix-MinAtar"
    channels = ("player", "enemy", "trail", "gold")
    actions = ("noop", "left", "up", "right", "down")
    max_steps = 1000

    def reset(self, keys: torch.Tensor) -> dict[str, torch.Tensor]:
        n, dev = keys.shape[0], keys.device

        def full(v: int) -> torch.Tensor:
            return torch.full((n,), v, dtype=torch.int64, device=dev)

        no_entity = torch.zeros(n, 8, dtype=torch.bool, device=dev)
        return {"player_x": full(5), "player_y": full(5),
                "spawn_speed": full(SPAWN_SPEED), "spawn_timer": full(SPAWN_SPEED),
                "move_speed": full(MOVE_SPEED), "move_timer": full(MOVE_SPEED),
                "ramp_timer": full(RAMP_INTERVAL), "ramp_index": full(0),
                "ent_x": torch.zeros(n, 8, dtype=torch.int64, device=dev),
                "ent_right": no_entity, "ent_gold": no_entity.clone(),
                "ent_alive": no_entity.clone()}

    def _draws(self, keys: torch.Tensor) -> dict[str, torch.Tensor]:
        """A step's random choices: a possible spawn's direction (``right [n]`` bool),
        kind (``gold [n]`` bool) and ordering of the entity rows (``order [n, 8]``)."""
        return {"right": rng.uniform(rng.fold(keys, _S_RIGHT), ()) < 0.5,
                "gold": rng.uniform(rng.fold(keys, _S_GOLD), ()) < GOLD_PROBABILITY,
                "order": rng.permutation(rng.fold(keys, _S_ORDER), 8)}

    def step(self, state: dict[str, torch.Tensor], action: torch.Tensor,
             keys: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        return self._transition(state, action, self._draws(keys))

    def _transition(self, state: dict[str, torch.Tensor], action: torch.Tensor,
                    draws: dict[str, torch.Tensor]):
        """:meth:`step` with the random choices ``draws`` (as :meth:`_draws` gives)."""
        n = action.shape[0]
        slots = torch.arange(8, device=action.device)
        x, right = state["ent_x"], state["ent_right"]
        gold, alive = state["ent_gold"], state["ent_alive"]

        # -- spawning: try the rows in places 2..8 of the drawn ordering --------------------
        spawn = state["spawn_timer"] == 0
        order = draws["order"]
        free = ~alive.gather(1, order[:, 1:])                         # [n, 7]
        found = free.any(dim=1)
        place = torch.where(found, free.long().argmax(dim=1) + 1, 7)
        row = order.gather(1, place.view(n, 1))                       # [n, 1]
        here = (slots == row) & spawn.view(n, 1)                      # [n, 8]
        x = torch.where(here, torch.where(draws["right"], 0, 9).view(n, 1), x)
        right = torch.where(here, draws["right"].view(n, 1), right)
        gold = torch.where(here, draws["gold"].view(n, 1), gold)
        alive = torch.where(here, found.view(n, 1), alive)
        spawn_timer = torch.where(spawn, state["spawn_speed"], state["spawn_timer"])

        # -- the player ------------------------------------------------------------------------
        px = (state["player_x"] - (action == LEFT).long() + (action == RIGHT).long()).clamp(0, 9)
        py = (state["player_y"] - (action == UP).long() + (action == DOWN).long()).clamp(1, 8)
        on_row = (slots + 1) == py.view(n, 1)                          # [n, 8]

        # -- touching, the march, touching again ---------------------------------------------
        touch = alive & on_row & (x == px.view(n, 1))
        reward = (touch & gold).sum(dim=1)
        terminated = (touch & ~gold).any(dim=1)
        alive = alive & ~(touch & gold)

        march = state["move_timer"] == 0
        move_timer = torch.where(march, state["move_speed"], state["move_timer"])
        moved = x + torch.where(right, 1, -1)
        stepping = march.view(n, 1) & alive
        x = torch.where(stepping, moved, x)
        alive = alive & ~(stepping & ((x < 0) | (x > 9)))
        touch = stepping & alive & on_row & (x == px.view(n, 1))
        reward = reward + (touch & gold).sum(dim=1)
        terminated = terminated | (touch & ~gold).any(dim=1)
        alive = alive & ~(touch & gold)

        # -- timers and the difficulty ramp ------------------------------------------------
        spawn_speed, move_speed = state["spawn_speed"], state["move_speed"]
        ramping = (spawn_speed > 1) | (move_speed > 1)
        counting = ramping & (state["ramp_timer"] >= 0)
        speed_up = ramping & ~counting
        new_state = {
            "player_x": px, "player_y": py,
            "spawn_speed": spawn_speed - (speed_up & (spawn_speed > 1)).long(),
            "spawn_timer": spawn_timer - 1,
            "move_speed": move_speed - (speed_up & (move_speed != 0)
                                        & (state["ramp_index"] % 2 == 1)).long(),
            "move_timer": move_timer - 1,
            "ramp_timer": torch.where(counting, state["ramp_timer"] - 1, RAMP_INTERVAL),
            "ramp_index": state["ramp_index"] + speed_up.long(),
            "ent_x": x, "ent_right": right, "ent_gold": gold, "ent_alive": alive}
        return new_state, reward.float(), terminated

    def observe(self, state: dict[str, torch.Tensor]) -> torch.Tensor:
        x, alive, gold = state["ent_x"], state["ent_alive"], state["ent_gold"]
        n, dev = x.shape[0], x.device
        cols = torch.arange(10, device=dev)
        at = (cols == x.unsqueeze(-1)) & alive.unsqueeze(-1)                 # [n, 8, 10]
        behind = torch.where(state["ent_right"], x - 1, x + 1)
        trail = (cols == behind.unsqueeze(-1)) & alive.unsqueeze(-1)         # off-grid: none
        enemy = at & ~gold.unsqueeze(-1)
        treasure = at & gold.unsqueeze(-1)
        edge = torch.zeros(n, 1, 10, dtype=torch.bool, device=dev)

        def grid(rows: torch.Tensor) -> torch.Tensor:                        # rows 1..8
            return torch.cat([edge, rows, edge], dim=1)

        player = torch.zeros(n, 10, 10, dtype=torch.bool, device=dev)
        player[torch.arange(n, device=dev), state["player_y"], state["player_x"]] = True
        return torch.stack([player, grid(enemy), grid(trail), grid(treasure)], dim=-1)
