"""Per-client λ of pFedACnnL's output layer, chosen by K-fold cross-validation on the client's data.

pFedACnnL (Gu et al., "Analytic Personalized Federated Meta-Learning", arXiv 2502.06915) gives
client ``k`` the output layer

    ``W_k(λ) = (G_k + λI)⁻¹(B_k + λW) = W + (G_k + λI)⁻¹(B_k − G_k W)``,

the minimizer of ``||T_k − A_k W_k||² + λ||W_k − W||²`` (``A_k``: the client's design rows
``[h(x), 1]``, n x D; ``T_k``: one-hot labels; ``G_k = A_kᵀA_k``, ``B_k = A_kᵀT_k``; ``W``: the
global layer). The paper uses one λ for every client. One constant over-fits clients whose data
look like everybody's (their personalized model scores below the global one) and under-fits the
skewed ones. **Our addition** (not in the paper): each client picks its own λ from a grid of
relative values ``ρ`` (``λ = ρ·trace(G)/D``, :class:`~flwr_analytic.analytic.solvers.Regularization`)
plus ``ρ = ∞`` (keep ``W``), by K-fold cross-validation on its own training data:

* the samples, put in an order that depends on their values only (:func:`canonical_order`: the
  same folds whatever order the client's data loader gave), are assigned to ``K`` folds by a
  seeded permutation;
* for fold ``f`` and each ``ρ``: ``W_{-f}(ρ) = personalized_solve(G − G_f, B − B_f, W, ρ)`` (``ρ``
  relative to ``trace(G − G_f)``), scored by the number of correct ``argmax`` predictions of
  ``A_f W_{-f}(ρ)`` on fold ``f``'s labels; ``ρ = ∞`` scores ``A_f W``;
* the ``ρ`` with the most held-out correct predictions over all folds wins; ties go to the larger
  ``ρ`` (``∞`` largest: the global model unless personalizing is measurably better);
* the client's model is ``W_k(ρ*)`` on its full ``(G_k, B_k)`` (``W`` when ``ρ* = ∞``).

Everything is the client's own data and the ``W`` it received: no extra communication. The global
``W`` (and the hidden layers below) were fitted with the client's held-out rows included (a 1/K
share of its data inside the global sum), which favours ``ρ = ∞`` slightly: a conservative bias.
A client with fewer samples than folds keeps ``W``.

Cost. Primal form: one ``G_f`` per fold (``n_f D²``) and one Cholesky of ``G − G_f + λI`` per fold and
grid value, ``K·|grid|·D³/3`` flops (30 factorizations at the default grid and ``K = 5``; D = 1,601
takes a few seconds on 2 cores, D = 6,401 minutes). When the fold-training part has fewer rows
``n' = n − n_f`` than ``D`` (wide heads, small clients) the dual form is used, exact by the
push-through identity ``(A'ᵀA' + λI)⁻¹A'ᵀ = A'ᵀ(A'A'ᵀ + λI)⁻¹``:

    ``A_f W_{-f} = A_f W + (A_f A'ᵀ)(K' + λI)⁻¹(T' − A'W)``,  ``K' = A'A'ᵀ``  (n' x n'),

one Gram ``K = AAᵀ`` (``n² D``) and Cholesky factorizations of ``n' x n'`` matrices
(``trace(K') = trace(G')``, so ``λ`` is the same). The cheaper form by flop count is used. Memory:
the design rows ``A`` (n x D, float64) plus one ``D x D`` (or ``n x n``) Gram.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from flwr_analytic.analytic.solvers import Regularization, personalized_solve, ridge_solve
from flwr_analytic.analytic.targets import one_hot

#: Relative ``ρ`` values tried (``λ = ρ·trace(G)/D``); ``ρ = ∞`` (the global model) is always tried.
DEFAULT_GRID: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)
#: ``ρ = ∞``: the client keeps the global output layer.
GLOBAL = math.inf
#: How held-out predictions are computed: ``auto`` (cheaper by flop count), ``primal``, ``dual``.
SOLVERS = ("auto", "primal", "dual")


@dataclass(frozen=True, eq=False)
class LambdaChoice:
    """A client's chosen pFedACnnL ``ρ`` and the validation it came from.

    Attributes
    ----------
    rho : float
        The chosen relative λ (``λ = ρ·trace(G_k)/D``); ``math.inf``: the global model is kept.
    weights : numpy.ndarray
        The client's output layer ``W_k(ρ)`` (D x m) on its full statistics (``W`` when ``ρ = ∞``).
    correct : dict of float to int
        Held-out correct predictions summed over the folds, per grid value and ``∞`` (empty when
        the client had too few samples to validate).
    heldout : int
        Samples scored per grid value (every sample once; ``0`` when not validated).

    """

    rho: float
    weights: np.ndarray = field(repr=False)
    correct: dict[float, int] = field(default_factory=dict)
    heldout: int = 0

    @property
    def keeps_global(self) -> bool:
        """Whether the client keeps the global output layer (``ρ = ∞``)."""
        return math.isinf(self.rho)

    @property
    def regularization(self) -> Regularization | None:
        """The chosen λ rule (relative), ``None`` for the global model."""
        return None if self.keeps_global else Regularization(self.rho)


@dataclass(frozen=True)
class AutoLambda:
    """How a client picks its output layer's λ: the grid, the number of folds and the fold seed.

    Attributes
    ----------
    grid : tuple of float
        Relative ``ρ`` values (> 0, finite); ``∞`` is always added.
    folds : int
        ``K`` of the K-fold cross-validation (>= 2).
    seed : int
        Seed of the assignment of samples to folds.

    """

    grid: tuple[float, ...] = DEFAULT_GRID
    folds: int = 5
    seed: int = 0

    def __post_init__(self) -> None:
        check_grid(self.grid)
        if isinstance(self.folds, bool) or not isinstance(self.folds, int) or self.folds < 2:
            raise ValueError(f"folds must be an integer >= 2, got {self.folds!r}")

    def select(
        self,
        features: np.ndarray,
        labels: np.ndarray,
        w_global: np.ndarray,
        *,
        gram: np.ndarray | None = None,
        cross: np.ndarray | None = None,
    ) -> LambdaChoice:
        """:func:`select_lambda` with this policy's grid, folds and seed."""
        return select_lambda(
            features, labels, w_global, self.grid, self.folds, self.seed, gram=gram, cross=cross
        )


