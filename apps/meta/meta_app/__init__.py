"""Flower app of ν-step meta federated learning (wires flwr_analytic code only)."""
