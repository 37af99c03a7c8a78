"""Former home of :class:`LocalGrid`, now in :mod:`flwr_analytic.grid` (this path still works)."""

from flwr_analytic.grid import LocalGrid

__all__ = ["LocalGrid"]
