"""Server checkpoints: atomic ``.npz`` files (plain arrays + one JSON document) and resumable rounds.

A server process that dies mid-run loses nothing that was aggregated: the strategies write a checkpoint
after every solved layer (:class:`~flwr_analytic.strategies.FedACnnL`) or every round (the FedAvg-based
meta strategies, :class:`ResumableStartMixin`), and ``start()`` with the same configuration continues
from it. A checkpoint is one ``.npz`` file written to ``<path>.tmp`` and moved over ``path`` with
``os.replace`` (atomic on POSIX and Windows), so a crash while writing leaves the previous checkpoint
intact. It holds only plain numeric arrays and a JSON string (loaded with ``allow_pickle=False``).

Each checkpoint records a *fingerprint* of the configuration that determines the model; resuming with a
different configuration raises :class:`CheckpointMismatchError` naming every differing key.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import time
from collections.abc import Callable, Mapping
from logging import INFO
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result

#: Name of the JSON document inside the ``.npz``.
META_KEY = "__meta__"


class CheckpointMismatchError(ValueError):
    """A checkpoint was written by a run with another configuration (or another strategy)."""


def write_checkpoint(path: str | Path, arrays: Mapping[str, np.ndarray], meta: Mapping) -> Path:
    """Atomically write ``arrays`` and the JSON document ``meta`` to ``path`` (an ``.npz`` file).

    The file is written to ``<path>.tmp``, flushed and fsync-ed, then renamed over ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if META_KEY in arrays:
        raise ValueError(f"array name {META_KEY!r} is reserved")
    tmp = path.with_name(path.name + ".tmp")
    payload = {k: np.ascontiguousarray(v) for k, v in arrays.items()}
    payload[META_KEY] = np.array(json.dumps(_jsonable(dict(meta))))
    with open(tmp, "wb") as fh:
        np.savez(fh, **payload)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path


def read_checkpoint(path: str | Path, kind: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Read a checkpoint written by :func:`write_checkpoint`; check its ``format`` is ``kind``.

    Returns
    -------
    (arrays, meta)
        The arrays by name and the JSON document.

    Raises
    ------
    CheckpointMismatchError
        When the file is a checkpoint of another kind (e.g. of another strategy).

    """
    with open(path, "rb") as fh:
        data = np.load(io.BytesIO(fh.read()), allow_pickle=False)
        arrays = {k: data[k] for k in data.files if k != META_KEY}
        meta = json.loads(str(data[META_KEY]))
    if meta.get("format") != kind:
        raise CheckpointMismatchError(
            f"{path} is a {meta.get('format')!r} checkpoint, expected {kind!r}"
        )
    return arrays, meta


def check_fingerprint(saved: Mapping[str, Any], current: Mapping[str, Any], path: Any) -> None:
    """Raise :class:`CheckpointMismatchError` naming every key where ``saved != current``."""
    saved, current = _jsonable(dict(saved)), _jsonable(dict(current))
    diff = [
        f"{key}: checkpoint {saved.get(key, '<absent>')!r} != this run {current.get(key, '<absent>')!r}"
        for key in sorted(set(saved) | set(current))
        if saved.get(key) != current.get(key)
    ]
    if diff:
        raise CheckpointMismatchError(
            f"checkpoint {path} was written with another configuration ({'; '.join(diff)}); "
            "resume with the same configuration or delete the checkpoint to start over"
        )


def random_state() -> list[Any]:
    """Python's global ``random`` state (Flower samples nodes with it) as JSON-able lists."""
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def set_random_state(state: list[Any]) -> None:
    """Inverse of :func:`random_state`."""
    version, internal, gauss = state
    random.setstate((int(version), tuple(int(v) for v in internal), gauss))


def digest_arrays(arrays: Mapping[str, np.ndarray]) -> str:
    """SHA-256 of named arrays (sorted by name; dtype, shape and bytes)."""
    h = hashlib.sha256()
    for key in sorted(arrays):
        arr = np.ascontiguousarray(arrays[key])
        h.update(f"{key}|{arr.dtype.str}|{arr.shape}".encode())
        h.update(arr.tobytes())
    return h.hexdigest()


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set):
        items = sorted(value) if isinstance(value, set) else value
        return [_jsonable(v) for v in items]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    return value


