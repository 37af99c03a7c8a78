"""ν-step meta federated learning (Jamali, Saber and Bae, arXiv:2504.21327); no Flower imports.

- :mod:`~flwr_analytic.meta.meta_gradient`: the meta-gradient in ``exact``, ``hessian-free`` and
  ``first-order`` modes, and an autograd-through-the-unrolled-steps reference.
- :mod:`~flwr_analytic.meta.local_training`: the local loop of τ meta-steps with outer rate β.
- :mod:`~flwr_analytic.meta.baselines`: FedAvg/FedProx SGD and pFedMe local updates.
- :mod:`~flwr_analytic.meta.personalization`: the test-time fine-tuning curve ``s = 0..S``.
- :mod:`~flwr_analytic.meta.protocol`: the local-update settings in the training messages.
"""

from flwr_analytic.meta.baselines import pfedme_train, sgd_train
from flwr_analytic.meta.local_training import (
    HESSIAN_BATCH_POLICIES,
    BatchSampler,
    LocalResult,
    MetaConfig,
    meta_train,
)
from flwr_analytic.meta.meta_gradient import (
    MODES,
    MetaGradient,
    gradient,
    gradient_equivalents,
    hvp_exact,
    hvp_finite_difference,
    inner_steps,
    load_params,
    make_loss_fn,
    meta_gradient,
    model_params,
    step_cost,
    unrolled_meta_gradient,
)
from flwr_analytic.meta.personalization import (
    PersonalizationCurve,
    evaluate,
    personalization_curve,
)

__all__ = [
    "HESSIAN_BATCH_POLICIES",
    "MODES",
    "BatchSampler",
    "LocalResult",
    "MetaConfig",
    "MetaGradient",
    "PersonalizationCurve",
    "evaluate",
    "gradient",
    "gradient_equivalents",
    "hvp_exact",
    "hvp_finite_difference",
    "inner_steps",
    "load_params",
    "make_loss_fn",
    "meta_gradient",
    "meta_train",
    "model_params",
    "personalization_curve",
    "pfedme_train",
    "sgd_train",
    "step_cost",
    "unrolled_meta_gradient",
]
