"""Figures of TensorBoard runs: losses of both twins, gradient agreement, gradient norms,
test error. Each function draws from a :class:`~manualbp.tools.runs.Run` (or result rows) and
writes one PNG; nothing is drawn that the run did not log.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from manualbp.tools.runs import Run, param_order

if TYPE_CHECKING:
    from manualbp.tools.report import ResultRow

__all__ = [
    "deep_pairs",
    "plot_divergence",
    "plot_grad_check",
    "plot_grad_norms",
    "plot_losses",
    "plot_test_error",
]

TWINS = ("manual", "autograd")
FLOAT32_EPS = float(np.finfo(np.float32).eps)
DPI = 100


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out: Path) -> None:
    """Write ``fig`` to ``out`` as a 256-colour palette PNG and close it.

    Line plots use few colours, so the palette image looks the same as matplotlib's RGBA PNG
    at a fraction of the size (the committed figures stay well under 150 KB).
    """
    import io

    from PIL import Image

    plt = _pyplot()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    plt.close(fig)
    buffer.seek(0)
    with Image.open(buffer) as image:
        image.convert("RGB").quantize(colors=256).save(out, format="PNG", optimize=True)


def _smooth(values: np.ndarray, weight: float) -> np.ndarray:
    """TensorBoard-style exponential moving average, debiased at the start."""
    smoothed = np.empty_like(values)
    average, norm = 0.0, 0.0
    for i, value in enumerate(values):
        average = weight * average + (1 - weight) * value
        norm = weight * norm + (1 - weight)
        smoothed[i] = average / norm
    return smoothed


def plot_losses(run: Run, out: Path, smoothing: float = 0.6) -> list[str]:
    """Train (raw thin line and smoothed) and validation loss of both twins, log scale, and
    below it the twins' largest weight difference (``divergence/max``), when logged.

    Returns notes on the curves the run lacks.
    """
    plt = _pyplot()
    divergence = run.get("divergence/max")
    loss_diff = run.get("grad_check/loss_diff")
    lower = divergence if divergence is not None else loss_diff
    rows = 2 if lower is not None else 1
    fig, axes = plt.subplots(
        rows,
        1,
        figsize=(7, 5.2 if rows == 2 else 3.8),
        sharex=True,
        squeeze=False,
        gridspec_kw={"height_ratios": [3, 1.3][:rows]},
    )
    ax = axes[0, 0]
    notes = []
    # The manual twin thick and pale, the autograd twin thin, dashed and on top: where the two
    # agree the dashes run inside the thick line.
    styles = {"manual": "-", "autograd": "--"}
    # In check mode the twin does not train: its loss is measured at the manual weights on the
    # gradient-check steps.
    check_mode = run.hparams.get("compare") == "check"
    widths = {"manual": 2.6, "autograd": 1.1}
    alphas = {"manual": 0.45, "autograd": 1.0}
    colours = {"train": "tab:blue", "val": "tab:orange"}
    for twin in TWINS:
        train = run.get(f"train/loss/{twin}")
        if train is None:
            notes.append(f"no train/loss/{twin}")
        else:
            ax.plot(
                train.steps, train.values, styles[twin], color=colours["train"], lw=0.5, alpha=0.3
            )
            ax.plot(
                train.steps,
                _smooth(train.values, smoothing),
                styles[twin],
                color=colours["train"],
                lw=widths[twin],
                alpha=alphas[twin],
                label=f"train (smoothed), {twin}"
                + (" at manual weights" if twin == "autograd" and check_mode else ""),
            )
        val = run.get(f"val/loss/{twin}")
        if val is None:
            notes.append(f"no val/loss/{twin}")
        else:
            ax.plot(
                val.steps,
                val.values,
                styles[twin],
                color=colours["val"],
                lw=widths[twin],
                alpha=alphas[twin],
                marker="o" if twin == "manual" else "x",
                ms=6 if twin == "manual" else 4,
                label=f"validation, {twin}",
            )
    if ax.lines:
        drawn = np.concatenate([line.get_ydata() for line in ax.lines])
        drawn = drawn[drawn > 0]
        if drawn.size and drawn.max() > 3 * drawn.min():  # log only where it spreads the curves
            ax.set_yscale("log")
        ax.legend(fontsize=8, ncol=2)
    ax.set_ylabel(f"{run.hparams.get('loss', '')} loss".strip())
    title = f"{run.name}: {run.architecture}"
    if notes:
        title += "\n(" + "; ".join(notes) + ")"
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="major", alpha=0.3)
    if lower is not None:
        bottom = axes[1, 0]
        gaps = np.abs(lower.values)
        zero = gaps == 0
        bottom.set_ylabel(
            "max |θ_m − θ_a|" if lower is divergence else "|loss_m − loss_a|", fontsize=8
        )
        bottom.grid(True, alpha=0.3)
        if zero.all():
            bottom.plot(lower.steps, gaps, color="tab:gray", lw=1, marker=".", ms=3)
            bottom.set_ylim(-1, 1)
            bottom.set_yticks([0])
            label = "bitwise identical twins: 0 at every check"
        else:
            bottom.plot(lower.steps[~zero], gaps[~zero], color="tab:gray", lw=1, marker=".", ms=3)
            bottom.set_yscale("log")
            label = (
                f"0 at {int(zero.sum())} of {zero.size} checks (not drawn)" if zero.any() else ""
            )
        if label:
            bottom.set_title(label, fontsize=8, loc="right")
    axes[-1, 0].set_xlabel("optimizer step")
    fig.tight_layout()
    _save(fig, out)
    return notes


def plot_grad_check(run: Run, out: Path) -> bool:
    """Max relative gradient error (manual vs autograd) per parameter over training, log
    scale; exact agreement (0) is drawn at the bottom of the axis. Returns False (and writes
    nothing) when the run has no gradient check."""
    params = run.params()
    if not params:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8.5 if len(params) <= 10 else 9.5, 3.8))
    series = {param: run.scalars[f"grad_check/{param}/max_rel"] for param in params}
    positive = np.concatenate([s.values[s.values > 0] for s in series.values()] or [[]])
    floor = positive.min() / 10 if positive.size else FLOAT32_EPS / 100
    cmap = plt.get_cmap("viridis")
    layers = sorted({param_order(param)[0] for param in params})
    for param in params:
        layer = param_order(param)[0]
        colour = cmap(layers.index(layer) / max(1, len(layers) - 1) * 0.9)
        s = series[param]
        ax.plot(
            s.steps,
            np.maximum(s.values, floor),
            "-" if param.endswith("weight") else ":",
            color=colour,
            lw=1.2,
            label=param,
        )
    ax.axhline(FLOAT32_EPS, color="tab:red", lw=0.8, ls="--", label="float32 eps")
    if not positive.size:
        ax.text(
            0.5,
            0.5,
            "exact agreement: max_rel = 0 for every parameter at every check",
            transform=ax.transAxes,
            ha="center",
            va="center",
            fontsize=9,
        )
    ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("max relative error")
    title = f"{run.name}: manual vs autograd gradients, per parameter"
    if any((s.values == 0).any() for s in series.values()):
        title += f" (0 drawn at {floor:.0e})"
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(
        fontsize=7, ncol=1 if len(params) <= 10 else 2, loc="upper left", bbox_to_anchor=(1.01, 1.0)
    )
    fig.tight_layout()
    _save(fig, out)
    return True


def plot_divergence(run: Run, out: Path) -> bool:
    """Two questions on one time axis and one log scale: above, the gradient check (the two
    gradients at the *same* weights, worst ``max_rel`` over the parameters at each check);
    below, the weight divergence of the twins each trained on its own gradients
    (``divergence/max`` and per parameter). A correct formula keeps the upper curve at
    round-off while the lower one may grow: training amplifies last-bit differences. Zeros
    (exact agreement) are not drawn. Returns False (and writes nothing) when the run has no
    ``divergence/max`` (not a lockstep run)."""
    divergence = run.get("divergence/max")
    if divergence is None:
        return False
    check = run.get("grad_check/max_rel")
    plt = _pyplot()
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7.5, 5.6), sharex=True, sharey=True)
    if check is not None:
        keep = check.values > 0
        top.plot(check.steps[keep], check.values[keep], color="tab:blue", lw=1, marker=".", ms=3)
        top.axhline(FLOAT32_EPS, color="tab:red", lw=0.8, ls="--", label="float32 eps")
        top.legend(fontsize=7, loc="upper left")
        top.set_title(
            f"gradient check, same weights and batch: worst max_rel {check.values.max():.1e} "
            f"in {len(check.steps)} checks",
            fontsize=9,
        )
    top.set_ylabel("max_rel of the gradients")
    keep = divergence.values > 0
    bottom.plot(divergence.steps[keep], divergence.values[keep], color="black", lw=1.4, label="max")
    for param in run.params():
        series = run.get(f"divergence/{param}")
        if series is not None and (series.values > 0).any():
            nonzero = series.values > 0
            bottom.plot(series.steps[nonzero], series.values[nonzero], lw=0.7, label=param)
    bottom.set_title(
        f"weights, each twin trained on its own gradients: {divergence.last:.1e} at the end",
        fontsize=9,
    )
    bottom.set_ylabel("max |θ_manual − θ_autograd|")
    bottom.set_xlabel("optimizer step")
    bottom.legend(fontsize=7, loc="lower right", ncol=3)
    for ax in (top, bottom):
        ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
    fig.suptitle(f"{run.name}: {run.architecture}", fontsize=10)
    fig.tight_layout()
    _save(fig, out)
    return True


def deep_pairs(runs: Sequence[Run]) -> list[tuple[Run, Run]]:
    """``(sigmoid run, relu run)`` pairs with the same layer sizes and per-layer gradient
    norms of at least three ``fc*.weight`` layers (the vanishing-gradient comparison)."""
    pairs = []
    for sigmoid in runs:
        if sigmoid.hparams.get("activation") != "sigmoid" or len(sigmoid.norm_layers()) < 3:
            continue
        for relu in runs:
            if (
                relu.hparams.get("activation") == "relu"
                and relu.hparams.get("sizes") == sigmoid.hparams.get("sizes")
                and len(relu.norm_layers()) >= 3
            ):
                pairs.append((sigmoid, relu))
    return pairs


def _snapshot_steps(steps: np.ndarray, count: int) -> list[int]:
    """Up to ``count`` logged steps spread over training, first and last included."""
    picks = np.unique(np.round(np.linspace(0, len(steps) - 1, count)).astype(int))
    return [int(steps[i]) for i in picks]


def plot_grad_norms(sigmoid: Run, relu: Run, out: Path, snapshots: int = 4) -> None:
    """Per-layer gradient norms ``grad_norm/manual/fc<i>.weight`` of a deep sigmoid net and its
    ReLU counterpart: left, norm against layer index at a few steps; right, each layer over
    training for both nets. Log scale."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    nets = (("sigmoid", sigmoid, "-", "tab:red"), ("relu", relu, "--", "tab:blue"))
    for label, run, style, colour in nets:
        layers = run.norm_layers()
        common = set(layers[0][1].steps.tolist())
        for _, series in layers[1:]:
            common &= set(series.steps.tolist())
        steps = np.array(sorted(common))
        if steps.size == 0:
            continue
        picks = _snapshot_steps(steps, snapshots)
        for shade, step in enumerate(picks):
            norms = [float(s.values[s.steps == step][0]) for _, s in layers]
            alpha = 0.35 + 0.65 * shade / max(1, len(picks) - 1)
            left.plot(
                [i for i, _ in layers],
                norms,
                style,
                color=colour,
                marker="o",
                ms=3,
                alpha=alpha,
                label=f"{label}, step {step}",
            )
        cmap = plt.get_cmap("Reds" if label == "sigmoid" else "Blues")
        for rank, (index, series) in enumerate(layers):
            shade = cmap(0.35 + 0.65 * rank / max(1, len(layers) - 1))
            right.plot(
                series.steps,
                series.values,
                style,
                color=shade,
                lw=1,
                label=f"{label} fc{index}" if rank in (0, len(layers) - 1) else None,
            )
    left.set_xlabel("layer (fc1 = next to the input)")
    left.set_ylabel("‖∂loss/∂W‖ (manual model)")
    left.set_title("gradient norm per layer at a few steps", fontsize=10)
    right.set_xlabel("optimizer step")
    right.set_title("per-layer norms over training (light = fc1)", fontsize=10)
    for ax in (left, right):
        ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(
        f"Vanishing gradients: {sigmoid.name} (sigmoid) vs {relu.name} (relu), "
        f"{sigmoid.architecture.split()[0]}",
        fontsize=10,
    )
    fig.tight_layout()
    _save(fig, out)


