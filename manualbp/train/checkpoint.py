"""``ModelCheckpoint`` whose ``last.ckpt`` is always the latest state of the run.

Lightning's ``ModelCheckpoint(save_last=True)`` writes ``last.ckpt`` only when it writes a
best-k checkpoint at the same step, so when the final epochs do not improve the monitored
metric, ``last.ckpt`` holds an earlier epoch. :class:`LastStateCheckpoint` also writes it at
every other point where Lightning considers saving (the end of each validation in training,
or of each training epoch) and when training ends, so ``last.ckpt`` is the end of the run.
"""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint

__all__ = ["LastStateCheckpoint"]


class LastStateCheckpoint(ModelCheckpoint):
    """:class:`~lightning.pytorch.callbacks.ModelCheckpoint` (same arguments) with a
    ``last.ckpt`` that is never older than the latest epoch, nor than the end of training."""

    _last_written_at: int | None = None

    def _save_last_checkpoint(self, trainer: L.Trainer, monitor_candidates: dict) -> None:
        super()._save_last_checkpoint(trainer, monitor_candidates)
        if self.save_last:
            self._last_written_at = trainer.global_step

    def _keep_last_current(self, trainer: L.Trainer) -> None:
        if (
            self.save_last
            and self._last_written_at != trainer.global_step
            and trainer.global_step > 0
            and not trainer.fast_dev_run
            and not trainer.sanity_checking
            and trainer.state.fn == "fit"
        ):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer):
            self._keep_last_current(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self._should_save_on_train_epoch_end(trainer):
            self._keep_last_current(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        self._keep_last_current(trainer)
