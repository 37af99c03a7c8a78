r"""Test-time personalization curve (no Flower imports).

The received global model is fine-tuned with ``s`` SGD steps at rate α on the client's *training*
batches, ``theta^{s+1} = theta^s - alpha grad f_i(theta^s; D_s)``, and each ``theta^s``
(``s = 0..S``; ``s = 0`` is the global model) is evaluated on the client's held-out *test* split.
This is the quantity the ν-step meta objective optimizes (Jamali et al., arXiv:2504.21327;
Per-FedAvg, Fallah et al. 2020). Test data is never used for adaptation.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from flwr_analytic.meta.local_training import BatchSampler
from flwr_analytic.meta.meta_gradient import gradient, load_params, make_loss_fn, model_params


@dataclass
class PersonalizationCurve:
    """Test loss and accuracy after ``s = 0..S`` fine-tuning steps.

    Attributes
    ----------
    loss : list[float]
        Mean test loss at each ``s``.
    correct : list[float]
        Number of correctly classified test samples at each ``s``.
    num_test : int
        Test-set size.
    grad_evals : int
        Fine-tuning gradients spent (``S``).

    """

    loss: list[float] = field(default_factory=list)
    correct: list[float] = field(default_factory=list)
    num_test: int = 0
    grad_evals: int = 0

    @property
    def accuracy(self) -> list[float]:
        """Accuracy at each ``s``."""
        return [c / max(self.num_test, 1) for c in self.correct]


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 1024) -> tuple[float, int]:
    """``(mean cross-entropy, number correct)`` of ``model`` on ``(x, y)``."""
    model.eval()
    total, correct = 0.0, 0
    for i in range(0, len(y), batch_size):
        logits = model(x[i : i + batch_size])
        yy = y[i : i + batch_size]
        total += float(nn.functional.cross_entropy(logits, yy, reduction="sum"))
        correct += int((logits.argmax(1) == yy).sum())
    return total / max(len(y), 1), correct


def personalization_curve(
    model: nn.Module,
    x_train: Tensor,
    y_train: Tensor,
    x_test: Tensor,
    y_test: Tensor,
    alpha: float,
    steps: int,
    batch_size: int,
    rng: np.random.Generator,
) -> PersonalizationCurve:
    """Fine-tune a copy of ``model``'s weights with ``steps`` SGD steps and test after each.

    Parameters
    ----------
    model : torch.nn.Module
        The received global model (restored on exit).
    x_train, y_train : torch.Tensor
        The client's training data (the only data used to adapt).
    x_test, y_test : torch.Tensor
        The client's held-out test data.
    alpha : float
        Fine-tuning step size α (the inner rate of the meta objective).
    steps : int
        ``S``; the curve has ``S + 1`` points.
    batch_size : int
        Fine-tuning minibatch size.
    rng : numpy.random.Generator
        Seeded batch sampler.

    """
    w0 = model_params(model)
    loss_fn = make_loss_fn(model)
    sampler = BatchSampler(x_train, y_train, rng) if steps > 0 else None
    curve = PersonalizationCurve(num_test=len(y_test))
    params = w0
    try:
        for s in range(steps + 1):
            load_params(model, params)
            loss, correct = evaluate(model, x_test, y_test)
            curve.loss.append(loss)
            curve.correct.append(float(correct))
            if s < steps:
                g = gradient(loss_fn, params, sampler.sample(batch_size))
                params = tuple(p - alpha * q for p, q in zip(params, g, strict=True))
                curve.grad_evals += 1
    finally:
        load_params(model, w0)
    return curve
