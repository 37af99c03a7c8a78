"""Markdown tables of ``natural_images.py``'s JSON (its ``--render``; ``render_results.py``)."""

from __future__ import annotations

from flwr_analytic.analytic.recalibration import DEFAULT_RHO as RECALIBRATION


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"


def render(result: dict) -> str:
    """Markdown tables of a saved result."""
    out = []
    central = result.get("central")
    if central:
        out += ["| CIFAR-10 (16k train / 4k test, centralized) | test acc | train time (s) "
                "| peak RSS (GiB) | head D |", "|---|---|---|---|---|"]  # fmt: skip
        for r in central["rows"]:
            out.append(f"| {r['label']} (head ρ={r['head_rho']:g}) | {_pct(r['test_accuracy'])} "
                       f"| {r['seconds']:.1f} | {r['peak_rss_gib']:.2f} | {r['head_dim']} |")  # fmt: skip
        bp, t = central.get("backprop_cnn"), central["analytic_seconds"]
        if bp is None:
            out.append("| backprop: not in this run (`--skip-backprop`) | - | - | - | - |")
        else:
            out.append(f"| backprop cnn-32-64 (Adam), best epoch within the coates time ({t:.0f} s) "
                       f"| {_pct(bp['at_analytic_time'])} | {t:.1f} | - | - |")  # fmt: skip
            out.append(f"| backprop cnn-32-64 (Adam), best epoch within 5x that time ({5 * t:.0f} s) "
                       f"| {_pct(bp['at_5x_analytic_time'])} | {5 * t:.1f} | - | - |")  # fmt: skip
        out.append("")
    for fed in (result.get("federated"), result.get("federated_mirror")):
        if not fed:
            continue
        mb = 8 * sum(fed["upload_floats_per_layer"]) / fed["clients"] / 1e6  # float64 on the wire
        recipe = fed.get("recipe", {"filters": 1600, "threshold": 0.25, "polarity": False})
        model = f"coates-{recipe['filters']} zca-kmeans" + ", polarity" * recipe["polarity"]
        auto = _pct(fed.get("personal_accuracy_auto"))
        auto += f" / {_pct(fed.get('personal_accuracy_auto_recal'))}"
        out += [f"| CIFAR-10, 20 clients Dirichlet(0.1), {model}, α {recipe['threshold']} | global "
                "| personalized ρ=0.1 / 1 (standardized) / auto / auto + recalibration | time (s) "
                "| upload per client (MB, float64) |", "|---|---|---|---|---|",
                f"| in process (`fit_federated`{', `mirror`' * fed.get('mirror', False)}) "
                f"| {_pct(fed['global_accuracy'])} "
                f"| {_pct(fed['personal_accuracy_0.1'])} / {_pct(fed['personal_accuracy_1'])} "
                f"/ {auto} | {fed['seconds']:.0f} | {mb:.1f} |", ""]  # fmt: skip
        rhos = [r["auto-rho"] for r in fed["per_client"] if "auto-rho" in r]
        if rhos:
            counts = {f"{v:.3g}": rhos.count(v) for v in sorted(set(rhos))}
            rule = "standardized" if "global_leverage" in fed else "relative"  # earlier runs
            lev = (
                f", global leverage h̄ = {fed['global_leverage']:.3f}"
                if rule == "standardized"
                else ""
            )
            out += [f"Auto λ ({rule} ρ{lev}) chosen per client: {counts}.", ""]
    fm = result.get("fashion_federated")
    if fm:
        recipe = fm.get("recipe", {"filters": 1600, "threshold": 0.25, "polarity": False})
        model = f"coates-{recipe['filters']} zca-kmeans" + ", polarity" * recipe["polarity"]
        model += f", {recipe.get('grid', 2)}×{recipe.get('grid', 2)} pooling"
        out += [f"| Fashion-MNIST, 20 clients Dirichlet(0.1), {model}, α {recipe['threshold']} | global "
                "| personalized (ρ=0.1) | time (s) |", "|---|---|---|---|",
                f"| FedACnnL app, in-process grid | {_pct(fm['global_accuracy'])} "
                f"| {_pct(fm['personal_accuracy'])} | {fm['seconds']:.0f} |"]  # fmt: skip
        auto = fm.get("auto")
        if auto:
            ev = auto["evaluation"]
            counts = dict(
                zip(
                    ev.get("personal-lambda-values", []),
                    ev.get("personal-lambda-counts", []),
                    strict=True,
                )
            )
            chosen = ", ".join(f"{v:.3g}: {c}" for v, c in counts.items())
            chosen += f", ∞: {ev.get('personal-lambda-global', 0)}"
            out += [f"| same, `personal-lambda = \"auto\"` | {_pct(auto['global_accuracy'])} "
                    f"| {_pct(auto['personal_accuracy'])} (auto) | {auto['seconds']:.0f} |", "",
                    f"Auto λ (standardized ρ) chosen per client: {chosen}."]  # fmt: skip
        recal = fm.get("auto_recal")
        if recal:
            out.insert(len(out) - 2, f"| same, then `personal-recalibration = "
                       f"{RECALIBRATION:g}` | {_pct(recal['global_accuracy'])} | "
                       f"{_pct(recal['personal_accuracy'])} | {recal['seconds']:.0f} |")  # fmt: skip
        out.append("")
    fp = result.get("fashion_product")
    if fp:
        c = fp["config"]
        out += ["| Fashion-MNIST, same app, `second-stage = "
                f"{c['second-stage']}` | global | second stage | pFedACnnL (ρ {c['lam']:g}, "
                f"{c['lam-rule']}) | product (T {c['scoring-temperature']:g}, "
                f"w {c['scoring-weight']:g}) | time (s) | peak (GiB) |",
                "|---|---|---|---|---|---|---|",
                f"| FedACnnL app + `SecondStage`, in-process grid | {_pct(fp['global_accuracy'])} "
                f"| {_pct(fp['second_stage_accuracy'])} | {_pct(fp['personal_accuracy'])} "
                f"| **{_pct(fp['product_accuracy'])}** | {fp['seconds']:.0f} "
                f"| {fp['peak_rss_gib']:.1f} |", ""]  # fmt: skip
    return "\n".join(out).rstrip()
