"""Reading the TensorBoard runs of ``manualbp fit``: one reader for the report and the tests.

A run is one ``runs/<experiment>/version_N/`` directory: TensorBoard event files, the module's
``hparams.yaml`` and the ``config.yaml`` LightningCLI saved. :func:`load_run` reads every scalar
with TensorBoard's own event reader (all events, no sampling) and the hyperparameters;
:func:`discover_runs` finds the latest fit run of every experiment.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

__all__ = [
    "Run",
    "Series",
    "discover_runs",
    "is_fit_run",
    "load_run",
    "param_order",
    "read_scalars",
]


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

    def pairs(self) -> list[tuple[int, float]]:
        """``[(step, value), ...]`` as plain Python numbers, in step order."""
        return list(zip(self.steps.tolist(), self.values.tolist(), strict=True))


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
        return sorted(names, key=param_order)

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


def param_order(param: str) -> tuple[int, int, str]:
    match = re.fullmatch(r"fc(\d+)\.(weight|bias)", param)
    if match:
        return (int(match.group(1)), match.group(2) != "weight", param)
    return (10**6, 0, param)


def _version_number(path: Path) -> int:
    match = re.fullmatch(r"version_(\d+)", path.name)
    return int(match.group(1)) if match else -1


def _has_events(path: Path) -> bool:
    return any(path.glob("events.out.tfevents.*"))


def is_fit_run(path: Path | str) -> bool:
    """Whether the run at ``path`` trained (logged a ``train/loss/*`` scalar): a fit, not the
    run ``manualbp test`` or ``validate`` writes beside it."""
    from tensorboard.backend.event_processing.event_accumulator import (
        HISTOGRAMS,
        IMAGES,
        SCALARS,
        TENSORS,
        EventAccumulator,
    )

    accumulator = EventAccumulator(
        str(path), size_guidance={SCALARS: 1, HISTOGRAMS: 1, IMAGES: 1, TENSORS: 1}
    )
    accumulator.Reload()
    return any(tag.startswith("train/loss/") for tag in accumulator.Tags()["scalars"])


def discover_runs(runs_root: Path | str) -> list[Path]:
    """The latest fit of every experiment under ``runs_root``.

    ``runs_root`` holds one directory per experiment (``runs/mnist_mlp/version_0``, ...);
    returns, sorted by experiment name, the highest ``version_N`` of each that is a fit
    (:func:`is_fit_run`); the versions ``manualbp test`` and ``validate`` create are passed
    over. Experiments without a fit are left out.
    """
    root = Path(runs_root)
    found = []
    for experiment in sorted(p for p in root.iterdir() if p.is_dir()):
        versions = [
            p
            for p in experiment.iterdir()
            if p.is_dir() and _version_number(p) >= 0 and _has_events(p)
        ]
        for version in sorted(versions, key=_version_number, reverse=True):
            if is_fit_run(version):
                found.append(version)
                break
    return found


def read_scalars(path: Path | str, *, finite_only: bool = True) -> dict[str, Series]:
    """Every scalar tag of the event files in ``path`` (all events, no sampling).

    Args:
        path: the directory holding the event files.
        finite_only: drop non-finite values (the NaN placeholders the hparams tab writes at
            step 0, and any other NaN or inf) and tags left without a value. ``False`` keeps
            them, for a caller that must see a NaN that was logged.
    """
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
        if finite_only:  # placeholders (hparams-tab NaNs) carry no measurement
            by_step = {step: value for step, value in by_step.items() if math.isfinite(value)}
        if by_step:
            steps = np.array(sorted(by_step), dtype=np.int64)
            values = np.array([by_step[int(step)] for step in steps], dtype=np.float64)
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
    return Run(name=name, path=path, scalars=read_scalars(path), hparams=_read_hparams(path))
