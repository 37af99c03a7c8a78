"""Local meta-training vs FedAvg and Per-FedAvg written out step by step; peers; personalization."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from flwr_analytic.meta import (
    BatchSampler,
    MetaConfig,
    evaluate,
    meta_train,
    model_params,
    personalization_curve,
    pfedme_train,
    sgd_train,
)
from flwr_analytic.models import build_module, get_architecture


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _model(seed=0):
    torch.manual_seed(seed)
    return build_module(get_architecture("lenet5", (1, 8, 8), 4)).double()


def _data(n=60, seed=0):
    """Learnable labels: the brightest of the four 4x4 quadrants."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 8, 8, generator=g, dtype=torch.float64)
    quads = torch.stack(
        [x[:, 0, :4, :4], x[:, 0, :4, 4:], x[:, 0, 4:, :4], x[:, 0, 4:, 4:]], 1
    ).mean((2, 3))
    return x, quads.argmax(1)


def _max_diff(a, b):
    return max(float((p - q).abs().max()) for p, q in zip(a, b, strict=True))


def test_nu_zero_is_fedavg_sgd_step_for_step():
    x, y = _data()
    cfg = MetaConfig(nu=0, alpha=0.3, beta=0.1, mode="exact", local_steps=5, outer_batch_size=16)
    meta = _model()
    meta_train(meta, x, y, cfg, np.random.default_rng(7))

    # FedAvg client written with torch.optim.SGD on the same seeded batches
    ref = _model()
    opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    sampler = BatchSampler(x, y, np.random.default_rng(7))
    for _ in range(5):
        bx, by = sampler.sample(16)
        opt.zero_grad()
        nn.functional.cross_entropy(ref(bx), by).backward()
        opt.step()
    assert _max_diff(model_params(meta), model_params(ref)) < 1e-12

    sgd = _model()
    sgd_train(sgd, x, y, lr=0.1, local_steps=5, batch_size=16, rng=np.random.default_rng(7))
    assert _max_diff(model_params(meta), model_params(sgd)) < 1e-12


def _per_fedavg_reference(model, x, y, alpha, beta, steps, bsz, rng, hf, delta):
    """Per-FedAvg client (Fallah et al. 2020, Alg. 1) in the style of public reimplementations:
    copy, inner SGD step on batch 1, gradient on batch 2 at the adapted copy, restore, and for HF
    the finite-difference Hessian correction on batch 3."""
    sampler = BatchSampler(x, y, rng)
    for _ in range(steps):
        b1, b2 = sampler.sample(bsz), sampler.sample(bsz)
        b3 = sampler.sample(bsz) if hf else None
        temp = copy.deepcopy(model.state_dict())
        model.zero_grad()
        nn.functional.cross_entropy(model(b1[0]), b1[1]).backward()
        with torch.no_grad():
            for p in model.parameters():
                p -= alpha * p.grad
        model.zero_grad()
        nn.functional.cross_entropy(model(b2[0]), b2[1]).backward()
        outer = [p.grad.detach().clone() for p in model.parameters()]
        model.load_state_dict(temp)
        if hf:
            grads = []
            for sign in (1.0, -1.0):
                with torch.no_grad():
                    for p, g in zip(model.parameters(), outer, strict=True):
                        p += sign * delta * g
                model.zero_grad()
                nn.functional.cross_entropy(model(b3[0]), b3[1]).backward()
                grads.append([p.grad.detach().clone() for p in model.parameters()])
                model.load_state_dict(temp)
            outer = [
                g - alpha * (gp - gm) / (2 * delta)
                for g, gp, gm in zip(outer, grads[0], grads[1], strict=True)
            ]
        with torch.no_grad():
            for p, g in zip(model.parameters(), outer, strict=True):
                p -= beta * g


@pytest.mark.parametrize("mode", ["first-order", "hessian-free"])
def test_nu_one_is_per_fedavg_step_for_step(mode):
    x, y = _data()
    hf = mode == "hessian-free"
    cfg = MetaConfig(
        nu=1,
        alpha=0.2,
        beta=0.05,
        mode=mode,
        local_steps=4,
        inner_batch_size=10,
        outer_batch_size=10,
        hessian_batch_size=10,
        hessian_batches="independent",
        delta=1e-3,
    )
    meta = _model()
    res = meta_train(meta, x, y, cfg, np.random.default_rng(3))
    ref = _model()
    _per_fedavg_reference(ref, x, y, 0.2, 0.05, 4, 10, np.random.default_rng(3), hf, 1e-3)
    assert _max_diff(model_params(meta), model_params(ref)) < 1e-12
    assert res.metrics["grad-evals"] == 4 * (4 if hf else 2)
    assert res.metrics["samples-processed"] == 4 * 10 * (3 if hf else 2)
    # and the update really moved the weights
    assert _max_diff(model_params(meta), model_params(_model())) > 1e-4


