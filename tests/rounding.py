"""Rounding bounds for comparing two float64 solves of the same ridge system (shared by tests)."""

from __future__ import annotations

import numpy as np

from flwr_analytic.analytic import AnalyticNetwork, LayerStatistics

#: Relative tolerance of layers whose solve is well conditioned.
TOL = 1e-9


def output_rounding_bound(net: AnalyticNetwork, total: LayerStatistics) -> float:
    """Relative bound ``ε·κ(ΣG + γI)`` (at least :data:`TOL`) on the output layer of two runs.

    Two runs over the same data differ only in summation order (the clients' sums, BLAS blocking
    under other thread counts): a relative perturbation ``~ε`` of ``ΣG``, which a linear solve
    amplifies by at most the condition number (first-order perturbation bound). The digits CNN
    heads with γ = 1e-6 relative have ``κ ≈ 5e7``: about 1e-8.
    """
    gram = total.gram
    ridge = net.output_reg.amount(gram)
    return max(TOL, np.finfo(np.float64).eps * np.linalg.cond(gram + ridge * np.eye(len(gram))))
