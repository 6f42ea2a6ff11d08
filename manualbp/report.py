"""Figures and a results table from the TensorBoard runs of ``manualbp fit``.

Reads the scalars a :class:`~manualbp.module.TwinModule` run wrote under
``runs/<experiment>/version_N/`` (with TensorBoard's own event reader) and writes:

* ``loss_<experiment>.png``: training and validation loss of the manual (solid) and autograd
  (dashed) twins on one axis, with the twins' largest weight difference below;
* ``grad_check_<experiment>.png``: the largest relative gradient error per parameter over
  training (``grad_check/<param>/max_rel``, log scale);
* ``grad_norms_<sigmoid>_vs_<relu>.png``: per-layer gradient norms of a deep sigmoid net and
  its ReLU twin (vanishing gradients), for every such pair among the runs;
* ``test_error.png``: final test error of every experiment, both twins, beside the published
  error where known;
* ``results.md``: the table behind ``test_error.png`` plus the gradient agreement, and a note
  on every tag a run lacks (a figure line or table cell is skipped, never invented).

Everything is computed from the event files; nothing is hard-coded but the published errors
of the classic experiments (:data:`PUBLISHED`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

__all__ = [
    "PUBLISHED",
    "Published",
    "ResultRow",
    "Run",
    "Series",
    "deep_pairs",
    "discover_runs",
    "load_run",
    "plot_grad_check",
    "plot_grad_norms",
    "plot_losses",
    "plot_test_error",
    "result_row",
    "results_markdown",
    "write_report",
]

TWINS = ("manual", "autograd")
FLOAT32_EPS = float(np.finfo(np.float32).eps)
DPI = 100


@dataclass(frozen=True)
class Published:
    """A published MNIST test error (in percent) and where it comes from."""

    error: float
    source: str


PUBLISHED: dict[str, Published] = {
    "lecun_300_mse": Published(4.7, "LeCun et al. 1998, 2-layer NN, 300 HU, MSE"),
    "lecun_500_150": Published(2.95, "LeCun et al. 1998, 3-layer NN, 500+150 HU"),
    "simard_800_ce": Published(1.6, "Simard et al. 2003, 2-layer MLP, 800 HU, cross-entropy"),
}
"""Published test errors of the classic plain-MLP rows (no distortions, no preprocessing
beyond normalisation), keyed by experiment name."""


@dataclass(frozen=True)
class Series:
    """One scalar tag: ``steps (T,)`` int64 and ``values (T,)`` float64, sorted by step, one
    value per step (the last one written)."""

    steps: np.ndarray
    values: np.ndarray

    @property
    def last(self) -> float:
        """The value at the largest step."""
        return float(self.values[-1])


@dataclass
class Run:
    """The scalars and hyperparameters of one ``version_N`` directory of one experiment."""

    name: str
    """The experiment's name (the logger's ``name``, the directory above ``version_N``)."""
    path: Path
    scalars: dict[str, Series]
    hparams: dict = field(default_factory=dict)
    """The module's hyperparameters (``hparams.yaml``; empty when absent)."""

    def get(self, tag: str) -> Series | None:
        """The series of ``tag``, or ``None`` when the run has no (finite) value for it."""
        return self.scalars.get(tag)

    def params(self) -> list[str]:
        """Parameter names with a gradient check (``fc1.weight``, ...), in layer order."""
        names = {
            tag[len("grad_check/") : -len("/max_rel")]
            for tag in self.scalars
            if tag.startswith("grad_check/") and tag.endswith("/max_rel") and tag.count("/") == 2
        }
        return sorted(names, key=_param_order)

    def norm_layers(self, model: str = "manual") -> list[tuple[int, Series]]:
        """``(layer index, grad_norm series)`` of every ``fc<i>.weight`` of ``model``."""
        layers = []
        for tag, series in self.scalars.items():
            match = re.fullmatch(rf"grad_norm/{model}/fc(\d+)\.weight", tag)
            if match:
                layers.append((int(match.group(1)), series))
        return sorted(layers, key=lambda item: item[0])

    @property
    def architecture(self) -> str:
        """``784-300-10 tanh`` from the hyperparameters (``?`` when unknown)."""
        sizes = self.hparams.get("sizes")
        text = "-".join(str(size) for size in sizes) if sizes else "?"
        activation = self.hparams.get("activation")
        return f"{text} {activation}" if activation else text

    @property
    def epochs(self) -> int | None:
        """Training epochs completed.

        One ``val/acc/manual`` value per epoch (validation after every epoch, Lightning's
        default); without validation, Lightning's ``epoch`` scalar plus one, skipping its value
        at the last step, which the test after ``fit`` overwrites with the epoch counter as it
        stands after training (one more than the last epoch's index).
        """
        val = self.get("val/acc/manual")
        if val is not None:
            return len(val.steps)
        epoch = self.get("epoch")
        if epoch is None:
            return None
        values = epoch.values[:-1] if len(epoch.values) > 1 else epoch.values
        return int(values.max()) + 1


