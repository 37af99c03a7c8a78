"""What a person reads at the end of a run: a table of global vs personalized accuracy and a PNG.

Both read an evaluation in the form of FedACnnL's aggregated evaluation ``MetricRecord`` (a mapping;
see :func:`~flwr_analytic.strategies.evaluation.aggregate_personalized_evaluation`): for ``m`` in
``global-accuracy`` and ``personal-accuracy`` the weighted mean ``m``, ``m-client-mean``,
``m-client-min``, ``m-client-p10`` and the per-client values ``m-clients`` in the order of
``client-ids``. No Flower imports (the demo uses this module too).

matplotlib is a development dependency (``pip install -e '.[dev]'``), not a runtime one: it is
imported only when :func:`write_accuracy_png` is called, which raises ``ImportError`` without it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

#: The rows of :func:`accuracy_table`: label and metric prefix.
MODELS = (("global", "global-accuracy"), ("personalized", "personal-accuracy"),
          ("second stage", "second-stage-accuracy"), ("product", "product-accuracy"))  # fmt: skip
#: The columns of :func:`accuracy_table`: header and metric suffix.
COLUMNS = (("weighted", ""), ("client mean", "-client-mean"), ("min", "-client-min"),
           ("p10", "-client-p10"))  # fmt: skip


def client_summary(values: np.ndarray, weights: np.ndarray, prefix: str) -> dict[str, float]:
    """Weighted mean and client distribution of per-client values ``v_k`` with weights ``n_k``.

    Parameters
    ----------
    values, weights : np.ndarray
        One value and one weight (test-set size) per client.
    prefix : str
        The metric name.

    Returns
    -------
    dict
        ``prefix`` = ``Σ n_k v_k / Σ n_k``; ``-client-mean``, ``-client-std`` (population),
        ``-client-min`` and ``-client-p10`` (10th percentile) of the ``v_k``.

    """
    values, weights = np.asarray(values, dtype=float), np.asarray(weights, dtype=float)
    return {
        prefix: float(np.sum(values * weights) / np.sum(weights)),
        f"{prefix}-client-mean": float(np.mean(values)),
        f"{prefix}-client-std": float(np.std(values)),
        f"{prefix}-client-min": float(np.min(values)),
        f"{prefix}-client-p10": float(np.percentile(values, 10)),
    }


def accuracy_table(evaluation: Mapping[str, Any]) -> list[str]:
    """Global vs personalized accuracy: weighted mean, client mean, min and p10, as text lines.

    Parameters
    ----------
    evaluation : mapping
        The aggregated evaluation (see the module); rows whose metrics are missing are left out.

    Returns
    -------
    list of str
        A header and one line per model, e.g. ``personalized  98.51%  98.32%  90.00%  95.02%``;
        empty when the evaluation has neither model's accuracy.

    """
    width = max(len(label) for label, _ in MODELS)
    lines = []
    for label, prefix in MODELS:
        if prefix not in evaluation:
            continue
        cells = [evaluation.get(prefix + suffix) for _, suffix in COLUMNS]
        shown = [f"{float(c):>12.2%}" if c is not None else f"{'-':>12}" for c in cells]
        lines.append(f"{label:<{width}} " + " ".join(shown))
    if not lines:
        return []
    header = f"{'accuracy':<{width}} " + " ".join(f"{name:>12}" for name, _ in COLUMNS)
    clients = evaluation.get("num-clients")
    if clients is not None:
        header += f"   ({int(clients)} clients)"
    return [header, *lines]


def lambda_line(evaluation: Mapping[str, Any], key: str = "personal-lambda") -> str | None:
    """How many clients chose each pFedACnnL ρ (per-client λ), as one line; ``None`` without it.

    E.g. ``pFedACnnL λ per client (ρ: clients): 0.01: 3, 0.1: 2, ∞ (global kept): 1`` from
    ``key-values``, ``key-counts`` and ``key-global``
    (:func:`~flwr_analytic.strategies.evaluation.lambda_distribution`).
    """
    if f"{key}-values" not in evaluation:
        return None
    pairs = zip(evaluation[f"{key}-values"], evaluation[f"{key}-counts"], strict=True)
    cells = [f"{float(v):g}: {int(c)}" for v, c in pairs]
    cells.append(f"∞ (global kept): {int(evaluation.get(f'{key}-global', 0))}")
    return "pFedACnnL λ per client (ρ: clients): " + ", ".join(cells)


def short_list(values: Iterable[Any], shown: int = 8) -> str:
    """``[3, 5, 9]``, or the first ``shown`` values and how many more (a log line stays short)."""
    values = list(values)
    if len(values) <= shown:
        return str(values)
    return f"{values[:shown]} … +{len(values) - shown} more"


def per_client_accuracy(evaluation: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(client ids, global, personalized)`` per client, sorted by global accuracy then id.

    Raises
    ------
    KeyError
        When the evaluation has no per-client values.
    ValueError
        When the lists differ in length.

    """
    ids = np.asarray(evaluation["client-ids"], dtype=np.int64)
    glob = np.asarray(evaluation["global-accuracy-clients"], dtype=float)
    pers = np.asarray(evaluation["personal-accuracy-clients"], dtype=float)
    if not len(ids) == len(glob) == len(pers):
        raise ValueError(
            f"per-client lists differ in length: {len(ids)} ids, {len(glob)} global, "
            f"{len(pers)} personalized"
        )
    order = np.lexsort((ids, glob))
    return ids[order], glob[order], pers[order]


