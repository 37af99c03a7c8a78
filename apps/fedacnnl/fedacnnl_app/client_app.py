"""ClientApp: layer statistics in training rounds, global and pFedACnnL metrics in evaluation."""

from flwr_analytic.clients.fedacnnl_client import make_fedacnnl_client_app

app = make_fedacnnl_client_app()
