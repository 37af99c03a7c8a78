"""Checkpoint and resume for any strategy: a wrapper that saves after every round.

After each round (at the end of ``aggregate_evaluate``, which every loop calls once per round) the
wrapper writes one atomic ``.npz`` (:func:`~flwr_analytic.strategies.checkpoint.write_checkpoint`):
the server round, Python's ``random`` state (Flower samples nodes with it), the latest global arrays,
the ``Result`` metrics so far, the wrapped strategies' own state (``checkpoint_state()``: FedACnnL's
solved layers and summed statistics, a ``Metered`` history) and a fingerprint of the configuration. A
``start`` that finds the file checks the fingerprint (a mismatch raises
:class:`~flwr_analytic.strategies.checkpoint.CheckpointMismatchError` naming every differing key),
restores everything and continues at the next round, so the final model equals an uninterrupted
run's bit for bit whenever the clients' work depends only on what the server sends them.
"""

from __future__ import annotations

from collections.abc import Mapping
from logging import INFO
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy

from flwr_analytic.strategies.checkpoint import (
    check_fingerprint,
    random_state,
    read_checkpoint,
    set_random_state,
    write_checkpoint,
)
from flwr_analytic.strategies.utils import arrays_digest
from flwr_analytic.strategies.wrapper import StrategyWrapper

_SKIP = frozenset({"history", "checkpoint_path"})


def _records(saved: Mapping[str, Mapping[str, Any]]) -> dict[int, MetricRecord]:
    return {int(r): MetricRecord(dict(m)) for r, m in saved.items()}


def _shift(metrics: dict[int, MetricRecord], offset: int) -> dict[int, MetricRecord]:
    return {r + offset: m for r, m in metrics.items()}