# --------------------------------------------------------------------------- reading
def _version_number(path: Path) -> int:
    match = re.fullmatch(r"version_(\d+)", path.name)
    return int(match.group(1)) if match else -1


def _has_events(path: Path) -> bool:
    return any(path.glob("events.out.tfevents.*"))


def discover_runs(runs_root: Path | str) -> list[Path]:
    """The latest ``version_N`` (with event files) of every experiment under ``runs_root``.

    ``runs_root`` holds one directory per experiment (``runs/mnist_mlp/version_0``, ...);
    returns their latest versions sorted by experiment name. Experiments without any event
    file are left out.
    """
    root = Path(runs_root)
    found = []
    for experiment in sorted(p for p in root.iterdir() if p.is_dir()):
        versions = [
            p
            for p in experiment.iterdir()
            if p.is_dir() and _version_number(p) >= 0 and _has_events(p)
        ]
        if versions:
            found.append(max(versions, key=_version_number))
    return found


def _read_scalars(path: Path) -> dict[str, Series]:
    """Every scalar tag of the event files in ``path`` (all events, no sampling)."""
    from tensorboard.backend.event_processing.event_accumulator import (
        HISTOGRAMS,
        IMAGES,
        SCALARS,
        TENSORS,
        EventAccumulator,
    )

    accumulator = EventAccumulator(
        str(path), size_guidance={SCALARS: 0, HISTOGRAMS: 1, IMAGES: 1, TENSORS: 1}
    )
    accumulator.Reload()
    scalars = {}
    for tag in accumulator.Tags()["scalars"]:
        by_step = {event.step: event.value for event in accumulator.Scalars(tag)}
        finite = {step: value for step, value in by_step.items() if math.isfinite(value)}
        if finite:  # placeholders (hparams-tab NaNs) carry no measurement
            steps = np.array(sorted(finite), dtype=np.int64)
            values = np.array([finite[int(step)] for step in steps], dtype=np.float64)
            scalars[tag] = Series(steps, values)
    return scalars


def _read_hparams(path: Path) -> dict:
    """The module hyperparameters: ``hparams.yaml``, else the ``model`` section of
    ``config.yaml``, else ``{}``."""
    for filename, section in (("hparams.yaml", None), ("config.yaml", "model")):
        file = path / filename
        if file.is_file():
            try:
                loaded = yaml.safe_load(file.read_text()) or {}
            except yaml.YAMLError:
                continue
            if section is not None:
                loaded = loaded.get(section) or {}
            if isinstance(loaded, dict) and loaded:
                return loaded
    return {}


def load_run(path: Path | str, name: str | None = None) -> Run:
    """Read one run directory (``.../<experiment>/version_N``).

    Args:
        path: the directory holding the event files.
        name: experiment name; default the name of ``path``'s parent (or of ``path`` itself
            when it is not a ``version_N`` directory).
    """
    path = Path(path)
    if name is None:
        name = path.parent.name if _version_number(path) >= 0 else path.name
    return Run(name=name, path=path, scalars=_read_scalars(path), hparams=_read_hparams(path))


# --------------------------------------------------------------------------- table
@dataclass
class ResultRow:
    """One experiment's line of the results table (errors in percent)."""

    experiment: str
    architecture: str
    loss: str
    epochs: int | None
    test_error: dict[str, float | None]
    """``{"manual": ..., "autograd": ...}``: ``100 * (1 - last test/acc/<twin>)``."""
    worst_grad_max_rel: float | None
    published: Published | None
    source: str = ""
    """The run directory the numbers come from."""
    notes: list[str] = field(default_factory=list)

    @property
    def difference(self) -> float | None:
        """Manual minus autograd test error, percentage points."""
        manual, autograd = self.test_error["manual"], self.test_error["autograd"]
        return None if manual is None or autograd is None else manual - autograd


def _worst_max_rel(run: Run) -> float | None:
    """The largest gradient-check relative error of the run (any tag that holds it)."""
    candidates = [
        run.get(tag)
        for tag in ("grad_check/worst_max_rel", "grad_check/max_rel", "hp/worst_grad_max_rel")
    ]
    values = [float(series.values.max()) for series in candidates if series is not None]
    return max(values) if values else None


