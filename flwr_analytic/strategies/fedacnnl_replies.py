"""FedACnnL training replies (Message API): decoding, checking, and naming who did not answer.

A client's reply to the round of layer ``l`` (Gu et al., arXiv 2502.06915) holds exactly one
``ArrayRecord`` (its packed statistics ``(G, B, n)``, :meth:`LayerStatistics.pack`) and one
``MetricRecord`` with integer ``num-examples`` and ``layer`` and, optionally, an integer
``partition-id``; nothing else. Anything else, including bytes that do not decode, is a
``StatisticsError`` naming the problem, so one hostile reply never stops a round.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from logging import WARNING
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import Message, MetricRecord
from flwr.common import log
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode

from flwr_analytic.analytic import LayerStatistics, StatisticsError
from flwr_analytic.analytic.ownership import PartitionOwners
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


def accept_reply(
    server: LayerwiseServer,
    msg: Message,
    connected: Collection[int] | None,
    weighted_by_key: str = P.NUM_EXAMPLES,
) -> tuple[Mapping[str, Any], str | None]:
    """Check a training reply and add it to the layer's sum: its metrics and a note, if any.

    The claim is checked against the partition's owner and the run's ``num-partitions``
    (:meth:`LayerwiseServer.contribute`); raises ``StatisticsError`` with the reason to reject.
    """
    key, stats = check_reply(server, msg, weighted_by_key)
    metrics = next(iter(msg.content.metric_records.values()))
    claimed = metrics.get(P.NUM_PARTITIONS)
    if claimed is not None and (isinstance(claimed, bool) or not isinstance(claimed, int)):
        raise StatisticsError(f"num-partitions must be an integer, got {claimed!r}")
    claimed = claimed if claimed is not None and claimed > 0 else None  # 0: not known
    note = server.contribute(key, stats, claimed, connected)
    if note:
        log(WARNING, "%s", note)
    return metrics, note


def error_reply(msg: Message) -> tuple[str, int | None]:
    """What an error reply means: ``("unavailable", None)`` or ``("failed", partition)``.

    The SuperLink's own error about a node that is gone is no reply: the node is *missing*, and
    the SuperLink's id is not a client. Any other error is a failed client, with the partition it
    named (``None`` when it did not say).
    """
    code, reason = msg.error.code, str(msg.error.reason)
    from_link = int(msg.metadata.src_node_id) == SUPERLINK_NODE_ID
    if from_link and code in (ErrorCode.NODE_UNAVAILABLE, ErrorCode.REPLY_MESSAGE_UNAVAILABLE):
        return "unavailable", None
    return "failed", P.error_partition(reason)


def evaluation_replies(
    owners: PartitionOwners | Mapping[int, int], replies: list[Message]
) -> tuple[list[Any], list[tuple[int, str]]]:
    """The evaluation replies to aggregate, each partition once; and the rejected ``(node, why)``.

    A reply is rejected for an error, for a ``num-partitions`` other than the run's, or for a
    partition held by another node (its owner since training) or already counted (by node id).
    ``owners``: the run's :class:`PartitionOwners`, or a plain partition → node map.
    """
    owner_map = owners.owner if isinstance(owners, PartitionOwners) else owners
    agreed = owners.num_partitions if isinstance(owners, PartitionOwners) else None
    good, rejected, counted = [], [], set()
    for msg in sorted(replies, key=lambda m: int(m.metadata.src_node_id)):
        node = int(msg.metadata.src_node_id)
        if msg.has_error():
            rejected.append((node, str(msg.error.reason)))
            continue
        metrics = next(iter(msg.content.metric_records.values()), {})
        claimed = metrics.get(P.NUM_PARTITIONS, 0)
        if agreed and claimed and int(claimed) != agreed:
            rejected.append((node, f"num-partitions={claimed} disagrees with the run's "
                                   f"{agreed}: not evaluated"))  # fmt: skip
            continue
        pid = metrics.get(P.PARTITION_ID, -1)
        pid = int(pid) if isinstance(pid, int | float) and pid >= 0 else None
        owner = owner_map.get(pid) if pid is not None else None
        if pid is not None and ((owner is not None and owner != node) or pid in counted):
            holder = f"held by node {owner}" if owner not in (None, node) else "already counted"
            rejected.append((node, f"duplicate partition-id {pid} ({holder}): counted once"))
            continue
        counted.add(pid)
        good.append(msg.content)
    return good, rejected


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
    history: RoundLog,
    layer: int,
    min_valid_replies: int,
    max_retries: int,
    solved: int,
    num_layers: int | None = None,
) -> str:
    """Why ``layer`` could not be solved: valid replies, attempts, who was absent, what is kept.

    Parameters
    ----------
    history : RoundLog
        The strategy's round records (``details["layer"]`` 0-based, as in the results JSON).
    layer : int
        The 0-based index of the layer; the message names it 1-based, ``layer k/L``, as the
        round log lines do.
    min_valid_replies, max_retries : int
        The strategy's settings, quoted in the message.
    solved : int
        Layers solved so far (kept in the strategy).
    num_layers : int, optional
        ``L``; without it the message says ``layer k``.

    Returns
    -------
    str
        One line, e.g. ``layer 2/3 could not be solved: 2 valid replies (min_valid_replies=3)
        after 2 attempts (rounds [2, 3], max_retries=1); ...``.
    """
    tried = [r for r in history if r.kind == "train" and r.details.get("layer") == layer]
    last = tried[-1].details if tried else {}
    absent = [
        f"{kind} {who} {last[f'{kind}-{who}']}"
        for kind in ("missing", "failed")
        for who in ("partitions", "nodes")
        if last.get(f"{kind}-{who}")
    ][:2]
    name = f"layer {layer + 1}" + (f"/{num_layers}" if num_layers else "")
    return (
        f"{name} could not be solved: {last.get('num-valid', 0)} valid replies "
        f"(min_valid_replies={min_valid_replies}) after {len(tried)} attempts "
        f"(rounds {[r.round for r in tried]}, max_retries={max_retries})"
        + (f"; last attempt: {', '.join(absent)}" if absent else "")
        + f"; {len(last.get('rejected', []))} replies rejected; the {solved} solved layers are "
        "kept in the strategy"
    )


__all__ = [
    "accept_reply",
    "check_reply",
    "error_reply",
    "evaluation_replies",
    "decode_statistics_reply",
    "failure_message",
    "name_absent",
    "round_metrics",
]
