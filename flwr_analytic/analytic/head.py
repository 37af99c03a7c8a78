"""An analytic (closed-form) output head on any backbone: features, statistics, solves (no Flower).

The backbone is any ``nn.Module`` (BatchNorm, residual blocks, attention: it is only run forward,
in eval mode); the *head* is one named ``nn.Linear`` whose input features ``h`` are captured with a
forward pre-hook. With the design rows ``a = [h, 1]`` (or ``[h, φ(h), 1]`` with a random-feature
expansion, :class:`RandomFeatures`) and one-hot labels ``y``, client ``k`` holds

    G_k = A_kᵀA_k,   B_k = A_kᵀY_k,   n_k,

float64 :class:`~flwr_analytic.analytic.statistics.LayerStatistics`. The server solves the global
head on the sum, ``W = (Σ_k G_k + γI)⁻¹ Σ_k B_k`` (ridge regression onto one-hot labels: the last
layer of FedACnnL, Gu et al., arXiv 2502.06915; the analytic classifier of ACIL, Zhuang et al.,
NeurIPS 2022), which equals the ridge solution on the pooled features of every client. Client ``k``
personalizes it as pFedACnnL does, ``W_k = (G_k + λI)⁻¹(B_k + λW)``. ``W`` (``D × C``) maps to the
head's parameters as ``weight = W[:-1]ᵀ`` and ``bias = W[-1]``.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from flwr_analytic.analytic.design import StatisticsAccumulator
from flwr_analytic.analytic.personal_lambda import AutoLambda, LambdaChoice
from flwr_analytic.analytic.solvers import Regularization, personalized_solve, ridge_solve
from flwr_analytic.analytic.statistics import LayerStatistics
from flwr_analytic.analytic.targets import one_hot
from flwr_analytic.data.batches import iter_batches

#: Activations of the random-feature expansion.
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": torch.relu,
    "tanh": torch.tanh,
}
#: Precisions of the forward pass (the sums are float64 either way).
DTYPES = {"float64": torch.float64, "float32": torch.float32}
#: ``state_dict`` suffixes of the expansion's fixed random matrix and offset (:class:`ExpandedHead`).
EXPANSION_WEIGHT, EXPANSION_BIAS = "expansion_weight", "expansion_bias"


def head_module(model: nn.Module, head: str) -> nn.Linear:
    """The ``nn.Linear`` named ``head`` in ``model`` (``ValueError`` naming the candidates)."""
    modules = dict(model.named_modules())
    found = modules.get(head)
    if isinstance(found, nn.Linear | ExpandedHead):
        return found  # type: ignore[return-value]
    linear = [name for name, m in modules.items() if isinstance(m, nn.Linear)]
    what = "no module" if found is None else f"a {type(found).__name__}"
    raise ValueError(
        f"head {head!r} is {what} of {type(model).__name__}: the head must be an nn.Linear; "
        f"its nn.Linear modules are {linear}"
    )


def head_keys(head: str) -> tuple[str, str]:
    """``state_dict`` keys of the head's weight and bias."""
    return f"{head}.weight", f"{head}.bias"


def expansion_keys(head: str) -> tuple[str, str]:
    """``state_dict`` keys of the expansion's random matrix and offset."""
    return f"{head}.{EXPANSION_WEIGHT}", f"{head}.{EXPANSION_BIAS}"


@dataclass(frozen=True)
class RandomFeatures:
    """A seeded random-feature expansion of the head's input: ``φ(h) = act(hRᵀ + r)``.

    The design rows become ``[h, φ(h), 1]`` (``D = F + E + 1``): the linear head is the special case
    of a zero ``φ`` block, so the expansion only adds capacity. ``R`` (``E × F``) and ``r`` (``E``)
    are drawn like ``nn.Linear``'s default initialization, uniform in ``±1/√F``, and stay fixed: the
    "buffer layer" of ACIL (Zhuang et al., NeurIPS 2022), random features after Rahimi & Recht
    (NeurIPS 2007). Only the output weights are solved.

    Parameters
    ----------
    width : int
        ``E``, the number of random features (>= 1).
    seed : int (default: 0)
        Seed of ``numpy.random.default_rng``.
    activation : {"relu", "tanh"} (default: "relu")
        ``act``.

    """

    width: int
    seed: int = 0
    activation: str = "relu"

    def __post_init__(self) -> None:
        if isinstance(self.width, bool) or not isinstance(self.width, int) or self.width < 1:
            raise ValueError(f"RandomFeatures width must be an integer >= 1, got {self.width!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"RandomFeatures activation {self.activation!r}: allowed {sorted(ACTIVATIONS)}"
            )

    def draw(self, in_features: int) -> tuple[np.ndarray, np.ndarray]:
        """``(R, r)``: float64 ``(E, F)`` and ``(E,)``, uniform in ``±1/√F``."""
        rng = np.random.default_rng(self.seed)
        bound = 1.0 / np.sqrt(in_features)
        weight = rng.uniform(-bound, bound, (self.width, in_features))
        return weight, rng.uniform(-bound, bound, self.width)


