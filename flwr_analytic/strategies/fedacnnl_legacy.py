"""FedACnnL for projects on Flower's legacy strategy API (``flwr.server.strategy.Strategy``).

A thin adapter over :class:`flwr_analytic.strategies.fedacnnl.FedACnnL` (same checks, summation
order and solves; Gu et al., arXiv 2502.06915), to be run with ``ServerConfig(num_rounds=
strategy.num_rounds)`` and :class:`flwr_analytic.clients.fedacnnl_legacy.FedACnnLNumPyClient`.
"""

from __future__ import annotations

import time
from typing import Any

from flwr.app import MetricRecord, RecordDict
from flwr.common import (
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    Parameters,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import Strategy as LegacyStrategy

from flwr_analytic.analytic import StatisticsError
from flwr_analytic.analytic.server import ClientKey, LayerOutcome
from flwr_analytic.clients.fedacnnl_legacy import list_to_packed
from flwr_analytic.fedacnnl import protocol as P
from flwr_analytic.strategies.fedacnnl import FedACnnL
from flwr_analytic.strategies.records import RoundLog, RoundRecord


class FedACnnLLegacy(LegacyStrategy):
    """FedACnnL / pFedACnnL as a legacy Flower strategy.

    Parameters
    ----------
    *args, **kwargs
        Those of :class:`~flwr_analytic.strategies.fedacnnl.FedACnnL` (architecture, scheme, γ,
        λ, seed, sampling fractions and minimums, ...).

    Notes
    -----
    Run it for :attr:`num_rounds` rounds; federated evaluation happens in the last one (the model is
    complete only then). ``evaluation`` holds the full aggregated metrics, including the
    per-client lists that legacy metric dicts cannot carry.

    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.core = FedACnnL(*args, **kwargs)
        if self.core.server.num_groups >= 2:
            raise ValueError("group-wise models (num_groups >= 2) need the Message-API FedACnnL")
        if any(self.core.net.rounds(i) > 1 for i in range(self.core.net.num_layers)):
            raise ValueError("zca-kmeans (several rounds per layer) needs the Message-API FedACnnL")
        self.evaluation: dict[str, Any] = {}

    def __repr__(self) -> str:
        return f"FedACnnLLegacy({self.core.architecture.name}, rounds={self.num_rounds})"

    @property
    def num_rounds(self) -> int:
        """Rounds to run: one per layer fitted from statistics."""
        return self.core.num_rounds

    @property
    def net(self):  # noqa: ANN201
        """The server's :class:`~flwr_analytic.analytic.AnalyticNetwork`."""
        return self.core.net

    @property
    def history(self) -> RoundLog:
        """The round records (:class:`~flwr_analytic.strategies.records.RoundLog`)."""
        return self.core.history

    def _arrays(self) -> Parameters:
        return ndarrays_to_parameters(P.weights_list(self.core.net))

    def _sample(self, client_manager: ClientManager, fraction: float, minimum: int):  # noqa: ANN202
        available = client_manager.num_available()
        size = max(int(available * fraction), minimum)
        clients = client_manager.sample(
            num_clients=size, min_num_clients=max(size, self.core.min_available_nodes)
        )
        return sorted(clients, key=lambda c: str(c.cid))

    def _config(self, server_round: int) -> dict[str, Any]:
        config: dict[str, Any] = dict(P.network_config(self.core.net, self.core.batch_size))
        config[P.SERVER_ROUND] = server_round
        config[P.PERSONALIZE_LAYERS] = self.core.personalize_layers
        return config

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        """Start over (no layer solved) and return the empty model."""
        self.core.reset()
        return ndarrays_to_parameters([])

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        """Ask for the statistics of the next unsolved layer (nothing once all are solved)."""
        core = self.core
        if core.finished:
            return []
        config = {**self._config(server_round), P.LAYER: core.server.layer}
        clients = self._sample(client_manager, core.fraction_train, core.min_train_nodes)
        ins = FitIns(self._arrays(), config)
        record = core.history.open(server_round, "train")
        record.num_sent = len(clients)
        record.bytes_sent = sum(len(t) for t in ins.parameters.tensors) * len(clients)
        record.details["layer"] = core.server.layer
        self._t0 = time.perf_counter()
        return [(client, ins) for client in clients]

    def open_round(self, server_round: int, failures: list[Any]) -> tuple[RoundRecord, int]:
        """The training record of ``server_round`` with the failures rejected; the layer."""
        record = self.core.history.open(server_round, "train")
        for failure in failures:
            record.reject(-1, f"client failure: {failure!r}")
        return record, self.core.server.layer

    def close_round(self, record: RoundRecord, outcome: LayerOutcome) -> dict[str, Any]:
        """Record the outcome of a training round; return Flower's metrics dict."""
        record.details.update({"num-valid": outcome.num_valid, "solved": outcome.solved})
        if outcome.partitions:
            record.details["partitions"] = outcome.partitions
        record.seconds = time.perf_counter() - getattr(self, "_t0", time.perf_counter())
        return {
            P.LAYER: outcome.layer,
            "num-clients": outcome.num_valid,
            "num-rejected": len(record.details.get("rejected", [])),
            "bytes-sent": int(record.bytes_sent),
            "bytes-received": int(record.bytes_received),
            "round-time": float(record.seconds),
        }

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Any]]:
        """Record the round, solve the layer from the results (:meth:`solve_results`), close it."""
        record, layer = self.open_round(server_round, failures)
        record.num_replies = len(results)
        outcome = self.solve_results(record, layer, results)
        metrics = self.close_round(record, outcome)
        return (self._arrays() if outcome.solved else None), metrics

    def solve_results(
        self, record: RoundRecord, layer: int, results: list[tuple[ClientProxy, FitRes]]
    ) -> LayerOutcome:
        """Check every result, sum in ``partition-id`` order and solve the layer (with enough)."""
        server = self.core.server
        for proxy, res in results:
            record.bytes_received += sum(len(t) for t in res.parameters.tensors)
            node = int(proxy.node_id) if hasattr(proxy, "node_id") else 0
            try:
                stats = server.check(
                    list_to_packed(parameters_to_ndarrays(res.parameters)),
                    res.num_examples,
                    res.metrics.get(P.LAYER),
                    res.metrics,
                )
                server.contribute(ClientKey.of(res.metrics.get(P.PARTITION_ID), node), stats)
            except (StatisticsError, KeyError, ValueError, TypeError) as exc:
                record.reject(-1, f"client {proxy.cid}: {exc}")
        outcome = server.close_layer()
        for key, reason in outcome.duplicates:
            record.reject(key.node, reason)
        return outcome

    def configure_evaluate(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, EvaluateIns]]:
        """Evaluate global and pFedACnnL models once every layer is solved."""
        core = self.core
        if core.fraction_evaluate == 0.0 or not core.finished:
            return []
        config = self._config(server_round)
        config.update(
            P.evaluate_settings(
                core.lam,
                core.lam_rule,
                core.personal_lambda,
                core.server.output_leverage,
                core.personal_recalibration,
            )
        )
        clients = self._sample(client_manager, core.fraction_evaluate, core.min_evaluate_nodes)
        return [(client, EvaluateIns(self._arrays(), config)) for client in clients]

    def aggregate_evaluate(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, EvaluateRes]],
        failures: list[tuple[ClientProxy, EvaluateRes] | BaseException],
    ) -> tuple[float | None, dict[str, Any]]:
        """Aggregate like :func:`aggregate_personalized_evaluation`; scalars are returned."""
        if not results:
            return None, {}
        records = [
            RecordDict({"metrics": MetricRecord({**res.metrics, P.NUM_EXAMPLES: res.num_examples})})
            for _, res in results
        ]
        agg = dict(self.core.evaluate_metrics_aggr_fn(records, self.core.weighted_by_key))
        self.evaluation = agg
        scalars = {k: v for k, v in agg.items() if not isinstance(v, list)}
        return float(agg.get("personal-loss", float("nan"))), scalars

    def evaluate(self, server_round: int, parameters: Parameters) -> tuple[float, dict] | None:
        """No centralized evaluation (use the Message-API strategy's ``evaluate_fn``)."""
        return None
