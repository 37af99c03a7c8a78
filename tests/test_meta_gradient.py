"""The ν-step meta-gradient against autograd, explicit Hessians and finite differences."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from flwr_analytic.meta import (
    gradient,
    hvp_exact,
    hvp_finite_difference,
    inner_steps,
    make_loss_fn,
    meta_gradient,
    model_params,
    step_cost,
    unrolled_meta_gradient,
)
from flwr_analytic.models import build_module, get_architecture

ALPHA = 0.5


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _flat(params):
    return torch.cat([p.reshape(-1) for p in params])


def _rel(a, b):
    return float((_flat(a) - _flat(b)).norm() / _flat(b).norm())


def _data(seed, n=24, shape=(1, 4, 4), classes=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *shape, generator=g, dtype=torch.float64)
    y = torch.randint(0, classes, (n,), generator=g)
    return x, y


def _batches(nu, seed, n=12):
    out = []
    for k in range(nu + 1):
        out.append(_data(seed * 100 + k, n=n))
    return out[:nu], out[nu]


def _package_mlp():
    torch.manual_seed(0)
    return build_module(get_architecture("mlp", (1, 4, 4), 3, hidden=8)).double()


def _tanh_mlp():
    torch.manual_seed(1)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def reversed_order_meta_gradient(loss_fn, params, inner, outer, alpha):
    """A deliberately wrong implementation: applies (I - alpha H_0) first (left to right)."""
    traj = inner_steps(loss_fn, params, inner, alpha)
    v = gradient(loss_fn, traj[-1], outer)
    for k in range(len(inner)):
        hv = hvp_exact(loss_fn, traj[k], inner[k], v)
        v = tuple(a - alpha * b for a, b in zip(v, hv, strict=True))
    return v


def exact_meta_gradient(loss_fn, params, inner, outer, alpha):
    return meta_gradient(loss_fn, params, inner, outer, alpha, mode="exact").direction


def unrolled_mismatch(impl, model, nu, seed=0):
    """Relative error of ``impl`` against autograd through the unrolled ν steps."""
    loss_fn = make_loss_fn(model)
    params = model_params(model)
    inner, outer = _batches(nu, seed)
    ref = unrolled_meta_gradient(loss_fn, params, inner, outer, ALPHA)
    return _rel(impl(loss_fn, params, inner, outer, ALPHA), ref)


@pytest.mark.parametrize("factory", [_package_mlp, _tanh_mlp], ids=["relu-mlp", "tanh-mlp"])
@pytest.mark.parametrize("nu", [1, 2, 3, 4])
def test_exact_equals_autograd_through_unrolled_steps(factory, nu):
    assert unrolled_mismatch(exact_meta_gradient, factory(), nu) <= 1e-8


@pytest.mark.parametrize("nu", [2, 3, 4])
def test_reversed_product_order_fails_the_same_check(nu):
    # The check above must reject an implementation that multiplies the factors in the wrong order.
    err = unrolled_mismatch(reversed_order_meta_gradient, _tanh_mlp(), nu)
    assert err > 1e-4, err
    err_relu = unrolled_mismatch(reversed_order_meta_gradient, _package_mlp(), nu)
    assert err_relu > 1e-4, err_relu


def test_product_order_against_explicit_hessians_on_logistic_regression():
    # d = 6 logistic model: build H_k explicitly and multiply (I - aH_0)(I - aH_1)(I - aH_2) g.
    torch.manual_seed(3)
    model = nn.Sequential(nn.Flatten(), nn.Linear(5, 1)).double()
    loss_fn = make_loss_fn(
        model, lambda z, y: nn.functional.binary_cross_entropy_with_logits(z[:, 0], y.double())
    )
    params = model_params(model)
    g = torch.Generator().manual_seed(4)
    batches = [
        (
            torch.randn(10, 1, 1, 5, generator=g, dtype=torch.float64),
            torch.randint(0, 2, (10,), generator=g),
        )
        for _ in range(7)
    ]
    inner, outer, hess = batches[:3], batches[3], batches[4:]
    res = meta_gradient(loss_fn, params, inner, outer, ALPHA, "exact", hessian_batches=hess)

    shapes = [p.shape for p in params]

    def unflat(z):
        out, i = [], 0
        for s in shapes:
            n = int(np.prod(s))
            out.append(z[i : i + n].reshape(s))
            i += n
        return tuple(out)

    traj = inner_steps(loss_fn, params, inner, ALPHA)
    eye = torch.eye(6, dtype=torch.float64)
    mats = [
        eye
        - ALPHA
        * torch.autograd.functional.hessian(
            lambda z, k=k: loss_fn(unflat(z), hess[k]), _flat(traj[k])
        )
        for k in range(3)
    ]
    gout = _flat(gradient(loss_fn, traj[-1], outer))
    right = mats[0] @ mats[1] @ mats[2] @ gout
    wrong = mats[2] @ mats[1] @ mats[0] @ gout
    assert float((_flat(res.direction) - right).norm() / right.norm()) <= 1e-10
    assert float((wrong - right).norm() / right.norm()) > 1e-3


@pytest.mark.parametrize("nu", [1, 3])
def test_hessian_free_approaches_exact_as_delta_shrinks(nu):
    model = _tanh_mlp()
    loss_fn = make_loss_fn(model)
    params = model_params(model)
    inner, outer = _batches(nu, 7)
    exact = meta_gradient(loss_fn, params, inner, outer, ALPHA, "exact").direction
    errs = [
        _rel(
            meta_gradient(loss_fn, params, inner, outer, ALPHA, "hessian-free", delta=d).direction,
            exact,
        )
        for d in (1e-1, 1e-2, 1e-3)
    ]
    # central differences: O(delta^2), so each decade should cut the error by far more than 10x
    assert errs[1] < errs[0] / 20 and errs[2] < errs[1] / 20, errs
    assert errs[2] < 1e-6, errs


def test_finite_difference_hvp_matches_exact_hvp():
    model = _tanh_mlp()
    loss_fn = make_loss_fn(model)
    params = model_params(model)
    batch = _data(11)
    v = tuple(torch.randn_like(p) for p in params)
    exact = hvp_exact(loss_fn, params, batch, v)
    fd = hvp_finite_difference(loss_fn, params, batch, v, delta=1e-4)
    assert _rel(fd, exact) < 1e-6


def test_first_order_drops_the_hessian_terms():
    model = _tanh_mlp()
    loss_fn = make_loss_fn(model)
    params = model_params(model)
    inner, outer = _batches(2, 5)
    fo = meta_gradient(loss_fn, params, inner, outer, ALPHA, "first-order")
    phi = inner_steps(loss_fn, params, inner, ALPHA)[-1]
    assert _rel(fo.direction, gradient(loss_fn, phi, outer)) == 0.0
    exact = meta_gradient(loss_fn, params, inner, outer, ALPHA, "exact")
    assert _rel(fo.direction, exact.direction) > 1e-3


def test_nu_zero_is_the_plain_gradient():
    model = _package_mlp()
    loss_fn = make_loss_fn(model)
    params = model_params(model)
    batch = _data(9)
    for mode in ("exact", "hessian-free", "first-order"):
        res = meta_gradient(loss_fn, params, [], batch, ALPHA, mode)
        assert _rel(res.direction, gradient(loss_fn, params, batch)) == 0.0
        assert (res.grad_evals, res.hvp_evals) == (1, 0)


@pytest.mark.parametrize("nu", [0, 1, 3])
def test_work_counters(nu):
    model = _tanh_mlp()
    loss_fn = make_loss_fn(model)
    params = model_params(model)
    inner, outer = _batches(nu, 2)
    ex = meta_gradient(loss_fn, params, inner, outer, ALPHA, "exact")
    hf = meta_gradient(loss_fn, params, inner, outer, ALPHA, "hessian-free")
    fo = meta_gradient(loss_fn, params, inner, outer, ALPHA, "first-order")
    assert (ex.grad_evals, ex.hvp_evals) == (nu + 1, nu)
    assert (hf.grad_evals, hf.hvp_evals) == (3 * nu + 1, 0)
    assert (fo.grad_evals, fo.hvp_evals) == (nu + 1, 0)
    assert step_cost(nu, "exact") == nu + 1 + 2 * nu
    assert step_cost(nu, "hessian-free") == 3 * nu + 1
    assert step_cost(nu, "first-order") == nu + 1


def test_unknown_mode_and_batch_count_raise():
    model = _tanh_mlp()
    loss_fn = make_loss_fn(model)
    params = model_params(model)
    inner, outer = _batches(2, 1)
    with pytest.raises(ValueError, match="mode"):
        meta_gradient(loss_fn, params, inner, outer, ALPHA, "second-order")
    with pytest.raises(ValueError, match="Hessian batches"):
        meta_gradient(loss_fn, params, inner, outer, ALPHA, "exact", hessian_batches=inner[:1])


@pytest.mark.parametrize("nu", [1, 3])
def test_exact_matches_finite_differences_of_the_meta_objective(nu):
    # independent of autograd's double backward: directional derivatives of F(w) = f(phi^nu(w))
    model = _tanh_mlp()
    loss_fn = make_loss_fn(model)
    params = model_params(model)
    inner, outer = _batches(nu, 13)
    direction = meta_gradient(loss_fn, params, inner, outer, ALPHA, "exact").direction

    def meta_loss(p):
        phi = inner_steps(loss_fn, p, inner, ALPHA)[-1]
        with torch.no_grad():
            return float(loss_fn(phi, outer))

    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        d = tuple(torch.randn(p.shape, generator=g, dtype=torch.float64) for p in params)
        eps = 1e-5
        plus = tuple(p + eps * u for p, u in zip(params, d, strict=True))
        minus = tuple(p - eps * u for p, u in zip(params, d, strict=True))
        fd = (meta_loss(plus) - meta_loss(minus)) / (2 * eps)
        analytic = float(sum((a * u).sum() for a, u in zip(direction, d, strict=True)))
        assert abs(fd - analytic) <= 1e-7 * max(1.0, abs(analytic)), (fd, analytic)