def expand(
    h: torch.Tensor, expansion: tuple[torch.Tensor, torch.Tensor] | None, activation: str = "relu"
) -> torch.Tensor:
    """``[h, act(hRᵀ + r)]``, or ``h`` itself without an expansion."""
    if expansion is None:
        return h
    weight, bias = (t.to(h.dtype) for t in expansion)
    return torch.cat([h, ACTIVATIONS[activation](F.linear(h, weight, bias))], dim=1)


class ExpandedHead(nn.Module):
    """The solved head with a random-feature expansion, for your model (:func:`expand_head`).

    ``forward(h) = [h, act(hRᵀ + r)] weightᵀ + bias``; ``R``, ``r`` are buffers, ``weight``
    (``C × (F + E)``) and ``bias`` parameters, so ``state_dict`` keys are ``weight``, ``bias``,
    ``expansion_weight``, ``expansion_bias``.
    """

    def __init__(self, in_features: int, width: int, out_features: int, activation: str = "relu"):
        super().__init__()
        self.in_features, self.out_features, self.activation = in_features, out_features, activation
        self.weight = nn.Parameter(torch.zeros(out_features, in_features + width))
        self.bias = nn.Parameter(torch.zeros(out_features))
        self.register_buffer(EXPANSION_WEIGHT, torch.zeros(width, in_features))
        self.register_buffer(EXPANSION_BIAS, torch.zeros(width))

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # noqa: D102
        pair = (getattr(self, EXPANSION_WEIGHT), getattr(self, EXPANSION_BIAS))
        return F.linear(expand(h, pair, self.activation), self.weight, self.bias)


def expand_head(model: nn.Module, head: str, expansion: RandomFeatures) -> nn.Module:
    """Replace ``model``'s ``nn.Linear`` ``head`` by an :class:`ExpandedHead` (in place).

    Then ``model.load_state_dict(result.arrays.to_torch_state_dict())`` loads an analytic head
    solved with ``expansion``.
    """
    linear = head_module(model, head)
    parent_name, _, child = head.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    new = ExpandedHead(
        linear.in_features, expansion.width, linear.out_features, expansion.activation
    )
    setattr(parent, child, new)
    return model


