"""Per-client λ of pFedACnnL's output layer, chosen by exact leave-one-out on the client's data.

pFedACnnL (Gu et al., "Analytic Personalized Federated Meta-Learning", arXiv 2502.06915) gives
client ``k`` the output layer

    ``W_k(λ) = (G_k + λI)⁻¹(B_k + λW) = W + (G_k + λI)⁻¹(B_k − G_k W)``,

the minimizer of ``||T_k − A_k W_k||² + λ||W_k − W||²`` (``A_k``: the client's design rows
``[h(x), 1]``, n x D; ``T_k``: one-hot labels; ``G_k = A_kᵀA_k``, ``B_k = A_kᵀT_k``; ``W``: the
global layer). The paper uses one λ for every client. One constant over-fits clients whose data
look like everybody's (their personalized model scores below the global one) and under-fits the
skewed ones. **Our addition** (not in the paper): each client picks its own ``ρ`` from a grid
(``λ = ρ·trace(G)/D`` for the relative rule, a diagonal ``ρ·n·σ_j²`` for the standardized one,
:class:`~flwr_analytic.analytic.solvers.Regularization`) plus ``ρ = ∞`` (keep ``W``):

1. **Score.** For every grid ``ρ``, each of the client's samples is predicted by the personalized
   layer fitted without it — exact leave-one-out in closed form, one eigendecomposition for the
   whole grid (:class:`~flwr_analytic.analytic.leave_one_out.LeaveOneOut`); ``ρ = ∞`` predicts
   with ``W``. ``correct[ρ]``: the number of right ``argmax`` predictions.

   ``W`` was fitted with these very samples, so its predictions on them are optimistic: a wide
   head memorizes (CIFAR-10, D = 9,601 over 12k samples: 98.50% right on its training samples,
   72.88% on held-out ones), and uncorrected the choice drifts to ``ρ = ∞`` and very large ``ρ``.
   The server therefore sends one number, the global layer's mean leverage ``h̄ = df/N``
   (:func:`global_leverage`; ``df`` its effective degrees of freedom), and every left-out
   residual is divided by ``1 − h̄`` as well (generalized cross-validation's stand-in for the
   global hat matrix's diagonal, Craven & Wahba 1979). Measured there
   (``benchmarks/auto_lambda_cifar.py``): the clients' exact mean leverages 0.335–0.358 against
   ``h̄`` = 0.348; auto λ 79.89% uncorrected, 85.29% corrected, best fixed ρ 85.66%. (Validating
   against the leave-client-out layer ``W_{−k}``, solved by the server without client ``k``'s
   statistics, gave 85.86%, but needs every client's statistics at the server — not under SecAgg
   or streaming aggregation — and one solve per client: not built.)
2. **Choose.** If ``W`` is among the best, keep it. Otherwise take the middle of the best plateau:
   the median (in grid order) of the ``ρ`` with the most correct — away from both of its edges,
   where one sample more or less would change the count.
3. **Only when measurably better.** Personalize only if the paired gain over ``W`` is
   significant at ``z`` standard errors: with ``b`` samples only ``ρ*`` gets right and ``c`` only
   ``W`` does, the exact one-sided McNemar (sign) test ``P(X ≥ b), X ~ Binomial(b + c, ½)``
   must fall below ``Φ(−z)`` (``z = 1``: 0.159, the one-standard-error rule of Breiman et al.
   1984; exact, because the discordant counts are often a handful: ``(2, 0)`` is not
   significant). ``z = 0`` skips the test. Clients whose data look like everybody's keep ``W``.
4. The client's layer is ``W_k(ρ*)`` on its full ``(G_k, B_k)``.

Everything is the client's own data, the ``W`` it received and ``h̄`` (one float in the evaluation
message); no random folds (the choice does not depend on the order of the rows). The hidden
layers were also fitted with the client's samples; that is not corrected. The rule (the fine
grid, the plateau median, ``z = 1``, the ``h̄`` correction) was chosen on a development split
(each client's training data cut 80/20, the global model refitted on the 80%), never on test
data: ``benchmarks/auto_lambda.py --split dev`` reports it.

Cost: ``min(n, D)³`` for the eigendecomposition plus ``n·D·min(n, D)``, then ``O(n·min(n, D)·m)``
per grid value (D = 1,601, n = 2,800: about a second on 2 cores).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy.stats import binomtest, norm

from flwr_analytic.analytic.leave_one_out import LOO_RULES, LeaveOneOut
from flwr_analytic.analytic.solvers import Regularization, effective_dof, personalized_solve
from flwr_analytic.analytic.statistics import LayerStatistics
from flwr_analytic.analytic.targets import one_hot

#: Relative ``ρ`` values tried: quarter decades from 1e-4 to 1e3; ``ρ = ∞`` is always tried.
DEFAULT_GRID: tuple[float, ...] = tuple(10 ** (k / 4) for k in range(-16, 13))
#: ``ρ = ∞``: the client keeps the global output layer.
GLOBAL = math.inf
#: Significance (in standard errors, one-sided level ``Φ(−z)``) of the personalized layer's
#: left-out gain over ``W`` required to personalize.
DEFAULT_Z = 1.0


@dataclass(frozen=True, eq=False)
class LambdaChoice:
    """A client's chosen pFedACnnL ``ρ`` and the validation it came from.

    Attributes
    ----------
    rho : float
        The chosen ``ρ`` (``math.inf``: the global model is kept).
    weights : numpy.ndarray
        The client's output layer ``W_k(ρ)`` (D x m) on its full statistics (``W`` when ``ρ = ∞``).
    correct : dict of float to int
        Left-out correct predictions per grid value and ``∞`` (empty when the client had too few
        samples to validate).
    heldout : int
        Samples scored per grid value (``0`` when not validated).
    rule : str
        The λ rule ``ρ`` belongs to (``relative`` or ``standardized``).
    gain : tuple of int
        ``(b, c)``: left-out samples only the best ``ρ`` / only ``W`` got right (``(0, 0)`` when
        ``W`` was among the best or not validated).

    """

    rho: float
    weights: np.ndarray = field(repr=False)
    correct: dict[float, int] = field(default_factory=dict)
    heldout: int = 0
    rule: str = "relative"
    gain: tuple[int, int] = (0, 0)

    @property
    def keeps_global(self) -> bool:
        """Whether the client keeps the global output layer (``ρ = ∞``)."""
        return math.isinf(self.rho)

    @property
    def regularization(self) -> Regularization | None:
        """The chosen λ rule, ``None`` for the global model."""
        return None if self.keeps_global else Regularization(self.rho, self.rule)


@dataclass(frozen=True)
class AutoLambda:
    """How a client picks its output layer's λ: the grid, the λ rule and the significance ``z``.

    Attributes
    ----------
    grid : tuple of float
        ``ρ`` values (> 0, finite); ``∞`` is always added.
    rule : {"relative", "standardized"}
        How ``ρ`` becomes the penalty (the run's ``lam-rule``; ``absolute`` runs use ``relative``).
    z : float
        Personalize only when the left-out gain over ``W`` is significant at one-sided level
        ``Φ(−z)`` (exact McNemar test; >= 0, ``0``: no test).

    """

    grid: tuple[float, ...] = DEFAULT_GRID
    rule: str = "relative"
    z: float = DEFAULT_Z

    def __post_init__(self) -> None:
        check_grid(self.grid)
        if self.rule not in LOO_RULES:
            raise ValueError(f"auto λ rule must be one of {LOO_RULES}, got {self.rule!r}")
        if isinstance(self.z, bool) or not isinstance(self.z, int | float) or not self.z >= 0:
            raise ValueError(f"z must be a number >= 0, got {self.z!r}")

    def select(
        self,
        features: np.ndarray,
        labels: np.ndarray,
        w_global: np.ndarray,
        *,
        gram: np.ndarray | None = None,
        cross: np.ndarray | None = None,
        leverage: float = 0.0,
    ) -> LambdaChoice:
        """:func:`select_lambda` with this policy's grid, rule and ``z``."""
        return select_lambda(
            features,
            labels,
            w_global,
            self.grid,
            self.rule,
            self.z,
            gram=gram,
            cross=cross,
            leverage=leverage,
        )


def check_grid(grid: Sequence[float]) -> tuple[float, ...]:
    """``grid`` sorted ascending, after checking it is non-empty, finite, > 0 and duplicate-free."""
    values = tuple(sorted(float(v) for v in grid))
    if not values or any(not math.isfinite(v) or v <= 0 for v in values):
        raise ValueError(f"the λ grid must hold finite values > 0 (∞ is always tried), got {grid}")
    if len(set(values)) != len(values):
        raise ValueError(f"the λ grid has duplicates: {grid}")
    return values


def global_leverage(total: LayerStatistics, reg: Regularization, bias: bool = True) -> float:
    """The global output layer's mean leverage ``h̄ = df/N`` (server side, from the summed statistics).

    ``df = trace((G + Γ)⁻¹G)`` (:func:`~flwr_analytic.analytic.solvers.effective_dof`) of the
    layer solved from ``total`` with ``reg`` (``bias=False``: without the ones column); ``N`` the
    summed count. ``D³/3`` flops, once per run; ``0`` without samples.
    """
    if total.count <= 0:
        return 0.0
    gram = total.gram if bias else total.gram[:-1, :-1]
    return min(max(effective_dof(gram, reg) / float(total.count), 0.0), 1.0 - 1e-9)


def choose_rho(
    grid: Sequence[float], right: np.ndarray, right_global: np.ndarray, z: float = DEFAULT_Z
) -> tuple[float, tuple[int, int]]:
    """Steps 2–3 of the module docstring: ``ρ*`` from left-out correctness.

    Parameters
    ----------
    grid : sequence of float
        The ``ρ`` values, ascending.
    right : numpy.ndarray
        ``right[j, i]``: sample ``i`` predicted right at ``grid[j]`` (bool, |grid| x n).
    right_global : numpy.ndarray
        Sample ``i`` predicted right by ``W`` (bool, n).
    z : float
        Significance of the paired gain required to leave ``W``: the exact one-sided McNemar
        p-value must be below ``Φ(−z)``; ``0``: no test.

    Returns
    -------
    (rho, (b, c))
        ``ρ*`` (``∞``: keep ``W``) and the discordant counts of the plateau median against ``W``.

    """
    counts = right.sum(axis=1)
    best = int(counts.max())
    if int(right_global.sum()) >= best:
        return GLOBAL, (0, 0)
    tied = np.flatnonzero(counts == best)
    j = int(tied[(len(tied) - 1) // 2])  # the middle of the best plateau
    b = int(np.sum(right[j] & ~right_global))
    c = int(np.sum(~right[j] & right_global))
    if z > 0 and binomtest(b, b + c, 0.5, alternative="greater").pvalue >= norm.sf(z):
        return GLOBAL, (b, c)
    return float(grid[j]), (b, c)


def select_lambda(
    features: np.ndarray,
    labels: np.ndarray,
    w_global: np.ndarray,
    grid: Sequence[float] = DEFAULT_GRID,
    rule: str = "relative",
    z: float = DEFAULT_Z,
    *,
    gram: np.ndarray | None = None,
    cross: np.ndarray | None = None,
    leverage: float = 0.0,
) -> LambdaChoice:
    """Choose a client's pFedACnnL ``ρ`` by exact leave-one-out (see the module docstring).

    Parameters
    ----------
    features : numpy.ndarray
        ``A_k`` (n x D): the output layer's design rows (the ``standardized`` rule needs the bias
        column, all ones, last).
    labels : numpy.ndarray
        Integer labels (n,) in ``0..m−1``.
    w_global : numpy.ndarray
        The global output layer ``W`` (D x m).
    grid : sequence of float
        ``ρ`` values (> 0, finite); ``∞`` is always tried.
    rule : {"relative", "standardized"}
        The λ rule of ``ρ``.
    z : float
        Significance of the left-out gain required to leave ``W`` (>= 0, see :func:`choose_rho`).
    gram, cross : numpy.ndarray, optional
        The client's full ``G_k``, ``B_k`` for the final solve (e.g. the statistics it sent, so the
        result equals :func:`~flwr_analytic.analytic.training.personalize` at ``ρ*``); default
        ``AᵀA``, ``AᵀT``.
    leverage : float
        The global layer's mean leverage ``h̄ ∈ [0, 1)`` (:func:`global_leverage`); ``0``: ``W``
        is treated as if fitted without the client's samples.

    Returns
    -------
    LambdaChoice
        ``ρ*``, ``W_k(ρ*)`` and the left-out correct count of every candidate. A client with
        fewer than two samples keeps ``W`` unvalidated.

    """
    policy = AutoLambda(check_grid(grid), rule, z)  # checks grid, rule and z
    a = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    w = np.asarray(w_global, dtype=np.float64)
    if a.ndim != 2 or w.ndim != 2 or a.shape[1] != w.shape[0] or y.shape != (a.shape[0],):
        raise ValueError(
            f"features (n x D), labels (n,) and w_global (D x m) disagree: {a.shape}, {y.shape}, "
            f"{w.shape}"
        )
    if rule == "standardized" and len(a) and not np.all(a[:, -1] == 1.0):
        raise ValueError("the standardized rule needs the bias column (all ones) last in features")
    if isinstance(leverage, bool) or not 0.0 <= float(leverage) < 1.0:
        raise ValueError(f"leverage must be in [0, 1), got {leverage!r}")
    if len(y) < 2:
        return LambdaChoice(GLOBAL, w.copy(), rule=rule)
    t = one_hot(y, w.shape[1])
    loo = LeaveOneOut(a, t, w, rule)
    right = np.stack([p.argmax(axis=1) == y for p in loo.path(policy.grid, leverage)])
    right_global = (t - (t - a @ w) / (1.0 - leverage)).argmax(axis=1) == y
    rho, gain = choose_rho(policy.grid, right, right_global, z)
    correct = {**dict(zip(policy.grid, map(int, right.sum(axis=1)), strict=True))}
    correct[GLOBAL] = int(right_global.sum())
    if math.isinf(rho):
        return LambdaChoice(GLOBAL, w.copy(), correct, len(y), rule, gain)
    gram = a.T @ a if gram is None else np.asarray(gram, dtype=np.float64)
    cross = a.T @ t if cross is None else np.asarray(cross, dtype=np.float64)
    weights = personalized_solve(gram, cross, w, Regularization(rho, rule))
    return LambdaChoice(rho, weights, correct, len(y), rule, gain)


__all__ = [
    "DEFAULT_GRID",
    "DEFAULT_Z",
    "GLOBAL",
    "AutoLambda",
    "LambdaChoice",
    "check_grid",
    "choose_rho",
    "global_leverage",
    "select_lambda",
]