def test_meta_training_is_seeded_and_reduces_the_meta_loss():
    x, y = _data(120, seed=1)
    cfg = MetaConfig(
        nu=2,
        alpha=0.1,
        beta=0.2,
        mode="exact",
        local_steps=30,
        inner_batch_size=20,
        outer_batch_size=20,
        hessian_batches="reuse",
    )
    a, b = _model(), _model()
    ra = meta_train(a, x, y, cfg, np.random.default_rng(0))
    meta_train(b, x, y, cfg, np.random.default_rng(0))
    assert _max_diff(model_params(a), model_params(b)) == 0.0
    assert ra.metrics["hvp-evals"] == 60 and ra.metrics["grad-evals"] == 90
    assert ra.metrics["grad-equivalents"] == 90 + 2 * 60
    before, _ = evaluate(_model(), x, y)
    after, _ = evaluate(a, x, y)
    assert after < before


def test_fedprox_term_pulls_towards_the_global_model():
    x, y = _data()
    free, prox = _model(), _model()
    w0 = model_params(_model())
    sgd_train(free, x, y, 0.5, 20, 16, np.random.default_rng(0), proximal_mu=0.0)
    sgd_train(prox, x, y, 0.5, 20, 16, np.random.default_rng(0), proximal_mu=1.0)
    dist = [
        float(sum(((p - q) ** 2).sum() for p, q in zip(model_params(m), w0, strict=True)))
        for m in (free, prox)
    ]
    assert dist[1] < dist[0]


def test_pfedme_one_step_one_inner_step_is_scaled_sgd():
    # theta = w - lr_p grad f(w); w' = w - eta lam (w - theta) = w - eta lam lr_p grad f(w)
    x, y = _data()
    a, b = _model(), _model()
    pfedme_train(
        a,
        x,
        y,
        lr=0.1,
        personal_lr=0.05,
        lam=4.0,
        inner_steps=1,
        local_steps=1,
        batch_size=16,
        rng=np.random.default_rng(2),
    )
    sgd_train(
        b, x, y, lr=0.1 * 4.0 * 0.05, local_steps=1, batch_size=16, rng=np.random.default_rng(2)
    )
    assert _max_diff(model_params(a), model_params(b)) < 1e-12


def test_pfedme_counts_k_gradients_per_step():
    x, y = _data()
    res = pfedme_train(_model(), x, y, 0.05, 0.05, 15.0, 5, 3, 16, np.random.default_rng(0))
    assert res.metrics["grad-evals"] == 15


def test_personalization_curve_adapts_on_train_only_and_restores_model():
    x, y = _data(80, seed=2)
    xt, yt = _data(40, seed=3)
    model = _model()
    w0 = model_params(model)
    curve = personalization_curve(model, x, y, xt, yt, 0.5, 5, 16, np.random.default_rng(0))
    assert len(curve.correct) == 6 and curve.grad_evals == 5 and curve.num_test == 40
    assert _max_diff(model_params(model), w0) == 0.0
    loss0, correct0 = evaluate(model, xt, yt)
    assert curve.loss[0] == pytest.approx(loss0) and curve.correct[0] == correct0
    # adaptation depends on the training data and not on the test labels
    shuffled = personalization_curve(
        model, x, y[torch.randperm(80)], xt, yt, 0.5, 5, 16, np.random.default_rng(0)
    )
    assert shuffled.loss[5] != curve.loss[5]
    other_test = personalization_curve(
        model, x, y, xt, (yt + 1) % 4, 0.5, 5, 16, np.random.default_rng(0)
    )
    assert curve.loss[5] != other_test.loss[5]
    # fine-tuning on the data reduces its own test loss when train == test distribution
    same = personalization_curve(model, x, y, x, y, 0.5, 5, 80, np.random.default_rng(0))
    assert same.loss[5] < same.loss[0]
