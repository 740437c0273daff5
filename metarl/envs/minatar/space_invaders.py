"""SpaceInvaders-MinAtar as a batched torch game (gymnax's rules, written as tensor code).

The rules, for ``n`` games at once (rows are numbered 0 at the top to 9 at the bottom):

* **Objects.** A cannon on the bottom row (row 9) at column ``pos``; a block of aliens
  (initially rows 0-3, columns 2-7: 24 aliens) that moves as one, in direction
  ``alien_dir`` (-1 left, +1 right; -1 at the start); the player's bullets (at most one
  per cell) that fly up one row per step; the aliens' bullets that fall one row per step.
* **The player.** ``fire`` places a bullet on the cannon's cell (row 9, the column the
  cannon was at before this step's move) when the gun is cool (``cooldown == 0``), and
  sets ``cooldown`` to 5; ``left`` / ``right`` move the cannon one column, stopping at the
  edges. Then every player bullet moves up one row (a bullet leaving row 0 disappears) and
  every alien bullet moves down one row (one leaving row 9 disappears). An alien bullet
  that lands on the cannon's (new) cell ends the game.
* **The aliens' march.** ``move_timer`` counts down by one every step; on a step where it
  is 0 at the start the block moves and the timer restarts at
  ``min(number of aliens, move_interval)`` (so few aliens march faster; a lone alien moves
  every step). A move is one column in ``alien_dir``, unless an alien touches the wall the
  block walks towards (column 0 going left, column 9 going right): then the direction
  flips and the block drops one row instead (rows shift down cyclically, so an alien on
  row 9 would reappear on row 0, but that step is terminal). The game ends if an alien is
  on the cannon's cell before the march, if the block drops while an alien is on row 9,
  or if, after a move, an alien is on the cannon's cell.
* **The aliens' fire.** ``shot_timer`` counts down by one every step; on a step where it
  is 0 at the start it restarts at 10, and the alien nearest the cannon fires: the
  non-empty column nearest to the cannon's column (on a tie, the left one), its lowest
  alien, which places a bullet on its own cell (the bullet starts falling next step).
* **Rewards.** Every alien sharing a cell with a player bullet (after the march) dies,
  with the bullet, for +1 each.
* **Waves and difficulty ramp.** When the last alien dies, a new block fills rows 0-3,
  columns 2-7 at the end of that step (direction, timers and bullets carry over), and
  while ``move_interval > 6`` the march interval drops by one (12 at the start, so at
  most 6 speed-ups) and ``ramp_index`` counts the speed-up.
* **Termination** is the cannon being hit (by an alien bullet or an alien, above); the
  episode cap of 1,000 steps is the wrapper's (:class:`~metarl.envs.minatar.base.
  MinAtarEnv`). The game has no randomness: ``reset`` and ``step`` ignore their keys.
* **Actions** (gymnax's minimal set, in order): ``noop``, ``left``, ``right``, ``fire``.
* **Channels** (gymnax's order): ``cannon`` (row 9, column ``pos``), ``alien`` (every
  alien), ``alien_left`` (every alien while the block walks left), ``alien_right`` (every
  alien while it walks right), ``friendly_bullet``, ``enemy_bullet``.

State fields (leading dim ``n``): ``pos``, ``alien_dir``, ``move_interval``,
``move_timer``, ``shot_timer``, ``cooldown``, ``ramp_index`` (int64 ``[n]``) and the
maps ``aliens``, ``f_bullets``, ``e_bullets`` (bool ``[n, 10, 10]``).
"""

from __future__ import annotations

import torch

from metarl.envs.minatar.base import Game

SHOT_COOL_DOWN = 5          # steps between two player shots
MOVE_INTERVAL = 12          # steps between two marches of a full block, at the start
MIN_MOVE_INTERVAL = 6       # the ramp stops when the interval reaches this
ENEMY_SHOT_INTERVAL = 10    # steps between two alien shots
NOOP, LEFT, RIGHT, FIRE = range(4)


def _alien_block(n: int, device) -> torch.Tensor:
    """A fresh block of aliens ``[n, 10, 10]``: rows 0-3, columns 2-7."""
    block = torch.zeros(n, 10, 10, dtype=torch.bool, device=device)
    block[:, 0:4, 2:8] = True
    return block


