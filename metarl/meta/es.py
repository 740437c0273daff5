"""Evolution strategies with one ``ask`` / ``tell`` interface over torch tensors.

A strategy is configured once (dimension, population size, the sense of optimisation and
its settings) and is otherwise stateless: everything that changes from one generation to
the next lives in a state dataclass of tensors, which ``state_dict`` / ``load_state`` turn
into something ``torch.save`` can write and read back exactly.

    strategy = make_strategy("openai-es", num_dims=1152, popsize=64, maximize=True)
    state = strategy.init()
    for generation in range(800):
        candidates, state = strategy.ask(state)        # [popsize, num_dims]
        fitness = evaluate(candidates)                 # [popsize]
        state = strategy.tell(state, candidates, fitness)
    best_guess = strategy.mean(state)

The sense is explicit: ``maximize=True`` treats larger fitness as better, ``False`` smaller.
Fitness must be finite; map failures to a bad value before ``tell`` (the meta-training loop
does, with a warning).
"""

from __future__ import annotations

import copy
import dataclasses
import io
import math
import pickle
from dataclasses import dataclass

import numpy as np
import torch

from metarl import rng


class Strategy:
    """Base class: configuration in the constructor, everything else in the state."""

    name = "strategy"
    #: the paper (or reference) the strategy comes from, for docs and provenance
    reference = ""

    def __init__(self, num_dims: int, popsize: int, *, maximize: bool, seed: int = 0):
        if not isinstance(num_dims, int) or num_dims <= 0:
            raise ValueError(f"num_dims must be a positive integer, got {num_dims!r}")
        if not isinstance(popsize, int) or popsize < 2:
            raise ValueError(f"popsize must be an integer of at least 2, got {popsize!r}")
        if not isinstance(maximize, bool):
            raise TypeError("maximize must be True or False: say which way is better")
        self.num_dims, self.popsize, self.maximize, self.seed = num_dims, popsize, maximize, seed

    def settings(self) -> dict:
        """The strategy's settings, for provenance and for checking a resume."""
        return {"strategy": self.name, "num_dims": self.num_dims, "popsize": self.popsize,
                "maximize": self.maximize, "seed": self.seed}

    def init(self, x0: torch.Tensor | None = None):
        raise NotImplementedError

    def ask(self, state):
        """``(candidates [popsize, num_dims], new_state)``."""
        raise NotImplementedError

    def tell(self, state, candidates: torch.Tensor, fitness: torch.Tensor):
        """Update the state with the fitness ``[popsize]`` of the asked candidates."""
        raise NotImplementedError

    def mean(self, state) -> torch.Tensor:
        """The strategy's current estimate of the best point ``[num_dims]``."""
        raise NotImplementedError

    def extras(self, state) -> dict:
        """Scalars worth logging (sigma, learning rate, ...)."""
        return {}

    # -- saving ---------------------------------------------------------------------------
    def state_dict(self, state) -> dict:
        return {k: v for k, v in dataclasses.asdict(state).items()}

    def load_state(self, d: dict):
        raise NotImplementedError

    def _check_fitness(self, candidates, fitness) -> torch.Tensor:
        fitness = torch.as_tensor(fitness, dtype=torch.float64).reshape(-1)
        if fitness.shape[0] != self.popsize or candidates.shape[0] != self.popsize:
            raise ValueError(
                f"tell expects {self.popsize} candidates and fitness values, got "
                f"{candidates.shape[0]} and {fitness.shape[0]}"
            )
        if not torch.isfinite(fitness).all():
            raise ValueError("fitness has NaN or infinite values; map failed members to a "
                             "finite bad value before tell")
        return fitness


def _positive(**values) -> None:
    for name, v in values.items():
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
            raise ValueError(f"{name} must be a positive finite number, got {v!r}")


