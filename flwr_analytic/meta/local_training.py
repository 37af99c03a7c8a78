r"""Local ν-step meta-training loop of one client (no Flower imports).

One round of client ``i`` in the generalized meta federated learning framework (Jamali, Saber and
Bae, arXiv:2504.21327; Per-FedAvg for ν = 1, Fallah et al. 2020): starting from the received
``w``, for ``t = 1..tau``

.. math::

    u \leftarrow u - \beta\,(I-\alpha H_0)\cdots(I-\alpha H_{\nu-1})\,\nabla f_i(\phi^\nu(u); D'),

with fresh batches ``D_1..D_nu`` (inner), ``D'`` (outer) and, with the ``independent`` Hessian-batch
policy, ``D''_1..D''_nu`` at every step. ν = 0 is ``tau`` SGD steps at rate β (FedAvg).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import Tensor, nn

from flwr_analytic.meta.meta_gradient import (
    MODES,
    Batch,
    gradient_equivalents,
    load_params,
    make_loss_fn,
    meta_gradient,
    model_params,
)

HESSIAN_BATCH_POLICIES = ("reuse", "independent")


class BatchSampler:
    """Seeded minibatches of an in-memory data set (each batch without replacement).

    Parameters
    ----------
    x, y : torch.Tensor
        Inputs and labels.
    rng : numpy.random.Generator
        Source of every batch index (seed it from seed + partition id + round).

    """

    def __init__(self, x: Tensor, y: Tensor, rng: np.random.Generator):
        if len(x) == 0:
            raise ValueError("cannot sample batches from an empty data set")
        self.x, self.y, self.rng = x, y, rng

    def __len__(self) -> int:
        return len(self.y)

    def sample(self, size: int) -> Batch:
        """Draw a batch of ``min(size, n)`` distinct rows."""
        idx = self.rng.choice(len(self.y), size=min(int(size), len(self.y)), replace=False)
        idx_t = torch.from_numpy(np.sort(idx))
        return self.x[idx_t], self.y[idx_t]


@dataclass(frozen=True)
class MetaConfig:
    """Hyper-parameters of local ν-step meta-training.

    Attributes
    ----------
    nu : int
        Number of inner fine-tuning steps ν (0: FedAvg, 1: Per-FedAvg).
    alpha : float
        Inner step size α (also the test-time fine-tuning rate).
    beta : float
        Outer (meta) step size β.
    mode : {"exact", "hessian-free", "first-order"}
        How the ``(I - alpha H_k)`` factors are applied.
    local_steps : int
        Local meta-steps τ per round.
    inner_batch_size, outer_batch_size, hessian_batch_size : int
        Sizes of ``D_k``, ``D'`` and ``D''_k``.
    hessian_batches : {"reuse", "independent"}
        ``reuse``: ``D''_k = D_k`` (exact gradient of the sampled unrolled objective);
        ``independent``: fresh ``D''_k`` as in Per-FedAvg.
    delta : float
        Finite-difference δ of ``hessian-free``.

    """

    nu: int = 1
    alpha: float = 0.01
    beta: float = 0.01
    mode: str = "exact"
    local_steps: int = 10
    inner_batch_size: int = 32
    outer_batch_size: int = 32
    hessian_batch_size: int = 32
    hessian_batches: str = "independent"
    delta: float = 1e-3

    def __post_init__(self) -> None:
        if self.nu < 0:
            raise ValueError(f"nu must be >= 0, got {self.nu}")
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}; allowed: {', '.join(MODES)}")
        if self.hessian_batches not in HESSIAN_BATCH_POLICIES:
            raise ValueError(
                f"unknown hessian_batches {self.hessian_batches!r}; allowed: reuse, independent"
            )
        if self.local_steps < 0:
            raise ValueError(f"local_steps must be >= 0, got {self.local_steps}")

    def to_dict(self) -> dict[str, float | int | str]:
        """Plain dict of the fields."""
        return asdict(self)


@dataclass
class LocalResult:
    """Outcome of one local training call.

    Attributes
    ----------
    metrics : dict[str, float]
        ``train-loss`` (mean outer loss over the steps), ``grad-evals``, ``hvp-evals``,
        ``grad-equivalents`` (HVP = 2 gradients), ``samples-processed``, ``local-steps``,
        ``train-time``.

    """

    metrics: dict[str, float]


class LocalRun:
    """What every local training loop keeps: loss function, batch sampler, losses and start time.

    Parameters
    ----------
    model : torch.nn.Module
        The model being trained (its loss function is built from it).
    x, y : torch.Tensor
        The client's training data.
    rng : numpy.random.Generator
        Seeded generator of the batch indices.

    Attributes
    ----------
    loss_fn : callable
        ``loss_fn(params, batch)`` (:func:`~flwr_analytic.meta.meta_gradient.make_loss_fn`).
    sampler : BatchSampler
        The minibatches.
    losses : list of float
        The loss recorded at every local step.

    """

    def __init__(self, model: nn.Module, x: Tensor, y: Tensor, rng: np.random.Generator):
        self.t0 = time.perf_counter()
        self.loss_fn = make_loss_fn(model)
        self.sampler = BatchSampler(x, y, rng)
        self.losses: list[float] = []

    def batch(self, params: tuple[Tensor, ...], size: int) -> Batch:
        """Draw a batch of ``size`` rows and record the loss of ``params`` on it (no gradient)."""
        batch = self.sampler.sample(size)
        with torch.no_grad():
            self.losses.append(float(self.loss_fn(params, batch)))
        return batch

    def result(
        self, grad_evals: float, hvp_evals: float, samples: float, local_steps: int
    ) -> LocalResult:
        """The work counters, the mean recorded loss and the time since the start."""
        return LocalResult(
            metrics={
                "train-loss": float(np.mean(self.losses)) if self.losses else float("nan"),
                "grad-evals": float(grad_evals),
                "hvp-evals": float(hvp_evals),
                "grad-equivalents": gradient_equivalents(grad_evals, hvp_evals),
                "samples-processed": float(samples),
                "local-steps": float(local_steps),
                "train-time": time.perf_counter() - self.t0,
            }
        )


def meta_train(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    config: MetaConfig,
    rng: np.random.Generator,
) -> LocalResult:
    """Run ``config.local_steps`` ν-step meta-steps on ``model`` in place.

    Batches are drawn per meta-step in the order ``D_1..D_nu``, ``D'``, then ``D''_1..D''_nu``
    (independent policy only), all from ``rng``.

    Parameters
    ----------
    model : torch.nn.Module
        Holds the received weights ``w`` on entry and the updated ``u`` on exit.
    x, y : torch.Tensor
        The client's training data.
    config : MetaConfig
        ν, α, β, mode, τ, batch sizes, Hessian-batch policy and δ.
    rng : numpy.random.Generator
        Seeded generator of the batch indices.

    Returns
    -------
    LocalResult
        Work counters and the mean outer loss.

    """
    run = LocalRun(model, x, y, rng)
    sample = run.sampler.sample
    params = model_params(model)
    grad_evals = hvp_evals = samples = 0
    for _ in range(config.local_steps):
        inner = [sample(config.inner_batch_size) for _ in range(config.nu)]
        outer = sample(config.outer_batch_size)
        hess = None
        if config.hessian_batches == "independent" and config.mode != "first-order":
            hess = [sample(config.hessian_batch_size) for _ in range(config.nu)]
        res = meta_gradient(
            run.loss_fn, params, inner, outer, config.alpha, config.mode, hess, config.delta
        )
        params = tuple(p - config.beta * d for p, d in zip(params, res.direction, strict=True))
        grad_evals += res.grad_evals
        hvp_evals += res.hvp_evals
        samples += sum(len(b[1]) for b in [*inner, outer, *(hess or [])])
        run.losses.append(res.outer_loss)
    load_params(model, params)
    return run.result(grad_evals, hvp_evals, samples, config.local_steps)
