"""FedACnnL training replies (Message API): decoding, checking, and naming who did not answer.

A client's reply to the round of layer ``l`` (Gu et al., arXiv 2502.06915) holds exactly one
``ArrayRecord`` (its packed statistics ``(G, B, n)``, :meth:`LayerStatistics.pack`) and one
``MetricRecord`` with integer ``num-examples`` and ``layer`` and, optionally, an integer
``partition-id``; nothing else. Anything else, including bytes that do not decode, is a
``StatisticsError`` naming the problem, so one hostile reply never stops a round.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import Message, MetricRecord

from flwr_analytic.analytic import LayerStatistics, StatisticsError
from flwr_analytic.analytic.server import ClientKey, LayerOutcome, LayerwiseServer
from flwr_analytic.fedacnnl import protocol as P

if TYPE_CHECKING:
    from flwr_analytic.strategies.records import RoundLog, RoundRecord


def decode_statistics_reply(
    msg: Message, weighted_by_key: str = P.NUM_EXAMPLES
) -> tuple[ClientKey, dict[str, np.ndarray], Mapping[str, Any]]:
    """Return the reply's :class:`ClientKey`, its packed statistics and its metrics.

    Raises
    ------
    StatisticsError
        For a record layout other than one ``ArrayRecord`` + one ``MetricRecord``, a missing
        ``num-examples`` (``weighted_by_key``) or ``layer``, a non-integer ``partition-id``, or an
        array that cannot be decoded. Any unexpected exception while decoding becomes one too.

    """
    try:
        content = msg.content
        counts = (
            len(content.array_records),
            len(content.metric_records),
            len(content.config_records),
        )
        if counts != (1, 1, 0):
            raise StatisticsError(
                "expected one ArrayRecord, one MetricRecord and no ConfigRecord, got "
                f"{counts[0]}, {counts[1]} and {counts[2]}"
            )
        metrics = next(iter(content.metric_records.values()))
        for key in (weighted_by_key, P.LAYER):
            if key not in metrics:
                raise StatisticsError(f"MetricRecord lacks {key!r}")
        partition = metrics.get(P.PARTITION_ID)
        if partition is not None and (
            isinstance(partition, bool) or not isinstance(partition, int | np.integer)
        ):
            raise StatisticsError(
                f"metric {P.PARTITION_ID!r} must be an integer, got {partition!r}"
            )
        packed = {}
        for key, array in next(iter(content.array_records.values())).items():
            try:
                packed[key] = array.numpy()
            except Exception as exc:  # noqa: BLE001 - hostile bytes: any decoder error
                raise StatisticsError(f"array {key!r} cannot be decoded: {exc}") from exc
        return ClientKey.of(partition, msg.metadata.src_node_id), packed, metrics
    except StatisticsError:
        raise
    except Exception as exc:  # noqa: BLE001 - never let a malformed reply stop the round
        raise StatisticsError(f"malformed reply ({type(exc).__name__}: {exc})") from exc


def check_reply(
    server: LayerwiseServer, msg: Message, weighted_by_key: str = P.NUM_EXAMPLES
) -> tuple[ClientKey, LayerStatistics]:
    """Decode ``msg`` and check its statistics (:meth:`LayerwiseServer.check`).

    Any failure, including an unexpected exception on hostile input, is a ``StatisticsError``.
    """
    key, packed, metrics = decode_statistics_reply(msg, weighted_by_key)
    try:
        stats = server.check(packed, metrics[weighted_by_key], metrics[P.LAYER], metrics)
    except StatisticsError:
        raise
    except Exception as exc:  # noqa: BLE001 - never let a malformed reply stop the round
        raise StatisticsError(f"malformed reply ({type(exc).__name__}: {exc})") from exc
    return key, stats


def name_absent(
    record: RoundRecord,
    sent: list[int],
    replied: set[int],
    failed: list[int],
    node_partitions: Mapping[int, int],
) -> dict[str, Any]:
    """Name the clients that failed (error reply) or are missing (no reply by the timeout).

    Partition ids are known for nodes that replied in an earlier round, node ids always. Writes
    ``num-missing`` (when > 0), ``{failed,missing}-{nodes,partitions}`` into ``record.details``;
    returns them with ``num-failed`` for the round's ``MetricRecord``.
    """
    missing = sorted(set(sent) - replied)
    num_missing = max(len(missing), record.num_sent - record.num_replies)
    out: dict[str, Any] = {"num-missing": num_missing, "num-failed": len(failed)}
    for kind, nodes in (("failed", sorted(failed)), ("missing", missing)):
        if nodes:
            out[f"{kind}-nodes"] = nodes
            known = sorted(node_partitions[n] for n in nodes if n in node_partitions)
            if known:
                out[f"{kind}-partitions"] = known
    record.details.update(
        {k: v for k, v in out.items() if k != "num-failed" and (k != "num-missing" or v)}
    )
    return out


def round_metrics(
    record: RoundRecord,
    outcome: LayerOutcome,
    absent: Mapping[str, Any],
    timings: Mapping[str, Any],
    extra: Mapping[str, Any],
) -> MetricRecord:
    """Write a training round's outcome into ``record``; return the round's ``MetricRecord``.

    ``timings``: ``compute`` (the clients' reported ``compute-time`` values), ``check`` (server
    seconds checking and adding replies), ``solve`` (seconds solving); ``extra``: the release
    policy's details (DP: ``dp-ridge``, ``dp-sigma``).
    """
    compute = list(timings["compute"])
    record.details.update(
        {
            "num-valid": outcome.num_valid,
            "partitions": outcome.partitions,
            "num-examples": outcome.num_examples,
            "solved": outcome.solved,
            "client-compute-time": float(sum(compute)),
            "client-compute-time-max": float(max(compute, default=0.0)),
            "aggregate-time": float(timings["check"]),
            "solve-time": float(timings["solve"]),
            **extra,
        }
    )
    if outcome.groups is not None:
        record.details["groups"] = outcome.groups
    return MetricRecord(
        {
            P.LAYER: outcome.layer,
            "num-clients": outcome.num_valid,
            "num-rejected": len(record.details.get("rejected", [])),
            "num-examples": outcome.num_examples,
            **absent,
        }
    )


def failure_message(
    history: RoundLog, layer: int, min_valid_replies: int, max_retries: int, solved: int
) -> str:
    """Why ``layer`` could not be solved: valid replies, attempts, who was absent, what is kept."""
    tried = [r for r in history if r.kind == "train" and r.details.get("layer") == layer]
    last = tried[-1].details if tried else {}
    absent = [
        f"{kind} {who} {last[f'{kind}-{who}']}"
        for kind in ("missing", "failed")
        for who in ("partitions", "nodes")
        if last.get(f"{kind}-{who}")
    ][:2]
    return (
        f"layer {layer} could not be solved: {last.get('num-valid', 0)} valid replies "
        f"(min_valid_replies={min_valid_replies}) after {len(tried)} attempts "
        f"(rounds {[r.round for r in tried]}, max_retries={max_retries})"
        + (f"; last attempt: {', '.join(absent)}" if absent else "")
        + f"; {len(last.get('rejected', []))} replies rejected; the {solved} solved layers are "
        "kept in the strategy"
    )


__all__ = [
    "check_reply",
    "decode_statistics_reply",
    "failure_message",
    "name_absent",
    "round_metrics",
]
