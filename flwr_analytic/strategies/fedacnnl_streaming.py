"""FedACnnL with streaming aggregation: merge each reply as it arrives, for thousands of clients.

Gu et al., "Analytic Personalized Federated Meta-Learning", arXiv 2502.06915. The server of FedACnnL
only needs the sums ``ΣG_k``, ``ΣB_k``, ``Σn_k`` of a layer's statistics. :class:`FedACnnL` collects
every reply first (``Grid.send_and_receive``) and sums them in ``partition-id`` order, so the model is
bit-for-bit independent of arrival order, but it holds all ``K`` replies, unpacked, at once:
``K · D(D+1)/2`` float64 plus ``K · D²`` (the unpacked Grams), 30 GB for 1000 clients and the
``D = 1601`` head of the default MNIST CNN. :class:`StreamingFedACnnL` pulls replies in chunks while
the clients still compute, checks each one with the sorted strategy's checks and adds it to one
float64 accumulator, then drops it: server memory is ``O(D²)`` whatever ``K``. The sum runs in arrival order,
so two runs agree to float64 rounding (relative ``~1e-15`` per addition), not bit for bit.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Message, MessageType, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result

from flwr_analytic.analytic import LayerStatistics, StatisticsError
from flwr_analytic.strategies.fedacnnl import FedACnnL, arrays_nbytes

#: Key of the client's per-call compute time in its reply's ``MetricRecord`` (seconds).
COMPUTE_TIME = "compute-time"


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
    each one is checked as :class:`FedACnnL` checks it, its ``G``, ``B`` and ``n`` are added to
    float64 accumulators and the reply is dropped. The layer is solved from the accumulated
    ``(ΣG, ΣB, Σn)`` as before. The summation follows arrival order: the model equals
    :class:`FedACnnL`'s to float64 rounding, not bit for bit.

    Parameters
    ----------
    *args, **kwargs
        As :class:`FedACnnL`. ``num_groups >= 2`` is refused: group-wise output layers need every
        client's statistics, which this strategy does not keep.
    pull_interval : float (default: 0.05)
        Seconds between two pulls while replies are outstanding.
    max_in_flight : int (default: 64)
        Push at most this many training (and evaluation) messages at a time and one more per reply
        pulled (``0``: all at once). Replies wait at the SuperLink until pulled; when the server
        checks them slower than the clients produce them (1000 clients, ``D = 1601``: 10 MB each,
        ~0.1-0.3 s of checks each), all-at-once piles them up (11.6 GiB peak, measured) while a
        window of 64 bounds them (5.3 GiB, and 454 s instead of 567 s). Flower's in-memory
        SuperLink state also scans every stored message for every node when it dispatches, and
        every pull checks every outstanding message id: ``O(nodes x messages)`` per dispatch sweep
        and ``O(messages)`` per pull; a window bounds both.

    Notes
    -----
    Each training entry of ``history`` also holds ``client-compute-time`` (sum of the clients'
    reported ``compute-time``, seconds), ``client-compute-time-max``, ``aggregate-time`` (server time
    checking and adding replies) and ``solve-time`` (unpacking the sum and solving the layer).
    """

    def __init__(
        self, *args: Any, pull_interval: float = 0.05, max_in_flight: int = 64, **kwargs: Any
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
        self._carry_sums: tuple[np.ndarray, np.ndarray, int] | None = None

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

        Every reply passes :meth:`FedACnnL._read_reply` (the same checks as the sorted strategy:
        record layout, sizes before allocation, float64, finite, symmetric, ``G[-1,-1] = n·L``,
        positive semi-definite, label histogram). Absent clients are named as in
        :class:`FedACnnL` (``missing-*`` / ``failed-*``). When the layer cannot be solved, the sums
        of the valid replies are kept and a retry (``max_retries``) adds the new replies to them.
        Returns ``(None, metrics)`` when fewer than ``min_valid_replies`` replies were valid.
        """
        layer = self.net.solved_layers
        entry = self._train_entry(server_round)
        dim, targets = self.net.design_dim(layer), self.net.num_targets(layer)
        carried = self._carry is not None and self._carry[0] == layer
        if carried:  # a retry of this layer: start from the sums of the earlier attempts
            keys = list(self._carry[1])
            gram, cross, count = self._carry_sums
            entry["num-carried"] = len(keys)
        else:
            keys, count = [], 0
            gram, cross = np.zeros((dim, dim)), np.zeros((dim, targets))
        seen = {key[:2] for key, _ in keys}
        received, num_replies, aggregate = 0, 0, 0.0
        compute: list[float] = []
        failed: list[int] = []
        replied: set[int] = set()
        for msg in replies:
            t_msg = time.perf_counter()
            num_replies += 1
            node = int(msg.metadata.src_node_id)
            replied.add(node)
            if msg.has_error():
                failed.append(node)
                self._reject(entry, node, f"client error: {msg.error.reason}")
                continue
            received += sum(arrays_nbytes(r) for r in msg.content.array_records.values())
            try:
                key, stats = self._read_reply(msg, layer)
                if key[:2] in seen:
                    raise StatisticsError(f"duplicate partition-id {key[1]}")
            except (StatisticsError, KeyError, ValueError, TypeError) as exc:
                self._reject(entry, node, str(exc))
                continue
            seen.add(key[:2])
            keys.append((key, None))
            if key[0] == 0:
                self.node_partitions[node] = int(key[1])
            gram += stats.gram
            cross += stats.cross
            count += int(stats.count)
            metrics = next(iter(msg.content.metric_records.values()))  # exactly one (checked)
            if COMPUTE_TIME in metrics:
                compute.append(float(metrics[COMPUTE_TIME]))
            del msg, stats
            aggregate += time.perf_counter() - t_msg
        entry["bytes-received"] = received
        entry["num-replies"] = num_replies
        entry["num-valid"] = len(keys)
        entry["partitions"] = sorted(key[1] for key, _ in keys if key[0] == 0)
        entry["client-compute-time"] = float(sum(compute))
        entry["client-compute-time-max"] = float(max(compute, default=0.0))
        entry["aggregate-time"] = aggregate
        num_missing = self._record_absent(entry, replied, num_replies, failed)
        t_solve = time.perf_counter()
        arrays = None
        if len(keys) < self.min_valid_replies:
            self._carry, self._carry_sums = (layer, keys), (gram, cross, count)
            log(
                WARNING,
                "layer %d has %d valid replies (< %d): not solved",
                layer,
                len(keys),
                self.min_valid_replies,
            )
        else:
            self._carry, self._carry_sums = None, None
            total = LayerStatistics(gram, cross, count).validate(dim, targets)
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
        return arrays, self._train_metrics(entry, layer, num_missing, len(failed))


__all__ = ["StreamingFedACnnL"]
