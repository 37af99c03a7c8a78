"""FedACnnL with streaming aggregation: merge each reply as it arrives, for thousands of clients.

Gu et al., "Analytic Personalized Federated Meta-Learning", arXiv 2502.06915. The server of FedACnnL
only needs the sums ``ΣG_k``, ``ΣB_k``, ``Σn_k`` of a layer's statistics. :class:`FedACnnL` collects
every reply first (``Grid.send_and_receive``) and sums them in ``partition-id`` order, so the model is
bit-for-bit independent of arrival order, but it holds all ``K`` replies, unpacked, at once:
``K · D(D+1)/2`` float64 plus ``K · D²`` (the unpacked Grams), 30 GB for 1000 clients and the
``D = 1601`` head of the default MNIST CNN. :class:`StreamingFedACnnL` pulls replies in chunks while
the clients still compute, checks each one in its packed form and adds its triangle to one float64
accumulator, then drops it: server memory is ``O(D²)`` whatever ``K``. The sum runs in arrival order,
so two runs agree to float64 rounding (relative ``~1e-15`` per addition), not bit for bit.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result

from flwr_analytic.analytic import LayerStatistics, StatisticsError
from flwr_analytic.analytic.statistics import COUNT_KEY, CROSS_KEY, GRAM_KEY
from flwr_analytic.fedacnnl import protocol as P
from flwr_analytic.strategies.fedacnnl import FedACnnL, arrays_nbytes

#: Key of the client's per-call compute time in its reply's ``MetricRecord`` (seconds).
COMPUTE_TIME = "compute-time"


def diagonal_offsets(dim: int) -> np.ndarray:
    """Positions of ``G[i, i]`` in the row-major packed upper triangle: ``i·D − i(i−1)/2``."""
    i = np.arange(dim, dtype=np.int64)
    return i * dim - i * (i - 1) // 2


def check_packed(
    packed: dict[str, np.ndarray], dim: int, targets: int, num_examples: Any
) -> tuple[np.ndarray, np.ndarray, int]:
    """Check packed statistics without unpacking them; return ``(triangle, cross, count)``.

    The same checks as :meth:`LayerStatistics.validate` on the transport form (symmetry holds by
    construction): keys, shapes ``D(D+1)/2`` and ``(D, m)``, float64, finite, non-negative diagonal,
    an integer count equal to the reply's ``num-examples`` and consistent with ``G[-1, -1]`` (the
    number of design rows, a whole multiple of the count).

    Raises
    ------
    StatisticsError
        Naming the first problem found.

    """
    missing = {GRAM_KEY, CROSS_KEY, COUNT_KEY} - set(packed)
    if missing:
        raise StatisticsError(f"packed statistics miss {sorted(missing)}")
    tri, cross, count = packed[GRAM_KEY], packed[CROSS_KEY], np.asarray(packed[COUNT_KEY])
    if tri.ndim != 1 or tri.size != dim * (dim + 1) // 2:
        raise StatisticsError(
            f"{GRAM_KEY} has shape {tri.shape}, expected ({dim * (dim + 1) // 2},) for D={dim}"
        )
    if cross.shape != (dim, targets):
        raise StatisticsError(f"cross has shape {cross.shape}, expected ({dim}, {targets})")
    for name, arr in ((GRAM_KEY, tri), (CROSS_KEY, cross)):
        if arr.dtype != np.float64:
            raise StatisticsError(f"{name} must be float64, got {arr.dtype}")
        if not np.all(np.isfinite(arr)):
            raise StatisticsError(f"{name} has non-finite values (NaN or Inf)")
    if count.size != 1 or not np.issubdtype(count.dtype, np.integer):
        raise StatisticsError(f"{COUNT_KEY} must be one integer, got {count!r}")
    n = int(count.reshape(-1)[0])
    if isinstance(num_examples, list) or int(num_examples) != n or n < 0:
        raise StatisticsError(f"{P.NUM_EXAMPLES}={num_examples} but count={n}")
    diag = tri[diagonal_offsets(dim)]
    if np.any(diag < -1e-12 * max(1.0, float(np.max(np.abs(tri))))):
        raise StatisticsError("gram has a negative diagonal entry: not AᵀA of any data")
    rows = float(tri[-1])
    if n == 0 and rows != 0:
        raise StatisticsError(f"count is 0 but the gram holds {rows:g} design rows")
    if n > 0 and (rows < n or rows != round(rows) or round(rows) % n != 0):
        raise StatisticsError(
            f"count {n} is inconsistent with {rows:g} design rows (G[-1,-1] must be a whole "
            "multiple of the sample count)"
        )
    return tri, cross, n


class _ReplyStream(Grid):
    """A :class:`Grid` whose ``send_and_receive`` of training messages yields replies as they come.

    Messages are pushed at once, or at most ``max_in_flight`` at a time (a new one for each reply
    pulled); the returned iterator pulls every ``pull_interval`` seconds until all replies are in or
    ``timeout`` passes. Evaluation messages get the list of replies (through the same window when
    ``max_in_flight > 0``, else from the wrapped grid); other calls go to the wrapped grid.
    """

    def __init__(self, grid: Grid, pull_interval: float, max_in_flight: int = 0) -> None:
        self.grid = grid
        self.pull_interval = pull_interval
        self.max_in_flight = max_in_flight

    def set_run(self, run: Any) -> None:  # noqa: D102
        self.grid.set_run(run)

    @property
    def run(self) -> Any:  # noqa: D102
        return self.grid.run

    def create_message(self, *args: Any, **kwargs: Any) -> Message:  # noqa: D102
        return self.grid.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:  # noqa: D102
        return self.grid.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:  # noqa: D102
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:  # noqa: D102
        return self.grid.pull_messages(message_ids)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.grid, name)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Training: a lazy iterator of replies; evaluation: the list of replies (windowed too)."""
        messages = list(messages)
        if not messages:
            return []
        train = messages[0].metadata.message_type == MessageType.TRAIN
        if not train and self.max_in_flight <= 0:
            return self.grid.send_and_receive(messages, timeout=timeout)
        window = self.max_in_flight if self.max_in_flight > 0 else len(messages)
        ids = set(self.grid.push_messages(messages[:window]))
        replies = self._pull(ids, messages[window:], timeout)
        return replies if train else list(replies)

    def _pull(
        self, ids: set[str], queued: list[Message], timeout: float | None
    ) -> Iterator[Message]:
        # Stop after one reply per pushed message: grids whose ids are not the messages' own
        # (e.g. an in-process grid's keys) are handled by the count.
        end = time.monotonic() + (timeout if timeout is not None else float("inf"))
        remaining = len(ids)
        queued.reverse()
        while remaining > 0 and time.monotonic() < end:
            got = list(self.grid.pull_messages(ids))
            ids.difference_update(m.metadata.reply_to_message_id for m in got)
            remaining -= len(got)
            more = [queued.pop() for _ in range(min(len(got), len(queued)))]
            if more:
                new = list(self.grid.push_messages(more))
                ids.update(new)
                remaining += len(new)
            while got:
                yield got.pop(0)
            if remaining > 0:
                time.sleep(self.pull_interval)


