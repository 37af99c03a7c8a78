"""FedACnnL through Flower's SecAgg+: the server solves each layer from the masked sum only.

FedACnnL (Gu et al., arXiv 2502.06915) solves ``W = (Σ_k G_k + γI)⁻¹ Σ_k B_k``: the sums are all
the server needs, so the statistics can travel through secure aggregation. Flower 1.41/1.42's SecAgg+
runs on the legacy compat path: the server app wraps this strategy in a
``LegacyContext`` and runs ``DefaultWorkflow(fit_workflow=SecAggPlusWorkflow(...))``; clients run
:class:`~flwr_analytic.clients.fedacnnl_secagg.FedACnnLSecAggClient` behind ``secaggplus_mod``
(:func:`make_secagg_server_app` / :func:`~flwr_analytic.clients.fedacnnl_secagg.make_secagg_client_app`).

How the sum is recovered (see :class:`~flwr_analytic.analytic.privacy.SecAggEncoding`): the
workflow hands ``aggregate_fit`` the same dequantized *weighted mean* in every result's parameters,
``Σ_k w_k x_k / Σ_k w_k`` with ``w_k = num_examples_k / max_weight``. Clients report
``num_examples = 1`` and the workflow must use ``max_weight = 1`` (checked by
:func:`secaggplus_workflow`), so every weight is exactly 1 and the mean is ``(1/K) Σ_k x_k``; ``K``
is the number of results the workflow passes (the clients whose masked vectors were summed). The
server multiplies by ``K`` and the public scales, rounds the count, checks and solves.

What the server cannot do under SecAgg+: look at one client's statistics. Per-client checks of
:class:`~flwr_analytic.strategies.fedacnnl.FedACnnL` (shapes, NaN, symmetry, counts) become checks of
the sum; a client's own range check (:class:`~flwr_analytic.analytic.privacy.SecAggRangeError`)
replaces the clipping SecAgg+ would silently apply.
"""

from __future__ import annotations

from typing import Any

from flwr.common import FitIns, FitRes, Parameters, parameters_to_ndarrays
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy

from flwr_analytic.analytic import LayerStatistics, StatisticsError
from flwr_analytic.analytic.privacy import (
    SECAGG_CLIPPING_RANGE,
    SECAGG_COUNT_SCALE,
    SECAGG_QUANTIZATION_RANGE,
    SECAGG_SCALE,
    SecAggEncoding,
    rows_per_sample,
)
from flwr_analytic.analytic.server import LayerOutcome
from flwr_analytic.fedacnnl import protocol as P
from flwr_analytic.strategies.fedacnnl_legacy import FedACnnLLegacy
from flwr_analytic.strategies.records import RoundRecord