def _record_arrays(record: ArrayRecord | None) -> dict[str, np.ndarray]:
    return {} if record is None else {k: v.numpy() for k, v in record.items()}


def _metric_dicts(metrics: Mapping[int, MetricRecord]) -> dict[str, dict[str, Any]]:
    return {str(r): dict(m) for r, m in metrics.items()}


def _metric_records(saved: Mapping[str, Mapping[str, Any]]) -> dict[int, MetricRecord]:
    return {int(r): MetricRecord(dict(m)) for r, m in saved.items()}


class ResumableStartMixin:
    """``start()`` that checkpoints every round and resumes from the checkpoint (FedAvg-style loop).

    Place it first in the bases of a Flower :class:`~flwr.serverapp.strategy.Strategy` that uses
    Flower's round loop (``FedAvg`` and its subclasses). With ``checkpoint_path`` unset, ``start`` is
    Flower's own. With it set, ``start`` runs the same loop (``configure_train`` → ``aggregate_train``
    → ``configure_evaluate`` → ``aggregate_evaluate`` → ``evaluate_fn``) and after every round writes
    ``path`` atomically: the global arrays (exact dtype and bits), the server round, Python's
    ``random`` state (Flower samples nodes with it), the per-round ``history`` and the ``Result``
    metrics, and a fingerprint of the configuration (strategy class, every scalar attribute, the
    train/evaluate configs and the SHA-256 of ``initial_arrays``). A later ``start`` with the same
    configuration continues at the next round with the saved arrays and ``random`` state, so the
    final arrays equal those of an uninterrupted run bit for bit whenever the clients' work depends
    only on the global arrays and the server round (as in the meta app, whose clients seed their
    generators with ``(seed, partition-id, server-round)``). A different configuration raises
    :class:`CheckpointMismatchError`. ``num_rounds`` is not part of the fingerprint: a finished run
    can be extended by resuming with a larger value.
    """

    #: Where :meth:`start` keeps its checkpoint (``None``: Flower's loop, no checkpoint).
    checkpoint_path: str | Path | None = None
    CHECKPOINT_FORMAT = "flwr-analytic-rounds-checkpoint/1"
    _FINGERPRINT_SKIP = frozenset({"checkpoint_path", "history", "evaluate_rounds"})

    def checkpoint_fingerprint(
        self,
        initial_arrays: ArrayRecord | None,
        train_config: ConfigRecord,
        evaluate_config: ConfigRecord,
    ) -> dict[str, Any]:
        """The configuration a checkpoint must match to be resumed (see the class docstring)."""
        scalars = {
            k: v
            for k, v in sorted(vars(self).items())
            if not k.startswith("_")
            and k not in self._FINGERPRINT_SKIP
            and isinstance(v, bool | int | float | str)
        }
        return {
            "strategy": type(self).__name__,
            **scalars,
            "train-config": dict(train_config),
            "evaluate-config": dict(evaluate_config),
            "initial-arrays-sha256": digest_arrays(_record_arrays(initial_arrays)),
        }

    def _save_round(
        self, path: Path, server_round: int, arrays: ArrayRecord, result: Result, fp: dict
    ) -> None:
        history = [{k: v for k, v in e.items() if k != "t0"} for e in getattr(self, "history", [])]
        saved = _record_arrays(arrays)
        meta = {
            "format": self.CHECKPOINT_FORMAT,
            "fingerprint": fp,
            "server-round": server_round,
            "array-keys": list(saved),
            "has-result-arrays": bool(result.arrays is not None and len(result.arrays)),
            "random-state": random_state(),
            "history": history,
            "train-metrics": _metric_dicts(result.train_metrics_clientapp),
            "evaluate-metrics": _metric_dicts(result.evaluate_metrics_clientapp),
            "server-metrics": _metric_dicts(result.evaluate_metrics_serverapp),
            "time": time.time(),
        }
        write_checkpoint(path, {f"array/{k}": v for k, v in saved.items()}, meta)

    def _load_round(self, path: Path, fp: dict, result: Result) -> tuple[int, ArrayRecord]:
        arrays, meta = read_checkpoint(path, self.CHECKPOINT_FORMAT)
        check_fingerprint(meta["fingerprint"], fp, path)
        record = ArrayRecord(
            {k: Array(np.ascontiguousarray(arrays[f"array/{k}"])) for k in meta["array-keys"]}
        )
        if meta["has-result-arrays"]:
            result.arrays = record
        result.train_metrics_clientapp.update(_metric_records(meta["train-metrics"]))
        result.evaluate_metrics_clientapp.update(_metric_records(meta["evaluate-metrics"]))
        result.evaluate_metrics_serverapp.update(_metric_records(meta["server-metrics"]))
        self.history = [dict(e) for e in meta["history"]]  # type: ignore[attr-defined]
        set_random_state(meta["random-state"])
        return int(meta["server-round"]), record

    # pylint: disable=too-many-arguments,too-many-positional-arguments,too-many-locals
    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
    ) -> Result:
        """Flower's round loop with a checkpoint after every round (see the class docstring).

        Parameters and return value as :meth:`flwr.serverapp.strategy.Strategy.start`.
        """
        if not self.checkpoint_path:
            return super().start(  # type: ignore[misc]
                grid,
                initial_arrays,
                num_rounds=num_rounds,
                timeout=timeout,
                train_config=train_config,
                evaluate_config=evaluate_config,
                evaluate_fn=evaluate_fn,
            )
        path = Path(self.checkpoint_path)
        train_config = ConfigRecord() if train_config is None else train_config
        evaluate_config = ConfigRecord() if evaluate_config is None else evaluate_config
        fp = self.checkpoint_fingerprint(initial_arrays, train_config, evaluate_config)
        result = Result()
        arrays, done = initial_arrays, 0
        log(INFO, "Starting %s strategy (checkpoint %s):", type(self).__name__, path)
        self.summary()  # type: ignore[attr-defined]
        t_start = time.time()
        if path.is_file():
            done, arrays = self._load_round(path, fp, result)
            log(INFO, "Resuming after round %d from checkpoint %s", done, path)
        elif evaluate_fn:
            res = evaluate_fn(0, initial_arrays)
            if res is not None:
                result.evaluate_metrics_serverapp[0] = res
        for current_round in range(done + 1, num_rounds + 1):
            log(INFO, "")
            log(INFO, "[ROUND %s/%s]", current_round, num_rounds)
            replies = grid.send_and_receive(
                messages=self.configure_train(current_round, arrays, train_config, grid),  # type: ignore[attr-defined]
                timeout=timeout,
            )
            agg_arrays, agg_metrics = self.aggregate_train(current_round, replies)  # type: ignore[attr-defined]
            if agg_arrays is not None:
                result.arrays = arrays = agg_arrays
            if agg_metrics is not None:
                log(INFO, "\t└──> Aggregated MetricRecord: %s", agg_metrics)
                result.train_metrics_clientapp[current_round] = agg_metrics
            replies = grid.send_and_receive(
                messages=self.configure_evaluate(current_round, arrays, evaluate_config, grid),  # type: ignore[attr-defined]
                timeout=timeout,
            )
            agg_eval = self.aggregate_evaluate(current_round, replies)  # type: ignore[attr-defined]
            if agg_eval is not None:
                log(INFO, "\t└──> Aggregated MetricRecord: %s", agg_eval)
                result.evaluate_metrics_clientapp[current_round] = agg_eval
            if evaluate_fn:
                res = evaluate_fn(current_round, arrays)
                if res is not None:
                    result.evaluate_metrics_serverapp[current_round] = res
            self._save_round(path, current_round, arrays, result, fp)
        log(INFO, "Strategy execution finished in %.2fs", time.time() - t_start)
        return result


__all__ = [
    "CheckpointMismatchError",
    "ResumableStartMixin",
    "check_fingerprint",
    "digest_arrays",
    "random_state",
    "read_checkpoint",
    "set_random_state",
    "write_checkpoint",
]