def prepared_model(model: nn.Module, dtype: str = "float64") -> nn.Module:
    """A copy of ``model`` in eval mode and ``dtype`` (float32 parameters widen exactly)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    return copy.deepcopy(model).to(DTYPES[dtype]).eval()


def iter_head_features(
    model: nn.Module, head: str, data: Any, batch_size: int = 256
) -> Iterator[tuple[torch.Tensor, np.ndarray]]:
    """``(h, y)`` per batch: the head's float64 input ``(N, F)`` and the labels.

    ``model`` runs as given (see :func:`prepared_model`) without gradients; a forward pre-hook on
    ``head`` keeps its input. Any backbone works (BatchNorm in eval mode uses its running
    statistics, residual additions are just computed); the head must be called once per forward
    with a ``(N, F)`` input. ``data``: any source of :func:`~flwr_analytic.data.batches.iter_batches`.
    """
    module = head_module(model, head)
    captured: list[torch.Tensor] = []
    handle = module.register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
    dtype = next(model.parameters()).dtype
    try:
        with torch.no_grad():
            for x, y in iter_batches(data, batch_size):
                captured.clear()
                model(torch.as_tensor(x).to(dtype))
                if len(captured) != 1:
                    raise ValueError(f"head {head!r} ran {len(captured)} times in one forward pass")
                h = captured[0]
                if h.ndim != 2 or h.shape[0] != len(y):
                    raise ValueError(
                        f"head {head!r} gets input of shape {tuple(h.shape)}; an analytic head "
                        f"needs one feature row per sample, (N={len(y)}, F)"
                    )
                yield h.to(torch.float64), np.asarray(y)
    finally:
        handle.remove()


def head_statistics(
    model: nn.Module,
    head: str,
    data: Any,
    num_classes: int,
    expansion: tuple[torch.Tensor, torch.Tensor] | None = None,
    activation: str = "relu",
    batch_size: int = 256,
) -> LayerStatistics:
    """``(G, B, n)`` of the head's design rows ``[h, (φ(h),) 1]`` and one-hot labels, float64.

    Parameters
    ----------
    model : nn.Module
        The model with the global backbone, prepared (:func:`prepared_model`).
    head : str
        Name of the head ``nn.Linear``.
    data : any
        Source of ``(x, y)`` batches (arrays, ``LoaderData``, a ``DataLoader``).
    num_classes : int
        ``C``, the head's output width.
    expansion : (Tensor, Tensor), optional
        ``(R, r)`` of a :class:`RandomFeatures` expansion.
    activation : str
        The expansion's activation.
    batch_size : int
        Rows per batch of array data.

    """
    acc: StatisticsAccumulator | None = None
    for h, y in iter_head_features(model, head, data, batch_size):
        rows = expand(h, expansion, activation)
        if acc is None:
            acc = StatisticsAccumulator(rows.shape[1] + 1, num_classes, "float64")
        acc.add_rows(rows, one_hot(y, num_classes))
    if acc is None:
        width = head_module(model, head).in_features + (
            0 if expansion is None else len(expansion[1])
        )
        return LayerStatistics.zeros(width + 1, num_classes)
    return acc.result()


def head_design(
    model: nn.Module,
    head: str,
    data: Any,
    expansion: tuple[torch.Tensor, torch.Tensor] | None = None,
    activation: str = "relu",
    batch_size: int = 256,
) -> tuple[np.ndarray, np.ndarray]:
    """The head's design rows ``A = [h, (φ(h),) 1]`` (n x D, float64) and the labels of ``data``.

    The rows whose ``AᵀA`` :func:`head_statistics` sums; memory ``n·D`` (for a client's leave-one-out
    choice of λ, :func:`~flwr_analytic.analytic.personal_lambda.select_lambda`).
    """
    rows, labels = [], []
    for h, y in iter_head_features(model, head, data, batch_size):
        rows.append(expand(h, expansion, activation).numpy())
        labels.append(np.asarray(y, dtype=np.int64))
    if not rows:
        width = head_module(model, head).in_features + (
            0 if expansion is None else len(expansion[1])
        )
        return np.zeros((0, width + 1)), np.zeros(0, dtype=np.int64)
    a = np.concatenate(rows)
    return np.hstack([a, np.ones((len(a), 1))]), np.concatenate(labels)


def solve_head(total: LayerStatistics, reg: Regularization, bias: bool = True) -> np.ndarray:
    """Global head ``W = (ΣG + γI)⁻¹ ΣB`` (``D × C``, Cholesky; :func:`ridge_solve`).

    Without a bias the last (ones) row and column are left out and ``W[-1] = 0``.
    """
    if bias:
        return ridge_solve(total.gram, total.cross, reg)
    w = ridge_solve(total.gram[:-1, :-1], total.cross[:-1], reg)
    return np.vstack([w, np.zeros((1, w.shape[1]))])


def personal_head(
    stats: LayerStatistics, w_global: np.ndarray, reg: Regularization, bias: bool = True
) -> np.ndarray:
    """The pFedACnnL head of one client, ``W_k = (G_k + λI)⁻¹(B_k + λW)`` (:func:`personalized_solve`)."""
    if stats.count == 0:
        return np.array(w_global, dtype=np.float64)
    if bias:
        return personalized_solve(stats.gram, stats.cross, w_global, reg)
    w = personalized_solve(stats.gram[:-1, :-1], stats.cross[:-1], w_global[:-1], reg)
    return np.vstack([w, np.zeros((1, w.shape[1]))])


def auto_personal_head(
    design: np.ndarray,
    labels: np.ndarray,
    stats: LayerStatistics,
    w_global: np.ndarray,
    bias: bool = True,
    policy: AutoLambda | None = None,
    leverage: float = 0.0,
) -> LambdaChoice:
    """The client's pFedACnnL head with its own ρ, chosen by leave-one-out on its data.

    :func:`~flwr_analytic.analytic.personal_lambda.select_lambda` on the head's design rows
    (:func:`head_design`), ``ρ ∈ {1e-4, 10^-3.75, …, 1e3, ∞}`` (∞ keeps ``W``); the head is then
    ``W_k = (G_k + λI)⁻¹(B_k + λW)`` on the client's full ``(G_k, B_k)`` at ``ρ*``. Without a bias
    the ones column is left out and ``W_k[-1] = 0``, as in :func:`personal_head`. ``leverage``:
    the global head's mean leverage ``h̄`` the server sent (``personal_lambda.global_leverage``).
    """
    policy = policy or AutoLambda()
    if bias:
        return policy.select(
            design, labels, w_global, gram=stats.gram, cross=stats.cross, leverage=leverage
        )
    choice = policy.select(
        design[:, :-1],
        labels,
        w_global[:-1],
        gram=stats.gram[:-1, :-1],
        cross=stats.cross[:-1],
        leverage=leverage,
    )
    weights = np.vstack([choice.weights, np.zeros((1, choice.weights.shape[1]))])
    return dataclasses.replace(choice, weights=weights)


def head_state(head: str, w: np.ndarray, bias: bool = True) -> dict[str, np.ndarray]:
    """The head's float64 ``state_dict`` entries: ``weight = W[:-1]ᵀ``, ``bias = W[-1]``."""
    kw, kb = head_keys(head)
    out = {kw: np.ascontiguousarray(w[:-1].T)}
    if bias:
        out[kb] = np.ascontiguousarray(w[-1])
    return out