def check_grid(grid: Sequence[float]) -> tuple[float, ...]:
    """``grid`` sorted ascending, after checking it is non-empty, finite, > 0 and duplicate-free."""
    values = tuple(sorted(float(v) for v in grid))
    if not values or any(not math.isfinite(v) or v <= 0 for v in values):
        raise ValueError(f"the λ grid must hold finite values > 0 (∞ is always tried), got {grid}")
    if len(set(values)) != len(values):
        raise ValueError(f"the λ grid has duplicates: {grid}")
    return values


def fold_assignment(n: int, folds: int, seed: int) -> np.ndarray:
    """Fold of each of ``n`` samples: ``fold[perm[i]] = i mod K`` for a seeded permutation ``perm``.

    Fold sizes differ by at most one.
    """
    order = np.random.default_rng(seed).permutation(n)
    fold = np.empty(n, dtype=np.int64)
    fold[order] = np.arange(n) % folds
    return fold


def canonical_order(features: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """A row order that depends on the rows' values only, not on the order they came in.

    Rows sorted by label, then by their projection on a fixed pseudo-random direction (seed
    ``0x5EED``): the folds of :func:`select_lambda` then do not depend on how the client's data
    loader ordered its samples (a shuffled ``DataLoader`` gives the same choice in every run).
    """
    direction = np.random.default_rng(0x5EED).standard_normal(features.shape[1])
    return np.lexsort((features @ direction, labels))


def select_lambda(
    features: np.ndarray,
    labels: np.ndarray,
    w_global: np.ndarray,
    grid: Sequence[float] = DEFAULT_GRID,
    folds: int = 5,
    seed: int = 0,
    *,
    gram: np.ndarray | None = None,
    cross: np.ndarray | None = None,
    solver: str = "auto",
) -> LambdaChoice:
    """Choose a client's pFedACnnL ``ρ`` by K-fold cross-validation (see the module docstring).

    Parameters
    ----------
    features : numpy.ndarray
        ``A_k`` (n x D): the output layer's design rows, bias column included.
    labels : numpy.ndarray
        Integer labels (n,) in ``0..m−1``.
    w_global : numpy.ndarray
        The global output layer ``W`` (D x m).
    grid : sequence of float
        Relative ``ρ`` values (> 0, finite); ``∞`` is always tried.
    folds : int
        ``K`` (>= 2). With fewer samples than folds the global model is kept unvalidated.
    seed : int
        Seed of the fold assignment.
    gram, cross : numpy.ndarray, optional
        The client's full ``G_k``, ``B_k`` for the final solve (e.g. the statistics it sent, so the
        result equals :func:`~flwr_analytic.analytic.training.personalize` at ``ρ*``); default
        ``AᵀA``, ``AᵀT``.
    solver : {"auto", "primal", "dual"}
        How held-out predictions are computed (equal up to rounding); ``auto``: fewer flops.

    Returns
    -------
    LambdaChoice
        ``ρ*``, ``W_k(ρ*)`` and the held-out correct count of every candidate.

    """
    a = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    w = np.asarray(w_global, dtype=np.float64)
    values = check_grid(grid)
    if isinstance(folds, bool) or not isinstance(folds, int | np.integer) or folds < 2:
        raise ValueError(f"folds must be an integer >= 2, got {folds!r}")
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    if a.ndim != 2 or w.ndim != 2 or a.shape[1] != w.shape[0] or y.shape != (a.shape[0],):
        raise ValueError(
            f"features (n x D), labels (n,) and w_global (D x m) disagree: {a.shape}, {y.shape}, "
            f"{w.shape}"
        )
    n, dim = a.shape
    if n < folds:
        return LambdaChoice(GLOBAL, w.copy())
    order = canonical_order(a, y)  # folds independent of the order the rows arrived in
    given = a, y  # the full G_k, B_k below: summed in the given order, as the client's statistics
    a, y = a[order], y[order]
    t = one_hot(y, w.shape[1])
    fold = fold_assignment(n, folds, seed)
    n_fit = n - int(np.bincount(fold, minlength=folds).min())
    if solver == "auto":
        primal = n * dim * dim + folds * len(values) * dim**3 / 3
        dual = n * n * dim + folds * len(values) * n_fit**3 / 3
        solver = "dual" if dual < primal else "primal"
    scores = (_dual_correct if solver == "dual" else _primal_correct)(a, t, y, w, fold, values)
    base = a @ w
    correct = {**dict(zip(values, scores, strict=True)), GLOBAL: _count(base, y)}
    # most held-out correct; ties to the larger ρ (∞ last in the order, so it wins ties)
    rho = max(reversed(list(correct)), key=lambda r: correct[r])
    if math.isinf(rho):
        return LambdaChoice(GLOBAL, w.copy(), correct, n)
    a, y = given
    gram = a.T @ a if gram is None else np.asarray(gram, dtype=np.float64)
    cross = a.T @ one_hot(y, w.shape[1]) if cross is None else np.asarray(cross, dtype=np.float64)
    weights = personalized_solve(gram, cross, w, Regularization(rho))
    return LambdaChoice(rho, weights, correct, n)


def _count(scores: np.ndarray, y: np.ndarray) -> int:
    """Correct ``argmax`` predictions."""
    return int(np.sum(scores.argmax(axis=1) == y))


def _primal_correct(
    a: np.ndarray,
    t: np.ndarray,
    y: np.ndarray,
    w: np.ndarray,
    fold: np.ndarray,
    grid: tuple[float, ...],
) -> list[int]:
    """Held-out correct per ``ρ``: ``A_f W_{-f}(ρ)``, ``W_{-f}`` solved on ``(G − G_f, B − B_f)``."""
    gram, cross = a.T @ a, a.T @ t
    correct = [0] * len(grid)
    for f in range(int(fold.max()) + 1):
        rows = fold == f
        a_f = a[rows]
        g_fit, b_fit = gram - a_f.T @ a_f, cross - a_f.T @ t[rows]
        for i, rho in enumerate(grid):
            w_fit = personalized_solve(g_fit, b_fit, w, Regularization(rho))
            correct[i] += _count(a_f @ w_fit, y[rows])
    return correct


def _dual_correct(
    a: np.ndarray,
    t: np.ndarray,
    y: np.ndarray,
    w: np.ndarray,
    fold: np.ndarray,
    grid: tuple[float, ...],
) -> list[int]:
    """As :func:`_primal_correct` in the dual: ``A_f W + (A_f A'ᵀ)(K' + λI)⁻¹(T' − A'W)``."""
    kernel, base = a @ a.T, a @ w
    residual = t - base
    dim = a.shape[1]
    correct = [0] * len(grid)
    for f in range(int(fold.max()) + 1):
        held, fit = np.flatnonzero(fold == f), np.flatnonzero(fold != f)
        k_fit, k_held = kernel[np.ix_(fit, fit)], kernel[np.ix_(held, fit)]
        scale = float(np.trace(k_fit)) / dim  # trace(A'A'ᵀ) = trace(A'ᵀA') = trace(G − G_f)
        for i, rho in enumerate(grid):
            z = ridge_solve(k_fit, residual[fit], Regularization(rho * scale, "absolute"))
            correct[i] += _count(base[held] + k_held @ z, y[held])
    return correct


__all__ = [
    "DEFAULT_GRID",
    "GLOBAL",
    "SOLVERS",
    "AutoLambda",
    "LambdaChoice",
    "canonical_order",
    "check_grid",
    "fold_assignment",
    "select_lambda",
]