def plot_test_error(rows: Sequence[ResultRow], out: Path) -> bool:
    """Bars of the final test error of both twins per experiment, with the published error
    as a black tick. Returns False (and writes nothing) when no row has a test error."""
    rows = [row for row in rows if any(v is not None for v in row.test_error.values())]
    if not rows:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(rows) + 3), 3.8))
    x = np.arange(len(rows))
    width = 0.38
    for offset, twin, hatch in ((-width / 2, "manual", None), (width / 2, "autograd", "//")):
        values = [row.test_error[twin] for row in rows]
        present = [i for i, v in enumerate(values) if v is not None]
        bars = ax.bar(
            x[present] + offset,
            [values[i] for i in present],
            width,
            hatch=hatch,
            color="tab:blue" if twin == "manual" else "tab:cyan",
            label=twin,
        )
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    published = [(i, row.published.error) for i, row in enumerate(rows) if row.published]
    if published:
        ax.scatter(
            [i for i, _ in published],
            [e for _, e in published],
            marker="_",
            s=900,
            color="black",
            linewidths=2,
            label="published",
            zorder=3,
        )
    ax.set_xticks(x, [row.experiment for row in rows], rotation=20, ha="right", fontsize=8)
    errors = [v for row in rows for v in row.test_error.values() if v is not None]
    if min(errors) > 0:  # log scale: a failed run (90% error) and 1.5% both stay readable
        ax.set_yscale("log")
        ax.set_ylim(min(errors) / 2, max(errors) * 2)
    ax.set_ylabel("test error (%)")
    ax.set_title("MNIST test error: manual backprop vs autograd", fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    _save(fig, out)
    return True


def plot_step_time_vs_batch(rows: Sequence[dict[str, float]], out: Path) -> None:
    """Step time (ms, log-log) against batch size for manual, direct and autograd, and their
    ratios to autograd: ``rows`` as ``manualbp.tools.benchmark.batch_sweep`` returns them."""
    plt = _pyplot()
    fig, (times, ratios) = plt.subplots(1, 2, figsize=(10, 4))
    batches = [row["batch"] for row in rows]
    for key, label in (
        ("step_ms_autograd", "builtin autograd"),
        ("step_ms_manual", "manual (eager)"),
        ("step_ms_direct", "manual (direct)"),
    ):
        times.plot(batches, [row[key] for row in rows], marker="o", label=label)
    times.set(xscale="log", yscale="log", xlabel="batch size", ylabel="ms per training step")
    times.set_title("784-200-10 ReLU step (forward, backward, SGD)")
    times.legend()
    ratios.plot(batches, [row["ratio_manual"] for row in rows], marker="o", label="eager")
    ratios.plot(batches, [row["ratio_direct"] for row in rows], marker="o", label="direct")
    ratios.axhline(1.0, color="gray", linewidth=0.8)
    ratios.set(xscale="log", xlabel="batch size", ylabel="manual / autograd (median)")
    ratios.set_title("ratio to builtin autograd, interleaved")
    ratios.legend()
    _save(fig, out)
