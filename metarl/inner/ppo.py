"""Population PPO: train P agents at once, each with its own learned algorithm.

``train(config, algorithm, meta_params, seeds) -> TrainResult`` is a pure function of its
inputs. The loop has two slots: the drift function (PPO's policy objective, the drift
family) and the agent optimiser (the optim family). ``algorithm`` fills its own family's
slot, one member per row of ``meta_params``; the other slot keeps its family's handcrafted
default (PPO's clip, Adam with the environment's learning rate).

Every tensor carries the population dimension first; the actor-critic runs for the whole
population at once (a hand-batched ``baddbmm`` forward by default, or
``torch.func.functional_call`` under ``torch.func.vmap`` with ``config.fused=False``; a test
checks they agree); all ``P x N`` environments step in one call; the optimiser updates the
flat ``[P, D]`` parameters in one operation. Randomness
comes from :mod:`metarl.rng` keyed by each member's seed, so member ``i`` of a population
gets the same numbers as the same member trained alone.

The PPO details follow purejaxrl (which LPO, OPEN and the paper's code build on): GAE,
per-minibatch advantage normalisation, clipped value loss, entropy bonus, global gradient
clipping, Adam with a linear learning-rate anneal, epochs over shuffled minibatches. In the
optimiser slot, gradients are clipped for actor and critic separately (the setting of the
learned-optimiser papers) and the optimiser may read per-layer activations (dormancy).
Transitions from the auto-reset step (every backend follows envpool's next-step reset) are
masked out of the losses, the advantage normalisation and the episode statistics.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from metarl import rng
from metarl.configs import PPOConfig
from metarl.envs import check_env_id, env_seeds, make
from metarl.envs.spec import EnvSpec
from metarl.families import get_family, make_member
from metarl.families.base import Member
from metarl.families.drift import Drift
from metarl.families.optim import AgentLayout, OptimMember, StepContext
from metarl.inner import compiled
from metarl.inner.losses import clip_grads, gae, policy_logp
from metarl.inner.normalize import ObsNormalizer, RewardNormalizer
from metarl.inner.towers import Towers
from metarl.nets import (
    ActorCritic,
    FlatParams,
    init_population,
    population_tower,
)

# Stream numbers folded into member keys, one per purpose of randomness.
_S_INIT, _S_ACTION, _S_SHUFFLE = 1, 2, 3


@dataclass
class TrainResult:
    """What a population training run returns. Tensors are on the CPU.

    - ``final_return [P]``: per member, the mean return of the episodes that ended in the
      last update, averaged over the member's environments (an environment with no episode
      ending then contributes its most recent finished episode, or if none has finished,
      its current episode's return so far). NaN for a failed member.
    - ``curve [P, U]``: the same measure for each of the ``U`` updates, taken from that
      update's rollout (before its gradient steps): ``curve[:, 0]`` precedes any learning
      and ``curve[:, -1]`` is ``final_return``, as purejaxrl and the paper measure it.
    - ``timesteps [U]``: environment steps per member at the end of each update.
    - ``failed [P]``: the member's loss or parameters became non-finite.
    - ``agent_params [P, D]``: final agent parameters (flat; see :class:`FlatParams`).
    - ``timings``: seconds spent in rollouts (acting and stepping) and in PPO updates.
    - ``algorithm``: the trained member's name; ``drift`` and ``optimizer``: the members
      that filled the two slots.
    """

    final_return: torch.Tensor
    curve: torch.Tensor
    timesteps: torch.Tensor
    failed: torch.Tensor
    seeds: list[int]
    config: PPOConfig
    drift: str
    wall_time: float
    env_steps: int
    agent_params: torch.Tensor = field(repr=False)
    timings: dict = field(default_factory=dict)
    algorithm: str = ""
    optimizer: str = ""

    @property
    def mean(self) -> float:
        return float(self.final_return.nanmean())

    @property
    def stderr(self) -> float:
        x = self.final_return[torch.isfinite(self.final_return)]
        if x.numel() < 2:
            return 0.0
        return float(x.std(unbiased=True) / math.sqrt(x.numel()))


# -- input checks -------------------------------------------------------------------------


def check_config(config: PPOConfig) -> None:
    """Refuse a configuration that cannot train, before any work starts."""
    for name in ("num_envs", "num_steps", "total_timesteps", "update_epochs",
                 "num_minibatches", "hidden", "layers"):
        v = getattr(config, name)
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    if config.num_updates < 1:
        raise ValueError(
            f"total_timesteps={config.total_timesteps} is less than one update of "
            f"num_envs x num_steps = {config.batch_size} steps; raise --total-timesteps "
            f"or lower --num-envs / --num-steps"
        )
    if config.batch_size % config.num_minibatches:
        raise ValueError(
            f"num_envs x num_steps = {config.batch_size} is not divisible by "
            f"num_minibatches={config.num_minibatches}; pick a divisor"
        )
    for name in ("lr", "max_grad_norm", "clip_eps"):
        if not getattr(config, name) > 0:
            raise ValueError(f"{name} must be positive, got {getattr(config, name)!r}")
    if not (0 < config.gamma <= 1 and 0 <= config.gae_lambda <= 1):
        raise ValueError("gamma must be in (0, 1] and gae_lambda in [0, 1]")
    if config.activation not in ("tanh", "relu"):
        raise ValueError(f"activation must be 'tanh' or 'relu', got {config.activation!r}")
    try:
        device = torch.device(config.device)
    except RuntimeError:
        raise ValueError(f"device {config.device!r} is not a torch device; use cpu, cuda or "
                         f"cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {config.device!r} asked for, but this torch has no CUDA "
                         f"device available; use --device cpu")


def check_options(config: PPOConfig, spec: EnvSpec) -> PPOConfig:
    """Resolve the continuous-control options against the environment's action space."""
    options = ("normalize_obs", "normalize_reward", "clip_action")
    if spec.discrete:
        bad = [o for o in options if getattr(config, o)]
        if bad:
            flags = ", ".join("--" + o.replace("_", "-") for o in bad)
            raise ValueError(
                f"{flags}: continuous-control option(s) set, but {spec.env_id} has a discrete "
                f"action space ({spec.num_actions} actions); drop them for this environment"
            )
        return config.replace(normalize_obs=False, normalize_reward=False, clip_action=False)
    return config.replace(**{o: True if getattr(config, o) is None else getattr(config, o)
                             for o in options})


