"""Progress of a ``manualbp`` run: a live bar in a terminal, one line per epoch anywhere else.

In a terminal, Lightning's tqdm bar shows both twins' training losses (the module logs them
with ``prog_bar=True``). Piped to a file or a CI log, a tqdm bar writes every refresh as a new
chunk of text (megabytes for a 10-epoch run); :class:`EpochLines` writes one line per training
epoch instead (here wrapped)::

    epoch 1/10  step 860  train loss manual 0.1236 autograd 0.1236
        val acc manual 96.40% autograd 96.40%  (8.6 s)

:func:`progress_bar` picks one of the two by whether standard output is a terminal.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping
from typing import IO

import lightning as L
from lightning.pytorch.callbacks import ProgressBar, TQDMProgressBar

__all__ = ["EpochLines", "TwinProgressBar", "epoch_line", "progress_bar"]

TWINS = ("manual", "autograd")


class TwinProgressBar(TQDMProgressBar):
    """Lightning's tqdm bar showing the twins' metrics, without the logger's version number."""

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        return items


def _twin_values(metrics: Mapping[str, object], prefix: str, percent: bool) -> str:
    """``"manual 0.1236 autograd 0.1236"`` for the twins that have ``<prefix>/<twin>``."""
    parts = []
    for twin in TWINS:
        value = metrics.get(f"{prefix}/{twin}")
        if value is None:
            continue
        number = float(value)
        parts.append(f"{twin} {100 * number:.2f}%" if percent else f"{twin} {number:.4g}")
    return " ".join(parts)


def epoch_line(
    epoch: int,
    max_epochs: int | None,
    step: int,
    metrics: Mapping[str, object],
    seconds: float | None = None,
    validated: bool = True,
) -> str:
    """One epoch as one line: the twins' last logged training loss and, when ``validated``,
    their validation accuracy (``epoch`` counts from 1)."""
    total = f"/{max_epochs}" if max_epochs is not None and max_epochs > 0 else ""
    fields = [f"epoch {epoch}{total}", f"step {step}"]
    train = _twin_values(metrics, "train/loss", percent=False)
    if train:
        fields.append(f"train loss {train}")
    val = _twin_values(metrics, "val/acc", percent=True) if validated else ""
    if val:
        fields.append(f"val acc {val}")
    if seconds is not None:
        fields.append(f"({seconds:.1f} s)")
    return "  ".join(fields)


class EpochLines(ProgressBar):
    """A progress "bar" for logs: one :func:`epoch_line` per training epoch, from global rank 0,
    written to ``stream`` (default: standard output at the time of writing)."""

    def __init__(self, stream: IO[str] | None = None) -> None:
        super().__init__()
        self._enabled = True
        self._stream = stream
        self._epoch_started = 0.0
        self._validated_epoch: int | None = None

    @property
    def is_enabled(self) -> bool:
        return self._enabled

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def print(self, *args, **kwargs) -> None:
        print(*args, file=self._stream or sys.stdout, **kwargs)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._epoch_started = time.perf_counter()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._validated_epoch = trainer.current_epoch

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not (self._enabled and trainer.is_global_zero):
            return
        line = epoch_line(
            trainer.current_epoch + 1,
            trainer.max_epochs,
            trainer.global_step,
            trainer.callback_metrics,
            time.perf_counter() - self._epoch_started,
            validated=self._validated_epoch == trainer.current_epoch,
        )
        self.print(line, flush=True)


def progress_bar(stream: IO[str] | None = None) -> ProgressBar:
    """:class:`TwinProgressBar` when ``stream`` (default ``sys.stdout``) is a terminal, else
    :class:`EpochLines`."""
    stream = sys.stdout if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    return TwinProgressBar() if isatty is not None and isatty() else EpochLines()
