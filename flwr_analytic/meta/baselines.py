r"""Local updates of the peer methods (no Flower imports).

All take the same inputs as :func:`flwr_analytic.meta.local_training.meta_train` (model in place,
training tensors, seeded generator) and count their gradient evaluations, so the methods can be
compared at an equal budget of local gradient computations.

- FedAvg (McMahan et al. 2017): ``tau`` SGD steps ``w <- w - lr grad f(w; D)``.
- FedProx (Li et al. 2020): SGD on ``f(w) + (mu/2) ||w - w_global||^2``.
- pFedMe (Dinh, Tran and Nguyen, NeurIPS 2020): per local step, ``K`` steps on the Moreau-envelope
  sub-problem ``theta <- theta - lr_p (grad f(theta; D) + lambda (theta - w))`` and then
  ``w <- w - eta lambda (w - theta)``; the server mixes ``w <- (1 - beta) w + beta avg(w_i)``
  (see :class:`flwr_analytic.strategies.PFedMe`).
"""

from __future__ import annotations

import numpy as np
from torch import Tensor, nn

from flwr_analytic.meta.local_training import LocalResult, LocalRun
from flwr_analytic.meta.meta_gradient import gradient, load_params, model_params


def sgd_train(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    lr: float,
    local_steps: int,
    batch_size: int,
    rng: np.random.Generator,
    proximal_mu: float = 0.0,
) -> LocalResult:
    r"""``local_steps`` SGD steps on ``f(w) + (mu/2)||w - w^t||^2`` (FedAvg for ``mu = 0``).

    Parameters
    ----------
    model : torch.nn.Module
        Holds the global ``w^t`` on entry and the local result on exit.
    x, y : torch.Tensor
        Training data.
    lr : float
        Step size.
    local_steps : int
        Number of SGD steps τ.
    batch_size : int
        Minibatch size.
    rng : numpy.random.Generator
        Seeded batch sampler.
    proximal_mu : float
        FedProx proximal weight μ.

    """
    run = LocalRun(model, x, y, rng)
    anchor = model_params(model)
    params = anchor
    for _ in range(local_steps):
        batch = run.batch(params, batch_size)
        g = gradient(run.loss_fn, params, batch)
        params = tuple(
            p - lr * (q + proximal_mu * (p - a)) for p, q, a in zip(params, g, anchor, strict=True)
        )
    load_params(model, params)
    return run.result(local_steps, 0, local_steps * min(batch_size, len(y)), local_steps)


def pfedme_train(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    lr: float,
    personal_lr: float,
    lam: float,
    inner_steps: int,
    local_steps: int,
    batch_size: int,
    rng: np.random.Generator,
) -> LocalResult:
    r"""PFedMe local update (Dinh et al. 2020, Algorithm 1), as in the authors' code.

    For each of ``local_steps`` batches ``D``: ``K = inner_steps`` steps
    ``theta <- theta - personal_lr (grad f(theta; D) + lam (theta - w))`` (``theta`` starts at the
    received model and persists across local steps), then ``w <- w - lr lam (w - theta)``.

    Returns the local ``w`` in ``model``; costs ``K`` gradients per local step.
    """
    run = LocalRun(model, x, y, rng)
    w = model_params(model)
    theta = w
    for _ in range(local_steps):
        batch = run.batch(theta, batch_size)
        for _ in range(inner_steps):
            g = gradient(run.loss_fn, theta, batch)
            theta = tuple(
                t - personal_lr * (q + lam * (t - u)) for t, q, u in zip(theta, g, w, strict=True)
            )
        w = tuple(u - lr * lam * (u - t) for u, t in zip(w, theta, strict=True))
    load_params(model, w)
    evals = float(local_steps * inner_steps)
    return run.result(evals, 0, evals * min(batch_size, len(y)), local_steps)
