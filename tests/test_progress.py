"""Progress output: a tqdm bar in a terminal, one line per epoch in a pipe or a file."""

from __future__ import annotations

import io

import torch
from torch.utils.data import DataLoader, TensorDataset

from manualbp.nn import MLP
from manualbp.train.module import TwinModule
from manualbp.train.progress import EpochLines, TwinProgressBar, epoch_line, progress_bar


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_the_bar_is_chosen_by_whether_output_is_a_terminal() -> None:
    assert isinstance(progress_bar(Terminal()), TwinProgressBar)
    assert isinstance(progress_bar(io.StringIO()), EpochLines)


def test_a_piped_run_writes_one_line_per_epoch(quiet_trainer, capsys) -> None:
    torch.manual_seed(0)
    inputs, targets = torch.randn(64, 8), torch.randint(0, 3, (64,))  # (N, 8), (N,)
    train = DataLoader(TensorDataset(inputs, targets), batch_size=16)
    val = DataLoader(TensorDataset(inputs, targets), batch_size=64)
    module = TwinModule(net=MLP([8, 6, 3], "relu"), compare="lockstep")
    trainer = quiet_trainer(
        max_epochs=3,
        log_every_n_steps=1,
        enable_progress_bar=True,
        callbacks=[EpochLines()],
        check_val_every_n_epoch=2,
    )
    trainer.fit(module, train_dataloaders=train, val_dataloaders=val)
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("  ")[0] for line in lines] == ["epoch 1/3", "epoch 2/3", "epoch 3/3"]
    for line in lines:
        assert "train loss manual " in line and " autograd " in line
    # Validation ran after epoch 2 only: the other lines show no (stale) validation accuracy.
    assert ["val acc" in line for line in lines] == [False, True, False]
    assert lines[1].split("  ")[1] == "step 8"


def test_epoch_line_reads_as_documented() -> None:
    metrics = {
        "train/loss/manual": torch.tensor(0.12356),
        "train/loss/autograd": torch.tensor(0.12361),
        "val/acc/manual": torch.tensor(0.964),
        "val/acc/autograd": torch.tensor(0.9642),
    }
    assert epoch_line(1, 10, 860, metrics, 8.61) == (
        "epoch 1/10  step 860  train loss manual 0.1236 autograd 0.1236  "
        "val acc manual 96.40% autograd 96.42%  (8.6 s)"
    )
