"""flwr-analytic: analytic (gradient-free) and nu-step meta federated learning for Flower."""

__version__ = "0.1.0"