def head_matrix(state: Mapping[str, np.ndarray], head: str) -> np.ndarray:
    """Inverse of :func:`head_state`: ``W = [weightᵀ; bias]`` (``bias = 0`` when absent)."""
    kw, kb = head_keys(head)
    weight = np.asarray(state[kw], dtype=np.float64)
    bias = np.asarray(state[kb], dtype=np.float64) if kb in state else np.zeros(weight.shape[0])
    return np.vstack([weight.T, bias[None, :]])


def backbone_digest(state: Mapping[str, np.ndarray], head: str) -> str:
    """SHA-256 of every entry but the head's weight and bias (names, dtypes, bytes; key order).

    Statistics kept from the training round are reused in the evaluation only when the backbone
    (and expansion) they were computed with has this digest.
    """
    digest = hashlib.sha256()
    for key in sorted(set(state) - set(head_keys(head))):
        value = np.ascontiguousarray(state[key])
        digest.update(f"{key}|{value.dtype.str}|{value.shape}".encode())
        digest.update(value.tobytes())
    return digest.hexdigest()


def evaluate_heads(
    model: nn.Module,
    head: str,
    data: Any,
    heads: Mapping[str, np.ndarray],
    expansion: tuple[torch.Tensor, torch.Tensor] | None = None,
    activation: str = "relu",
    batch_size: int = 256,
) -> dict[str, dict[str, float]]:
    """Accuracy and loss of several heads ``W`` on the same features (one forward pass).

    Scores are ``s = [h, (φ(h),) 1] W``; the loss is the squared error to the one-hot label summed
    over classes and averaged over samples (the ridge objective, as
    :meth:`~flwr_analytic.analytic.network.AnalyticNetwork.evaluate`).

    Returns
    -------
    dict
        Per head name: ``accuracy``, ``loss``, ``correct``, ``num-examples`` (``accuracy`` and
        ``loss`` are 0 without samples).

    """
    correct = dict.fromkeys(heads, 0)
    loss = dict.fromkeys(heads, 0.0)
    count = 0
    for h, y in iter_head_features(model, head, data, batch_size):
        rows = expand(h, expansion, activation).numpy()
        for name, w in heads.items():
            scores = rows @ w[:-1] + w[-1]
            correct[name] += int(np.sum(scores.argmax(1) == y))
            loss[name] += float(np.sum((scores - one_hot(y, w.shape[1])) ** 2))
        count += len(y)
    return {
        name: {
            "accuracy": correct[name] / count if count else 0.0,
            "loss": loss[name] / count if count else 0.0,
            "correct": correct[name],
            "num-examples": count,
        }
        for name in heads
    }


__all__ = [
    "ACTIVATIONS",
    "ExpandedHead",
    "RandomFeatures",
    "auto_personal_head",
    "backbone_digest",
    "evaluate_heads",
    "expand",
    "expand_head",
    "expansion_keys",
    "head_design",
    "head_keys",
    "head_matrix",
    "head_module",
    "head_state",
    "head_statistics",
    "iter_head_features",
    "personal_head",
    "prepared_model",
    "solve_head",
]
