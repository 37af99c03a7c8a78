"""Decoding of FedACnnL training replies (Message API): the server half of the wire format.

A client's reply to the round of layer ``l`` (Gu et al., arXiv 2502.06915) holds exactly one
``ArrayRecord`` (its packed statistics ``(G, B, n)``, :meth:`LayerStatistics.pack`) and one
``MetricRecord`` with integer ``num-examples`` and ``layer`` and, optionally, an integer
``partition-id``; nothing else. Anything else, including bytes that do not decode, is a
``StatisticsError`` naming the problem, so one hostile reply never stops a round.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from flwr.app import Message

from flwr_analytic.analytic import StatisticsError
from flwr_analytic.analytic.server import ClientKey
from flwr_analytic.fedacnnl import protocol as P


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


__all__ = ["decode_statistics_reply"]
