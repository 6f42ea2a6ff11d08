"""The four XOR points as a tiny LightningDataModule: the classic 2-4-1 sigmoid benchmark."""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

__all__ = ["XORDataModule"]


class XORDataModule(L.LightningDataModule):
    """Every batch is the whole truth table: inputs ``(4, 2)``, targets ``(4, 1)`` in {0, 1}.

    Args:
        steps_per_epoch: how many (identical) full-batch steps make one training epoch, so a
            run of a few thousand steps needs only a few Lightning epochs.
    """

    def __init__(self, steps_per_epoch: int = 500) -> None:
        super().__init__()
        if not isinstance(steps_per_epoch, int) or steps_per_epoch < 1:
            raise ValueError(
                f"XORDataModule: steps_per_epoch must be a positive int, got {steps_per_epoch!r}"
            )
        self.save_hyperparameters(logger=False)  # TwinModule logs them, prefixed
        self.inputs = torch.tensor([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]])  # (4, 2)
        self.targets = torch.tensor([[0.0], [1.0], [1.0], [0.0]])  # (4, 1)

    def _loader(self, repeats: bool) -> DataLoader:
        steps = self.hparams.steps_per_epoch if repeats else 1
        dataset = TensorDataset(self.inputs.repeat(steps, 1), self.targets.repeat(steps, 1))
        return DataLoader(dataset, batch_size=len(self.inputs), shuffle=False)

    def train_dataloader(self) -> DataLoader:
        return self._loader(repeats=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(repeats=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(repeats=False)
