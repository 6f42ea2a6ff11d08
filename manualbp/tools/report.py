"""Figures and a results table from the TensorBoard runs of ``manualbp fit``.

Reads the runs (:mod:`manualbp.tools.runs`) under ``runs/<experiment>/version_N/`` and writes:

* ``loss_<experiment>.png``: training and validation loss of the manual (solid) and autograd
  (dashed) twins on one axis, with the twins' largest weight difference below;
* ``grad_check_<experiment>.png``: the largest relative gradient error per parameter over
  training (``grad_check/<param>/max_rel``, log scale);
* ``divergence_<experiment>.png`` (lockstep runs): the gradient check at the same weights above
  the weight divergence of the twins trained apart, on one time axis;
* ``grad_norms_<sigmoid>_vs_<relu>.png``: per-layer gradient norms of a deep sigmoid net and
  its ReLU counterpart (vanishing gradients), for every such pair among the runs;
* ``test_error.png``: final test error of every experiment, both twins, beside the published
  error where known;
* ``results.md``: the table behind ``test_error.png`` plus the gradient agreement, and a note
  on every tag a run lacks (a figure line or table cell is skipped, never invented).

Everything is computed from the event files; nothing is hard-coded but the published errors
of the classic experiments (:data:`PUBLISHED`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from manualbp.tools.figures import (
    deep_pairs,
    plot_divergence,
    plot_grad_check,
    plot_grad_norms,
    plot_losses,
    plot_test_error,
)
from manualbp.tools.runs import Run, load_run

__all__ = [
    "PUBLISHED",
    "Published",
    "ResultRow",
    "result_row",
    "results_markdown",
    "write_report",
]

TWINS = ("manual", "autograd")


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
        divergence_png = out / f"divergence_{run.name}.png"
        if plot_divergence(run, divergence_png):
            written.append(divergence_png)
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
