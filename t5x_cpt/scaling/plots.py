"""Figures (matplotlib, PNG, no display needed).

  loss_vs_compute   loss against C = 6 N D, one curve per run coloured by size, with the fitted
                    law at each size dashed (one panel per run kind)
  isoloss           IsoLoss contours of a law over (compute, N), the efficient frontier
                    N_opt(C) and the runs on top (the paper's Fig. 4 kind)
  savings           saved fraction and effectively transferred tokens along each CPT run
  forgetting        source-language loss of CPT runs against target compute, per replay ratio,
                    with the fitted law of forgetting
"""

from __future__ import annotations

import os
from typing import Mapping

import numpy as np

from t5x_cpt.scaling import allocation, forgetting, laws
from t5x_cpt.scaling.tables import Table


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (every figure of the project goes to a file).

    Imported on first use: matplotlib is slow to import and only the plotting code needs it."""
    import matplotlib
    matplotlib.use("Agg")          # files only; never needs a display
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path: str, dpi: int = 120) -> str:
    """Write `fig` to `path` (creating its directory) and close it; returns `path`."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    pyplot().close(fig)
    return path


def loss_vs_compute(table: Table, fits: Mapping[str, Mapping[str, float]], path: str) -> str:
    """Loss vs compute per run and run kind, with each run kind's fitted law (natural params)."""
    plt = pyplot()
    kinds = table.run_kinds() or [""]
    fig, axes = plt.subplots(1, len(kinds), figsize=(5.5 * len(kinds), 4.2), squeeze=False)
    sizes = np.unique(table["N"])
    cmap = plt.get_cmap("viridis")
    color = {n: cmap(i / max(1, len(sizes) - 1)) for i, n in enumerate(sizes)}
    for ax, kind in zip(axes[0], kinds):
        t = table.filter(run_kind=kind) if kind else table
        rr = t.run_ids()
        for run in sorted(set(rr)):
            rows = np.flatnonzero(rr == run)
            rows = rows[np.argsort(t["D"][rows])]
            n = t["N"][rows[0]]
            ax.plot(t.compute()[rows], t["loss"][rows], "o", ms=3.0, alpha=0.6, color=color[n],
                    markeredgewidth=0)
        params = fits.get(kind) if kind else next(iter(fits.values()), None)
        if params:
            law = laws.law_from_params(params)
            for n in np.unique(t["N"]):
                d = t["D"][t["N"] == n]
                dd = np.geomspace(d.min(), d.max(), 50)
                ax.plot(laws.scaling_compute(n, dd), law.predict(params, N=np.full_like(dd, n), D=dd),
                        "-", lw=1.0, color=color[n])
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("compute C = 6 N D (FLOPs, target tokens)")
        ax.set_ylabel("validation loss (nats/token)")
        ax.set_title(f"{kind or 'runs'}: points = runs, lines = fitted law")
    sm = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(np.log10(sizes.min()), np.log10(sizes.max())))
    fig.colorbar(sm, ax=axes[0].tolist(), label="log10 N")
    return save_figure(fig, path)


