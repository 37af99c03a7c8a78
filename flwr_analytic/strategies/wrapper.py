"""Strategy wrappers: take a ``strategy``, delegate to it, add one concern.

The shape of Flower's ``DifferentialPrivacyServerSideFixedClipping``
(``flwr/serverapp/strategy/dp_fixed_clipping.py``): a wrapper is a ``Strategy`` holding the wrapped
``strategy``; the four ``configure_*`` / ``aggregate_*`` methods and ``summary`` pass through it, and it
changes what it is about. Wrappers compose (``Checkpointed(Metered(FedACnnL(...)))``). Attributes the
wrapper does not have are read from the wrapped strategy (``wrapped.num_rounds``, ``wrapped.net``).

:meth:`StrategyWrapper.start` runs the innermost strategy's own loop with the outermost wrapper as the
strategy, so every call passes through every wrapper: Flower's ``Strategy.start`` for FedAvg-like
strategies, :func:`~flwr_analytic.strategies.layerwise_loop.run_layerwise` for FedACnnL. The call
travels down the chain through :meth:`StrategyWrapper.run_loop`, where a wrapper may adjust the run
(``Checkpointed`` resumes there).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy


class StrategyWrapper(Strategy):
    """Delegate everything to ``strategy``; subclasses override what they add.

    Parameters
    ----------
    strategy : Strategy
        The wrapped strategy (possibly itself a wrapper).

    """

    def __init__(self, strategy: Strategy) -> None:
        super().__init__()
        self.strategy = strategy

    def __getattr__(self, name: str) -> Any:
        # only called for attributes this wrapper does not have: read them from the wrapped one
        if name == "strategy":  # not set yet (e.g. during unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.strategy, name)

    def innermost(self) -> Strategy:
        """The strategy at the bottom of the wrapper chain."""
        inner = self.strategy
        while isinstance(inner, StrategyWrapper):
            inner = inner.strategy
        return inner

    def summary(self) -> None:
        """Log the wrapped strategy's summary."""
        self.strategy.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """The wrapped strategy's training messages."""
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The wrapped strategy's aggregation of training replies."""
        return self.strategy.aggregate_train(server_round, replies)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """The wrapped strategy's evaluation messages."""
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """The wrapped strategy's aggregation of evaluation replies."""
        return self.strategy.aggregate_evaluate(server_round, replies)

    def start(self, grid: Grid, *args: Any, **kwargs: Any) -> Result:
        """Run the innermost strategy's loop with this wrapper as the strategy (see module)."""
        return self.run_loop(self, grid, *args, **kwargs)

    def run_loop(self, driver: Strategy, grid: Grid, *args: Any, **kwargs: Any) -> Result:
        """Run the innermost strategy's loop with ``driver`` (the outermost wrapper) as strategy.

        Each wrapper in the chain passes the call down; a wrapper that adjusts the run itself
        (:class:`~flwr_analytic.strategies.checkpointing.Checkpointed`) overrides this method,
        so it works at any place in the chain.
        """
        if isinstance(self.strategy, StrategyWrapper):
            return self.strategy.run_loop(driver, grid, *args, **kwargs)
        return type(self.strategy).start(driver, grid, *args, **kwargs)


class SortedReplies(StrategyWrapper):
    """Hand replies to the wrapped strategy in node-id order (bit-reproducible float sums).

    FedAvg sums the replies in the order it gets them; a SuperLink returns them in any order, so
    the same clients can give models that differ in the last bits. Node ids are fixed for a run.
    """

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Aggregate the training replies sorted by source node id."""
        ordered = sorted(replies, key=lambda m: m.metadata.src_node_id)
        return self.strategy.aggregate_train(server_round, ordered)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Aggregate the evaluation replies sorted by source node id."""
        ordered = sorted(replies, key=lambda m: m.metadata.src_node_id)
        return self.strategy.aggregate_evaluate(server_round, ordered)


class EvaluateRounds(StrategyWrapper):
    """Federated evaluation only in the given rounds (e.g. every ``k`` rounds and the last).

    Parameters
    ----------
    strategy : Strategy
        The wrapped strategy.
    rounds : iterable of int
        The server rounds in which the wrapped strategy's evaluation runs.

    """

    def __init__(self, strategy: Strategy, rounds: Iterable[int]) -> None:
        super().__init__(strategy)
        self.rounds = frozenset(int(r) for r in rounds)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """The wrapped strategy's evaluation messages in :attr:`rounds`, none otherwise."""
        if server_round not in self.rounds:
            return []
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)


__all__ = ["EvaluateRounds", "SortedReplies", "StrategyWrapper"]