def resolve_population(member: Member, meta_params, seeds) -> tuple[torch.Tensor, list[int]]:
    """Check and broadcast ``meta_params`` and ``seeds`` to one row per member.

    Accepted: ``meta_params`` None (the member's own parameters, shared), ``[n]`` (shared by
    every seed) or ``[P, n]``; ``seeds`` a sequence of P integers, or of one integer shared
    by the P members.
    """
    if isinstance(seeds, int):
        seeds = [seeds]
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ValueError("seeds is empty: give at least one seed")
    n = member.num_meta_params
    if meta_params is None:
        meta_params = member.flat_params()
    meta_params = torch.as_tensor(meta_params, dtype=torch.float32)
    if meta_params.dim() == 1:
        if meta_params.shape[0] != n:
            raise ValueError(
                f"meta_params has {meta_params.shape[0]} entries but {member.name} has {n} "
                f"meta-parameters; pass [{n}] (shared) or [P, {n}] (one row per member)"
            )
        meta_params = meta_params.unsqueeze(0).expand(len(seeds), n)
    elif meta_params.dim() == 2:
        if meta_params.shape[1] != n:
            raise ValueError(
                f"meta_params has shape {list(meta_params.shape)} but {member.name} has {n} "
                f"meta-parameters per member; expected [P, {n}]"
            )
        if len(seeds) == 1:
            seeds = seeds * meta_params.shape[0]
        if meta_params.shape[0] != len(seeds):
            raise ValueError(
                f"meta_params has {meta_params.shape[0]} members but {len(seeds)} seeds were "
                f"given; give one seed per member or a single shared seed"
            )
    else:
        raise ValueError(
            f"meta_params must be [{n}] or [P, {n}], got shape {list(meta_params.shape)}"
        )
    # Non-finite rows are not an error: such a member trains and is reported as failed.
    return meta_params, seeds


