"""Drive a legacy (``flwr.server.strategy``) strategy by hand, as Flower's legacy server loop would."""

from __future__ import annotations

from flwr.server.client_manager import SimpleClientManager
from flwr.server.client_proxy import ClientProxy


class Proxy(ClientProxy):
    """A client proxy with only what the strategy touches: its node id."""

    def __init__(self, node_id: int) -> None:
        super().__init__(str(node_id))
        self.node_id = node_id

    def get_properties(self, *a, **k): ...
    def get_parameters(self, *a, **k): ...
    def fit(self, *a, **k): ...
    def evaluate(self, *a, **k): ...
    def reconnect(self, *a, **k): ...


def client_manager(node_ids) -> SimpleClientManager:
    """A client manager with one :class:`Proxy` per node id."""
    manager = SimpleClientManager()
    for node in node_ids:
        manager.register(Proxy(node))
    return manager
