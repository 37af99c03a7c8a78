"""Bounded waits for nodes: a round never blocks forever on a node that is gone.

Flower's ``sample_nodes`` waits, without limit, until ``min_available_nodes`` are connected; in a
deployment where a SuperNode died that is forever (issue 13: ``kill -9`` of one of five nodes with
``min-nodes = 5`` hung the run at the next layer). :func:`sample_available` waits at most
``timeout`` seconds; then the round goes on with the nodes that are connected when at least
``needed`` are (FedACnnL: ``min_valid_replies``), else :class:`NodesUnavailableError` names the
partitions whose nodes are missing. Node ids are sorted so that the sample is reproducible.
"""

from __future__ import annotations

import random
import time
from collections.abc import Mapping
from logging import INFO, WARNING

from flwr.common import log
from flwr.serverapp import Grid

from flwr_analytic.report import short_list


class NodesUnavailableError(RuntimeError):
    """Too few nodes connected within the availability timeout (names what is missing)."""


def wait_for_nodes(grid: Grid, min_available: int, timeout: float, poll: float = 1.0) -> list[int]:
    """The connected node ids (grid order) once ``min_available`` are, or after ``timeout`` s."""
    deadline, next_log = time.monotonic() + max(0.0, timeout), 0.0
    while len(nodes := list(grid.get_node_ids())) < min_available:
        now = time.monotonic()
        left = deadline - now
        if left <= 0:
            break
        if now >= next_log:  # every 10 s, not every poll
            log(INFO, "Waiting for nodes to connect: %d connected (minimum required: %d; %.0f s "
                "left of availability-timeout)", len(nodes), min_available, left)  # fmt: skip
            next_log = now + 10.0
        time.sleep(min(poll, left))
    return nodes


def missing_partitions(connected: list[int], known: Mapping[int, int]) -> list[int]:
    """Partitions seen before (``known``: node id → partition id) whose node is not connected."""
    here = {known[n] for n in connected if n in known}
    return sorted(set(known.values()) - here)


def sample_available(
    grid: Grid,
    fraction: float,
    minimum: int,
    min_available: int,
    *,
    timeout: float,
    needed: int = 1,
    known: Mapping[int, int] | None = None,
    what: str = "round",
) -> list[int]:
    """Sample ``max(fraction · connected, minimum)`` nodes, waiting at most ``timeout`` seconds.

    Parameters
    ----------
    grid : Grid
        The grid.
    fraction, minimum, min_available : float, int, int
        Flower's sampling rule: ``max(⌊fraction · connected⌋, minimum)`` of at least
        ``min_available`` connected nodes.
    timeout : float
        Seconds to wait for ``min_available`` nodes; then the round proceeds with those connected.
    needed : int
        Fewest connected nodes the round can use (FedACnnL's ``min_valid_replies``).
    known : mapping, optional
        Node id → partition id seen so far (to name missing partitions).
    what : str
        The round, for messages (``"layer 3/5"``).

    Raises
    ------
    NodesUnavailableError
        When fewer than ``needed`` nodes are connected after ``timeout`` seconds.

    """
    wanted = max(min_available, minimum)
    connected = wait_for_nodes(grid, wanted, timeout)
    # as Flower's sample_nodes (same draws from ``random``), capped by what is connected
    size = min(len(connected), max(int(len(connected) * fraction), minimum))
    if len(connected) >= wanted:
        return sorted(random.sample(connected, size))
    missing = missing_partitions(connected, known or {})
    detail = (
        f"{what}: {len(connected)} nodes connected after {timeout:g} s "
        f"(min-nodes {wanted}); missing partitions {short_list(missing) if missing else 'unknown'}"
    )
    if len(connected) < max(1, needed):
        raise NodesUnavailableError(
            f"{detail}, fewer than the {max(1, needed)} needed; stopping (a checkpoint keeps "
            "the solved layers: restart the missing nodes and run again to resume)"
        )
    log(WARNING, "%s; going on with the %d connected", detail, len(connected))
    return sorted(random.sample(connected, size))


__all__ = ["NodesUnavailableError", "missing_partitions", "sample_available", "wait_for_nodes"]
