"""ServerApp: the strategy chosen by the run config key ``algorithm``; writes a per-round JSON."""

from flwr_analytic.strategies.meta_server import make_meta_server_app

app = make_meta_server_app()
