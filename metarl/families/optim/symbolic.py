"""What symbolic distillation (:mod:`metarl.meta.symbolic`) needs from the optimiser family.

A formula ``f`` is fitted to a feed-forward learned optimiser's per-parameter update on
synthetic inputs (:mod:`metarl.families.optim.synthetic`: the distributions of Goldie et
al. 2025, "How Should We Meta-Learn Reinforcement Learning Algorithms?"), with no
environment:

- **inputs**: OPEN-FF's 19 features (:data:`OPEN_FF_INPUTS`: the names of
  :data:`~metarl.families.optim.features.OPEN_FEATURE_NAMES` with ``.`` written ``_``)
  and the noise sample ``eps ~ N(0, 1)`` of OPEN's stochastic term, 20 in all; or
  No-Features' 8 inputs (:data:`NO_FEATURES_INPUTS`). The formula reads the inputs of
  the teacher's member;
- **data**: a fixed sample of ``points`` synthetic parameters (:class:`SymbolicData`,
  4,096 by default) drawn from a generator seeded with the run's seed, the features
  computed by the inner loop's feature code with the sample as one tensor;
- **target**: the teacher's update ``u`` before mean-centring (its noise term acting on
  every sample, all of them counting as actor parameters), in units of
  :data:`~metarl.families.optim.synthetic.UNIT` (1e-3): ``y = u / 1e-3``;
- **operators and limits**: the paper's set for optimisers, ``+ - * / max min square neg
  tanh abs`` plus ``exp`` and ``relu`` (:data:`~metarl.expression.OPTIM_OPERATORS`), at
  most 60 nodes and depth 9;
- **no constraint**: an optimiser has no rule like a drift's "0 at ``r = 1``", so every
  finite candidate is valid and there is nothing to repair.

A formula becomes :class:`SymbolicOptimizer`: it computes the momenta and features of the
member it was distilled from, evaluates ``f`` (with ``eps * actor_mask`` as the noise
input: the noise acts on actor parameters only, as OPEN-FF's term does), takes
``u = 1e-3 * f``, mean-centres ``u`` over all of the agent's parameters as the learned
members do, and steps ``p <- p - u``. It runs in the inner loop's optimiser slot and in
:class:`metarl.LearnedOptimizer`.

Teachers: OPEN-FF and No-Features (network artifacts, or the names: their seed-0
initialisation) and formulas of this family. The recurrent OPEN is refused (its update
depends on a hidden state carried across steps), as are Adam and SGD (their step reads a
learning rate and, for Adam, moment estimates that are not among the inputs).
:class:`OptimSymbolic` is the object the family registers under
``FAMILY.methods["symbolic"]``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import numpy as np
import torch

from metarl.expression import OPTIM_OPERATORS, compile_tree
from metarl.families.optim.features import (
    NO_FEATURE_NAMES,
    NUM_NO_FEATURES,
    NUM_OPEN_FEATURES,
    OPEN_FEATURE_NAMES,
)
from metarl.families.optim.learned import STEP_MULT, FeatureOptimizer
from metarl.families.optim.synthetic import UNIT, features, sample, update

#: the inputs of a formula distilled from OPEN-FF: its 19 features, then the noise
OPEN_FF_INPUTS = tuple(n.replace(".", "_") for n in OPEN_FEATURE_NAMES) + ("eps",)
#: the inputs of a formula distilled from No-Features: its 8 inputs
NO_FEATURES_INPUTS = tuple(n.replace(".", "_") for n in NO_FEATURE_NAMES)
#: the member whose inputs a formula reads -> (the formula's inputs, the feature set)
READS = {"open-ff": (OPEN_FF_INPUTS, "open"), "no-features": (NO_FEATURES_INPUTS, "raw")}
#: symbolic distillation's limits for optimisers (the paper's)
MAX_SIZE, MAX_DEPTH = 60, 9
#: the largest sample ``points`` accepts (gplearn evaluates every program on every point)
MAX_POINTS = 10_000_000


def reads_of(rep: dict) -> str:
    """The member whose inputs a symbolic representation's formula reads: its ``reads``
    entry, else the one whose input names its ``inputs`` are (``ValueError`` otherwise)."""
    reads, inputs = rep.get("reads"), rep.get("inputs")
    if reads is None:
        by_inputs = {names: r for r, (names, _) in READS.items()}
        reads = by_inputs.get(tuple(inputs or ()))
        if reads is None:
            raise ValueError(
                f"a symbolic optimiser must say whose inputs its formula reads: inputs "
                f"{list(OPEN_FF_INPUTS)} (open-ff) or {list(NO_FEATURES_INPUTS)} "
                f"(no-features), e.g. symbolic_artifact(tree, ..., family='optim', "
                f"inputs=OPEN_FF_INPUTS); the artifact has inputs {inputs}")
    if reads not in READS:
        raise ValueError(f"a symbolic optimiser reads the inputs of one of "
                         f"{', '.join(READS)}, got {reads!r}")
    if inputs is not None and tuple(inputs) != READS[reads][0]:
        raise ValueError(f"a symbolic optimiser reading {reads}'s inputs has inputs "
                         f"{list(READS[reads][0])}, the artifact has {list(inputs)}")
    return reads


class SymbolicOptimizer(FeatureOptimizer):
    """An optimiser written as a formula over OPEN-FF's or No-Features' inputs.

    ``u = 1e-3 * f(features[, eps * actor_mask])``, mean-centred over all of the agent's
    parameters, ``p <- p - u``. ``f`` is an expression tree (:mod:`metarl.expression`,
    the optimiser operators: guarded division, ``exp`` clamped at 10). The features and
    momenta are those of the member named by ``reads`` (``open-ff``: the 19 features and
    the noise, read from per-layer activations for dormancy; ``no-features``: the 8 raw
    inputs, no noise). There are no meta-parameters and no learning rate.
    """

    name = "symbolic"

    def __init__(self, tree, reads: str = "open-ff"):
        super().__init__()
        reads = reads_of({"reads": reads})
        self.reads = reads
        self.tree = tree
        #: the formula's input names, in order
        self.inputs, self.feature_set = READS[reads]
        self.num_inputs = NUM_OPEN_FEATURES if reads == "open-ff" else NUM_NO_FEATURES
        self.reads_activations = reads == "open-ff"  # dormancy
        self.stochastic = reads == "open-ff"  # the eps input
        self.fn = compile_tree(tree, self.inputs, operators=OPTIM_OPERATORS)

    def formula_value(self, x: torch.Tensor, eps: torch.Tensor | None = None) -> torch.Tensor:
        """``f`` (in units of 1e-3) on features ``x [..., num_inputs]`` and, when the
        formula reads OPEN-FF's inputs, the noise input ``eps [...]``."""
        cols = list(x.unbind(-1))
        if self.stochastic:
            if eps is None:
                raise ValueError("this formula reads the noise input eps; pass eps")
            cols.append(eps.to(x.dtype))
        return self.fn(*cols)

    def step_update(self, p, x, state, actor_mask, noise):
        """``1e-3 * f(x, noise * actor_mask)`` (the noise acts on actor parameters only);
        ``x [P, F, n]`` is feature-major, so each of the formula's inputs is a row."""
        return STEP_MULT * self.formula_value(
            x.transpose(1, 2), noise * actor_mask if self.stochastic else None)

    def synthetic_update(self, x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """The update ``u [n]`` on synthetic features ``x [n, F]`` with noise ``eps [n]``
        (every sample counts as an actor parameter), before mean-centring."""
        return STEP_MULT * self.formula_value(x, eps)

    def formula(self) -> str:
        import sympy as sp

        from metarl.expression import to_sympy

        syms = {n: sp.Symbol(n) for n in self.inputs}
        return (f"u = 1e-3 * ({sp.N(to_sympy(self.tree, syms), 6)})   "
                f"[{self.reads}'s inputs; u mean-centred, p <- p - u]")

    def source(self) -> str:
        from metarl.expression import guard_source, to_source

        body = to_source(self.tree, self.inputs)
        names = self.inputs[:-1] if self.stochastic else self.inputs
        lines = ["import torch", "", *guard_source(body)]
        args = "x, eps" if self.stochastic else "x"
        lines += ["", f"def update({args}):",
                  f'    """u before mean-centring; x [..., {len(names)}]: {self.reads}\'s '
                  f'inputs (metarl.families.optim.features)',
                  *(["    eps: N(0, 1) noise times the actor mask"] if self.stochastic else []),
                  '    """',
                  f"    {', '.join(names)} = x.unbind(-1)",
                  f"    return 1e-3 * {body}", ""]
        return "\n".join(lines)


def symbolic_member(rep: dict) -> SymbolicOptimizer:
    """The member of a ``symbolic`` artifact of the optimiser family (the family's builder):
    whose inputs it reads (:func:`reads_of`), then its tree, checked against the optimiser
    operators."""
    from metarl.expression import check_tree

    reads = reads_of(rep)
    check_tree(rep.get("tree"), READS[reads][0], OPTIM_OPERATORS)
    return SymbolicOptimizer(rep["tree"], reads)


@dataclass
class SymbolicData:
    """The optimiser family's data for symbolic distillation: ``points`` synthetic
    parameters (:func:`~metarl.families.optim.synthetic.sample`), drawn once from a
    generator seeded with the run's seed."""

    points: int = 4096

    def check(self) -> None:
        v = self.points
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= MAX_POINTS:
            raise ValueError(f"symbolic data option points must be an integer in "
                             f"[1, {MAX_POINTS:,}], got {v!r} (options: "
                             f"{', '.join(asdict(self))})")


@dataclass(frozen=True)
class OptimSymbolic:
    """Symbolic distillation of a feed-forward learned optimiser (OPEN-FF, No-Features,
    or a formula) into a :class:`SymbolicOptimizer`.

    Attributes (read by :mod:`metarl.meta.symbolic`):

    - ``family``: ``"optim"``;
    - ``reads``: the member whose inputs the formula reads (``open-ff`` or
      ``no-features``), set from the teacher by :meth:`for_teacher`; ``inputs``: their
      names, in the order of the data's columns;
    - ``operators``, ``max_size``, ``max_depth``: the paper's operators for optimisers
      (the drift set plus ``exp`` and ``relu``), 60 nodes, depth 9;
    - ``violation_name`` None: the family has no constraint (every finite candidate is
      valid; ``repair`` None: nothing to repair); ``report_names`` empty; ``tolerance``,
      ``constraint_*`` unused.
    """

    family: str = "optim"
    reads: str = "open-ff"
    operators: tuple[str, ...] = OPTIM_OPERATORS
    max_size: int = MAX_SIZE
    max_depth: int = MAX_DEPTH
    violation_name: str | None = None
    report_names: tuple[str, ...] = ()
    tolerance: float = 0.0
    constraint_text: str | None = None
    constraint_plural: str | None = None
    constraint_note: str = ""
    repair = None

    @property
    def inputs(self) -> tuple[str, ...]:
        return READS[self.reads][0]

    # -- the teacher -----------------------------------------------------------------------

    def check_teacher(self, artifact, name: str) -> None:
        """Accept OPEN-FF, No-Features and formulas of this family; refuse the recurrent
        OPEN, the handcrafted Adam and SGD, and proposed code with the reason
        (``ValueError``)."""
        if artifact.kind == "code":  # building it would start its sandbox
            raise ValueError(
                f"symbolic distillation cannot take {name!r} as a teacher: it is proposed "
                f"code, whose update reads raw inputs (p, g, the momenta) and a learning "
                f"rate through its own signature, not the features of OPEN-FF or "
                f"No-Features, and runs only in a sandbox; teachers are open-ff, "
                f"no-features, their artifacts and formulas of the optim family.")
        member, _ = artifact.build()
        what = f"{name!r} ({member.name})"
        if getattr(member, "recurrent", False):
            raise ValueError(
                f"symbolic distillation cannot take {what} as a teacher: the recurrent "
                f"OPEN's update depends on a hidden state (its GRU) carried across "
                f"steps, which a formula of the current step's inputs cannot express. "
                f"Distil it into a network with `metarl distill` instead, or take an "
                f"OPEN-FF or No-Features teacher.")
        if not isinstance(member, FeatureOptimizer):
            raise ValueError(
                f"symbolic distillation cannot take {what} as a teacher: it is a "
                f"handcrafted optimiser whose step reads what the formulas' inputs (OPEN-FF's "
                f"19 features and the noise, or No-Features' 8 inputs) do not hold: a "
                f"learning rate (per environment, annealed) and, for Adam, its own "
                f"bias-corrected moment estimates. Its formula is already known "
                f"(metarl/families/optim/handcrafted.py); teachers are open-ff, "
                f"no-features, their artifacts and formulas of the optim family.")

    def for_teacher(self, artifact) -> OptimSymbolic:
        """This object with ``reads`` set to the teacher's inputs (OPEN-FF's or
        No-Features'; a formula teacher's own)."""
        member, _ = artifact.build()
        reads = member.reads if isinstance(member, SymbolicOptimizer) else (
            "no-features" if member.feature_set == "raw" else "open-ff")
        return replace(self, reads=reads)

    # -- the data --------------------------------------------------------------------------

    def default_data(self) -> SymbolicData:
        """The data options when none are given: 4,096 synthetic points."""
        return SymbolicData()

    def check_data(self, options: SymbolicData) -> None:
        """Refuse bad data options (``ValueError``)."""
        if not isinstance(options, SymbolicData):
            raise ValueError(f"the optim family's symbolic data is a SymbolicData "
                             f"(points), got {type(options).__name__}")
        options.check()

    def data(self, artifact, options: SymbolicData, seed: int = 0
             ) -> tuple[np.ndarray, np.ndarray]:
        """``(X [N, len(inputs)], y [N])``, float64 numpy, on ``options.points`` synthetic
        parameters drawn from a generator seeded with ``seed``: :meth:`sample_data`."""
        return self.sample_data(artifact, options.points, torch.Generator().manual_seed(seed))

    def sample_data(self, artifact, n: int, generator: torch.Generator
                    ) -> tuple[np.ndarray, np.ndarray]:
        """``(X, y)`` on ``n`` points of ``generator``: ``X``'s columns are ``inputs`` (the
        features of :func:`~metarl.families.optim.synthetic.features`, then ``eps`` for
        OPEN-FF's inputs), ``y`` the teacher's update before mean-centring in units of
        1e-3, computed in float64 from the float32 features."""
        member, params = artifact.build()
        if member.num_meta_params:
            member.load_flat(params)
        member = member.eval().requires_grad_(False)
        raw = sample(n, generator)
        x = features(member, raw)
        with torch.no_grad():
            if isinstance(member, SymbolicOptimizer):
                u = member.synthetic_update(x.double(), raw["eps"].double())
            else:
                u = update(member.double(), x.double(), raw["eps"].double())
        columns = [x.double()]
        if self.reads == "open-ff":
            columns.append(raw["eps"].double().unsqueeze(1))
        return torch.cat(columns, 1).numpy(), (u / UNIT).numpy()

    # -- candidates ------------------------------------------------------------------------

    def output(self, fn, X: torch.Tensor) -> torch.Tensor:
        """What the artifact computes from a compiled formula on the data ``X [N, d]``:
        ``f`` itself, the update in units of 1e-3 (before mean-centring) ``[N]``."""
        return fn(*X.unbind(1))

    def constraint(self, fn, X: torch.Tensor) -> tuple[float, dict[str, float]]:
        """No constraint: ``(0.0, {})``."""
        return 0.0, {}

    # -- the result ------------------------------------------------------------------------

    def member(self, tree) -> SymbolicOptimizer:
        """The family member a formula becomes: ``SymbolicOptimizer(tree, reads)``."""
        return SymbolicOptimizer(tree, self.reads)

    def artifact(self, tree, provenance: dict, name: str):
        """The ``symbolic`` artifact of a formula: ``inputs`` and ``reads`` record whose
        inputs it reads (the tree is checked before it is kept)."""
        from metarl.artifact import symbolic_artifact

        art = symbolic_artifact(tree, provenance, name=name, family=self.family,
                                inputs=self.inputs)
        art.representation["reads"] = self.reads
        return art


__all__ = ["OptimSymbolic", "SymbolicOptimizer", "SymbolicData", "OPEN_FF_INPUTS",
           "NO_FEATURES_INPUTS", "READS", "symbolic_member", "reads_of"]
