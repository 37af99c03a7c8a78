"""The cell sources of the tutorial notebooks in this folder; regenerates them, executed.

Edit a cell here, then run ``.venv/bin/python notebooks/_build.py [NAME ...]`` (the same as
``notebooks/run.py --commit``): it renders each notebook from the cells below, executes it
(about 1 and 2 minutes on 2 cores) and writes it in place with its outputs, so the plots show on
the repository page. Never edit the ``.ipynb`` files by hand. The written form is normalized
(see ``run.py``): no timestamps or Python version in the metadata, execution counts 1..n, every
printed wall-clock time (``<number> s``) replaced by ``[time] s``, local paths by placeholders,
and no outputs for cells tagged ``volatile``. So print times as ``f"{seconds:.1f} s"``, and tag
``volatile`` a cell whose output holds timings in any other form.

Every notebook ends with a cell tagged ``summary`` (and ``volatile``: its raw JSON holds timings)
that prints one line ``SUMMARY {json}`` with the key numbers; the tests read it from a fresh
execution. ``tests/test_notebooks.py`` checks (fast) that the committed files have exactly these
cells, all executed, and re-executes them in CI.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent

SETUP = """\
import json
import os
import sys
import time
import warnings

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
import matplotlib.pyplot as plt
import numpy as np
import torch
from flwr.common.logger import update_console_handler

update_console_handler(level="WARNING", colored=False)  # keep Flower's per-round log out of the way
# flwr-datasets retries small partitions, and tqdm runs without ipywidgets: both only warn
warnings.filterwarnings("ignore", message="The specified min_partition_size")
warnings.filterwarnings("ignore", message="IProgress not found")
SEED = 0  # every random choice below derives from it
torch.manual_seed(SEED)
torch.set_num_threads(min(2, os.cpu_count() or 1))
print("kernel:", sys.executable)"""


STORED_OUTPUTS = """
*The outputs stored in this file come from one run (`notebooks/run.py --commit`). Printed
wall-clock times change from run to run, so they are stored as `[time]`, and the last cell's
output (raw numbers with timings) is left out; run the notebook to see yours.*
"""


def _md(text: str) -> nbformat.NotebookNode:
    return new_markdown_cell(text.strip("\n"))


def _code(text: str, tags: tuple[str, ...] = ()) -> nbformat.NotebookNode:
    cell = new_code_cell(text.strip("\n"))
    if tags:
        cell.metadata["tags"] = list(tags)
    return cell


# --------------------------------------------------------------------------------------------
# Notebook 1: analytic federated learning in five minutes
# --------------------------------------------------------------------------------------------

FIVE_MINUTES = [
    _md(
        r"""
# Analytic federated learning in five minutes

A convolutional network trained by 20 clients **without a single gradient**: each client sends
the sufficient statistics of one layer, the server solves a linear system, and three rounds later
the model is done. Each client then personalizes the output layer in closed form, with no extra
communication. We run it through Flower's strategy/client-app machinery and compare it with
**FedAvg training the same CNN**: accuracy per client, bytes on the wire and wall time.

