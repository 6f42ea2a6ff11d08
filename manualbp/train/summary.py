"""The end of every ``manualbp fit``, ``test`` and ``validate``: the answer, in a few lines.

Do the two twins agree? Each twin's accuracy and loss, the worst gradient disagreement of the
run and whether every check passed, how far the twins' weights drifted apart, and where the run
is::

    manualbp fit: runs/mnist_mlp/version_0, 10 epochs (8600 steps), compare=lockstep
      test accuracy      manual 98.05%  autograd 98.06%
      test loss          manual 0.06712  autograd 0.06705
      gradient check     passed: 172 checks, worst max_rel 7.8e-07 <= 1e-05, worst max_ulp 3.8e+07
      weight divergence  2.8e-02 = max |θ_manual − θ_autograd| (last-bit differences grown by ...)
      open it            tensorboard --logdir runs/mnist_mlp/version_0  (tab CUSTOM SCALARS)

:class:`RunRecord` keeps what training measured (the gradient checks) and travels in the
checkpoints, so ``manualbp test`` of a checkpoint reports the checks of the run it came from.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.loggers import TensorBoardLogger

__all__ = ["PASS_MAX_REL", "RunRecord", "RunSummary", "summarize"]

TWINS = ("manual", "autograd")

PASS_MAX_REL = {"32-true": 1e-5}
"""The largest ``max_rel`` a gradient check may show and pass, by Trainer precision: 1e-5 in
float32, the tolerance of ``allclose`` in :meth:`GradientReport.table
<manualbp.compare.GradientReport.table>` and of ``assert_close``, about 84 machine epsilons. A
correct formula stays far below it (the 10-epoch ``mnist_mlp`` run on a CPU: worst 7.8e-7 in
172 checks; its per-example terms differ in the last bit or two, a little more where the batch
sum cancels); a wrong one shows 1e-2 or more from the first check. Other precisions get the
numbers without a verdict: no threshold has been measured for them."""


def _worst(current: float | None, new: float) -> float:
    """The larger of the two; NaN (a check that saw a non-finite gradient) stays the worst."""
    if current is None:
        return new
    if math.isnan(current) or math.isnan(new):
        return math.nan
    return max(current, new)


class RunRecord(L.Callback):
    """Counts the gradient checks of a fit and keeps their worst ``max_rel`` and ``max_ulp``
    (reduced over parameters and ranks, as logged), the number of epochs and steps trained and
    the run directory; its state is saved in every checkpoint.

    Reads :attr:`TwinModule.last_check_values <manualbp.train.module.TwinModule>` after each
    training batch (a new dict after each check)."""

    def __init__(self) -> None:
        self.checks = 0
        self.worst_max_rel: float | None = None
        self.worst_max_ulp: float | None = None
        self.epochs = 0
        self.steps = 0
        self.fit_dir: str | None = None
        self._seen: object = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.fit_dir = _log_dir(trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.epochs = trainer.current_epoch + 1
        self.steps = trainer.global_step
        values = getattr(pl_module, "last_check_values", None)
        if values is None or values is self._seen:
            return
        self._seen = values
        if "grad_check/max_rel" not in values:  # compare="off": divergence only, no check
            return
        self.checks += 1
        self.worst_max_rel = _worst(self.worst_max_rel, values["grad_check/max_rel"])
        for key, value in values.items():
            if key.startswith("grad_check/") and key.endswith("/max_ulp"):
                self.worst_max_ulp = _worst(self.worst_max_ulp, value)

    def state_dict(self) -> dict[str, Any]:
        return {
            "checks": self.checks,
            "worst_max_rel": self.worst_max_rel,
            "worst_max_ulp": self.worst_max_ulp,
            "epochs": self.epochs,
            "steps": self.steps,
            "fit_dir": self.fit_dir,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for key in ("checks", "worst_max_rel", "worst_max_ulp", "epochs", "steps", "fit_dir"):
            setattr(self, key, state_dict.get(key, getattr(self, key)))


def _log_dir(trainer: L.Trainer) -> str | None:
    logger = trainer.logger
    return str(logger.log_dir) if isinstance(logger, TensorBoardLogger) else None


def _shown(path: str | os.PathLike[str]) -> str:
    """``path`` relative to the working directory when it lies inside it."""
    path = Path(path)
    try:
        return path.resolve().relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return str(path)


@dataclass
class RunSummary:
    """What :func:`summarize` found; ``str()`` gives the printed lines."""

    command: str
    stage: str
    """``"test"`` or ``"val"``: where the accuracies come from."""
    compare: str
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    """twin → ``{"acc": ..., "loss": ...}``."""
    checks: int = 0
    worst_max_rel: float | None = None
    worst_max_ulp: float | None = None
    tolerance: float | None = None
    precision: str = "32-true"
    divergence: float | None = None
    epochs: int = 0
    steps: int = 0
    run_dir: str | None = None
    fit_dir: str | None = None

    @property
    def passed(self) -> bool | None:
        """Every check within :data:`PASS_MAX_REL` (``None``: no check, or no threshold)."""
        if not self.checks or self.worst_max_rel is None or self.tolerance is None:
            return None
        return self.worst_max_rel <= self.tolerance  # NaN fails

    def lines(self) -> list[str]:
        where = f": {_shown(self.run_dir)}" if self.run_dir else ""
        head = f"manualbp {self.command}{where}"
        if self.epochs:
            trained = "trained" if self.command != "fit" else ""
            steps = (
                f"{self.epochs} epoch{'s' * (self.epochs != 1)} "
                f"({self.steps} step{'s' * (self.steps != 1)})"
            )
            head += f", {trained + ' ' if trained else ''}{steps}"
        head += f", compare={self.compare}"
        lines = [head]
        label = "test" if self.stage == "test" else "val"
        for name, key, spec in (("accuracy", "acc", "percent"), ("loss", "loss", ".4g")):
            values = [
                f"{twin} {self._format(self.metrics[twin][key], spec)}"
                for twin in TWINS
                if key in self.metrics.get(twin, {})
            ]
            if values:
                lines.append(f"  {label + ' ' + name:<19}" + "  ".join(values))
        lines.append(f"  {'gradient check':<19}{self._check_line()}")
        if self.divergence is not None:
            lines.append(
                f"  {'weight divergence':<19}{self.divergence:.1e} = max |θ_manual − θ_autograd| "
                "(last-bit differences grown by training)"
            )
        if self.fit_dir and self.fit_dir != self.run_dir:
            lines.append(f"  {'trained in':<19}{_shown(self.fit_dir)}")
        if self.run_dir:
            logdir = self.run_dir
            if self.fit_dir and self.fit_dir != self.run_dir:
                logdir = os.path.commonpath([self.run_dir, self.fit_dir])
            lines.append(
                f"  {'open it':<19}tensorboard --logdir {_shown(logdir)}  (tab CUSTOM SCALARS)"
            )
        return lines

    @staticmethod
    def _format(value: float, spec: str) -> str:
        return f"{100 * value:.2f}%" if spec == "percent" else format(value, spec)

    def _check_line(self) -> str:
        if not self.checks:
            return "none in this run" if self.compare != "off" else "off (compare=off)"
        checks = f"{self.checks} check{'s' * (self.checks != 1)}"
        ulp = f", worst max_ulp {self.worst_max_ulp:.1e}" if self.worst_max_ulp is not None else ""
        worst = f"worst max_rel {self.worst_max_rel:.1e}"
        if self.passed is None:
            return f"{checks}, {worst}{ulp} (no pass/fail threshold for {self.precision})"
        if self.passed:
            return f"passed: {checks}, {worst} <= {self.tolerance:.0e}{ulp}"
        return f"FAILED: {checks}, {worst} > {self.tolerance:.0e}{ulp}"

    def __str__(self) -> str:
        return "\n".join(self.lines())


def summarize(trainer: L.Trainer, module: L.LightningModule, command: str) -> RunSummary:
    """The summary of ``trainer``'s latest run of ``module`` (a TwinModule): the accuracies and
    losses it last evaluated (``test/`` if it tested, else ``val/``), the :class:`RunRecord`'s
    gradient checks and the twins' weight divergence now."""
    metrics = trainer.callback_metrics
    stage = "test" if any(key.startswith("test/") for key in metrics) else "val"
    results: dict[str, dict[str, float]] = {}
    for twin in TWINS:
        for key in ("acc", "loss"):
            value = metrics.get(f"{stage}/{key}/{twin}")
            if value is not None:
                results.setdefault(twin, {})[key] = float(value)
    hparams = getattr(module, "hparams", {})
    summary = RunSummary(
        command=command,
        stage=stage,
        compare=str(hparams.get("compare", "?")),
        metrics=results,
        precision=str(trainer.precision),
        tolerance=PASS_MAX_REL.get(str(trainer.precision)),
        run_dir=_log_dir(trainer),
    )
    record = next((c for c in trainer.callbacks if isinstance(c, RunRecord)), None)
    if record is not None:
        summary.checks = record.checks
        summary.worst_max_rel = record.worst_max_rel
        summary.worst_max_ulp = record.worst_max_ulp
        summary.epochs, summary.steps = record.epochs, record.steps
        summary.fit_dir = record.fit_dir
    if getattr(module, "lockstep", False):
        summary.divergence = float(module.divergence()["divergence/max"])
    return summary
