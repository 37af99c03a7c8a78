"""An in-process :class:`~flwr.serverapp.Grid` that calls a ``ClientApp`` directly (no Ray).

It runs the exact strategy and client code of a Flower run in one process, for tests, notebooks and
quick benchmarks. Node ``k`` gets the node config ``{"partition-id": k, "num-partitions": N}`` and
its own :class:`~flwr.app.Context`, whose ``state`` persists across rounds; a client that raises
answers with an error reply. Two options decide how much it looks like a real deployment:

- ``node_ids``: ``"sequential"`` (ids ``1..N``, node ``k`` is id ``k + 1``) or ``"random"``
  (seeded random 63-bit integers unrelated to the partition ids, as a SuperLink assigns them);
- ``shuffle_replies``: replies come back in a seeded random order, as a SuperLink may return them.

:class:`InProcessGrid` defaults to sequential ids and replies in message order;
:class:`LocalGrid` defaults to random ids and shuffled replies (strategies must rely on neither).
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping
from typing import Any

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common import Error
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from flwr_analytic.config_checks import check_choice

NODE_IDS = ("sequential", "random")


def _set_default_task_identity(run_id: int) -> None:
    """Give Flower's ``TaskIdentity`` the ids a runtime would set, where none is set yet.

    A :class:`~flwr.app.Message` created outside a Flower runtime (a test, a notebook) reads the
    identity of the running task, which only Flower's runtimes set. Its getters raise
    ``RuntimeError`` while an id is unset: that is how "unset" is asked through public API.
    """
    for name, value in (("run_id", run_id), ("node_id", 0), ("task_id", 0)):
        try:
            getattr(TaskIdentity, name)
        except RuntimeError:
            setattr(TaskIdentity, name, value)


class InProcessGrid(Grid):
    """Call a ``ClientApp`` in process for every message.

    Parameters
    ----------
    client_app : ClientApp
        The client app every node runs.
    num_nodes : int
        Number of nodes ``N``; node ``k`` gets the node config
        ``{"partition-id": k, "num-partitions": N}``.
    run_config : mapping, optional
        The run config every node's context holds (each node gets its own copy).
    run_id : int (default: 1)
        Run id of the nodes' contexts (and of ``TaskIdentity`` when no runtime set one).
    node_ids : {"sequential", "random"}, optional
        ``sequential``: node ``k`` has id ``k + 1``; ``random``: seeded random 63-bit integers.
        Default: the class attribute (``"sequential"``; ``"random"`` for :class:`LocalGrid`).
    shuffle_replies : bool, optional
        Return the replies of :meth:`send_and_receive` in a seeded random order. Default: the class
        attribute (``False``; ``True`` for :class:`LocalGrid`).
    seed : int (default: 0)
        Seed of the random node ids, the reply order and the message ids of :meth:`push_messages`.

    Attributes
    ----------
    contexts : dict[int, Context]
        Every node's context, by node id, in partition order.
    node_ids, shuffle_replies : str, bool
        As given; the class attributes are the defaults (:class:`LocalGrid` has others).

    """

    node_ids: str = "sequential"
    shuffle_replies: bool = False

    # pylint: disable=too-many-arguments
    def __init__(
        self,
        client_app: ClientApp,
        num_nodes: int,
        run_config: Mapping[str, Any] | None = None,
        run_id: int = 1,
        *,
        node_ids: str | None = None,
        shuffle_replies: bool | None = None,
        seed: int = 0,
    ) -> None:
        if node_ids is not None:
            self.node_ids = check_choice("node_ids", node_ids, NODE_IDS)
        if shuffle_replies is not None:
            self.shuffle_replies = shuffle_replies
        self.client_app = client_app
        self.num_nodes = num_nodes
        self.run_config = dict(run_config or {})
        self.run_id = run_id
        self._rng = random.Random(seed)
        ids: Iterable[int] = range(1, num_nodes + 1)
        if self.node_ids == "random":
            ids = self._rng.sample(range(1, 2**63), num_nodes)
        self.contexts = {
            node_id: Context(
                run_id=run_id,
                node_id=node_id,
                node_config={"partition-id": k, "num-partitions": num_nodes},
                state=RecordDict(),
                run_config=dict(self.run_config),
            )
            for k, node_id in enumerate(ids)
        }
        self._replies: dict[str, Message] = {}
        self._run: Run | None = None
        _set_default_task_identity(run_id)

    def set_run(self, run: Run) -> None:
        """Keep the run Flower's loop hands the grid."""
        self._run = run

    @property
    def run(self) -> Run | None:
        """The run given to :meth:`set_run` (``None`` before)."""
        return self._run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        """A message to ``dst_node_id``."""
        return Message(
            content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id, ttl=ttl
        )

    def get_node_ids(self) -> Iterable[int]:
        """The node ids, in partition order."""
        return list(self.contexts)

    def _call(self, msg: Message) -> Message:
        """The destination node's reply to ``msg``; a client exception becomes an error reply."""
        try:
            return self.client_app(msg, self.contexts[msg.metadata.dst_node_id])
        except Exception as exc:  # noqa: BLE001 - a failing client becomes an error reply
            return Message(Error(code=0, reason=repr(exc)), reply_to=msg)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Run every message now and keep its reply under the returned id."""
        ids = []
        for msg in messages:
            key = f"{len(self._replies)}-{self._rng.getrandbits(64):x}"
            self._replies[key] = self._call(msg)
            ids.append(key)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """The replies of ``message_ids`` not pulled yet (each reply is returned once)."""
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Run the messages one after another; return the replies (shuffled if so configured)."""
        replies = [self._call(msg) for msg in messages]
        if self.shuffle_replies:
            self._rng.shuffle(replies)
        return replies


class LocalGrid(InProcessGrid):
    """:class:`InProcessGrid` that looks like a real deployment by default.

    Node ids are seeded random 63-bit integers unrelated to the partition ids, and replies come back
    in a seeded random order: strategies must rely on neither. Parameters as in
    :class:`InProcessGrid`.
    """

    node_ids = "random"
    shuffle_replies = True
