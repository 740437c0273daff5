"""Seaquest-MinAtar as a batched torch game.

The rules (those of gymnax's MinAtar Seaquest, default parameters, ramping on)
=============================================================================

**Board and player.** The board is 10 x 10; row 0 is the surface, rows 1-8 are water and
row 9 holds two gauges. The player's submarine starts at column 5 on the surface, facing
left, with 200 units of oxygen. The six actions are ``noop, left, up, right, down,
fire``: left/right move one column (clamped to 0-9) and turn the submarine to face that
way; up/down move one row (clamped to 0-8). Fire launches a torpedo from the
submarine's new cell in the way it faces, when the torpedo cooldown is 0; the cooldown is
then set to 5 (so at most one torpedo every 5 steps).

**Objects.** Every object sits on a cell and points left or right. Torpedoes (the
player's bullets) and enemy bullets move one column per step. Fish, enemy submarines
and divers carry a move timer: an object whose timer is 0 moves one column and its timer
is set to the current move interval (5 for divers, the game's ``move_interval`` for fish
and enemy submarines), otherwise the timer counts down by 1. Objects that leave the
columns 0-9 disappear. Each kind of object is kept in a list in order of appearance;
the order decides ties (below).

**Spawning** (first thing in a step). When the enemy spawn timer is 0 it is reset to the
spawn interval and an enemy appears in a uniformly random row 1-8, on the left edge
moving right or the right edge moving left (probability 1/2 each); it is an enemy
submarine with probability 1/3, otherwise a fish, and it starts with move timer
``move_interval`` (a submarine also with shot timer 10). The enemy is not placed if an
enemy moving the opposite way is already in that row. When the diver spawn timer is 0 it
is reset to 30 and a diver appears the same way (random row 1-8, random side) with move
timer 5.

**A step** after spawning, in this order: (1) the submarine moves / fires; (2) torpedoes
move, then each torpedo hits the first fish in its cell (list order), then the first
enemy submarine; both disappear and each destroyed enemy gives reward +1 (if several
torpedoes pick the same enemy, the latest torpedo in the list is the one used up);
(3) divers on the submarine's cell are picked up (while fewer than 6 are aboard), then
divers move, then divers on the submarine's cell are picked up again; (4) enemy
submarines move; the episode ends if one is on the player's cell before or after the
move; torpedoes hit them again (+1 each); each enemy submarine whose shot timer is 0
fires a bullet from its cell in its direction and its shot timer is reset to 10,
otherwise the timer counts down; (5) enemy bullets move; the episode ends if one is on
the player's cell before or after the move; (6) fish move, ending the episode on contact
as for submarines, and torpedoes hit them again (+1 each); (7) the enemy spawn, diver
spawn and torpedo cooldown timers count down (not below 0). The episode ends if the
oxygen is 0 or less at this point. Under water (row > 0) oxygen drops by 1. Arriving at
the surface (row 0 after being under water) with no divers aboard ends the episode;
otherwise it refills the oxygen to 200 and takes one diver (with 6 divers aboard it pays
``oxygen * 10 // 200`` for the oxygen left and sets the diver count to -1, as gymnax and
MinAtar do, so that later surfacings count down from -1 and never end the episode).

**Difficulty ramp.** Every arrival at the surface (including the one that ends the
episode), while the spawn interval is above 1 or the move interval above 2, lowers the
spawn interval by 1 (from 20, down to 1) and, on every second ramp (when the ramp count
before it is odd), the move interval by 1 (from 5, down to 2); the ramp count then
increases by 1.

**Observation** ``[10, 10, 10]`` binary, channels in gymnax's order: ``sub_front`` (the
submarine's cell), ``sub_back`` (the cell behind it: column ``x - 1`` when facing right,
which is column 9 for ``x = 0``, as in gymnax and MinAtar's negative indexing; ``x + 1``
when facing left, nothing when that is 10), ``friendly_bullet``, ``trail`` (the cell
behind each fish, enemy submarine and diver, when on the board), ``enemy_bullet``,
``enemy_fish``, ``enemy_sub``, ``oxygen_gauge`` (row 9, the first ``oxygen * 10 // 200``
columns), ``diver_gauge`` (row 9, columns ``9 - divers`` to 8) and ``diver``.

Episodes are capped at 1,000 steps by :class:`~metarl.envs.minatar.base.MinAtarEnv`.

Lists of objects have fixed capacities here (gymnax keeps 100 slots per list; an object
that would not fit is not added). The capacities below are above what the rules allow:
at most 2 torpedoes (one every 5 steps, each on the board at most 9 steps), at most 3
divers (one every 30 steps, each on the board at most about 60 steps), and about 30
fish, enemy submarines or enemy bullets (at the fastest, one enemy per step living at
most 29 steps; each enemy submarine has at most one bullet in flight).
"""