def prepare_configs(envs: Sequence[str], **overrides) -> dict[str, PPOConfig]:
    """One resolved, checked configuration per environment: every check that can fail
    before work starts (unknown id, bad budget, continuous options on a discrete space)."""
    if not envs:
        raise ValueError("--envs is empty: name at least one environment (see `metarl envs`)")
    from metarl.configs import config_for, resolve_per_env
    from metarl.envs import spec_of

    overrides = resolve_per_env(overrides, list(envs))
    configs = {}
    for env_id in envs:
        backend = overrides.get("backend") or "auto"
        check_env_id(env_id, backend, overrides.get("device") or "cpu")
        c = config_for(env_id, **overrides)
        check_config(c)
        configs[env_id] = check_options(c, spec_of(env_id, backend))
    return configs


# -- the loop -----------------------------------------------------------------------------


def resolve_slots(algorithm: Member | str) -> tuple[Member, Drift, OptimMember]:
    """``(member, drift, optimizer)``: the algorithm and the two slots it leaves filled.

    ``algorithm`` (a member or any family's member name) fills its own family's slot;
    the other slot gets its family's handcrafted default (PPO clip or Adam)."""
    member = make_member(algorithm) if isinstance(algorithm, str) else algorithm
    if isinstance(member, Drift):
        return member, member, make_member(get_family("optim").default)
    if isinstance(member, OptimMember):
        return member, make_member(get_family("drift").default), member
    raise TypeError(f"algorithm must be a family member (a drift or an optimiser) or its "
                    f"name, got {type(member).__name__}")


def train(
    config: PPOConfig,
    algorithm: Member | str = "ppo-clip",
    meta_params: torch.Tensor | None = None,
    seeds: Sequence[int] | int = (0,),
    *,
    progress: bool = False,
    callback: Callable[[dict], None] | None = None,
) -> TrainResult:
    """Train one PPO agent per member of the population.

    Args:
        config: the inner-loop configuration (:func:`metarl.configs.config_for`).
        algorithm: a member of any family or its name: a drift (``ppo-clip``, ``dpo``,
            ``lpo``) or an optimiser (``adam``, ``sgd``, ``open``, ``open-ff``,
            ``no-features``). It fills its family's slot; the other slot keeps its
            handcrafted default (PPO clip, Adam).
        meta_params: the algorithm's meta-parameters, ``[n]`` shared or ``[P, n]`` per
            member; None uses the module's own parameters.
        seeds: one seed per member (or one shared seed). A member's seed fixes its network
            initialisation, its environments and its action sampling.
        progress: show a progress bar over updates.
        callback: called after every update with a dict of that update's statistics.
    """
    t_start = time.perf_counter()
    check_config(config)
    member, drift, optimizer = resolve_slots(algorithm)
    drift.check_config(config)
    optimizer.check_config(config)
    meta, seeds = resolve_population(member, meta_params, seeds)
    P, N = len(seeds), config.num_envs
    device = torch.device(config.device)
    if config.separate_grad_clip is None:
        config = config.replace(separate_grad_clip=member is optimizer)

    all_seeds = [s for seed in seeds for s in env_seeds(seed, N)]
    env = make(config.env_id, P * N, device=device, backend=config.backend, seeds=all_seeds)
    try:
        config = check_options(config, env.spec)
        return _train(config, env, member, drift, optimizer, meta.to(device), seeds, progress,
                      callback, t_start)
    finally:
        env.close()


