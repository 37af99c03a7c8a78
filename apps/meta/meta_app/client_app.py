"""ClientApp: ν-step meta learning and its peers (FedAvg, FedProx, Per-FedAvg, pFedMe)."""

from flwr_analytic.clients.meta_client import make_meta_client_app

app = make_meta_client_app()
