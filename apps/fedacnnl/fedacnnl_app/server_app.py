"""ServerApp: FedACnnL over the run config; writes the results JSON (``results-path``)."""

from flwr_analytic.strategies.fedacnnl_server import make_fedacnnl_server_app

app = make_fedacnnl_server_app()
