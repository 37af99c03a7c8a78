"""Flower app of FedACnnL / pFedACnnL (wires flwr_analytic code only)."""