from __future__ import annotations

import torch

from metarl import rng
from metarl.envs.minatar.base import Game

SIZE = 10
MAX_OXYGEN = 200
MAX_DIVERS = 6
SHOT_COOLDOWN = 5
ENEMY_SHOT_INTERVAL = 10
DIVER_MOVE_INTERVAL = 5
DIVER_SPAWN_INTERVAL = 30
INIT_SPAWN_INTERVAL = 20
INIT_MOVE_INTERVAL = 5

#: list capacities (see the module docstring for why they suffice)
CAPACITY = {"torpedoes": 4, "bullets": 48, "fish": 48, "subs": 48, "divers": 4}
#: columns of each list: x, y, facing right (0/1), then the move timer, then the shot timer
WIDTH = {"torpedoes": 3, "bullets": 3, "fish": 4, "subs": 5, "divers": 4}
_X, _Y, _RIGHT, _MOVE, _SHOT = 0, 1, 2, 3, 4


# -- ordered lists of objects ---------------------------------------------------------------
# A list is ``rows [n, capacity, width]`` (int64) and ``count [n]``: the first ``count`` rows
# are the objects in order of appearance; the other rows are zero.

def _live(rows: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """``[n, capacity]`` mask of the rows in use."""
    return torch.arange(rows.shape[1], device=rows.device) < count[:, None]


def _keep(rows: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows where ``keep [n, capacity]``, moved to the front in their order."""
    n, cap, width = rows.shape
    dest = torch.where(keep, keep.cumsum(1) - 1, cap)  # dropped rows go to a spare slot
    out = rows.new_zeros(n, cap + 1, width)
    out.scatter_(1, dest[..., None].expand(-1, -1, width), rows)
    return out[:, :cap], keep.sum(1)


def _add(rows, count, row: torch.Tensor, enabled: torch.Tensor):
    """Append ``row [n, width]`` where ``enabled [n]`` and there is room."""
    cap = rows.shape[1]
    enabled = enabled & (count < cap)
    slot = (torch.arange(cap, device=rows.device) == count[:, None]) & enabled[:, None]
    return torch.where(slot[..., None], row[:, None, :], rows), count + enabled


def _add_many(rows, count, new: torch.Tensor, enabled: torch.Tensor):
    """Append the rows of ``new [n, m, width]`` where ``enabled [n, m]``, in order, while
    there is room."""
    n, cap, width = rows.shape
    rank = enabled.cumsum(1) - 1
    enabled = enabled & (rank < (cap - count)[:, None])
    dest = torch.where(enabled, count[:, None] + rank, cap)
    out = torch.cat([rows, rows.new_zeros(n, 1, width)], 1)
    out.scatter_(1, dest[..., None].expand(-1, -1, width), new)
    return out[:, :cap], count + enabled.sum(1)


def _step_dir(rows: torch.Tensor) -> torch.Tensor:
    return torch.where(rows[..., _RIGHT] != 0, 1, -1)


def _on_board(x: torch.Tensor) -> torch.Tensor:
    return (x >= 0) & (x < SIZE)


def _fly(rows, count):
    """Bullets move one column; those leaving the board disappear."""
    x = rows[..., _X] + _step_dir(rows)
    rows = torch.cat([x[..., None], rows[..., 1:]], -1)
    return _keep(rows, _live(rows, count) & _on_board(x))


def _swim(rows, count, interval: torch.Tensor):
    """Objects whose move timer is 0 move one column and restart their timer at
    ``interval [n]``; the others count down. Those leaving the board disappear."""
    live = _live(rows, count)
    ready = live & (rows[..., _MOVE] == 0)
    x = torch.where(ready, rows[..., _X] + _step_dir(rows), rows[..., _X])
    timer = torch.where(ready, interval[:, None], (rows[..., _MOVE] - 1).clamp(min=0))
    rows = torch.cat([x[..., None], rows[..., 1:_MOVE], timer[..., None],
                      rows[..., _MOVE + 1:]], -1)
    return _keep(rows, live & _on_board(x))


def _at(rows, count, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``[n, capacity]``: rows in use on cell ``(x [n], y [n])``."""
    return (_live(rows, count) & (rows[..., _X] == x[:, None])
            & (rows[..., _Y] == y[:, None]))


def _hit(torps, n_torps, targets, n_targets):
    """Torpedoes hit targets on their cell: each torpedo picks the first target (list
    order) on its cell; a target picked by several torpedoes uses up the last of them.
    Returns the surviving torpedoes and targets and the number of targets destroyed."""
    same = ((torps[:, :, None, _X] == targets[:, None, :, _X])
            & (torps[:, :, None, _Y] == targets[:, None, :, _Y])
            & _live(torps, n_torps)[:, :, None] & _live(targets, n_targets)[:, None, :])
    picks = same & (same.cumsum(2) == 1)                # [n, torpedo, target]
    used = picks & (picks.flip(1).cumsum(1).flip(1) == 1)
    target_hit = picks.any(1)
    torp_used = used.any(2)
    torps, n_torps = _keep(torps, _live(torps, n_torps) & ~torp_used)
    targets, n_targets = _keep(targets, _live(targets, n_targets) & ~target_hit)
    return torps, n_torps, targets, n_targets, target_hit.sum(1)


def _pick_up(divers, n_divers, x, y, aboard):
    """Divers on cell ``(x, y)`` board in list order while fewer than 6 are aboard."""
    here = _at(divers, n_divers, x, y)
    room = (MAX_DIVERS - aboard).clamp(min=0)
    taken = here & (here.cumsum(1) - 1 < room[:, None])
    divers, n_divers = _keep(divers, _live(divers, n_divers) & ~taken)
    return divers, n_divers, taken.sum(1)


def _cells(rows, count, x=None) -> torch.Tensor:
    """``[n, 100]`` bool grid (``row * 10 + column``) marking the rows in use, at
    column ``x`` (default: the objects' own column; off-board columns mark nothing)."""
    x = rows[..., _X] if x is None else x
    live = _live(rows, count) & _on_board(x)
    idx = torch.where(live, rows[..., _Y] * SIZE + x, SIZE * SIZE)
    grid = torch.zeros(rows.shape[0], SIZE * SIZE + 1, dtype=torch.bool, device=rows.device)
    grid.scatter_(1, idx, True)
    return grid[:, :SIZE * SIZE]


class Seaquest(Game):
    """Seaquest-MinAtar (rules in the module docstring).

    State (``[n]`` int64 unless noted): ``sub_x``, ``sub_y``, ``sub_right`` (bool),
    ``oxygen``, ``divers_aboard``, ``torpedo_cooldown``, ``surfaced`` (bool: at the
    surface since the last arrival), ``enemy_timer``, ``diver_timer``,
    ``spawn_interval``, ``move_interval``, ``ramps``, and the five object lists
    ``<kind> [n, capacity, width]`` with ``n_<kind> [n]`` for kind in
    :data:`CAPACITY` (``torpedoes`` are the player's bullets, ``bullets`` the enemies').
    """

    env_id = "Seaquest-MinAtar"
    channels = ("sub_front", "sub_back", "friendly_bullet", "trail", "enemy_bullet",
                "enemy_fish", "enemy_sub", "oxygen_gauge", "diver_gauge", "diver")
    actions = ("noop", "left", "up", "right", "down", "fire")
    max_steps = 1000

    def reset(self, keys: torch.Tensor) -> dict[str, torch.Tensor]:
        """The start is the same for every game (the keys are not used)."""
        n, dev = keys.shape[0], keys.device

        def full(v):
            return torch.full((n,), v, dtype=torch.int64, device=dev)

        state = {
            "sub_x": full(5), "sub_y": full(0),
            "sub_right": torch.zeros(n, dtype=torch.bool, device=dev),
            "oxygen": full(MAX_OXYGEN), "divers_aboard": full(0), "torpedo_cooldown": full(0),
            "surfaced": torch.ones(n, dtype=torch.bool, device=dev),
            "enemy_timer": full(INIT_SPAWN_INTERVAL), "diver_timer": full(DIVER_SPAWN_INTERVAL),
            "spawn_interval": full(INIT_SPAWN_INTERVAL),
            "move_interval": full(INIT_MOVE_INTERVAL), "ramps": full(0),
        }
        for kind, cap in CAPACITY.items():
            state[kind] = torch.zeros(n, cap, WIDTH[kind], dtype=torch.int64, device=dev)
            state["n_" + kind] = full(0)
        return state

    def _draws(self, keys: torch.Tensor) -> dict[str, torch.Tensor]:
        """The step's random choices (used only when something spawns), from ``keys [n]``:
        ``enemy_right`` and ``diver_right`` (probability 1/2 each, from one random bit),
        ``enemy_is_sub`` (a uniform number below 1/3) and ``enemy_y``, ``diver_y`` (rows
        1-8, uniform: 1 + 32 random bits mod 8)."""
        b = rng.bits(keys, (5,))
        return {
            "enemy_right": (b[:, 0] & 1) == 1,
            "enemy_is_sub": rng.uniform(rng.fold(keys, 1), (1,))[:, 0] < 1.0 / 3.0,
            "enemy_y": 1 + b[:, 2] % 8,
            "diver_right": (b[:, 3] & 1) == 1,
            "diver_y": 1 + b[:, 4] % 8,
        }

    def step(self, state, action, keys):
        return self._transition(state, action, self._draws(keys))

    def _transition(self, s: dict, action: torch.Tensor, d: dict):
        """One step of every game with the random choices ``d`` (see :meth:`_draws`)."""
        s = dict(s)
        n, dev = action.shape[0], action.device

        def const(v):
            return torch.full((n,), v, dtype=torch.int64, device=dev)

        # spawning
        enemy_due = s["enemy_timer"] == 0
        e_right = d["enemy_right"].long()
        e_y = d["enemy_y"].long()
        opposed = torch.zeros(n, dtype=torch.bool, device=dev)
        for kind in ("subs", "fish"):
            rows = s[kind]
            opposed |= (_live(rows, s["n_" + kind]) & (rows[..., _Y] == e_y[:, None])
                        & (rows[..., _RIGHT] != e_right[:, None])).any(1)
        spawn = enemy_due & ~opposed
        enemy = torch.stack([(1 - e_right) * (SIZE - 1), e_y, e_right, s["move_interval"],
                             const(ENEMY_SHOT_INTERVAL)], 1)
        s["subs"], s["n_subs"] = _add(s["subs"], s["n_subs"], enemy, spawn & d["enemy_is_sub"])
        s["fish"], s["n_fish"] = _add(s["fish"], s["n_fish"], enemy[:, :4],
                                      spawn & ~d["enemy_is_sub"])
        s["enemy_timer"] = torch.where(enemy_due, s["spawn_interval"], s["enemy_timer"])
        diver_due = s["diver_timer"] == 0
        d_right = d["diver_right"].long()
        diver = torch.stack([(1 - d_right) * (SIZE - 1), d["diver_y"].long(), d_right,
                             const(DIVER_MOVE_INTERVAL)], 1)
        s["divers"], s["n_divers"] = _add(s["divers"], s["n_divers"], diver, diver_due)
        s["diver_timer"] = torch.where(diver_due, DIVER_SPAWN_INTERVAL, s["diver_timer"])

        # (1) the player's submarine
        x = torch.where(action == 1, s["sub_x"] - 1, s["sub_x"])
        x = torch.where(action == 3, x + 1, x).clamp(0, SIZE - 1)
        y = torch.where(action == 2, s["sub_y"] - 1, s["sub_y"])
        y = torch.where(action == 4, y + 1, y).clamp(0, SIZE - 2)
        right = torch.where(action == 1, False, torch.where(action == 3, True, s["sub_right"]))
        fire = (action == 5) & (s["torpedo_cooldown"] == 0)
        s["torpedoes"], s["n_torpedoes"] = _add(s["torpedoes"], s["n_torpedoes"],
                                                torch.stack([x, y, right.long()], 1), fire)
        s["torpedo_cooldown"] = torch.where(fire, SHOT_COOLDOWN, s["torpedo_cooldown"])
        s["sub_x"], s["sub_y"], s["sub_right"] = x, y, right

        # (2) torpedoes
        t, nt = _fly(s["torpedoes"], s["n_torpedoes"])
        t, nt, s["fish"], s["n_fish"], r_fish = _hit(t, nt, s["fish"], s["n_fish"])
        t, nt, s["subs"], s["n_subs"], r_subs = _hit(t, nt, s["subs"], s["n_subs"])
        reward = r_fish + r_subs

        # (3) divers
        dv, nd, first = _pick_up(s["divers"], s["n_divers"], x, y, s["divers_aboard"])
        aboard = s["divers_aboard"] + first
        dv, nd = _swim(dv, nd, const(DIVER_MOVE_INTERVAL))
        s["divers"], s["n_divers"], second = _pick_up(dv, nd, x, y, aboard)
        s["divers_aboard"] = (aboard + second).clamp(max=MAX_DIVERS)

        # (4) enemy submarines
        crash = _at(s["subs"], s["n_subs"], x, y).any(1)
        subs, ns = _swim(s["subs"], s["n_subs"], s["move_interval"])
        crash |= _at(subs, ns, x, y).any(1)
        t, nt, subs, ns, r_subs = _hit(t, nt, subs, ns)
        reward = reward + r_subs
        shoots = _live(subs, ns) & (subs[..., _SHOT] == 0)
        shot_timer = torch.where(shoots, ENEMY_SHOT_INTERVAL, (subs[..., _SHOT] - 1).clamp(min=0))
        subs = torch.cat([subs[..., :_SHOT], shot_timer[..., None]], -1)
        s["subs"], s["n_subs"] = subs, ns
        s["bullets"], s["n_bullets"] = _add_many(s["bullets"], s["n_bullets"],
                                                 subs[..., :3], shoots)

        # (5) enemy bullets
        crash |= _at(s["bullets"], s["n_bullets"], x, y).any(1)
        s["bullets"], s["n_bullets"] = _fly(s["bullets"], s["n_bullets"])
        crash |= _at(s["bullets"], s["n_bullets"], x, y).any(1)

        # (6) fish
        crash |= _at(s["fish"], s["n_fish"], x, y).any(1)
        fish, nf = _swim(s["fish"], s["n_fish"], s["move_interval"])
        crash |= _at(fish, nf, x, y).any(1)
        t, nt, s["fish"], s["n_fish"], r_fish = _hit(t, nt, fish, nf)
        reward = reward + r_fish
        s["torpedoes"], s["n_torpedoes"] = t, nt

        # (7) timers, oxygen, surfacing and the difficulty ramp
        for k in ("enemy_timer", "diver_timer", "torpedo_cooldown"):
            s[k] = (s[k] - 1).clamp(min=0)
        oxygen = s["oxygen"]
        crash |= oxygen <= 0
        under = y > 0
        arrive = ~under & ~s["surfaced"]
        aboard = s["divers_aboard"]
        crash |= arrive & (aboard == 0)
        full_load = arrive & (aboard == MAX_DIVERS)
        reward = reward + torch.where(full_load, oxygen * 10 // MAX_OXYGEN, 0)
        s["divers_aboard"] = torch.where(arrive, torch.where(full_load, -1, aboard - 1), aboard)
        s["oxygen"] = torch.where(arrive, MAX_OXYGEN, torch.where(under, oxygen - 1, oxygen))
        s["surfaced"] = ~under
        spawn_iv, move_iv, ramps = s["spawn_interval"], s["move_interval"], s["ramps"]
        ramp = arrive & ((spawn_iv > 1) | (move_iv > 2))
        s["move_interval"] = torch.where(ramp & (move_iv > 2) & (ramps % 2 == 1),
                                         move_iv - 1, move_iv)
        s["spawn_interval"] = torch.where(ramp & (spawn_iv > 1), spawn_iv - 1, spawn_iv)
        s["ramps"] = ramps + ramp
        return s, reward.float(), crash

    def observe(self, state: dict[str, torch.Tensor]) -> torch.Tensor:
        s = state
        n, dev = s["sub_x"].shape[0], s["sub_x"].device
        cols = torch.arange(SIZE, device=dev)
        rows_ = cols[None, :, None]  # [1, 10, 1] rows, broadcast against [n, 1, 10] columns
        sub_row = rows_ == s["sub_y"][:, None, None]
        front = sub_row & (cols[None, None, :] == s["sub_x"][:, None, None])
        back_x = torch.where(s["sub_right"], s["sub_x"] - 1, s["sub_x"] + 1)
        back_x = torch.where(back_x < 0, back_x + SIZE, back_x)  # column -1 is column 9
        back = sub_row & (cols[None, None, :] == back_x[:, None, None])

        def grid(kind, x=None):
            return _cells(s[kind], s["n_" + kind], x).view(n, SIZE, SIZE)

        trail = torch.zeros(n, SIZE, SIZE, dtype=torch.bool, device=dev)
        for kind in ("fish", "subs", "divers"):
            rows = s[kind]
            trail |= grid(kind, rows[..., _X] - _step_dir(rows))
        bottom = rows_ == SIZE - 1
        oxygen = bottom & (cols[None, None, :] < (s["oxygen"].clamp(min=0) * 10
                                                   // MAX_OXYGEN)[:, None, None])
        divers = bottom & (cols[None, None, :] < SIZE - 1) & (
            cols[None, None, :] >= (SIZE - 1 - s["divers_aboard"])[:, None, None])
        return torch.stack([front, back, grid("torpedoes"), trail, grid("bullets"),
                            grid("fish"), grid("subs"), oxygen, divers, grid("divers")], -1)
