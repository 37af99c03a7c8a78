"""Metering for any strategy: bytes each way, wall time and per-client metrics of every round.

A wrapper (:class:`~flwr_analytic.strategies.wrapper.StrategyWrapper`): it counts the tensor bytes of
the messages the wrapped strategy sends and of the replies it gets (lazily, so a streaming strategy
still sees its replies one at a time), times each half round from ``configure_*`` to the end of
``aggregate_*``, keeps each client's scalar metrics of every evaluation round (by ``partition-id``),
and writes all of it into the round's :class:`~flwr_analytic.strategies.records.RoundRecord`: the
wrapped strategy's own record when it keeps a :class:`~flwr_analytic.strategies.records.RoundLog`
(FedACnnL), else one of its own (Flower's FedAvg, FedProx, the meta strategies).

It also logs the one INFO line of every training round (``layer k/L`` for a layer-wise strategy,
else ``round r/R``; clients, rejected, bytes, seconds, elapsed time and an estimate of what
remains), and keeps what Flower's own loop logs short: the ``MetricRecord`` s it returns print
compactly (:class:`ReadableMetricRecord`) and, under Flower's ``Strategy.start`` (which logs every
aggregated record and prints them all at the end), hold no lists: per-client lists and curves stay
in the round records (the JSON).
"""

from __future__ import annotations

import inspect
import json
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from logging import INFO
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy

from flwr_analytic.strategies.records import RoundLog, RoundRecord
from flwr_analytic.strategies.utils import message_nbytes
from flwr_analytic.strategies.wrapper import StrategyWrapper


def _sent_nbytes(messages: list[Message]) -> int:
    return int(sum(message_nbytes(m) for m in messages))


def _client_metrics(replies: list[Message]) -> dict[str, list[float]]:
    """Each scalar metric of the replies, one value per client, ordered by ``partition-id``."""
    rows = []
    for msg in replies:
        if not msg.has_error():
            for record in msg.content.metric_records.values():
                rows.append({k: v for k, v in record.items() if isinstance(v, int | float)})
    rows.sort(key=lambda m: float(m.get("partition-id", -1)))
    keys = sorted(set().union(*rows)) if rows else []
    return {k: [float(m[k]) for m in rows] for k in keys if all(k in m for m in rows)}


def _short(value: Any) -> str:
    if isinstance(value, int):  # bool too
        return str(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list | tuple):
        return f"[{len(value)} values]"
    return repr(value)


class ReadableMetricRecord(MetricRecord):
    """A :class:`~flwr.app.MetricRecord` whose text form fits a log line.

    Floats to 4 significant digits, lists as their length, at most :attr:`MAX_CHARS` characters
    (``… +k more`` for the keys left out). The values are those given: only the text is short.
    """

    MAX_CHARS = 120

    def __repr__(self) -> str:
        """``{key: value, ...}``, short (see the class)."""
        items = [f"{k}: {_short(v)}" for k, v in self.items()]
        shown, size = [], 2
        for k, item in enumerate(items):
            tail = len(f", … +{len(items) - k - 1} more") if k < len(items) - 1 else 0
            if shown and size + len(item) + 2 + tail > self.MAX_CHARS:
                shown.append(f"… +{len(items) - k} more")
                break
            shown.append(item)
            size += len(item) + 2
        return "{" + ", ".join(shown) + "}"

    __str__ = __repr__

    def deflate(self) -> bytes:
        """Serialized as a plain ``MetricRecord`` (a receiver inflates it as one)."""
        return MetricRecord(dict(self)).deflate()