def result_row(run: Run, published: dict[str, Published] | None = None) -> ResultRow:
    """The results-table row of ``run``; missing measurements are ``None`` with a note."""
    published = PUBLISHED if published is None else published
    notes = []
    errors: dict[str, float | None] = {}
    for twin in TWINS:
        series = run.get(f"test/acc/{twin}")
        errors[twin] = 100.0 * (1.0 - series.last) if series is not None else None
        if series is None:
            mode = run.hparams.get("compare")
            why = f" ({mode} mode)" if mode and mode != "lockstep" and twin == "autograd" else ""
            notes.append(f"no test/acc/{twin}{why}")
    worst = _worst_max_rel(run)
    if worst is None:
        notes.append("no gradient check")
    reference = published.get(run.name)
    manual = errors["manual"]
    if reference is not None and manual is not None and manual > reference.error:
        notes.append(f"{manual - reference.error:.2f} pp above published")
    return ResultRow(
        experiment=run.name,
        architecture=run.architecture,
        loss=str(run.hparams.get("loss", "?")),
        epochs=run.epochs,
        test_error=errors,
        worst_grad_max_rel=worst,
        published=reference,
        source=run.path.as_posix(),
        notes=notes,
    )


def _cell(value: float | None, spec: str, missing: str = "n/a") -> str:
    return missing if value is None else format(value, spec)


def results_markdown(rows: Sequence[ResultRow], figures: Iterable[str] = ()) -> str:
    """The results table (and links to ``figures``, paths relative to the markdown file)."""
    lines = [
        "# MNIST results: manual backprop vs builtin autograd",
        "",
        "Generated by `python scripts/report.py` from the TensorBoard event files of each run",
        "(test error = 100 * (1 - final `test/acc/<twin>`), in %; difference = manual - autograd",
        "in percentage points; worst grad max_rel = largest `grad_check/max_rel` over training).",
        "",
        "| experiment | architecture | loss | epochs | test error manual (%) "
        "| test error autograd (%) | difference (pp) | worst grad max_rel | published (%) "
        "| notes |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        published = f"{row.published.error:g} ({row.published.source})" if row.published else "n/a"
        cells = [
            row.experiment,
            row.architecture,
            row.loss,
            _cell(row.epochs, "d"),
            _cell(row.test_error["manual"], ".2f"),
            _cell(row.test_error["autograd"], ".2f"),
            _cell(row.difference, "+.2f"),
            _cell(row.worst_grad_max_rel, ".2e"),
            published,
            "; ".join(row.notes),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    sources = [f"- {row.experiment}: `{row.source}`" for row in rows if row.source]
    if sources:
        lines += ["", "Runs read:", "", *sources]
    figures = list(figures)
    if figures:
        lines += ["", "## Figures", ""]
        lines += [f"![{Path(figure).stem}]({figure})" for figure in figures]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- figures
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


def _param_order(param: str) -> tuple[int, int, str]:
    match = re.fullmatch(r"fc(\d+)\.(weight|bias)", param)
    if match:
        return (int(match.group(1)), match.group(2) != "weight", param)
    return (10**6, 0, param)


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
    layers = sorted({_param_order(param)[0] for param in params})
    for param in params:
        layer = _param_order(param)[0]
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
    ReLU twin: left, norm against layer index at a few steps; right, each layer over
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


# --------------------------------------------------------------------------- report
def write_report(
    run_dirs: Sequence[Path | str], out: Path | str, published: dict[str, Published] | None = None
) -> list[Path]:
    """Every figure and ``results.md`` for ``run_dirs`` (one ``version_N`` each) into ``out``.

    Runs without any scalar are listed in the table with a note and get no figures. Returns
    the paths written, ``results.md`` last.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    runs = [load_run(path) for path in run_dirs]
    written: list[Path] = []
    rows = []
    for run in runs:
        row = result_row(run, published)
        rows.append(row)
        if not run.scalars:
            row.notes.append("no scalars in the event files")
            continue
        loss_png = out / f"loss_{run.name}.png"
        missing = plot_losses(run, loss_png)
        written.append(loss_png)
        if missing:
            row.notes.append("not plotted: " + ", ".join(m.removeprefix("no ") for m in missing))
        grad_png = out / f"grad_check_{run.name}.png"
        if plot_grad_check(run, grad_png):
            written.append(grad_png)
    for sigmoid, relu in deep_pairs(runs):
        norms_png = out / f"grad_norms_{sigmoid.name}_vs_{relu.name}.png"
        plot_grad_norms(sigmoid, relu, norms_png)
        written.append(norms_png)
    error_png = out / "test_error.png"
    if plot_test_error(rows, error_png):
        written.append(error_png)
    table = out / "results.md"
    figures = [path.relative_to(out).as_posix() for path in written]
    table.write_text(results_markdown(rows, figures))
    written.append(table)
    return written