class StreamingFedACnnL(FedACnnL):
    """FedACnnL that sums the statistics replies as they arrive (server memory ``O(D²)``).

    Implementation based on https://arxiv.org/abs/2502.06915 (Gu et al.). Same rounds, messages,
    checks and results as :class:`FedACnnL` (see there for every parameter), except how a training
    round is aggregated: replies are pulled from the grid in chunks every ``pull_interval`` seconds,
    each one is checked in packed form (:func:`check_packed`), its upper triangle, ``B`` and ``n`` are
    added to float64 accumulators and the reply is dropped. The layer is solved from the accumulated
    ``(ΣG, ΣB, Σn)`` as before. The summation follows arrival order: the model equals
    :class:`FedACnnL`'s to float64 rounding, not bit for bit.

    Parameters
    ----------
    *args, **kwargs
        As :class:`FedACnnL`. ``num_groups >= 2`` is refused: group-wise output layers need every
        client's statistics, which this strategy does not keep.
    pull_interval : float (default: 0.05)
        Seconds between two pulls while replies are outstanding.
    max_in_flight : int (default: 0)
        Push at most this many training (and evaluation) messages at a time and one more per reply
        pulled (``0``: all at once). Flower's in-memory SuperLink state scans every stored message
        for every node when it dispatches, and every pull checks every outstanding message id:
        ``O(nodes x messages)`` per dispatch sweep and ``O(messages)`` per pull; a window bounds
        both.

    Notes
    -----
    Each training entry of ``history`` also holds ``client-compute-time`` (sum of the clients'
    reported ``compute-time``, seconds), ``client-compute-time-max``, ``aggregate-time`` (server time
    checking and adding replies) and ``solve-time`` (unpacking the sum and solving the layer).
    """

    def __init__(
        self, *args: Any, pull_interval: float = 0.05, max_in_flight: int = 0, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        if self.num_groups >= 2:
            raise ValueError(
                "num_groups >= 2 (group-wise output layers) needs every client's statistics; "
                "streaming aggregation keeps only their sum: use FedACnnL (aggregation='sorted')"
            )
        if pull_interval <= 0:
            raise ValueError(f"pull_interval must be > 0, got {pull_interval}")
        self.pull_interval = float(pull_interval)
        if (
            isinstance(max_in_flight, bool)
            or int(max_in_flight) != max_in_flight
            or max_in_flight < 0
        ):
            raise ValueError(f"max_in_flight must be an integer >= 0, got {max_in_flight!r}")
        self.max_in_flight = int(max_in_flight)

    def start(self, grid: Grid, *args: Any, **kwargs: Any) -> Result:  # noqa: D102
        stream = _ReplyStream(grid, self.pull_interval, self.max_in_flight)
        return super().start(stream, *args, **kwargs)

    start.__doc__ = FedACnnL.start.__doc__

    def aggregate_train(
        self,
        server_round: int,
        replies: Iterable[Message],
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Check and add each reply as it arrives; solve the layer from the sums.

        Returns ``(None, metrics)`` when fewer than ``min_valid_replies`` replies were valid.
        """
        layer = self.net.solved_layers
        entry = self._pending or {"round": server_round, "kind": "train", "layer": layer}
        self._pending = None
        entry.setdefault("t0", time.perf_counter())
        entry.setdefault("bytes-sent", 0)
        dim, targets = self.net.design_dim(layer), self.net.num_targets(layer)
        tri = np.zeros(dim * (dim + 1) // 2)
        cross = np.zeros((dim, targets))
        count, received, num_replies, aggregate = 0, 0, 0, 0.0
        compute: list[float] = []
        seen: set[tuple[int, int]] = set()
        for msg in replies:
            t_msg = time.perf_counter()
            num_replies += 1
            node = int(msg.metadata.src_node_id)
            if msg.has_error():
                self._reject(entry, node, f"client error: {msg.error.reason}")
                continue
            received += sum(arrays_nbytes(r) for r in msg.content.array_records.values())
            try:
                key, (t, b, n), seconds = self._read_packed(msg, layer, dim, targets)
                if key[:2] in seen:
                    raise StatisticsError(f"duplicate partition-id {key[1]}")
            except (StatisticsError, KeyError, ValueError, TypeError) as exc:
                self._reject(entry, node, str(exc))
                continue
            seen.add(key[:2])
            tri += t
            cross += b
            count += n
            if seconds is not None:
                compute.append(seconds)
            del msg, t, b
            aggregate += time.perf_counter() - t_msg
        entry["bytes-received"] = received
        entry["num-replies"] = num_replies
        entry["num-valid"] = len(seen)
        entry["client-compute-time"] = float(sum(compute))
        entry["client-compute-time-max"] = float(max(compute, default=0.0))
        entry["aggregate-time"] = aggregate
        num_missing = max(0, entry.get("num-sent", num_replies) - num_replies)
        if num_missing:
            entry["num-missing"] = num_missing
            log(WARNING, "aggregate_train: %d replies missing (timeout)", num_missing)
            if not self.accept_failures:
                raise RuntimeError(f"{num_missing} replies missing (accept_failures=False)")
        t_solve = time.perf_counter()
        arrays = None
        if len(seen) < self.min_valid_replies:
            log(
                WARNING,
                "layer %d has %d valid replies (< %d): not solved",
                layer,
                len(seen),
                self.min_valid_replies,
            )
        else:
            packed = {GRAM_KEY: tri, CROSS_KEY: cross, COUNT_KEY: np.asarray([count])}
            del tri
            total = LayerStatistics.unpack(packed).validate(dim, targets)
            del packed
            self.net.solve(layer, total)
            self.layer_statistics[layer] = total  # FedACnnL's record (checkpoints, add_clients)
            self._advance_free_layers()
            entry["num-examples"] = int(total.count)
            arrays = self.global_arrays()
        entry["solve-time"] = time.perf_counter() - t_solve
        entry["round-time"] = time.perf_counter() - entry.pop("t0")
        entry["solved"] = arrays is not None
        log(
            INFO,
            "aggregate_train (streaming): layer %d from %d/%d replies (%d rejected), %.2f s",
            layer,
            entry["num-valid"],
            num_replies,
            len(entry.get("rejected", [])),
            entry["round-time"],
        )
        self.history.append(entry)
        metrics = MetricRecord(
            {
                P.LAYER: layer,
                "num-clients": int(entry["num-valid"]),
                "num-rejected": len(entry.get("rejected", [])),
                "num-examples": int(entry.get("num-examples", 0)),
                "bytes-sent": int(entry["bytes-sent"]),
                "bytes-received": int(received),
                "round-time": float(entry["round-time"]),
                "num-missing": int(num_missing),
            }
        )
        if arrays is not None and self.checkpoint_path is not None:
            self.save_checkpoint()
        return arrays, metrics

    def _read_packed(
        self, msg: Message, layer: int, dim: int, targets: int
    ) -> tuple[tuple[int, int, int], tuple[np.ndarray, np.ndarray, int], float | None]:
        """Check one training reply in packed form: ``(order key, (tri, B, n), compute time)``."""
        content: RecordDict = msg.content
        if len(content.array_records) != 1 or len(content.metric_records) != 1:
            raise StatisticsError(
                f"expected one ArrayRecord and one MetricRecord, got {len(content.array_records)} "
                f"and {len(content.metric_records)}"
            )
        metrics = next(iter(content.metric_records.values()))
        if self.weighted_by_key not in metrics:
            raise StatisticsError(f"MetricRecord lacks {self.weighted_by_key!r}")
        claimed = metrics.get(P.LAYER)
        if claimed is not None and int(claimed) != layer:
            raise StatisticsError(f"statistics of layer {claimed}, expected {layer}")
        record = next(iter(content.array_records.values()))
        packed = {k: v.numpy() for k, v in record.items()}
        stats = check_packed(packed, dim, targets, metrics[self.weighted_by_key])
        key = self.order_key(metrics.get(P.PARTITION_ID), msg.metadata.src_node_id)
        seconds = metrics.get(COMPUTE_TIME)
        return key, stats, None if seconds is None else float(seconds)


__all__ = ["StreamingFedACnnL", "check_packed", "diagonal_offsets"]