def isoloss(params: Mapping[str, float], path: str, *, table: Table | None = None,
            flops_range: tuple[float, float] | None = None, title: str = "") -> str:
    """IsoLoss contours over (C, N) of a chinchilla/cpt law, its efficient frontier and the runs."""
    plt = pyplot()
    if flops_range is None:
        if table is not None:
            c = table.compute()
            flops_range = (c.min() / 3, c.max() * 30)
        else:
            flops_range = (1e18, 1e24)
    cs = np.geomspace(*flops_range, 200)
    opt = allocation.optimal(params, cs)
    n_lo, n_hi = opt["N_opt"].min() / 30, opt["N_opt"].max() * 30
    if table is not None:
        n_lo, n_hi = min(n_lo, table["N"].min() / 3), max(n_hi, table["N"].max() * 3)
    ns = np.geomspace(n_lo, n_hi, 200)
    cc, nn = np.meshgrid(cs, ns)
    loss = allocation.loss(params, nn, cc / (laws.FLOPS_PER_PARAM_TOKEN * nn))
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    levels = np.quantile(loss, np.linspace(0.02, 0.9, 14))
    cf = ax.contourf(cc, nn, loss, levels=np.unique(levels), cmap="magma_r", extend="both")
    ax.contour(cc, nn, loss, levels=np.unique(levels), colors="k", linewidths=0.4)
    fig.colorbar(cf, ax=ax, label="predicted loss")
    ax.plot(cs, opt["N_opt"], color="tab:cyan", lw=2, label="efficient frontier N_opt(C)")
    if table is not None:
        ax.scatter(table.compute(), table["N"], s=4, color="white", edgecolor="none", label="runs")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("compute C = 6 N D (FLOPs)")
    ax.set_ylabel("parameters N")
    c = allocation.constants(params)
    ax.set_title(title or f"{c['law']}: N_opt = {c['k_N']:.3g} C^{c['a']:.3f}")
    ax.legend(loc="upper left", fontsize=8)
    return save_figure(fig, path)


def savings(result: Mapping, path: str) -> str:
    """Saved fraction and transferred tokens along each CPT run (from savings.savings)."""
    plt = pyplot()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for run in result["runs"]:
        pts = [p for p in run.get("points", []) if p["saved_fraction"] is not None]
        if not pts:
            continue
        d = np.array([p["D"] for p in pts])
        label = f"{run['run']} (N={run['N']:.3g}, r={run['replay_ratio']:g})"
        a1.plot(d, [p["saved_fraction"] for p in pts], "-o", ms=2.5, label=label)
        a2.plot(d, [p["transferred_tokens"] for p in pts], "-o", ms=2.5, label=label)
    a1.set_xscale("log")
    a1.set_xlabel("CPT target tokens D")
    a1.set_ylabel("compute saved vs scratch (fraction)")
    # One noisy evaluation can give a wild point (a CPT loss far above its curve); clip the axis
    # so it does not flatten every curve, and say so.
    a1.set_ylim(-0.25, 1.0)
    a1.set_title("saving at equal loss (axis clipped to [-0.25, 1])")
    a2.set_xlabel("CPT target tokens D")
    a2.set_ylabel("D_scratch - D_cpt (tokens)")
    a2.set_title("effectively transferred data")
    a1.legend(fontsize=6)
    return save_figure(fig, path)


def forgetting_curves(table: Table, fit_json: Mapping | None, path: str) -> str:
    """Source-language loss vs target compute, one colour per replay ratio, fitted law dashed."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    r = table["replay_ratio"] if table.has("replay_ratio") else np.zeros(len(table))
    ratios = sorted(set(r.tolist()))
    cmap = plt.get_cmap("plasma")
    runs = table.run_ids()
    for i, ratio in enumerate(ratios):
        col = cmap(i / max(1, len(ratios) - 1) * 0.85)
        rows = np.flatnonzero(r == ratio)
        for j, run in enumerate(sorted(set(runs[rows]))):
            rr = rows[runs[rows] == run]
            rr = rr[np.argsort(table["D"][rr])]
            c = table.compute()[rr]
            ax.plot(c, table["loss"][rr], "o", ms=2.5, color=col,
                    label=f"replay {ratio:.0%}" if j == 0 else None)
            if fit_json:
                cc = np.geomspace(c.min(), c.max(), 60)
                n = table["N"][rr[0]]
                loss0 = table["loss0"][rr[0]] if fit_json.get("baseline") == "loss0 column" else None
                ax.plot(cc, forgetting.predict(fit_json, n, cc / (laws.FLOPS_PER_PARAM_TOKEN * n),
                                               ratio, loss0=loss0), "--", lw=1, color=col)
    ax.set_xscale("log")
    ax.set_xlabel("target-language compute C_t = 6 N D_target (FLOPs)")
    ax.set_ylabel("source-language validation loss")
    ax.set_title("forgetting: points = runs, dashed = fitted law")
    ax.legend(fontsize=7)
    return save_figure(fig, path)