def human_seconds(seconds: float) -> str:
    """``0.81 s``, ``12 s``, ``4 min 05 s``, ``2 h 03 min``."""
    if seconds < 10:
        return f"{seconds:.2f} s"
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{int(seconds // 60)} min {int(seconds % 60):02d} s"
    return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"


def human_bytes(nbytes: float) -> str:
    """``512 B``, ``1.2 kB``, ``3.4 MB``, ``1.1 GB``."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if nbytes >= size:
            return f"{nbytes / size:.3g} {unit}"
    return f"{int(nbytes)} B"


@dataclass
class Progress:
    """Elapsed time of a run of ``total`` units (rounds, or layers) and an estimate of the rest.

    The estimate, from the second unit on, is the units left times the larger of the mean time
    of the units after the first (the first also pays for start-up: workers, data) and the last
    unit's time (layers get slower with depth; rounds take about the same time).
    """

    total: int | None
    done: int = 0
    start: float = field(default_factory=time.perf_counter)
    done_here: int = 0
    last: float = 0.0
    first: float = 0.0

    def step(self, seconds: float, completed: bool) -> None:
        """Count a round of ``seconds`` (a unit when ``completed``)."""
        self.last = seconds
        if completed:
            self.done += 1
            self.done_here += 1
            if self.done_here == 1:
                self.first = time.perf_counter() - self.start

    def text(self) -> str:
        """``elapsed 12 s, ~30 s left`` (an estimate from the second unit on, given a total)."""
        elapsed = time.perf_counter() - self.start
        out = f"elapsed {human_seconds(elapsed)}"
        if self.total is None or self.done_here < 2 or self.done >= self.total:
            return out
        per_unit = max((elapsed - self.first) / (self.done_here - 1), self.last)
        return f"{out}, ~{human_seconds(per_unit * (self.total - self.done))} left"


def round_line(record: RoundRecord, num_layers: int | None, label: str, errors: int = 0) -> str:
    """The INFO line of a training round (no per-client lists).

    ``layer k/L (round r)`` when the record has a ``layer`` (0-based in the record, 1-based here;
    ``, k-means iteration t`` in a ``zca-kmeans`` layer's Lloyd rounds), else ``label``; valid
    clients of those sent (the strategy's ``num-valid`` when it counts them, else replies without
    error), rejected (the strategy's ``rejected``, else the ``errors``),
    missing, bytes each way, seconds.
    """
    details = record.details
    if "layer" in details:
        of = f"/{num_layers}" if num_layers else ""
        step = f", k-means iteration {details['stage']}" if details.get("stage") else ""
        head = f"layer {int(details['layer']) + 1}{of} (round {record.round}{step})"
        if details.get("second-stage"):  # strategies.SecondStage: the head on [h, q, 1]
            head = f"second stage on layer {int(details['layer']) + 1}{of} (round {record.round})"
    else:
        head = label
    valid = details.get("num-valid", record.num_replies - errors)
    # a strategy that counts valid replies also lists every rejection (the SuperLink's errors for
    # nodes that are gone are missing replies, not rejected ones)
    counted = "rejected" in details or "num-valid" in details
    rejected = len(details.get("rejected", [])) if counted else errors
    parts = [f"{valid}/{record.num_sent} clients", f"{rejected} rejected"]
    if record.num_replies < record.num_sent:
        parts.append(f"{record.num_sent - record.num_replies} missing")
    parts += [
        f"sent {human_bytes(record.bytes_sent)}",
        f"received {human_bytes(record.bytes_received)}",
        human_seconds(record.seconds),
    ]
    if details.get("solved") is False:
        parts.append("not solved")
    return f"{head}: {', '.join(parts)}"


def _without_lists(metrics: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in metrics.items() if not isinstance(v, list | tuple)}


class Metered(StrategyWrapper):
    """Record bytes, wall time and per-client metrics of every round of ``strategy``.

    Parameters
    ----------
    strategy : Strategy
        The wrapped strategy.
    client_metrics : bool (default: True)
        Keep each client's scalar evaluation metrics in the round record
        (``details["client-metrics"]``: metric → per-client values by ``partition-id``).
    result_lists : bool, optional
        Whether the ``MetricRecord`` s returned to the loop keep list values (per-client values,
        curves). Default: not under Flower's ``Strategy.start``, which logs every returned record
        and prints them all at the end; yes otherwise (FedACnnL's loop logs none). The round
        records (:attr:`history`, the JSON) always keep them.

    Notes
    -----
    ``history`` is the :class:`RoundLog`; the training ``MetricRecord`` also gets ``bytes-sent``,
    ``bytes-received`` and ``round-time``. Each training round logs one line (:func:`round_line`)
    with the elapsed time and an estimate of what remains: of the strategy's ``num_rounds`` (a
    layer-wise strategy's fitted layers) when it has one, else of the loop's ``num_rounds``.
    """

    def __init__(
        self, strategy: Strategy, client_metrics: bool = True, result_lists: bool | None = None
    ) -> None:
        super().__init__(strategy)
        inner = getattr(strategy, "history", None)
        self.history: RoundLog = inner if isinstance(inner, RoundLog) else RoundLog()
        self.client_metrics = client_metrics
        self.result_lists = result_lists
        self._t0: dict[tuple[int, str], float] = {}
        self._errors: dict[int, int] = {}
        self._lists = True if result_lists is None else result_lists
        self._progress: Progress | None = None
        self._first_round: int | None = None

    def run_loop(self, driver: Strategy, grid: Grid, *args: Any, **kwargs: Any) -> Result:
        """Note the planned rounds and the start time, then run the loop (see the wrapper)."""
        flower_loop = type(self.innermost()).start is Strategy.start
        self._lists = (not flower_loop) if self.result_lists is None else self.result_lists
        layerwise = getattr(self.strategy, "num_rounds", None)
        if isinstance(layerwise, int):  # rounds are layers: count the solved ones
            done = sum(1 for r in self.history if r.kind == "train" and r.details.get("solved"))
            self._progress = Progress(layerwise, done)
        else:
            bound = inspect.signature(Strategy.start).bind_partial(driver, grid, *args, **kwargs)
            bound.apply_defaults()  # Flower's loop checks its arguments itself
            self._progress = Progress(int(bound.arguments["num_rounds"]))
        self._first_round = None
        try:
            return super().run_loop(driver, grid, *args, **kwargs)
        finally:
            self._progress = None

    def _returned(self, metrics: MetricRecord) -> MetricRecord:
        """The record handed back to the loop: short text, lists only if :attr:`_lists`."""
        return ReadableMetricRecord(dict(metrics) if self._lists else _without_lists(metrics))

    def _log_round(self, record: RoundRecord) -> None:
        errors, progress = self._errors.pop(record.round, 0), self._progress
        if progress is None:  # driven without a loop (a test, an adapter): no plan, no estimate
            label = f"round {record.round}"
            log(INFO, "%s", round_line(record, self._num_layers(), label, errors))
            return
        progress.step(record.seconds, record.details.get("solved", True) is not False)
        if self._first_round is None:
            self._first_round = record.round
        label = f"round {record.round}"
        if progress.total is not None:  # a wrapper's extra round (AnalyticHead) is past the plan
            last = self._first_round - 1 + progress.total
            label += f"/{last}" if record.round <= last else f" (after the {last} planned)"
        line = round_line(record, self._num_layers(), label, errors)
        log(INFO, "%s | %s", line, progress.text())

    def _num_layers(self) -> int | None:
        net = getattr(self.strategy, "net", None)
        return getattr(net, "num_layers", None)

    def _open(self, server_round: int, kind: str, messages: list[Message]) -> None:
        record = self.history.open(server_round, kind)
        record.num_sent = len(messages)
        record.bytes_sent = _sent_nbytes(messages)

    def _counted(self, replies: Iterable[Message], record: RoundRecord) -> Iterator[Message]:
        count = errors = 0
        for msg in replies:
            count += 1
            errors += int(msg.has_error())
            record.bytes_received += message_nbytes(msg)
            yield msg
        record.num_replies = count
        self._errors[record.round] = errors

    def _close(self, record: RoundRecord, kind: str) -> None:
        t0 = self._t0.pop((record.round, kind), None)
        if t0 is not None:
            record.seconds = time.perf_counter() - t0

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """The wrapped strategy's messages; their bytes and the start of the round recorded."""
        self._t0[(server_round, "train")] = time.perf_counter()
        messages = list(self.strategy.configure_train(server_round, arrays, config, grid))
        self._open(server_round, "train", messages)
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Count the replies' bytes as the wrapped strategy reads them; time the round."""
        record = self.history.open(server_round, "train")
        record.bytes_received = 0
        stream = self._counted(replies, record)
        if isinstance(replies, list | tuple):  # strategies may read a list more than once
            stream = list(stream)
        arrays, metrics = self.strategy.aggregate_train(server_round, stream)
        self._close(record, "train")
        self._log_round(record)
        if metrics is None:
            return arrays, None
        metrics["bytes-sent"] = record.bytes_sent
        metrics["bytes-received"] = record.bytes_received
        metrics["round-time"] = record.seconds
        if not isinstance(getattr(self.strategy, "history", None), RoundLog):
            record.metrics = dict(metrics)
        return arrays, self._returned(metrics)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """The wrapped strategy's evaluation messages; bytes and start time recorded."""
        self._t0[(server_round, "evaluate")] = time.perf_counter()
        messages = list(self.strategy.configure_evaluate(server_round, arrays, config, grid))
        if messages:
            self._open(server_round, "evaluate", messages)
        return messages

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Aggregate through the wrapped strategy; record time and per-client metrics."""
        replies = list(replies)
        if not replies:
            self._t0.pop((server_round, "evaluate"), None)
            return self.strategy.aggregate_evaluate(server_round, replies)
        record = self.history.open(server_round, "evaluate")
        record.bytes_received = sum(message_nbytes(m) for m in replies)
        record.num_replies = len(replies)
        metrics = self.strategy.aggregate_evaluate(server_round, replies)
        self._close(record, "evaluate")
        if self.client_metrics:
            record.details["client-metrics"] = _client_metrics(replies)
        if metrics is None:
            return None
        record.metrics = dict(metrics)
        return self._returned(metrics)

    def history_records(self) -> list[dict[str, Any]]:
        """The per-round records as JSON-serializable dicts."""
        return self.history.as_dicts()

    def save_history(self, path: str | Path, **extra: Any) -> Path:
        """Write ``{**extra, "history": [...]}`` as JSON to ``path``."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({**extra, "history": self.history_records()}, indent=2))
        return path

    def checkpoint_state(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """The wrapped strategy's checkpoint state plus the history (for ``Checkpointed``)."""
        inner = getattr(self.strategy, "checkpoint_state", None)
        arrays, meta = inner() if inner is not None else ({}, {})
        return arrays, {**meta, "metered-history": self.history.as_dicts()}

    def restore_checkpoint_state(self, arrays: dict[str, Any], meta: dict[str, Any]) -> None:
        """Inverse of :meth:`checkpoint_state`."""
        inner = getattr(self.strategy, "restore_checkpoint_state", None)
        if inner is not None:
            inner(arrays, meta)
        history = getattr(self.strategy, "history", None)
        self.history = history if isinstance(history, RoundLog) else self.history
        self.history.load(meta["metered-history"])


__all__ = ["Metered", "Progress", "ReadableMetricRecord", "round_line"]