class Checkpointed(StrategyWrapper):
    """Write a checkpoint after every round of ``strategy``; resume from it on ``start``.

    Parameters
    ----------
    strategy : Strategy
        The wrapped strategy (FedACnnL, Flower's FedAvg/FedProx, the meta strategies, wrappers).
    path : str or Path
        The checkpoint file (``.npz``), written atomically (``<path>.tmp`` then ``os.replace``).
    fingerprint : mapping, optional
        More configuration a checkpoint must match (e.g. the run config's data keys).

    Notes
    -----
    It must be the outermost wrapper (``Checkpointed(Metered(FedACnnL(...)))``): it saves the state
    of what it wraps, and a wrapper outside it is refused at ``start``. The fingerprint is the
    wrapped strategy's ``checkpoint_fingerprint()`` when it has one (FedACnnL: architecture,
    schemes, ridges, seed, dtype, aggregation, release, groups), else its class and scalar
    attributes; plus the train/evaluate configs, the SHA-256 of the initial
    arrays and ``fingerprint``. ``num_rounds`` is not part of it: a finished run can be extended.
    """

    FORMAT = "flwr-analytic-checkpoint/2"

    def __init__(
        self,
        strategy: Strategy,
        path: str | Path,
        fingerprint: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(strategy)
        self.path = Path(path)
        self.extra = dict(fingerprint or {})
        self.offset = self._last = 0
        self._fp: dict[str, Any] = {}
        self._arrays: ArrayRecord | None = None
        self._metrics: dict[str, dict[int, MetricRecord]] = {"train": {}, "evaluate": {}}

    def fingerprint(
        self, initial_arrays: ArrayRecord | None, train_config: Any, evaluate_config: Any
    ) -> dict[str, Any]:
        """What a checkpoint must match to be resumed (see the class notes)."""
        own = getattr(self.strategy, "checkpoint_fingerprint", None)
        if own is not None:
            base = dict(own())
        else:
            inner = self.innermost()
            base = {"strategy": type(inner).__name__}
            base.update({k: v for k, v in sorted(vars(inner).items())
                         if not k.startswith("_") and k not in _SKIP
                         and isinstance(v, bool | int | float | str)})  # fmt: skip
        return {
            **base,
            # Flower's FedAvg writes ``server-round`` into the config it is given: not configuration
            "train-config": {k: v for k, v in (train_config or {}).items() if k != "server-round"},
            "evaluate-config": {
                k: v for k, v in (evaluate_config or {}).items() if k != "server-round"
            },
            "initial-arrays-sha256": arrays_digest(initial_arrays or ArrayRecord()),
            **self.extra,
        }

    def save(self, server_round: int) -> Path:
        """Write the checkpoint of the state after ``server_round``."""
        own = getattr(self.strategy, "checkpoint_state", None)
        arrays, meta = own() if own is not None else ({}, {})
        saved = {} if self._arrays is None else {k: v.numpy() for k, v in self._arrays.items()}
        arrays = {**arrays, **{f"array/{k}": v for k, v in saved.items()}}
        meta = {
            **meta,
            "format": self.FORMAT,
            "fingerprint": self._fp,
            "server-round": int(server_round),
            "random-state": random_state(),
            "array-keys": list(saved),
            "metrics": {
                kind: {str(r): dict(m) for r, m in ms.items()} for kind, ms in self._metrics.items()
            },  # fmt: skip
        }
        return write_checkpoint(self.path, arrays, meta)

    def restore(
        self,
        initial_arrays: ArrayRecord | None = None,
        train_config: Any = None,
        evaluate_config: Any = None,
    ) -> ArrayRecord | None:
        """Restore the wrapped strategies from the checkpoint (configuration checked first).

        Returns the saved global arrays (``None`` when the strategy keeps its model itself).
        """
        self._fp = self.fingerprint(initial_arrays, train_config, evaluate_config)
        arrays, meta = read_checkpoint(self.path, self.FORMAT)
        check_fingerprint(meta["fingerprint"], self._fp, self.path)
        own = getattr(self.strategy, "restore_checkpoint_state", None)
        if own is not None:
            own(arrays, meta)
        set_random_state(meta["random-state"])
        self.offset = self._last = int(meta["server-round"])
        self._metrics = {kind: _records(ms) for kind, ms in meta["metrics"].items()}
        keys = meta["array-keys"]
        if keys:
            self._arrays = ArrayRecord(
                {k: Array(np.ascontiguousarray(arrays[f"array/{k}"])) for k in keys}
            )
        log(INFO, "Resuming after round %d from checkpoint %s", self.offset, self.path)
        return self._arrays

    def run_loop(
        self,
        driver: Strategy,
        grid: Grid,
        initial_arrays: ArrayRecord | None = None,
        num_rounds: int | None = None,
        **kwargs: Any,
    ) -> Result:
        """Resume from the checkpoint if there is one, then run the wrapped strategy's loop.

        Other arguments as Flower's ``Strategy.start``. The loops start at round 1 from
        ``initial_arrays``; a resumed run must start at round ``r + 1`` from the saved arrays, so
        this wrapper shifts every round number the loop uses by ``r``.
        """
        if driver is not self:
            raise ValueError(
                f"Checkpointed must be the outermost wrapper, but {type(driver).__name__} wraps "
                "it: a wrapper outside it would not be saved and would see the round numbers of a "
                "resumed run restart at 1"
            )
        configs = (kwargs.get("train_config"), kwargs.get("evaluate_config"))
        self._fp = self.fingerprint(initial_arrays, *configs)
        self.offset = 0
        if self.path.is_file():
            initial_arrays = self.restore(initial_arrays, *configs) or initial_arrays
        offset, evaluate_fn = self.offset, kwargs.get("evaluate_fn")
        if num_rounds is not None:
            kwargs["num_rounds"] = max(0, num_rounds - offset)
        if evaluate_fn is not None:
            kwargs["evaluate_fn"] = lambda rnd, arrays: evaluate_fn(rnd + offset, arrays)
        result = super().run_loop(driver, grid, initial_arrays, **kwargs)
        result.train_metrics_clientapp = {
            **self._metrics["train"],
            **_shift(result.train_metrics_clientapp, offset),
        }
        result.evaluate_metrics_clientapp = {
            **self._metrics["evaluate"],
            **_shift(result.evaluate_metrics_clientapp, offset),
        }
        result.evaluate_metrics_serverapp = _shift(result.evaluate_metrics_serverapp, offset)
        if (result.arrays is None or not len(result.arrays)) and self._arrays is not None:
            result.arrays = self._arrays
        return result

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> list[Message]:
        """The wrapped strategy's messages for the absolute round."""
        return list(self.strategy.configure_train(server_round + self.offset, arrays, config, grid))

    def aggregate_train(
        self, server_round: int, replies: Any
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Aggregate the absolute round; remember the arrays and metrics for the checkpoint."""
        rnd = server_round + self.offset
        arrays, metrics = self.strategy.aggregate_train(rnd, replies)
        if arrays is not None:
            self._arrays = arrays
        if metrics is not None:
            self._metrics["train"][rnd] = metrics
        return arrays, metrics

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> list[Message]:
        """The wrapped strategy's evaluation messages for the absolute round."""
        rnd = server_round + self.offset
        return list(self.strategy.configure_evaluate(rnd, arrays, config, grid))

    def aggregate_evaluate(self, server_round: int, replies: Any) -> MetricRecord | None:
        """Aggregate the absolute round's evaluation, then write the checkpoint of the round."""
        rnd = server_round + self.offset
        metrics = self.strategy.aggregate_evaluate(rnd, replies)
        if metrics is not None:
            self._metrics["evaluate"][rnd] = metrics
        if rnd > 0:
            self._last = rnd
            self.save(rnd)
        return metrics

    def add_clients(self, statistics: Any) -> Any:
        """The wrapped strategy's ``add_clients`` (FedACnnL), then a checkpoint."""
        w = self.strategy.add_clients(statistics)
        self.save(self._last)
        return w

    def remove_clients(self, statistics: Any) -> Any:
        """The wrapped strategy's ``remove_clients`` (FedACnnL), then a checkpoint."""
        w = self.strategy.remove_clients(statistics)
        self.save(self._last)
        return w


__all__ = ["Checkpointed"]