class SpaceInvaders(Game):
    """SpaceInvaders-MinAtar; the rules are in the module docstring."""

    env_id = "SpaceInvaders-MinAtar"
    channels = ("cannon", "alien", "alien_left", "alien_right", "friendly_bullet",
                "enemy_bullet")
    actions = ("noop", "left", "right", "fire")
    max_steps = 1000

    def reset(self, keys: torch.Tensor) -> dict[str, torch.Tensor]:
        n, dev = keys.shape[0], keys.device

        def full(v: int) -> torch.Tensor:
            return torch.full((n,), v, dtype=torch.int64, device=dev)

        empty = torch.zeros(n, 10, 10, dtype=torch.bool, device=dev)
        return {"pos": full(5), "alien_dir": full(-1), "move_interval": full(MOVE_INTERVAL),
                "move_timer": full(MOVE_INTERVAL), "shot_timer": full(ENEMY_SHOT_INTERVAL),
                "cooldown": full(0), "ramp_index": full(0),
                "aliens": _alien_block(n, dev), "f_bullets": empty, "e_bullets": empty.clone()}

    def step(self, state: dict[str, torch.Tensor], action: torch.Tensor,
             keys: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        n = action.shape[0]
        dev = action.device
        rows = torch.arange(n, device=dev)
        cols = torch.arange(10, device=dev)

        # -- the player: fire from the old cell, move, then bullets fly -----------------------
        pos = state["pos"]
        fire = (action == FIRE) & (state["cooldown"] == 0)
        f_bullets = state["f_bullets"].clone()
        f_bullets[rows, 9, pos] |= fire
        cooldown = torch.where(fire, SHOT_COOL_DOWN, state["cooldown"])
        pos = (pos - (action == LEFT).long() + (action == RIGHT).long()).clamp(0, 9)
        f_bullets = torch.roll(f_bullets, -1, dims=1)
        f_bullets[:, 9] = False
        e_bullets = torch.roll(state["e_bullets"], 1, dims=1)
        e_bullets[:, 0] = False
        terminated = e_bullets[rows, 9, pos]

        # -- the aliens' march ----------------------------------------------------------------
        aliens = state["aliens"]
        terminated = terminated | aliens[rows, 9, pos]
        count = aliens.sum(dim=(1, 2))
        move = state["move_timer"] == 0
        move_timer = torch.where(move, torch.minimum(count, state["move_interval"]),
                                 state["move_timer"])
        left_wall = aliens[:, :, 0].any(dim=1) & (state["alien_dir"] < 0)
        right_wall = aliens[:, :, 9].any(dim=1) & (state["alien_dir"] > 0)
        drop = move & (left_wall | right_wall)
        alien_dir = torch.where(drop, -state["alien_dir"], state["alien_dir"])
        terminated = terminated | (drop & aliens[:, 9].any(dim=1))
        dropped = torch.roll(aliens, 1, dims=1)
        shifted = torch.where((alien_dir < 0).view(n, 1, 1), torch.roll(aliens, -1, dims=2),
                              torch.roll(aliens, 1, dims=2))
        marched = torch.where(drop.view(n, 1, 1), dropped, shifted)
        aliens = torch.where(move.view(n, 1, 1), marched, aliens)
        terminated = terminated | (move & aliens[rows, 9, pos])

        # -- the aliens' fire: the lowest alien of the non-empty column nearest the cannon ----
        shoot = state["shot_timer"] == 0
        shot_timer = torch.where(shoot, ENEMY_SHOT_INTERVAL, state["shot_timer"])
        occupied = aliens.any(dim=1)                                    # [n, 10] columns
        distance = (cols - pos.view(n, 1)).abs()
        # rank columns by distance, the left one first on a tie; empty columns last
        rank = 2 * distance + (cols > pos.view(n, 1)).long() + 100 * (~occupied).long()
        column = rank.argmin(dim=1)
        in_column = aliens[rows, :, column]                             # [n, 10] rows
        lowest = (in_column.long() * torch.arange(10, device=dev)).amax(dim=1)
        e_bullets[rows, lowest, column] |= shoot & occupied.any(dim=1)

        # -- hits -----------------------------------------------------------------------------
        hit = aliens & f_bullets
        reward = hit.sum(dim=(1, 2)).float()
        aliens = aliens & ~hit
        f_bullets = f_bullets & ~hit

        # -- timers, and a new (faster) wave when the block is cleared ------------------------
        cleared = ~aliens.any(dim=(1, 2))
        ramp = cleared & (state["move_interval"] > MIN_MOVE_INTERVAL)
        aliens = aliens | (cleared.view(n, 1, 1) & _alien_block(n, dev))
        new_state = {
            "pos": pos, "alien_dir": alien_dir,
            "move_interval": state["move_interval"] - ramp.long(),
            "move_timer": move_timer - 1, "shot_timer": shot_timer - 1,
            "cooldown": cooldown - (cooldown > 0).long(),
            "ramp_index": state["ramp_index"] + ramp.long(),
            "aliens": aliens, "f_bullets": f_bullets, "e_bullets": e_bullets}
        return new_state, reward, terminated

    def observe(self, state: dict[str, torch.Tensor]) -> torch.Tensor:
        aliens = state["aliens"]
        n = aliens.shape[0]
        cannon = torch.zeros_like(aliens)
        cannon[torch.arange(n, device=aliens.device), 9, state["pos"]] = True
        going_left = (state["alien_dir"] < 0).view(n, 1, 1)
        return torch.stack([cannon, aliens, aliens & going_left, aliens & ~going_left,
                            state["f_bullets"], state["e_bullets"]], dim=-1)
