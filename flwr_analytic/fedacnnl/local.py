"""An in-memory :class:`~flwr.serverapp.Grid` that calls a ``ClientApp`` directly (no Ray, no SuperLink).

It runs the exact strategy and client code of a Flower run in one process, for tests and quick
benchmarks. Like a real deployment, node ids are random 63-bit integers unrelated to the partition
ids, and replies come back in a random order (seeded): strategies must not rely on either.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping
from typing import Any

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common import Error
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity


class LocalGrid(Grid):
    """Call a ``ClientApp`` in-process for every message.

    Parameters
    ----------
    client_app : ClientApp
        The client app every node runs.
    num_nodes : int
        Number of nodes; node ``k`` gets node config ``{"partition-id": k, "num-partitions": N}``.
    run_config : mapping, optional
        The run config every node sees.
    seed : int (default: 0)
        Seed of the node ids and of the reply order.
    shuffle_replies : bool (default: True)
        Return replies in a random order (as a real SuperLink may).

    """

    def __init__(
        self,
        client_app: ClientApp,
        num_nodes: int,
        run_config: Mapping[str, Any] | None = None,
        *,
        seed: int = 0,
        shuffle_replies: bool = True,
        run_id: int = 1,
    ) -> None:
        self.client_app = client_app
        self._rng = random.Random(seed)
        self.shuffle_replies = shuffle_replies
        ids = self._rng.sample(range(1, 2**63), num_nodes)
        self.contexts = {
            node_id: Context(
                run_id=run_id,
                node_id=node_id,
                node_config={"partition-id": k, "num-partitions": num_nodes},
                state=RecordDict(),
                run_config=dict(run_config or {}),
            )
            for k, node_id in enumerate(ids)
        }
        self._pending: dict[str, Message] = {}
        self._run = None
        # Messages created outside a Flower runtime read the identity of the running task.
        for name, value in (("_run_id", run_id), ("_node_id", 0), ("_task_id", 0)):
            if getattr(TaskIdentity, name) is None:
                setattr(TaskIdentity, name[1:], value)

    def set_run(self, run: Any) -> None:  # noqa: D102
        self._run = run

    @property
    def run(self) -> Any:  # noqa: D102
        return self._run

    def create_message(  # noqa: D102
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return Message(
            content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id, ttl=ttl
        )

    def get_node_ids(self) -> Iterable[int]:
        """The node ids (random integers)."""
        return list(self.contexts)

    def _call(self, msg: Message) -> Message:
        try:
            return self.client_app(msg, self.contexts[msg.metadata.dst_node_id])
        except Exception as exc:  # noqa: BLE001 - a failing client becomes an error reply
            return Message(Error(code=0, reason=repr(exc)), reply_to=msg)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Run every message now and keep its reply."""
        ids = []
        for msg in messages:
            key = f"{len(self._pending)}-{self._rng.getrandbits(64):x}"
            self._pending[key] = self._call(msg)
            ids.append(key)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """The replies of ``message_ids``."""
        return [self._pending.pop(i) for i in message_ids if i in self._pending]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Run the messages one after another; return the replies (shuffled by default)."""
        replies = [self._call(msg) for msg in messages]
        if self.shuffle_replies:
            self._rng.shuffle(replies)
        return replies