- FedACnnL / pFedACnnL: Gu et al., *Analytic Personalized Federated Meta-Learning*,
  [arXiv:2502.06915](https://arxiv.org/abs/2502.06915); the layer-wise analytic CNN is ACnnL
  (Zhuang et al., Information Sciences 2025), the single-layer federated case AFL
  ([arXiv:2405.16240](https://arxiv.org/abs/2405.16240)).
- FedAvg: McMahan et al., *Communication-Efficient Learning of Deep Networks from Decentralized
  Data*, AISTATS 2017 ([arXiv:1602.05629](https://arxiv.org/abs/1602.05629)).
- Flower: Beutel et al., [arXiv:2007.14390](https://arxiv.org/abs/2007.14390).

Only the papers' abstracts were available to the authors of `flwr_analytic`: the per-layer
formulas below are the standard reconstruction consistent with them.

Runs in about a minute and a half on 2 CPU cores, on scikit-learn's embedded digits (no download).
"""
        + STORED_OUTPUTS
    ),
    _code(SETUP),
    _md(r"""
## 1. Twenty clients with skewed labels

The 1,797 8×8 digit images are split among 20 clients with a Dirichlet(0.1) label
distribution (each client sees mostly one or two digits; at least 20 images each), and each client
keeps 25% of its images as its own test set. Personalization is scored on these local test sets.
"""),
    _code(r"""
from flwr_analytic.data import federated_split, load_digits

NUM_CLIENTS, DIRICHLET_ALPHA, MIN_SIZE, TEST_FRACTION = 20, 0.1, 10, 0.25
data = load_digits()
split = federated_split(
    data,
    NUM_CLIENTS,
    "dirichlet",
    alpha=DIRICHLET_ALPHA,
    min_partition_size=MIN_SIZE,
    test_fraction=TEST_FRACTION,
    seed=SEED,
)
labels = np.array(
    [
        np.bincount(data.y[np.concatenate([tr, te])], minlength=10)
        for tr, te in zip(split.train, split.test)
    ]
)
print(
    f"{len(data.y)} images {data.input_shape}, train/test per client:",
    [(len(tr), len(te)) for tr, te in zip(split.train, split.test)],
)

fig, ax = plt.subplots(figsize=(9, 2.8))
bottom = np.zeros(NUM_CLIENTS)
colors = plt.cm.tab10(np.arange(10))
for digit in range(10):
    ax.bar(
        range(NUM_CLIENTS), labels[:, digit], bottom=bottom, color=colors[digit], label=str(digit)
    )
    bottom += labels[:, digit]
ax.set(
    xlabel="client",
    ylabel="images",
    title="Label mix per client (Dirichlet 0.1)",
    xticks=range(NUM_CLIENTS),
)
ax.legend(ncol=10, fontsize=7, loc="upper right", title="digit", title_fontsize=7)
plt.tight_layout()
plt.show()
"""),
    _md(r"""
## 2. The math: sufficient statistics and a closed-form solve

Take layer $l$ of the network. With the layers below it fixed, every training sample gives
design rows $a$ (for a dense layer the input $[h, 1]$; for a convolution every im2col patch
$[p, 1]$) and a target $t$ (the one-hot label). Client $k$ stacks its rows into $A_k$ and targets
into $T_k$ and sends only

$$G_k = A_k^\top A_k,\qquad B_k = A_k^\top T_k,\qquad n_k .$$

The server sums them and solves the ridge problem by a Cholesky factorization:

$$W_l = \Big(\sum_k G_k + \gamma I\Big)^{-1} \sum_k B_k .$$

Because $\sum_k A_k^\top A_k = A^\top A$ for the pooled design matrix $A$, **the federated model
equals the model trained centrally on the pooled data**, whatever the partition, and one round per
layer suffices (FedACnnL). Hidden layers use the same statistics: with the `label-pca` scheme a
conv layer's filters are 10 ridge regressions of the patches onto the labels plus the leading
principal directions of the patches (whitened, from the covariance held in the same summed $G$),
in ± pairs.
Client $k$ personalizes from the statistics it already holds
(pFedACnnL): its own ridge regression pulled towards the global solution,

$$W_{k,l} = (G_k + \lambda I)^{-1}(B_k + \lambda W_l),\qquad \lambda = \rho\,\operatorname{tr}(G_k)/D,$$

here for the output layer with $\rho = 0.1$. No gradient, no learning rate, no epochs.

The core (`flwr_analytic.analytic`, no Flower) does exactly that on in-memory clients; we check
the exactness claim against centralized training on the pooled data.
"""),
    _code(r"""
from flwr_analytic.analytic import (
    AnalyticNetwork,
    Regularization,
    fit_centralized,
    fit_federated,
    personalize,
)
from flwr_analytic.models import cnn

arch = cnn(data.input_shape, data.num_classes)  # conv 16 -> conv 64 -> linear head
print(arch)
clients = [(data.x[i], data.y[i]) for i in split.train]
start = time.perf_counter()
net = AnalyticNetwork(arch, "label-pca", seed=SEED)
fit = fit_federated(net, clients)
core_seconds = time.perf_counter() - start

pooled = np.concatenate(split.train)
central = fit_centralized(
    AnalyticNetwork(arch, "label-pca", seed=SEED), data.x[pooled], data.y[pooled]
)
exactness = max(
    float(np.abs(w - c).max() / np.abs(c).max()) for w, c in zip(net.weights, central.weights)
)
print(
    f"federated fit in {core_seconds:.1f} s; max relative difference to centralized: {exactness:.1e}"
)

core_correct = np.zeros(2)
for k, test in enumerate(split.test):
    mine = net.with_weights(personalize(net, fit.client_statistics[k], Regularization(0.1)))
    core_correct += (
        net.evaluate(data.x[test], data.y[test])["correct"],
        mine.evaluate(data.x[test], data.y[test])["correct"],
    )
core_acc = core_correct / sum(len(t) for t in split.test)
print(f"core: global {core_acc[0]:.2%}, pFedACnnL personalized {core_acc[1]:.2%}")
"""),
    _md(r"""
## 3. The same through Flower: the `FedACnnL` strategy and client app

`FedACnnL` is a Flower Message-API strategy: one training round per layer (the server sends the
solved layers below, clients reply with the packed upper triangle of $G_k$, $B_k$ and $n_k$), then
one evaluation round in which every client scores the global model and its pFedACnnL model.
`make_fedacnnl_client_app` takes your own data loader. Here a `LocalGrid` calls the client app
in-process (random node ids, shuffled replies, no Ray) so the notebook stays fast; the identical
server and client apps run on Flower's simulation engine with
`flwr.simulation.run_simulation` (`flwr-analytic-simulate`) or as a real Flower app with
`flwr run apps/fedacnnl` (see `docs/deployment.md`).
"""),
    _code(r'''
from flwr_analytic.clients.fedacnnl_client import make_fedacnnl_client_app
from flwr_analytic.grid import LocalGrid
from flwr_analytic.strategies.fedacnnl_server import run_fedacnnl


def load_partition(context):
    """The (train, test) ArrayDatasets of this node: any loader with this signature works."""
    return split.client(data, int(context.node_config["partition-id"]))


fed_config = {  # the run config of apps/fedacnnl (kebab-case keys)
    "dataset": "digits",
    "model": "cnn",
    "scheme": "label-pca",
    "lam": 0.1,
    "seed": SEED,
    "min-nodes": NUM_CLIENTS,
    "results-path": "",
}
grid = LocalGrid(make_fedacnnl_client_app(load_partition), NUM_CLIENTS, fed_config, seed=SEED)
fed_result, fed = run_fedacnnl(grid, fed_config)

print(f"{'round':>5} {'kind':>8} {'layer':>5} {'sent MB':>8} {'recv MB':>8} {'time':>8}")
for r in fed["rounds"]:
    layer = "-" if r.get("layer") is None else r["layer"]
    print(
        f"{r['round']:>5} {r['kind']:>8} {layer:>5} {r['bytes-sent'] / 1e6:>8.2f} "
        f"{r['bytes-received'] / 1e6:>8.2f} {r['round-time']:>6.2f} s"
    )
train_rounds = [r for r in fed["rounds"] if r["kind"] == "train"]
fed_train_seconds = sum(r["round-time"] for r in train_rounds)
fed_train_bytes = sum(r["bytes-sent"] + r["bytes-received"] for r in train_rounds)
print(
    f"FedACnnL: global {fed['global-accuracy']:.2%}, pFedACnnL {fed['personal-accuracy']:.2%} "
    f"after {len(train_rounds)} rounds, {fed_train_seconds:.1f} s, {fed_train_bytes / 1e6:.1f} MB"
)
print(
    "Flower run == core run:",
    bool(
        np.allclose(
            [fed["global-accuracy"], fed["personal-accuracy"]], core_acc, rtol=0, atol=1e-12
        )
    ),
)
'''),
    _md(r"""
## 4. FedAvg on the same CNN

The baseline is Flower's own `FedAvg` strategy (through the package's meta app, `algorithm =
"fedavg-ft"`): each round every client takes 10 SGD steps (batch 32) from the global model and the
server averages the models weighted by the number of examples. Its personalized counterpart is
FedAvg + fine-tuning: at evaluation each client takes 5 SGD steps on its *training* data before
testing. The client app loads its partition from the run config; the check below confirms it
sees exactly the split used above. The local learning rate 0.2 was chosen on these test sets in
FedAvg's favour: after 40 rounds rates 0.05 / 0.1 / 0.2 / 0.4 gave 91.7 / 93.6 / 96.0 / 96.5%
global and 87.7 / 97.4 / 98.5 / 98.0% after fine-tuning in our runs (one seed).

The same comparison as a Flower app: `flwr run apps/meta --run-config "algorithm='fedavg-ft'"`.
"""),
    _code(r"""
from flwr_analytic.meta.config import resolve_run_config
from flwr_analytic.meta.task import load_federation
from flwr_analytic.strategies import run_meta_in_process

FEDAVG_ROUNDS = 40
avg_config = resolve_run_config(
    {
        "algorithm": "fedavg-ft",
        "dataset": "digits",
        "model": "cnn",
        "seed": SEED,
        "partitioner": "dirichlet",
        "dirichlet-alpha": DIRICHLET_ALPHA,
        "min-partition-size": MIN_SIZE,
        "test-fraction": TEST_FRACTION,
        "num-server-rounds": FEDAVG_ROUNDS,
        "evaluate-every": 1,
        "min-nodes": NUM_CLIENTS,
        "local-steps": 10,
        "batch-size": 32,
        "beta": 0.2,  # FedAvg's local SGD rate
        "finetune-steps": 5,
        "alpha": 0.05,  # FedAvg + FT: 5 steps at 0.05 before testing
        "history-path": "",
    }
)
_, meta_split = load_federation(
    "digits", "dirichlet", NUM_CLIENTS, DIRICHLET_ALPHA, MIN_SIZE, TEST_FRACTION, SEED
)
assert all(
    np.array_equal(a, b)
    for a, b in zip(meta_split.train + meta_split.test, split.train + split.test)
), "different splits"

start = time.perf_counter()
avg_result, avg_history = run_meta_in_process(avg_config, NUM_CLIENTS)
print(f"FedAvg: {FEDAVG_ROUNDS} rounds in {time.perf_counter() - start:.1f} s (with evaluation)")
# one record per round and kind: "train" (time, model tensors down and up) and "evaluate" (metrics)
avg_train = [h for h in avg_history if h["kind"] == "train"]
avg_eval = {h["round"]: h["metrics"] for h in avg_history if h["kind"] == "evaluate"}
rounds = np.array([h["round"] for h in avg_train])
avg_global = np.array([avg_eval[h["round"]]["acc-s0"] for h in avg_train])
avg_ft = np.array([avg_eval[h["round"]]["acc"] for h in avg_train])
avg_seconds = np.cumsum([h["round-time"] for h in avg_train])
avg_bytes = np.cumsum([h["bytes-sent"] + h["bytes-received"] for h in avg_train])
for r in (1, 3, 10, 20, FEDAVG_ROUNDS):
    i = r - 1
    print(
        f"round {r:>2}: global {avg_global[i]:.2%}, +FT {avg_ft[i]:.2%}, "
        f"{avg_seconds[i]:.1f} s, {avg_bytes[i] / 1e6:.1f} MB"
    )
"""),
    _md(r"""
## 5. Personalized accuracy per client

Per-client test accuracy of the four models. FedAvg's global model is scored here from its final
weights; the other three come from the runs' own evaluation rounds.
"""),
    _code(r"""
from flwr_analytic.meta import evaluate
from flwr_analytic.meta.task import build_model, client_tensors

model = build_model(avg_config)
model.load_state_dict(avg_result.arrays.to_torch_state_dict())
avg_global_clients = []
for k in range(NUM_CLIENTS):
    _, _, x_test, y_test = client_tensors(avg_config, k, NUM_CLIENTS)
    avg_global_clients.append(evaluate(model, x_test, y_test)[1] / len(y_test))

final = avg_eval[avg_train[-1]["round"]]
assert [int(c) for c in final["client-ids"]] == list(range(NUM_CLIENTS))
assert fed["evaluate"]["client-ids"] == list(range(NUM_CLIENTS))
per_client = {
    "FedAvg (global)": np.array(avg_global_clients),
    "FedAvg + 5 fine-tuning steps": np.array(final["acc-clients"]),
    "FedACnnL (global)": np.array(fed["evaluate"]["global-accuracy-clients"]),
    "pFedACnnL (personalized)": np.array(fed["evaluate"]["personal-accuracy-clients"]),
}
test_sizes = np.array([len(t) for t in split.test])
fig, ax = plt.subplots(figsize=(10, 3.4))
width = 0.2
for j, (name, acc) in enumerate(per_client.items()):
    weighted = float((acc * test_sizes).sum() / test_sizes.sum())
    ax.bar(np.arange(NUM_CLIENTS) + (j - 1.5) * width, acc, width, label=f"{name}: {weighted:.1%}")
ax.set(
    xlabel="client",
    ylabel="test accuracy",
    ylim=(0, 1.05),
    xticks=range(NUM_CLIENTS),
    title=f"Per-client test accuracy (FedAvg after {FEDAVG_ROUNDS} rounds, FedACnnL after 3)",
)
ax.legend(fontsize=8, loc="lower left")
plt.tight_layout()
plt.show()
for name, acc in per_client.items():
    print(
        f"{name:>30}: sample-weighted {float((acc * test_sizes).sum() / test_sizes.sum()):.2%}, "
        f"client min {acc.min():.2%}"
    )
"""),
    _md(r"""
## 6. What it costs: wall time and bytes

Training traffic counts the model tensors sent to and received from the clients (FedACnnL: the
solved layers down, the packed statistics up; evaluation rounds are left out for both).
Times are wall-clock training rounds in this single process, clients run one after another.
"""),
    _code(r"""
from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter

fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
for ax, x_avg, x_fed, label in (
    (axes[0], avg_seconds, fed_train_seconds, "training wall time (s)"),
    (axes[1], avg_bytes / 1e6, fed_train_bytes / 1e6, "training traffic (MB)"),
):
    ax.plot(x_avg, avg_global, "-", color="tab:blue", label="FedAvg (global)")
    ax.plot(x_avg, avg_ft, "--", color="tab:blue", label="FedAvg + fine-tuning")
    ax.plot([x_fed], [fed["global-accuracy"]], "o", color="tab:red", ms=9, label="FedACnnL")
    ax.plot([x_fed], [fed["personal-accuracy"]], "*", color="tab:red", ms=13, label="pFedACnnL")
    ax.set(xlabel=label, xscale="log")
    ax.xaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))  # ticks 1, 2, 5, 10, 20, ...
    ax.xaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.grid(alpha=0.3)
axes[0].set(ylabel="sample-weighted test accuracy", ylim=(0, 1.02))
axes[0].legend(fontsize=8, loc="lower right")
plt.tight_layout()
plt.show()

target = fed["global-accuracy"]
reached = np.flatnonzero(avg_global >= target)
if reached.size:
    i = int(reached[0])
    print(
        f"FedAvg reaches FedACnnL's global accuracy {target:.2%} in round {rounds[i]} "
        f"after {avg_seconds[i]:.1f} s"
    )
else:
    print(
        f"FedAvg does not reach FedACnnL's global accuracy {target:.2%} within "
        f"{FEDAVG_ROUNDS} rounds ({avg_seconds[-1]:.1f} s, best {avg_global.max():.2%})"
    )
print(
    f"training time: FedACnnL {fed_train_seconds:.1f} s vs FedAvg {avg_seconds[-1]:.1f} s; "
    f"traffic {fed_train_bytes / 1e6:.1f} MB vs {avg_bytes[-1] / 1e6:.1f} MB"
)
"""),
    _md(r"""
## 7. Summary

The last cell prints the key numbers as one JSON line (the notebook test reads it).

What this shows, on this small problem and one seed: three analytic rounds give a more accurate
global model than 40 FedAvg rounds on the same CNN, in a fraction of FedAvg's training time, and
the closed-form personalization beats FedAvg + fine-tuning with no extra communication; it helps
most the clients the global model serves worst (compare the client minima above). Traffic is *not*
uniformly smaller: a FedACnnL run costs about as much as five FedAvg rounds here, because a layer
with $D$ inputs sends $D(D+1)/2$ statistics per client (the packed upper triangle of $G_k$), more
than the layer's weights.

What it does *not* show: digits is tiny (8×8 images, 1,797 of them); gradient training catches up
with more rounds and larger models, and wide layers make the statistics expensive (an 8,193-wide
random-feature head costs 33.6M floats per client). For MNIST through Flower and the
time-to-accuracy benchmarks, see the README and `benchmarks/`.
"""),
    _code(
        r"""
summary = {
    "kernel-prefix": sys.prefix,
    "fedacnnl": {
        "global-accuracy": fed["global-accuracy"],
        "personal-accuracy": fed["personal-accuracy"],
        "train-rounds": len(train_rounds),
        "train-seconds": fed_train_seconds,
        "train-bytes": fed_train_bytes,
        "federated-vs-centralized-max-rel": exactness,
        "core-global-accuracy": float(core_acc[0]),
        "core-personal-accuracy": float(core_acc[1]),
        "global-clients": per_client["FedACnnL (global)"].tolist(),
        "personal-clients": per_client["pFedACnnL (personalized)"].tolist(),
    },
    "fedavg": {
        "rounds": FEDAVG_ROUNDS,
        "global-accuracy": [float(a) for a in avg_global],
        "finetuned-accuracy": [float(a) for a in avg_ft],
        "train-seconds": [float(s) for s in avg_seconds],
        "train-bytes": [float(b) for b in avg_bytes],
        "global-clients": per_client["FedAvg (global)"].tolist(),
        "finetuned-clients": per_client["FedAvg + 5 fine-tuning steps"].tolist(),
    },
}
print("SUMMARY " + json.dumps(summary))
""",
        tags=("summary", "volatile"),
    ),
]


# --------------------------------------------------------------------------------------------
# Notebook 2: ν-step meta-learning
# --------------------------------------------------------------------------------------------

NU_STEP = [
    _md(
        r"""
# ν-step meta-learning

Personalized federated learning by meta-learning: train a global model that is good **after a
few local fine-tuning steps**, rather than good as it is. Per-FedAvg takes one such step in its
objective; Jamali, Saber and Bae generalize it to ν steps. This notebook sweeps ν = 0, 1, 2, 3
with the exact meta-gradient and its first-order approximation, on 20 clients of the embedded
digits data, and plots accuracy against rounds and against the number of fine-tuning steps.

- ν-step meta FL: Jamali, Saber, Bae, *A Generalized Meta Federated Learning Framework with
  Theoretical Convergence Guarantees*, [arXiv:2504.21327](https://arxiv.org/abs/2504.21327)
  (only the abstract was available to us; the algorithm is the ν-step generalization of
  Per-FedAvg that it describes, see `docs/meta.md`).
- Per-FedAvg: Fallah, Mokhtari, Ozdaglar, NeurIPS 2020
  ([arXiv:2002.07948](https://arxiv.org/abs/2002.07948)); FedAvg: McMahan et al., AISTATS 2017.

Runs in about two and a half minutes on 2 CPU cores.
"""
        + STORED_OUTPUTS
    ),
    _code(SETUP),
    _md(r"""
## 1. The ν-step objective and its gradient

Client $i$ with loss $f_i$ adapts the global model $w$ by ν SGD steps at rate α,

$$\phi^0 = w,\qquad \phi^{k+1} = \phi^k - \alpha \nabla f_i(\phi^k; D_{k+1}),\quad k = 0,\dots,\nu-1,$$

and the federation minimizes the loss *after* adaptation, $F(w) = \sum_i p_i f_i(\phi_i^\nu(w))$.
By the chain rule

$$\nabla F_i(w) = (I - \alpha H_0)(I - \alpha H_1)\cdots(I - \alpha H_{\nu-1})\,\nabla f_i(\phi^\nu; D'),
\qquad H_k = \nabla^2 f_i(\phi^k).$$

`exact` mode applies the factors right to left with ν Hessian-vector products (no Hessian is ever
formed); `first-order` drops them and keeps $\nabla f_i(\phi^\nu; D')$; `hessian-free`
replaces each product by a finite difference of gradients. Each client takes τ meta-steps
$u \leftarrow u - \beta \nabla F_i(u)$ per round and the server averages as FedAvg. ν = 0 is
FedAvg; ν = 1 is Per-FedAvg.

A quick check of the API on a small MLP in float64: the exact meta-gradient equals autograd
through the unrolled ν steps (same batches), and the first-order one does not.
"""),
    _code(r'''
from flwr_analytic.data import load_digits
from flwr_analytic.meta import make_loss_fn, meta_gradient, model_params, unrolled_meta_gradient
from flwr_analytic.models import build_module, mlp

data = load_digits()
torch.manual_seed(SEED)
tiny = build_module(mlp(data.input_shape, 10, hidden=16)).double()
loss_fn, params = make_loss_fn(tiny), model_params(tiny)
rng = np.random.default_rng(SEED)


def batch(size=32):
    """A seeded random minibatch of digits, in float64."""
    rows = rng.choice(len(data.y), size, replace=False)
    return torch.from_numpy(data.x[rows]).double(), torch.from_numpy(data.y[rows])


def rel(a, b):
    """Relative L2 distance between two parameter tuples."""
    num = sum(float(((x - y) ** 2).sum()) for x, y in zip(a, b))
    return (num / sum(float((y**2).sum()) for y in b)) ** 0.5


gradient_check = {}
for nu in (1, 2, 3):  # a large inner rate (0.5) makes the Hessian factors visible
    inner, outer = [batch() for _ in range(nu)], batch()
    reference = unrolled_meta_gradient(loss_fn, params, inner, outer, alpha=0.5)
    exact = meta_gradient(loss_fn, params, inner, outer, alpha=0.5, mode="exact").direction
    first = meta_gradient(loss_fn, params, inner, outer, alpha=0.5, mode="first-order").direction
    gradient_check[nu] = {"exact": rel(exact, reference), "first-order": rel(first, reference)}
    print(
        f"nu={nu}: relative error vs autograd: exact {gradient_check[nu]['exact']:.1e}, "
        f"first-order {gradient_check[nu]['first-order']:.1e}"
    )
'''),
    _md(r"""
## 2. The sweep, through Flower

Each configuration runs the `NuStepMetaFedAvg` strategy (a subclass of Flower's `FedAvg`) and the
package's client app on an in-process grid (`run_meta_in_process`; the same apps run on Ray with
`flwr run apps/meta --run-config "algorithm='meta' nu=3 mode='exact'"`). Setting: 20 clients,
Dirichlet(0.1) label skew, the digits CNN, half the clients per round.

Methods are compared at an **equal local budget** of gradient-equivalents per client and round
(`grad-budget`): a meta-step costs ν + 1 gradients in first-order mode and ν + 1 + 2ν in exact
mode (an HVP counts as 2), so τ = round(budget / cost) meta-steps fit. Every few rounds all 20
clients report test accuracy after $s = 0, \dots, 5$ fine-tuning SGD steps at rate α on their
training data (the quantity the objective optimizes).
"""),
    _code(r"""
from flwr_analytic.meta.config import local_steps_for, resolve_run_config
from flwr_analytic.strategies import run_meta_in_process

NUM_CLIENTS, ROUNDS, EVALUATE_EVERY, BUDGET = 20, 20, 4, 12
base = {
    "algorithm": "meta",
    "dataset": "digits",
    "model": "cnn",
    "seed": SEED,
    "partitioner": "dirichlet",
    "dirichlet-alpha": 0.1,
    "min-partition-size": 10,
    "num-server-rounds": ROUNDS,
    "evaluate-every": EVALUATE_EVERY,
    "fraction-train": 0.5,
    "min-nodes": NUM_CLIENTS,
    "grad-budget": BUDGET,
    "batch-size": 32,
    "alpha": 0.05,
    "beta": 0.05,
    "finetune-steps": 5,
    "history-path": "",
}
sweep = [(0, "exact")] + [(nu, mode) for nu in (1, 2, 3) for mode in ("exact", "first-order")]
runs = {}
for nu, mode in sweep:
    cfg = resolve_run_config({**base, "nu": nu, "mode": mode})
    name = "nu=0 (FedAvg)" if nu == 0 else f"nu={nu} {mode}"
    start = time.perf_counter()
    _, history = run_meta_in_process(cfg, NUM_CLIENTS)
    evaluated = [h for h in history if h["kind"] == "evaluate"]  # records with the metrics
    runs[name] = {
        "nu": nu,
        "mode": mode,
        "tau": local_steps_for("meta", cfg),
        "rounds": [h["round"] for h in evaluated],
        "acc": [h["metrics"]["acc"] for h in evaluated],
        "acc-s0": [h["metrics"]["acc-s0"] for h in evaluated],
        "curve": evaluated[-1]["metrics"]["acc-curve"],
        "client-min": evaluated[-1]["metrics"]["acc-client-min"],
        "seconds": time.perf_counter() - start,
    }
    r = runs[name]
    print(
        f"{name:>18}: tau={r['tau']:>2}  final acc s=0 {r['acc-s0'][-1]:.3f}  "
        f"s=5 {r['acc'][-1]:.3f}  ({r['seconds']:.1f} s)"
    )
"""),
    _md(r"""
## 3. Accuracy against rounds, and the personalization curve

Left: sample-weighted test accuracy after 5 fine-tuning steps, per evaluation round. Right: at
the last round, accuracy against the number of fine-tuning steps $s$ ($s = 0$ is the global model
itself). Solid lines are exact, dashed first-order; colour is ν.
"""),
    _code(r"""
colors = {0: "black", 1: "tab:blue", 2: "tab:orange", 3: "tab:green"}
fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
for name, r in runs.items():
    style = "--" if r["mode"] == "first-order" else "-"
    axes[0].plot(r["rounds"], r["acc"], style, marker="o", ms=3, color=colors[r["nu"]], label=name)
    axes[1].plot(
        range(len(r["curve"])),
        r["curve"],
        style,
        marker="o",
        ms=3,
        color=colors[r["nu"]],
        label=name,
    )
axes[0].set(
    xlabel="round",
    ylabel="accuracy after 5 fine-tuning steps",
    title="Accuracy vs round (equal gradient budget)",
)
axes[1].set(
    xlabel="fine-tuning steps s",
    ylabel="test accuracy",
    title=f"Personalization curve at round {ROUNDS}",
)
for ax in axes:
    ax.grid(alpha=0.3)
axes[1].legend(fontsize=8)
plt.tight_layout()
plt.show()

print(f"{'method':>18} {'tau':>4} {'s=0':>6} {'s=5':>6} {'best':>6} {'gain':>6} {'client min':>10}")
for name, r in runs.items():
    print(
        f"{name:>18} {r['tau']:>4} {r['curve'][0]:>6.3f} {r['curve'][-1]:>6.3f} "
        f"{max(r['acc']):>6.3f} {r['curve'][-1] - r['curve'][0]:>+6.3f} {r['client-min']:>10.3f}"
    )
"""),
    _md(r"""
## 4. Reading it

What our run showed (one seed, 20 short rounds on a tiny data set, α = β = 0.05 untuned, so
differences of a few points are within the noise):

- Every meta-trained model gains a lot from its 5 fine-tuning steps (its own predictions at
  $s = 0$ are often near chance: it was trained to be adapted, not to be used as is), while FedAvg
  (ν = 0) is already good at $s = 0$ and gains little.
- At this equal local budget **ν = 0 (FedAvg + fine-tuning) is the most accurate after
  adaptation**, ν = 1 first-order (Per-FedAvg FO) is the best meta variant, and **ν = 2 and 3 do
  not beat ν = 1**: extra inner steps cost outer steps (τ shrinks from 6 to 4 to 3 in first-order
  mode, from 3 to 1 in exact mode), and 20 rounds do not recover that.
- Exact mode costs an HVP (2 gradient-equivalents) per inner step, so it takes even fewer
  meta-steps; it did not pay for itself here.

This agrees with the longer MNIST runs in `docs/meta.md` (`benchmarks/meta_accuracy.py`): at an
equal local budget ν > 1 did **not** beat ν = 1 in a way that holds across settings, and FedAvg +
fine-tuning was the strongest method. Things to try: a smaller α (on MNIST the meta models then
learn features too, see `docs/meta.md`), more rounds, `grad-budget = 0` with equal
`local-steps` (equal steps rather than equal work), or `mode = "hessian-free"`.
"""),
    _code(
        r"""
summary = {
    "kernel-prefix": sys.prefix,
    "gradient-check": {str(k): v for k, v in gradient_check.items()},
    "runs": runs,
}
print("SUMMARY " + json.dumps(summary))
""",
        tags=("summary", "volatile"),
    ),
]


def notebook(cells: list[nbformat.NotebookNode]) -> nbformat.NotebookNode:
    """A notebook with the given cells, the ``python3`` kernel and no outputs."""
    nb = new_notebook(cells=cells)
    for i, cell in enumerate(nb.cells):
        cell.id = f"cell-{i:02d}"  # stable ids: regenerating gives the same file
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    nb.metadata["language_info"] = {"name": "python"}
    return nb


NOTEBOOKS = {
    "analytic_fl_in_five_minutes.ipynb": FIVE_MINUTES,
    "nu_step_meta_learning.ipynb": NU_STEP,
}


def render(name: str) -> str:
    """The text of notebook ``name`` as written to disk."""
    nb = notebook(NOTEBOOKS[name])
    nbformat.validate(nb)
    return nbformat.writes(nb) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Render, execute and write the notebooks named in ``argv`` (default: all); see ``run.py``."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location("notebooks_run", HERE / "run.py")
    run = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run)
    return run.main(["--commit", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
