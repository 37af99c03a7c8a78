r"""Meta-gradient of the ν-step meta objective (no Flower imports).

Jamali, Saber and Bae, "A Generalized Meta Federated Learning Framework with Theoretical
Convergence Guarantees", arXiv:2504.21327, generalize Per-FedAvg (Fallah, Mokhtari and Ozdaglar,
NeurIPS 2020) from one to ν local fine-tuning steps. For agent ``i`` with loss ``f_i``:

.. math::

    \phi^0 = w,\qquad \phi^{k+1} = \phi^k - \alpha \nabla f_i(\phi^k; D_{k+1}),\quad k=0..\nu-1,

    F_i(w) = f_i(\phi^\nu(w)),

    \nabla F_i(w) = (I-\alpha H_0)(I-\alpha H_1)\cdots(I-\alpha H_{\nu-1})\,
        \nabla f_i(\phi^\nu; D'),\qquad H_k = \nabla^2 f_i(\phi^k; D''_{k+1}).

The product is evaluated right to left with ν Hessian-vector products and no Hessian is ever
formed: ``v <- grad f(phi^nu; D')``, then ``v <- v - alpha H_k v`` for ``k = nu-1, ..., 0``.
Three modes:

``exact``
    true HVPs by double backward (reverse-over-reverse autograd);
``hessian-free``
    ``H v ~ [grad f(phi + delta v) - grad f(phi - delta v)] / (2 delta)`` (Per-FedAvg HF);
``first-order``
    the ``(I - alpha H_k)`` factors are dropped (Per-FedAvg FO for ν = 1).

ν = 0 gives ``grad f(w; D')``, the FedAvg/SGD direction.

Parameters are handled as a tuple of tensors ``params`` in the order of
``model.named_parameters()``; a loss function ``loss_fn(params, batch) -> scalar`` is built from a
module with :func:`make_loss_fn` (``torch.func.functional_call``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call

Params = tuple[Tensor, ...]
Batch = tuple[Tensor, Tensor]
LossFn = Callable[[Params, Batch], Tensor]

MODES = ("exact", "hessian-free", "first-order")


def make_loss_fn(
    model: nn.Module, criterion: Callable[[Tensor, Tensor], Tensor] | None = None
) -> LossFn:
    """Loss ``f(params; (x, y))`` of ``model`` evaluated at the parameter tuple ``params``.

    Parameters
    ----------
    model : torch.nn.Module
        The network; its own parameters are not used, only their names and order.
    criterion : callable, optional
        ``criterion(logits, y)``; mean cross-entropy by default.

    """
    names = [name for name, _ in model.named_parameters()]
    crit = criterion or nn.functional.cross_entropy

    def loss_fn(params: Params, batch: Batch) -> Tensor:
        x, y = batch
        logits = functional_call(model, dict(zip(names, params, strict=True)), (x,))
        return crit(logits, y)

    return loss_fn


def model_params(model: nn.Module) -> Params:
    """Detached copies of the parameters of ``model`` (in ``named_parameters`` order)."""
    return tuple(p.detach().clone() for p in model.parameters())


def load_params(model: nn.Module, params: Params) -> None:
    """Copy ``params`` into the parameters of ``model`` in place."""
    with torch.no_grad():
        for p, q in zip(model.parameters(), params, strict=True):
            p.copy_(q)


def gradient(loss_fn: LossFn, params: Params, batch: Batch) -> Params:
    """``grad f(params; batch)`` as a detached tuple (one gradient evaluation)."""
    leaves = tuple(p.detach().requires_grad_(True) for p in params)
    loss = loss_fn(leaves, batch)
    return tuple(g.detach() for g in torch.autograd.grad(loss, leaves))


def hvp_exact(loss_fn: LossFn, params: Params, batch: Batch, v: Params) -> Params:
    """Exact Hessian-vector product ``H v``, ``H = grad^2 f(params; batch)`` (double backward)."""
    leaves = tuple(p.detach().requires_grad_(True) for p in params)
    loss = loss_fn(leaves, batch)
    grads = torch.autograd.grad(loss, leaves, create_graph=True)
    hv = torch.autograd.grad(grads, leaves, grad_outputs=v, allow_unused=True)
    return tuple(
        torch.zeros_like(p) if h is None else h.detach() for p, h in zip(params, hv, strict=True)
    )


def hvp_finite_difference(
    loss_fn: LossFn, params: Params, batch: Batch, v: Params, delta: float = 1e-3
) -> Params:
    r"""Central finite-difference HVP (Per-FedAvg HF), two gradient evaluations.

    .. math:: H v \approx \frac{\nabla f(\phi + \delta v) - \nabla f(\phi - \delta v)}{2\delta},

    with error ``O(delta^2)`` for a thrice-differentiable loss.
    """
    plus = tuple(p + delta * u for p, u in zip(params, v, strict=True))
    minus = tuple(p - delta * u for p, u in zip(params, v, strict=True))
    gp, gm = gradient(loss_fn, plus, batch), gradient(loss_fn, minus, batch)
    return tuple((a - b) / (2.0 * delta) for a, b in zip(gp, gm, strict=True))


@dataclass
class MetaGradient:
    """Result of :func:`meta_gradient`.

    Attributes
    ----------
    direction : tuple[torch.Tensor, ...]
        The (approximate) meta-gradient ``grad F_i(w)``.
    adapted : tuple[torch.Tensor, ...]
        ``phi^nu``, the parameters after the ν inner steps.
    grad_evals : int
        Gradient evaluations (inner steps, outer gradient and 2 per finite-difference HVP).
    hvp_evals : int
        Exact Hessian-vector products (each costs about 2-3 gradients; see ``meta_cost.py``).
    outer_loss : float
        ``f(phi^nu; D')``.

    """

    direction: Params
    adapted: Params
    grad_evals: int
    hvp_evals: int
    outer_loss: float


def inner_steps(
    loss_fn: LossFn, params: Params, batches: Sequence[Batch], alpha: float
) -> list[Params]:
    """Return the trajectory ``[phi^0, ..., phi^nu]`` of the inner SGD steps.

    ``phi^{k+1} = phi^k - alpha grad f(phi^k; D_{k+1})``.
    """
    traj = [tuple(p.detach() for p in params)]
    for batch in batches:
        g = gradient(loss_fn, traj[-1], batch)
        traj.append(tuple(p - alpha * q for p, q in zip(traj[-1], g, strict=True)))
    return traj


def meta_gradient(
    loss_fn: LossFn,
    params: Params,
    inner_batches: Sequence[Batch],
    outer_batch: Batch,
    alpha: float,
    mode: str = "exact",
    hessian_batches: Sequence[Batch] | None = None,
    delta: float = 1e-3,
) -> MetaGradient:
    r"""ν-step meta-gradient ``(I - alpha H_0) ... (I - alpha H_{nu-1}) grad f(phi^nu; D')``.

    Parameters
    ----------
    loss_fn : callable
        ``loss_fn(params, batch) -> scalar``, e.g. from :func:`make_loss_fn`.
    params : tuple of torch.Tensor
        The point ``w`` (not modified).
    inner_batches : sequence of (x, y)
        ``D_1 .. D_nu``; ``nu = len(inner_batches)`` (0 gives the plain gradient).
    outer_batch : (x, y)
        ``D'`` for the outer gradient.
    alpha : float
        Inner (fine-tuning) step size α.
    mode : {"exact", "hessian-free", "first-order"}
        How the ``H_k v`` products are computed (see the module docstring).
    hessian_batches : sequence of (x, y), optional
        ``D''_1 .. D''_nu`` for ``H_k``; ``None`` reuses the inner batches, making ``exact`` the
        exact gradient of the sampled unrolled objective (equal to autograd through the steps).
    delta : float
        Finite-difference step δ of ``hessian-free``.

    Returns
    -------
    MetaGradient
        Direction, ``phi^nu`` and the work done.

    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; allowed: {', '.join(MODES)}")
    nu = len(inner_batches)
    hbatches = inner_batches if hessian_batches is None else hessian_batches
    if len(hbatches) != nu:
        raise ValueError(f"need {nu} Hessian batches, got {len(hbatches)}")
    traj = inner_steps(loss_fn, params, inner_batches, alpha)
    grad_evals, hvp_evals = nu, 0
    leaves = tuple(p.detach().requires_grad_(True) for p in traj[-1])
    loss = loss_fn(leaves, outer_batch)
    v = tuple(g.detach() for g in torch.autograd.grad(loss, leaves))
    grad_evals += 1
    if mode != "first-order":
        # Right to left: the factor (I - alpha H_{nu-1}) touches the outer gradient first.
        for k in range(nu - 1, -1, -1):
            if mode == "exact":
                hv = hvp_exact(loss_fn, traj[k], hbatches[k], v)
                hvp_evals += 1
            else:
                hv = hvp_finite_difference(loss_fn, traj[k], hbatches[k], v, delta)
                grad_evals += 2
            v = tuple(a - alpha * b for a, b in zip(v, hv, strict=True))
    return MetaGradient(
        direction=v,
        adapted=traj[-1],
        grad_evals=grad_evals,
        hvp_evals=hvp_evals,
        outer_loss=float(loss.detach()),
    )


def unrolled_meta_gradient(
    loss_fn: LossFn,
    params: Params,
    inner_batches: Sequence[Batch],
    outer_batch: Batch,
    alpha: float,
) -> Params:
    """Differentiate through the ν unrolled inner steps with autograd (the reference).

    Uses ``create_graph=True`` in every inner step.

    Memory grows with ν (the whole graph is kept); used to validate :func:`meta_gradient`.
    """
    w = tuple(p.detach().requires_grad_(True) for p in params)
    phi = w
    for batch in inner_batches:
        g = torch.autograd.grad(loss_fn(phi, batch), phi, create_graph=True)
        phi = tuple(p - alpha * q for p, q in zip(phi, g, strict=True))
    out = torch.autograd.grad(loss_fn(phi, outer_batch), w)
    return tuple(o.detach() for o in out)


def gradient_equivalents(grad_evals: int, hvp_evals: int, hvp_cost: float = 2.0) -> float:
    """Work in gradient evaluations, counting one exact HVP as ``hvp_cost`` gradients."""
    return grad_evals + hvp_cost * hvp_evals


def step_cost(nu: int, mode: str, hvp_cost: float = 2.0) -> float:
    """Gradient-equivalents of one meta-step: ``nu + 1`` gradients plus the ν HVPs of ``mode``."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; allowed: {', '.join(MODES)}")
    if mode == "first-order":
        return float(nu + 1)
    if mode == "hessian-free":
        return float(3 * nu + 1)
    return nu + 1 + hvp_cost * nu
