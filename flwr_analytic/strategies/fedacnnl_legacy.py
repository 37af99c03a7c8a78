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
from flwr_analytic.clients.fedacnnl_legacy import list_to_packed, state_to_arrays
from flwr_analytic.fedacnnl import protocol as P
from flwr_analytic.strategies.fedacnnl import FedACnnL


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
        if self.core.num_groups >= 2:
            raise ValueError("group-wise models (num_groups >= 2) need the Message-API FedACnnL")
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

    def _arrays(self) -> Parameters:
        return ndarrays_to_parameters(state_to_arrays(P.weights_state_dict(self.core.net)))

    def _sample(self, client_manager: ClientManager, fraction: float, minimum: int):  # noqa: ANN202
        available = client_manager.num_available()
        size = max(int(available * fraction), minimum)
        clients = client_manager.sample(
            num_clients=size, min_num_clients=max(size, self.core.min_available_nodes)
        )
        return sorted(clients, key=lambda c: str(c.cid))

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        """Start over (no layer solved) and return the empty model."""
        self.core.reset()
        return ndarrays_to_parameters([])

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        """Ask for the statistics of the next unsolved layer (nothing once all are solved)."""
        if self.core.finished:
            return []
        config: dict[str, Any] = dict(P.network_config(self.core.net, self.core.batch_size))
        config.update(
            {
                P.LAYER: self.core.net.solved_layers,
                P.SERVER_ROUND: server_round,
                P.PERSONALIZE_LAYERS: self.core.personalize_layers,
            }
        )
        clients = self._sample(client_manager, self.core.fraction_train, self.core.min_train_nodes)
        ins = FitIns(self._arrays(), config)
        self.core._pending = {  # noqa: SLF001
            "round": server_round,
            "kind": "train",
            "layer": self.core.net.solved_layers,
            "t0": time.perf_counter(),
            "num-sent": len(clients),
            "bytes-sent": sum(len(t) for t in ins.parameters.tensors) * len(clients),
        }
        return [(client, ins) for client in clients]

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Any]]:
        """Check every result, sum in ``partition-id`` order and solve the layer."""
        core = self.core
        layer = core.net.solved_layers
        entry = core._train_entry(server_round)  # noqa: SLF001
        for failure in failures:
            core._reject(entry, -1, f"client failure: {failure!r}")  # noqa: SLF001
        valid = []
        received = 0
        for proxy, res in results:
            received += sum(len(t) for t in res.parameters.tensors)
            try:
                stats = core.check_statistics(
                    list_to_packed(parameters_to_ndarrays(res.parameters)),
                    res.num_examples,
                    layer,
                    res.metrics.get(P.LAYER),
                )
            except (StatisticsError, KeyError, ValueError, TypeError) as exc:
                core._reject(entry, -1, f"client {proxy.cid}: {exc}")  # noqa: SLF001
                continue
            node = int(proxy.node_id) if hasattr(proxy, "node_id") else 0
            valid.append((core.order_key(res.metrics.get(P.PARTITION_ID), node), stats))
        entry["bytes-received"] = received
        entry["num-replies"] = len(results)
        solved = core.solve_layer(valid, entry)
        entry["round-time"] = time.perf_counter() - entry.pop("t0")
        core.history.append(entry)
        metrics = {
            P.LAYER: layer,
            "num-clients": int(entry.get("num-valid", 0)),
            "num-rejected": len(entry.get("rejected", [])),
            "bytes-sent": int(entry.get("bytes-sent", 0)),
            "bytes-received": received,
            "round-time": float(entry["round-time"]),
        }
        return (self._arrays() if solved else None), metrics

    def configure_evaluate(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, EvaluateIns]]:
        """Evaluate global and pFedACnnL models once every layer is solved."""
        core = self.core
        if core.fraction_evaluate == 0.0 or not core.finished:
            return []
        config: dict[str, Any] = dict(P.network_config(core.net, core.batch_size))
        config.update(
            {
                P.SERVER_ROUND: server_round,
                P.PERSONALIZE_LAYERS: core.personalize_layers,
                P.LAM: float(core.lam),
                P.LAM_RULE: core.lam_rule,
            }
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