def _train(config, env, member, drift, optimizer, meta, seeds, progress, callback, t_start):
    spec = env.spec
    P, N, T = len(seeds), config.num_envs, config.num_steps
    B, U = config.batch_size, config.num_updates
    E, M = config.update_epochs, config.num_minibatches
    mbs = config.minibatch_size
    device = env.device
    discrete = spec.discrete
    A = spec.action_dim

    model = ActorCritic(spec.obs_dim, A, discrete, config.hidden, config.layers,
                        config.activation).to(device)
    layout = FlatParams(model)
    keys = rng.seed_keys(seeds, device=device)
    params = init_population(model, rng.fold(keys, _S_INIT)).requires_grad_(True)
    none = torch.zeros(P, 0, device=device)
    drift_meta = meta if member is drift else none
    agent_layout = AgentLayout.for_actor_critic(model, device)
    opt = optimizer.population(meta if member is optimizer else none, agent_layout, config,
                               keys)
    opt_state = opt.init(params.detach())
    actor_mask = agent_layout.actor_mask
    log_std_slice = low = high = None
    if not discrete:
        i = layout.names.index("log_std")
        start = sum(layout.sizes[:i])
        log_std_slice = slice(start, start + layout.sizes[i])
        low, high = spec.action_bounds(device)

    obs_norm = ObsNormalizer(P, spec.obs_dim, device) if config.normalize_obs else None
    rew_norm = RewardNormalizer(P, N, config.gamma, device) if config.normalize_reward else None

    # The rollout's step and the minibatch loss head: compiled (and cached across calls)
    # with config.compile where that pays (compiled.py), else the same functions eagerly.
    rollout_step = compiled.rollout_step(model, layout, config, env, device,
                                         compile=config.compile)
    towers = Towers(model, layout)
    if config.fused:
        # The towers' forward and hand-written backward; autograd runs over the loss head.
        head = compiled.loss_head(config, drift, discrete, device, compile=config.compile)
        grad_buf = torch.zeros_like(params)
    else:
        loss_fn = compiled.minibatch_loss(model, layout, config, drift, log_std_slice,
                                          opt.needs_activations)

    # Members per pass of the critic over the rollout: about 2 MB of activations (fused).
    critic_chunk = max(1, (1 << 19) // (T * N * config.hidden)) if config.fused else P

    def critic(flat, obs, reuse=False):
        if config.fused:  # the same numbers; the large call's layers in a workspace
            return towers.tower(flat, "critic", obs, reuse=reuse).squeeze(-1)
        return population_tower(model, layout, flat, "critic", obs, fused=False).squeeze(-1)

    # Episode statistics per member and environment.
    last_return = torch.full((P, N), float("nan"), device=device)
    curve = torch.zeros(P, U, device=device)
    nonfinite = torch.zeros(P, dtype=torch.bool, device=device)

    raw_obs = env.reset().reshape(P, N, -1)
    obs = obs_norm(raw_obs) if obs_norm else raw_obs
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=U, desc=f"{member.name} on {spec.env_id} (P={P})", unit="update")

    t_rollout = t_update = 0.0
    for update in range(U):
        t0 = time.perf_counter()
        ep_sum = torch.zeros(P, N, device=device)
        ep_count = torch.zeros(P, N, device=device)
        # ---- rollout -------------------------------------------------------------------
        with torch.no_grad():
            log_std = params[:, log_std_slice] if log_std_slice else None
            # The actor's layers laid out for acting, once per rollout.
            weights = towers.actor_weights(params, N) if config.fused else params
            # The whole rollout's action noise in one draw: [P, T, N, A].
            k = rng.fold(keys, _S_ACTION, update)
            if discrete:
                noise = -torch.log(-torch.log(rng.uniform(k, (T, N, A))))  # Gumbel
            else:
                noise = rng.normal(k, (T, N, A))
            ep_stats = (ep_sum, ep_count, last_return)
            steps = []
            for t in range(T):
                # Only the actor acts; the critic runs once on the whole rollout below.
                (action, out, raw_obs, reward, terminated, done, valid,
                 *ep_stats) = rollout_step(env, weights, obs, noise[:, t], log_std, low, high,
                                           *ep_stats)
                if rew_norm:
                    reward = rew_norm(reward, done)
                steps.append((obs, action, out, reward, terminated, done, valid))
                obs = obs_norm(raw_obs) if obs_norm else raw_obs
            ep_sum, ep_count, last_return = ep_stats
            # [P, T, N, ...] buffers, population first so that a member's batch is a view;
            # the observations keep one more slot for the observation after the last step.
            columns = list(zip(*steps))
            obs_buf, act_buf, out_buf, rew_buf, term_buf, done_buf, valid_buf = (
                torch.stack(x, dim=1) for x in columns)
            # The actions' log-probabilities, for the whole rollout at once (row by row, so
            # the same numbers as step by step).
            logp_buf = policy_logp(out_buf.view(P, T * N, A), log_std,
                                   act_buf.view(P, T * N, *act_buf.shape[3:]),
                                   entropy=False)[0].view(P, T, N)
            # The critic's values [P, T + 1, N], a few members at a time (a member's values
            # do not depend on who is beside it): each pass's activations stay in cache.
            values = torch.empty(P, T + 1, N, device=device)
            for c in range(0, P, critic_chunk):
                s = slice(c, c + critic_chunk)
                part = obs_buf[s].view(-1, T * N, obs_buf.shape[-1])
                values[s, :T] = critic(params[s], part, reuse=("rollout", part.shape[0])
                                       ).view(-1, T, N)
            values[:, T] = critic(params, obs)

            adv_buf = gae(rew_buf, values, term_buf, done_buf, config.gamma,
                          config.gae_lambda)
            val_buf = values[:, :T]
            ret_buf = adv_buf + val_buf

            # Statistics of this update.
            partial = env.running_return.reshape(P, N)
            per_env = torch.where(ep_count > 0, ep_sum / ep_count.clamp(min=1),
                                  torch.where(torch.isnan(last_return), partial, last_return))
            curve[:, update] = per_env.mean(dim=1)

        t1 = time.perf_counter()
        t_rollout += t1 - t0
        # ---- PPO epochs ----------------------------------------------------------------
        # Each member's samples as rows of one [P * B, ...] table; a minibatch is one
        # index_select of whole rows per tensor (each member's shuffled indices, offset to
        # its rows): no shuffled copy of the whole batch (for MinAtar's 400-float
        # observations that copy was the largest cost of an update).
        rows = [x.reshape(P * B, *x.shape[3:])  # [P, T, N, ...] -> [P * T * N, ...]
                for x in (obs_buf, act_buf, logp_buf, val_buf, adv_buf, ret_buf,
                          valid_buf.float())]
        offset = torch.arange(P, device=device).unsqueeze(1) * B
        # The minibatches are written into the same buffers every time (a fresh 100 MB
        # allocation per minibatch, as MinAtar's observations at P = 64 take, costs more
        # in page faults than the copy itself).
        if update == 0:
            mb_bufs = [x.new_empty(P * mbs, *x.shape[1:]) for x in rows]
        losses = torch.zeros(P, device=device)
        for epoch in range(E):
            perm = rng.permutation(rng.fold(keys, _S_SHUFFLE, update, epoch), B) + offset
            for mb in range(M):
                idx = perm[:, mb * mbs:(mb + 1) * mbs].reshape(-1)
                b_obs, *rest = (torch.index_select(x, 0, idx, out=buf).view(P, mbs, *x.shape[1:])
                                for x, buf in zip(rows, mb_bufs))
                if config.fused:
                    taps = {} if opt.needs_activations else None
                    loss = towers.loss_and_grads(params, head, log_std_slice, grad_buf,
                                                 b_obs, drift_meta, *rest, taps=taps)
                    grads = grad_buf
                else:
                    loss, taps = loss_fn(params, drift_meta, b_obs, *rest)
                    (grads,) = torch.autograd.grad(loss.sum(), params)
                with torch.no_grad():
                    grads = clip_grads(grads, config.max_grad_norm,
                                       actor_mask if config.separate_grad_clip else None,
                                       inplace=True)  # grads is this step's own tensor
                    if taps is not None and log_std_slice is not None:
                        taps["log_std"] = torch.exp(params[:, log_std_slice])
                    opt.step(params, grads, opt_state,
                             StepContext(update, U, epoch, E, mb, M, taps))
                    losses += loss.detach()
        nonfinite |= ~torch.isfinite(losses)
        t_update += time.perf_counter() - t1
        if callback is not None or bar is not None:
            stats = {"update": update, "timesteps": (update + 1) * B,
                     "returns": curve[:, update].detach().cpu(),
                     "loss": (losses / (E * M)).cpu()}
            if callback is not None:
                callback(stats)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(mean_return=f"{float(stats['returns'].nanmean()):.1f}")
    if bar is not None:
        bar.close()

    with torch.no_grad():
        failed = nonfinite | ~torch.isfinite(params).all(dim=1)
        final = torch.where(failed, torch.full_like(curve[:, -1], float("nan")), curve[:, -1])
    return TrainResult(
        final_return=final.cpu(),
        curve=curve.cpu(),
        timesteps=torch.arange(1, U + 1) * B,
        failed=failed.cpu(),
        seeds=list(seeds),
        config=config,
        drift=drift.name,
        wall_time=time.perf_counter() - t_start,
        algorithm=member.name,
        optimizer=optimizer.name,
        env_steps=P * U * B,
        agent_params=params.detach().cpu(),
        timings={"rollout": t_rollout, "update": t_update},
    )