class FedACnnLSecAgg(FedACnnLLegacy):
    """FedACnnL / pFedACnnL as a legacy strategy for Flower's ``SecAggPlusWorkflow``.

    Parameters
    ----------
    *args, **kwargs
        Those of :class:`~flwr_analytic.strategies.fedacnnl.FedACnnL`.
    encoding : SecAggEncoding
        Public fixed-point encoding (scales, SecAgg+ clipping and quantization range); must
        match the workflow's ``clipping_range`` and ``quantization_range``.

    Notes
    -----
    ``aggregates`` keeps, per layer, the decoded sum and its entrywise error bounds
    ``(ε_G, ε_n)`` (``K·s·c/Q``, ``K·s_n·c/Q``), for audits and tests.

    """

    def __init__(self, *args: Any, encoding: SecAggEncoding, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.encoding = encoding
        self.aggregates: dict[int, dict[str, Any]] = {}

    def __repr__(self) -> str:
        return f"FedACnnLSecAgg({self.core.architecture.name}, rounds={self.num_rounds})"

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        """As :class:`FedACnnLLegacy`, plus the public ``secagg-*`` encoding keys."""
        pairs = super().configure_fit(server_round, parameters, client_manager)
        enc = self.encoding
        for _, ins in pairs:
            ins.config.update(
                {
                    SECAGG_SCALE: float(enc.scale),
                    SECAGG_COUNT_SCALE: float(enc.count_scale),
                    SECAGG_CLIPPING_RANGE: float(enc.clipping_range),
                    SECAGG_QUANTIZATION_RANGE: int(enc.quantization_range),
                }
            )
        return pairs

    def decode(self, results: list[tuple[ClientProxy, FitRes]], layer: int) -> LayerStatistics:
        """The statistics sum from the workflow's results (every one holds the same mean)."""
        if not results:
            raise StatisticsError("no results")
        weights = {int(res.num_examples) for _, res in results}
        if weights != {1}:
            raise StatisticsError(
                f"SecAgg clients must report num_examples=1 (the SecAgg+ weight), got {weights}"
            )
        claimed = {int(res.metrics.get(P.LAYER, -1)) for _, res in results}
        net = self.core.net
        if claimed != {layer}:  # named 1-based, "layer k/L", as in the log
            shown = ", ".join(f"{c + 1}/{net.num_layers}" for c in sorted(claimed))
            raise StatisticsError(
                f"results are for layers {shown}, expected layer {layer + 1}/{net.num_layers}"
            )
        mean = parameters_to_ndarrays(results[0][1].parameters)
        stats = self.encoding.decode(
            mean, len(results), rows_per_sample=rows_per_sample(net, layer)
        )
        stats.cross = stats.cross.reshape(net.design_dim(layer), net.num_targets(layer))
        return stats.validate(net.design_dim(layer), net.num_targets(layer))

    def open_round(self, server_round: int, failures: list[Any]) -> tuple[RoundRecord, int]:
        """As :class:`FedACnnLLegacy`, each failure counted once.

        Flower 1.41/1.42's SecAggPlusWorkflow lists a client failing in the masked-vector stage twice
        (two Exception objects wrapping the same reply error).
        """
        unique = {id(f.args[0] if getattr(f, "args", None) else f): f for f in failures}
        return super().open_round(server_round, list(unique.values()))

    def solve_results(
        self, record: RoundRecord, layer: int, results: list[tuple[ClientProxy, FitRes]]
    ) -> LayerOutcome:
        """Decode the SecAgg+ sum of the ``K`` clients, check it and solve the layer from it."""
        server = self.core.server
        record.details["secure-aggregation"] = "secagg+"
        record.bytes_received = sum(
            len(t) for _, res in results[:1] for t in res.parameters.tensors
        )
        outcome = LayerOutcome(layer, False, len(results), [], [])
        if results:
            try:
                stats = self.decode(results, layer)
            except (StatisticsError, ValueError, TypeError) as exc:
                shown = f"{layer + 1}/{self.core.net.num_layers}"
                record.reject(-1, f"secure aggregate of layer {shown}: {exc}")
            else:
                eps_g, eps_n = self.encoding.entry_tolerance(len(results))
                self.aggregates[layer] = {
                    "statistics": stats,
                    "num-clients": len(results),
                    "entry-tolerance": eps_g,
                    "count-tolerance": eps_n,
                }
                record.details["secagg-entry-tolerance"] = eps_g
                # nothing identifies the clients under SecAgg+: the sum of K is solved as such
                if len(results) >= server.min_valid_replies:
                    server.solve(stats, len(results))
                    outcome.solved, outcome.num_examples = True, int(stats.count)
        return outcome


def secaggplus_workflow(encoding: SecAggEncoding, num_shares: int | float = 1.0, **kwargs: Any):  # noqa: ANN201
    """Flower's ``SecAggPlusWorkflow`` with parameters matching ``encoding``.

    ``max_weight=1`` (clients report weight 1), ``clipping_range`` and ``quantization_range`` from
    the encoding, and ``modulus_range = 2**62`` (masks mod 2^62; sums of up to 2^31 clients of
    2^31-level values cannot wrap). Other keywords (``reconstruction_threshold``, ``timeout``) pass
    through; ``reconstruction_threshold`` defaults to 2/3 of the shares.
    """
    from flwr.server.workflow import SecAggPlusWorkflow

    kwargs.setdefault("reconstruction_threshold", 2 / 3)
    return SecAggPlusWorkflow(
        num_shares=num_shares,
        max_weight=1.0,
        clipping_range=float(encoding.clipping_range),
        quantization_range=int(encoding.quantization_range),
        modulus_range=2**62,
        **kwargs,
    )


def make_secagg_server_app(strategy_fn, **workflow_kwargs: Any):  # noqa: ANN001, ANN201
    """A ``ServerApp`` running ``strategy_fn(context)`` (a :class:`FedACnnLSecAgg`) under SecAgg+.

    ``main``: ``DefaultWorkflow(fit_workflow=secaggplus_workflow(strategy.encoding, ...))`` on a
    ``LegacyContext`` with ``ServerConfig(num_rounds=strategy.num_rounds)``.
    """
    from flwr.app import Context
    from flwr.serverapp import Grid, ServerApp

    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        strategy = strategy_fn(context)
        run_secagg(grid, context, strategy, **workflow_kwargs)

    return app


def run_secagg(grid: Any, context: Any, strategy: FedACnnLSecAgg, **workflow_kwargs: Any) -> Any:
    """Run ``strategy`` on ``grid`` through ``DefaultWorkflow`` + ``SecAggPlusWorkflow``.

    Returns the ``LegacyContext`` (its ``history`` holds Flower's metrics).
    """
    from flwr.server import LegacyContext, ServerConfig
    from flwr.server.workflow import DefaultWorkflow

    legacy = LegacyContext(
        context=context, config=ServerConfig(num_rounds=strategy.num_rounds), strategy=strategy
    )
    workflow = DefaultWorkflow(
        fit_workflow=secaggplus_workflow(strategy.encoding, **workflow_kwargs)
    )
    workflow(grid, legacy)
    return legacy