def write_accuracy_png(
    evaluation: Mapping[str, Any], path: str | Path, title: str | None = None
) -> Path:
    """Write a bar chart of each client's global vs personalized accuracy to ``path`` (PNG).

    Clients are sorted by global accuracy (ties by id), one pair of bars per client; the legend
    gives the sample-weighted accuracies. The axis starts below the lowest accuracy (at a
    multiple of 10%, said in the axis label) so that small gains and losses show. Drawn with
    matplotlib's Agg canvas (no display, no change of the global backend).

    Parameters
    ----------
    evaluation : mapping
        The aggregated evaluation with ``client-ids``, ``global-accuracy-clients`` and
        ``personal-accuracy-clients`` (see the module).
    path : str or Path
        Where to write; parent directories are created.
    title : str, optional
        Figure title (default: a description with the number of clients).

    Returns
    -------
    Path
        ``path``.

    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ids, glob, pers = per_client_accuracy(evaluation)
    n = len(ids)
    fig = Figure(figsize=(min(max(6.0, 0.32 * n + 1.5), 24.0), 3.6), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    x, width = np.arange(n), 0.4
    weighted = {p: evaluation.get(p) for _, p in MODELS}
    labels = [
        f"{name} ({weighted[p]:.1%} weighted)" if weighted[p] is not None else name
        for name, p in (("global", "global-accuracy"), ("personalized", "personal-accuracy"))
    ]
    ax.bar(x - width / 2, glob, width, label=labels[0], color="#8c9db5")
    ax.bar(x + width / 2, pers, width, label=labels[1], color="#d9822b")
    _label_clients(ax, x, ids)
    low = max(0.0, np.floor(10 * min(glob.min(), pers.min())) / 10 - 0.1)  # zoom on the spread
    ax.set_ylim(low, 1.0 + (1.0 - low) * 0.02)
    ax.set_ylabel("test accuracy" + (f" (axis from {low:.0%})" if low > 0 else ""))
    ax.set_title(title or f"Per-client accuracy, {n} clients (sorted by global accuracy)", pad=24)
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2, fontsize="small",
              frameon=False)  # fmt: skip
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def _label_clients(ax: Any, x: np.ndarray, ids: np.ndarray) -> None:
    """Client ids under the bars (every k-th one when there are many)."""
    step = max(1, int(np.ceil(len(ids) / 40)))
    ax.set_xticks(x[::step], [str(int(i)) for i in ids[::step]], fontsize="small")
    ax.set_xlabel("client (partition id)")
    ax.set_xlim(-0.6, len(ids) - 0.4)


__all__ = [
    "accuracy_table",
    "client_summary",
    "lambda_line",
    "per_client_accuracy",
    "short_list",
    "write_accuracy_png",
]