def centered_ranks(x: torch.Tensor) -> torch.Tensor:
    """Fitness shaping of OpenAI-ES: ranks mapped linearly onto [-0.5, 0.5]."""
    ranks = torch.empty_like(x)
    ranks[torch.argsort(x, stable=True)] = torch.arange(x.numel(), dtype=x.dtype)
    return ranks / (x.numel() - 1) - 0.5


@dataclass
class OpenAIESState:
    generation: torch.Tensor  # int64 scalar
    mean: torch.Tensor  # [n]
    adam_m: torch.Tensor  # [n]
    adam_v: torch.Tensor  # [n]
    sigma: torch.Tensor  # float64 scalar
    lr: torch.Tensor  # float64 scalar
    key: torch.Tensor  # int64 scalar: the noise key


class OpenAIES(Strategy):
    """OpenAI-ES (Salimans et al. 2017) as the paper runs it.

    Antithetic Gaussian perturbations ``mean +/- sigma * eps``, centred-rank fitness
    shaping, the gradient estimate ``sum_i shaped_i * eps_i / (popsize * sigma)`` followed
    by Adam (beta1 0.99), and sigma and the learning rate decaying by a factor per
    generation down to floors. Defaults are the paper's: sigma 0.03 -> 0.01, learning rate
    0.03 -> 0.001, decay 0.99, zero initial mean, population 64.
    """

    name = "openai-es"
    reference = "Salimans et al. 2017, Evolution Strategies as a Scalable Alternative to RL"

    def __init__(self, num_dims: int, popsize: int = 64, *, maximize: bool, seed: int = 0,
                 sigma: float = 0.03, sigma_decay: float = 0.99, sigma_min: float = 0.01,
                 lr: float = 0.03, lr_decay: float = 0.99, lr_min: float = 0.001,
                 beta1: float = 0.99, beta2: float = 0.999, adam_eps: float = 1e-8):
        super().__init__(num_dims, popsize, maximize=maximize, seed=seed)
        _positive(sigma=sigma, sigma_min=sigma_min, lr=lr, lr_min=lr_min)
        if popsize % 2:
            raise ValueError(f"openai-es samples antithetic pairs: popsize must be even, "
                             f"got {popsize}")
        self.sigma0, self.sigma_decay, self.sigma_min = sigma, sigma_decay, sigma_min
        self.lr0, self.lr_decay, self.lr_min = lr, lr_decay, lr_min
        self.beta1, self.beta2, self.adam_eps = beta1, beta2, adam_eps

    def settings(self) -> dict:
        return {**super().settings(), "sigma": self.sigma0, "sigma_decay": self.sigma_decay,
                "sigma_min": self.sigma_min, "lr": self.lr0, "lr_decay": self.lr_decay,
                "lr_min": self.lr_min, "beta1": self.beta1, "beta2": self.beta2,
                "adam_eps": self.adam_eps}

    def init(self, x0=None) -> OpenAIESState:
        mean = (torch.zeros(self.num_dims, dtype=torch.float32) if x0 is None
                else torch.as_tensor(x0, dtype=torch.float32).clone().reshape(self.num_dims))
        return OpenAIESState(
            generation=torch.tensor(0), mean=mean, adam_m=torch.zeros_like(mean),
            adam_v=torch.zeros_like(mean), sigma=torch.tensor(self.sigma0, dtype=torch.float64),
            lr=torch.tensor(self.lr0, dtype=torch.float64),
            key=rng.seed_keys([self.seed])[0],
        )

    def _noise(self, state) -> torch.Tensor:
        k = rng.fold(state.key.reshape(1), int(state.generation))
        return rng.normal(k, (self.popsize // 2, self.num_dims))[0]

    def ask(self, state):
        eps = self._noise(state)
        eps = torch.cat([eps, -eps])
        return state.mean + float(state.sigma) * eps, state

    def tell(self, state, candidates, fitness):
        fitness = self._check_fitness(candidates, fitness)
        if not self.maximize:
            fitness = -fitness
        shaped = centered_ranks(fitness).to(torch.float32)
        sigma = float(state.sigma)
        eps = (torch.as_tensor(candidates, dtype=torch.float32) - state.mean) / sigma
        grad = shaped @ eps / (self.popsize * sigma)  # ascent direction
        t = int(state.generation) + 1
        m = self.beta1 * state.adam_m + (1 - self.beta1) * grad
        v = self.beta2 * state.adam_v + (1 - self.beta2) * grad * grad
        m_hat = m / (1 - self.beta1**t)
        v_hat = v / (1 - self.beta2**t)
        mean = state.mean + float(state.lr) * m_hat / (v_hat.sqrt() + self.adam_eps)
        return OpenAIESState(
            generation=torch.tensor(t), mean=mean, adam_m=m, adam_v=v,
            sigma=torch.clamp(state.sigma * self.sigma_decay, min=self.sigma_min),
            lr=torch.clamp(state.lr * self.lr_decay, min=self.lr_min), key=state.key,
        )

    def mean(self, state):
        return state.mean

    def extras(self, state):
        return {"sigma": float(state.sigma), "lr": float(state.lr)}

    def load_state(self, d):
        return OpenAIESState(**{f.name: d[f.name] for f in dataclasses.fields(OpenAIESState)})


@dataclass
class CMAESState:
    generation: torch.Tensor  # int64 scalar
    es: object  # the live ``cma.CMAEvolutionStrategy``
    numpy_rng: tuple  # numpy's global RNG state, which ``cma`` samples from
    asked: torch.Tensor  # float64 [popsize, n]: the last asked points, exactly as cma drew
    blob: torch.Tensor | None = None  # uint8: ``es`` pickled when this state was made


class CMAES(Strategy):
    """CMA-ES (Hansen and Ostermeier 2001) through the ``cma`` package's ask/tell.

    Its whole state (the optimiser and numpy's global random state, which ``cma`` draws
    from) is kept in the state dataclass and pickled into tensors by ``state_dict``, so a
    resume is exact. A ``cma`` object restored from a pickle does not sample exactly as the
    live object it was pickled from (it keeps caches it does not pickle), so ``init`` and
    ``tell`` pass the optimiser through one pickle round trip and keep the bytes: a run
    that continues and a run that resumes from ``state_dict`` then draw the same points,
    and a checkpoint costs no second pickle. ``ask`` advances the optimiser object in
    place (a full covariance in 1,152 dimensions is expensive to copy); a state's ``blob``
    still describes it as it was when the state was made. ``sigma`` is
    the initial step size; ``options`` go to ``cma.CMAEvolutionStrategy`` (for example
    ``{"CMA_diagonal": True}`` for sep-CMA-ES in high dimension).
    """

    name = "cma-es"
    reference = "Hansen and Ostermeier 2001, Completely Derandomized Self-Adaptation in ES"

    def __init__(self, num_dims: int, popsize: int = 64, *, maximize: bool, seed: int = 0,
                 sigma: float = 0.03, options: dict | None = None):
        super().__init__(num_dims, popsize, maximize=maximize, seed=seed)
        _positive(sigma=sigma)
        try:
            import cma  # noqa: F401
        except ImportError as e:  # pragma: no cover - cma is a dependency
            raise ImportError("cma-es needs the `cma` package: pip install cma") from e
        self.sigma0 = sigma
        self.options = dict(options or {})

    def settings(self) -> dict:
        return {**super().settings(), "sigma": self.sigma0, "options": self.options}

    @staticmethod
    def _to_tensor(obj) -> torch.Tensor:
        return torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8).clone()

    @staticmethod
    def _from_tensor(t: torch.Tensor):
        return pickle.loads(t.numpy().tobytes())

    def init(self, x0=None) -> CMAESState:
        import cma

        x0 = (np.zeros(self.num_dims) if x0 is None
              else torch.as_tensor(x0, dtype=torch.float64).reshape(-1).numpy())
        # cma treats seed 0 as "seed from the clock": map every integer to a positive seed.
        opts = {"popsize": self.popsize, "seed": self.seed % (2**31 - 1) + 1, "verbose": -9,
                "verb_disp": 0, "verb_log": 0, "tolx": 0, "tolfun": 0, "tolfunhist": 0,
                "tolstagnation": 10**9, "maxiter": 10**9, **self.options}
        with _numpy_seed(self.seed % (2**32)):
            es = cma.CMAEvolutionStrategy(x0, self.sigma0, opts)
            blob = self._to_tensor(es)
            return CMAESState(torch.tensor(0), self._from_tensor(blob),
                              copy.deepcopy(np.random.get_state()),
                              torch.zeros(0, self.num_dims, dtype=torch.float64), blob)

    def ask(self, state):
        with _numpy_state(state.numpy_rng) as saved:
            asked = torch.as_tensor(np.asarray(state.es.ask()), dtype=torch.float64)
            new = CMAESState(state.generation, state.es, saved(), asked)
        return asked.to(torch.float32), new

    def tell(self, state, candidates, fitness):
        fitness = self._check_fitness(candidates, fitness)
        if state.asked.shape[0] != self.popsize:
            raise ValueError("cma-es: tell before ask; ask for candidates first")
        loss = (-fitness if self.maximize else fitness).tolist()
        # Tell cma the float64 points it drew (the float32 candidates are their rounding).
        with _numpy_state(state.numpy_rng) as saved:
            state.es.tell(list(state.asked.numpy()), loss)
            blob = self._to_tensor(state.es)
            return CMAESState(state.generation + 1, self._from_tensor(blob), saved(),
                              torch.zeros(0, self.num_dims, dtype=torch.float64), blob)

    def mean(self, state):
        return torch.as_tensor(state.es.mean, dtype=torch.float32)

    def extras(self, state):
        return {"sigma": float(state.es.sigma)}

    def state_dict(self, state) -> dict:
        blob = state.blob if state.blob is not None else self._to_tensor(state.es)
        return {"generation": state.generation, "blob": blob,
                "numpy_rng": self._to_tensor(state.numpy_rng), "asked": state.asked}

    def load_state(self, d):
        return CMAESState(d["generation"], self._from_tensor(d["blob"]),
                          self._from_tensor(d["numpy_rng"]), d["asked"], d["blob"])


class _numpy_seed:
    def __init__(self, seed):
        self.seed = seed

    def __enter__(self):
        self.saved = np.random.get_state()
        np.random.seed(self.seed)

    def __exit__(self, *exc):
        np.random.set_state(self.saved)


class _numpy_state:
    """Run a block with numpy's global RNG set to a saved state; yields a getter for the
    state at the end of the block; restores the caller's state afterwards."""

    def __init__(self, state):
        self.inner = state

    def __enter__(self):
        self.outer = np.random.get_state()
        np.random.set_state(self.inner)
        # A copy: the array in get_state's tuple must not change with the global generator.
        return lambda: copy.deepcopy(np.random.get_state())

    def __exit__(self, *exc):
        np.random.set_state(self.outer)


STRATEGIES: dict[str, type[Strategy]] = {"openai-es": OpenAIES, "cma-es": CMAES}


def make_strategy(name: str, num_dims: int, popsize: int = 64, *, maximize: bool,
                  seed: int = 0, **settings) -> Strategy:
    """A strategy by name (``openai-es``, ``cma-es``)."""
    if name not in STRATEGIES:
        import difflib

        close = difflib.get_close_matches(name, STRATEGIES, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(
            f"unknown evolution strategy {name!r}; choose one of {', '.join(STRATEGIES)}.{hint}"
        )
    return STRATEGIES[name](num_dims, popsize, maximize=maximize, seed=seed, **settings)


def save_state(strategy: Strategy, state) -> bytes:
    buf = io.BytesIO()
    torch.save(strategy.state_dict(state), buf)
    return buf.getvalue()
