"""Plots for routing analysis, comparisons and the report (matplotlib, headless Agg backend, PNG files).

Every function takes plain data (lists / dicts as found in the JSON files) and a path, writes one PNG and returns
the path, so plots can be redrawn from saved results without a model.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

DPI = 110


def _grid(n: int, max_cols: int = 4) -> tuple[int, int]:
    cols = min(max_cols, max(1, n))
    return math.ceil(n / cols), cols


def _save(fig: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def load_histograms(layers: Sequence[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """One bar chart per MoE layer: share of routed assignments per expert; dashed line = perfect balance, red x =
    dead expert."""
    rows, cols = _grid(len(layers))
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.6 * rows), squeeze=False)
    for ax in axes.flat[len(layers):]:
        ax.axis("off")
    for i, (ax, layer) in enumerate(zip(axes.flat, layers)):
        load = np.asarray(layer["load"], dtype=float)
        share = load / max(load.sum(), 1.0)
        dead = load == 0
        ax.bar(np.arange(len(load)), share, width=0.9, color="#1f77b4")
        if dead.any():  # zero-height bars are invisible: mark dead experts on the axis
            ax.plot(np.flatnonzero(dead), np.zeros(int(dead.sum())), "x", color="#d62728", ms=4, clip_on=False)
        ax.axhline(1 / len(load), color="k", ls="--", lw=0.8)
        ax.set_title(f"MoE layer {i}: max/mean {layer['max_over_mean']:.2f}, CV {layer['cv']:.2f}, "
                     f"dead {int(dead.sum())}", fontsize=8)
        ax.set_xlabel("expert", fontsize=8)
        ax.set_ylabel("share of assignments", fontsize=8)
        ax.tick_params(labelsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def coactivation_heatmaps(layers: Sequence[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """Per MoE layer: P(expert j chosen | expert i chosen), diagonal blanked."""
    rows, cols = _grid(len(layers))
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 3.0 * rows), squeeze=False)
    for ax in axes.flat[len(layers):]:
        ax.axis("off")
    for i, (ax, layer) in enumerate(zip(axes.flat, layers)):
        c = np.asarray(layer["coactivation"], dtype=float)
        cond = c / np.maximum(np.diag(c)[:, None], 1.0)
        np.fill_diagonal(cond, np.nan)
        im = ax.imshow(cond, cmap="viridis", interpolation="nearest", vmin=0)
        ax.set_title(f"MoE layer {i}", fontsize=8)
        ax.set_xlabel("expert j", fontsize=8)
        ax.set_ylabel("given expert i", fontsize=8)
        ax.tick_params(labelsize=7)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04).ax.tick_params(labelsize=7)
    fig.suptitle(title or "Co-activation: P(j chosen | i chosen)", fontsize=10)
    return _save(fig, path)


def disable_top_curve(curves: dict[str, Sequence[dict[str, Any]]], path: str | Path) -> Path:
    """Figure 4: validation loss against the ratio of disabled top routed experts, one line per checkpoint."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, rows in curves.items():
        ax.plot([r["ratio"] for r in rows], [r["loss"] for r in rows], marker="o", label=name)
    ticks = sorted({r["ratio"] for rows in curves.values() for r in rows})
    ax.set_xticks(ticks, [_fraction_label(t) for t in ticks])
    ax.ticklabel_format(axis="y", useOffset=False)
    ax.set_xlabel("ratio of disabled top routed experts")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title("Disabling each token's top routed experts (paper Fig. 4)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def topk_curve(curves: dict[str, Sequence[dict[str, Any]]], path: str | Path,
               references: dict[str, float] | None = None) -> Path:
    """Figure 5: validation loss against the number of activated routed experts; dashed lines = references."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, rows in curves.items():
        ax.plot([r["top_k"] for r in rows], [r["loss"] for r in rows], marker="o", label=name)
    for name, value in (references or {}).items():
        ax.axhline(value, ls="--", lw=1, color="gray")
        ax.annotate(name, (ax.get_xlim()[0], value), fontsize=7, va="bottom")
    ax.ticklabel_format(axis="y", useOffset=False)
    ax.set_xlabel("activated routed experts at evaluation")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title("Fewer activated routed experts (paper Fig. 5)")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def loss_curves(curves: dict[str, Sequence[Sequence[tuple[float, float]]]], path: str | Path,
                ylabel: str = "loss (nats/token)", title: str = "") -> Path:
    """One line per model: the mean over its runs (seeds) at common steps, shaded min..max across runs."""
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, runs in curves.items():
        runs = [r for r in runs if r]
        if not runs:
            continue
        steps = sorted(set.intersection(*(set(s for s, _ in r) for r in runs)))
        if not steps:
            continue
        vals = np.array([[dict(r)[s] for s in steps] for r in runs])
        (line,) = ax.plot(steps, vals.mean(axis=0), label=f"{name} ({len(runs)} run{'s' * (len(runs) > 1)})")
        if len(runs) > 1:
            ax.fill_between(steps, vals.min(axis=0), vals.max(axis=0), color=line.get_color(), alpha=0.2)
    ax.ticklabel_format(axis="y", useOffset=False)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title or "Loss curves")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def load_over_training(steps: Sequence[int], loads: Sequence[Sequence[Sequence[float]]], path: str | Path,
                       title: str = "") -> Path:
    """Heatmaps of expert load over training: loads[layer][i][expert] at steps[i], as a multiple of uniform."""
    n = len(loads)
    fig, axes = plt.subplots(n, 1, figsize=(8, 1.0 + 1.6 * n), squeeze=False)
    for layer, ax in enumerate(axes[:, 0]):
        m = np.asarray(loads[layer], dtype=float)  # (steps, E)
        rel = m / np.maximum(m.sum(axis=1, keepdims=True), 1e-12) * m.shape[1]
        im = ax.imshow(rel.T, aspect="auto", cmap="magma", interpolation="nearest", origin="lower",
                       vmin=0, vmax=max(2.0, float(np.nanmax(rel)) if rel.size else 2.0),
                       extent=(-0.5, len(steps) - 0.5, -0.5, m.shape[1] - 0.5))
        ticks = np.linspace(0, len(steps) - 1, min(6, len(steps))).round().astype(int)
        ax.set_xticks(ticks, [str(steps[t]) for t in ticks], fontsize=7)
        ax.set_ylabel(f"layer {layer}\nexpert", fontsize=8)
        ax.tick_params(labelsize=7)
        fig.colorbar(im, ax=ax, pad=0.01).set_label("load / uniform", fontsize=7)
    axes[-1, 0].set_xlabel("training step")
    fig.suptitle(title or "Expert load over training (1.0 = perfectly balanced)", fontsize=10)
    return _save(fig, path)


def _fraction_label(x: float) -> str:
    if x == 0:
        return "0"
    n = round(x * 16)
    return f"{n}/16" if abs(n / 16 - x) < 1e-9 else f"{x:.3g}"


def scaling_curves(summary: dict[str, Any], path: str | Path) -> Path:
    """Four panels over the token budgets of a scaling summary (analysis/scaling.py), one line per model: loss
    against tokens and against training FLOPs (error bars: std over seeds), routing entropy and gate mass."""
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    panels = ((axes[0][0], "tokens", "loss_mean", "validation loss (nats/token)"),
              (axes[0][1], "training_flops", "loss_mean", "validation loss (nats/token)"),
              (axes[1][0], "tokens", "token_entropy_normalized", "per-token routing entropy / log(E)"),
              (axes[1][1], "tokens", "gate_mass", "routed experts' gate mass per token"))
    for ax, xkey, ykey, ylabel in panels:
        for sfx, label in summary["labels"].items():
            pts = [(row["tokens"] if xkey == "tokens" else row["models"][sfx]["training_flops"],
                    row["models"][sfx][ykey], row["models"][sfx]["loss_std"] if ykey == "loss_mean" else None)
                   for row in summary["budgets"] if sfx in row["models"] and row["models"][sfx][ykey] is not None]
            if not pts:
                continue
            xs, ys, errs = zip(*pts)
            ax.errorbar(xs, ys, yerr=[e or 0.0 for e in errs], marker="o", capsize=3, label=label)
        ax.set_xscale("log")
        ax.set_xlabel("training tokens per run" if xkey == "tokens" else "training FLOPs per run")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("The Table 1 models across token budgets")
    return _save(fig, path)
