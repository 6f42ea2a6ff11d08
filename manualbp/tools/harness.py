"""What the Lightning harness costs around an experiment's own work.

``measure_harness(config)`` runs ``manualbp fit --config CONFIG`` in this process (fit, then
test, as the command does) with a :class:`RunClock` callback, and times the same work in a
plain loop, in interleaved rounds (a machine's speed can drift by more than the overhead
between two runs). The plain loop does every training step of both twins (forward, loss,
backward, optimizer step), the gradient check every ``check_every_n_steps`` steps, and the
forward passes of each validation and of the test, on the same batches. Reported per round,
and for the round of median overhead:

* ``startup_s``: from building the CLI (config parsing, MNIST loading) to the fit's start;
* ``run_s``: from the fit's start to the end of the test;
* ``pure_s``: the plain loop's time for that same work;
* ``overhead_s = run_s - pure_s`` and ``overhead_fraction = overhead_s / run_s``: what the
  harness (Lightning's loops, hooks, logging, TensorBoard, checkpoints, summaries) adds;
* ``lightning_floor_s`` (measured once): what Lightning's training loop alone costs for the
  same number of steps (:func:`lightning_loop_seconds_per_step`: a one-parameter module, no
  logger, no callbacks), with automatic optimization as the run uses, and
  ``lightning_floor_fraction`` of the run: the part of the overhead no LightningModule can
  remove.

``python scripts/benchmark.py --harness`` runs it on ``experiments/mnist_mlp.yaml``.
"""

from __future__ import annotations

import copy
import itertools
import statistics
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from manualbp.compare import compare_gradients

__all__ = ["RunClock", "lightning_loop_seconds_per_step", "measure_harness", "plain_loop_seconds"]


class RunClock(Callback):
    """Wall-clock marks of a run: the fit's start and the end of the last test batch, and the
    number of training steps and of validation and test batches."""

    def __init__(self) -> None:
        self.fit_start = self.test_end = 0.0
        self.steps = 0
        self.validations: list[int] = []  # batches per validation run (sanity check excluded)
        self.test_batches = 0

    def on_fit_start(self, trainer, pl_module) -> None:
        self.fit_start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.steps += 1

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self.validations.append(0)

    def on_validation_batch_end(self, trainer, pl_module, *args) -> None:
        if not trainer.sanity_checking:
            self.validations[-1] += 1

    def on_test_batch_end(self, trainer, pl_module, *args) -> None:
        self.test_batches += 1

    def on_test_end(self, trainer, pl_module) -> None:
        self.test_end = time.perf_counter()


def _batches(loader: Iterable, count: int) -> Iterable:
    """``count`` batches from ``loader``, starting it again whenever it ends."""
    produced = 0
    while produced < count:
        for batch in loader:
            if produced == count:
                return
            yield batch
            produced += 1


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def plain_loop_seconds(module, datamodule, clock: RunClock, optimizer_factory) -> float:
    """Seconds a plain Python loop takes for the work ``clock`` counted in the run, on copies
    of ``module``'s twins: training steps of the twins it trains (with a gradient check every
    ``check_every_n_steps`` unless ``compare="off"``), validation and test forward passes of
    both twins."""
    # On the batches' device: after a run Lightning has moved the module back to the CPU.
    device = next(iter(datamodule.train_dataloader()))[0].device
    manual = copy.deepcopy(module.manual_model).to(device)
    autograd = copy.deepcopy(module.autograd_model).to(device)
    manual_loss, autograd_loss = module.manual_loss, module.autograd_loss
    optimizers = [optimizer_factory(manual.parameters()), optimizer_factory(autograd.parameters())]
    every = module.hparams.check_every_n_steps if module.hparams.compare != "off" else 0
    twins = 2 if module.hparams.compare == "lockstep" else 1  # trained twins
    _sync(device)
    start = time.perf_counter()
    for step, (inputs, targets) in enumerate(_batches(datamodule.train_dataloader(), clock.steps)):
        if every and step % every == 0:
            compare_gradients(manual, autograd, manual_loss, autograd_loss, inputs, targets)
        for model, loss_fn, optimizer in list(
            zip((manual, autograd), (manual_loss, autograd_loss), optimizers, strict=True)
        )[:twins]:
            optimizer.zero_grad(set_to_none=True)
            loss_fn(model(inputs), targets).backward()
            optimizer.step()
    evaluations = [(datamodule.val_dataloader(), n) for n in clock.validations]
    evaluations.append((datamodule.test_dataloader(), clock.test_batches))
    with torch.no_grad():
        for loader, count in evaluations:
            for inputs, targets in _batches(loader, count):
                for model, loss_fn in ((manual, manual_loss), (autograd, autograd_loss)):
                    outputs = model(inputs)
                    loss_fn(outputs, targets)
                    (outputs.argmax(1) == targets).float().mean()
    _sync(device)
    return time.perf_counter() - start


class _Repeat:
    """An iterable of ``count`` times the same ``batch``, with a length (a training loader
    without the costs of a DataLoader)."""

    def __init__(self, batch: Any, count: int) -> None:
        self.batch, self.count = batch, count

    def __iter__(self) -> Iterator[Any]:
        return itertools.repeat(self.batch, self.count)

    def __len__(self) -> int:
        return self.count


class _OneParameter(LightningModule):
    """The smallest training step: one parameter, one multiply, SGD."""

    def __init__(self, automatic: bool) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.automatic_optimization = automatic

    def training_step(self, batch: tuple[torch.Tensor], batch_idx: int) -> torch.Tensor | None:
        loss = (self.weight * batch[0]).sum()  # ()
        if self.automatic_optimization:
            return loss
        optimizer = self.optimizers()
        optimizer.zero_grad()
        self.manual_backward(loss)
        optimizer.step()
        return None

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def lightning_loop_seconds_per_step(steps: int = 2000, automatic: bool = True) -> float:
    """Seconds per step of Lightning's training loop around the smallest possible step (a
    one-parameter module; no logger, callbacks, progress bar or checkpoints), minus that
    step run in a plain loop: the per-step cost of the loop itself on this machine."""
    batches = _Repeat((torch.ones(1),), steps)
    trainer = Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    clock = RunClock()
    trainer.callbacks.append(clock)
    start = time.perf_counter()
    trainer.fit(_OneParameter(automatic), train_dataloaders=batches)
    looped = time.perf_counter() - start
    module = _OneParameter(automatic)
    optimizer = module.configure_optimizers()
    start = time.perf_counter()
    for (ones,) in batches:
        optimizer.zero_grad()
        (module.weight * ones).sum().backward()
        optimizer.step()
    plain = time.perf_counter() - start
    return (looped - plain) / steps


def measure_harness(
    config: str = "experiments/mnist_mlp.yaml", extra_args: Sequence[str] = (), rounds: int = 3
) -> dict[str, Any]:
    """Run ``manualbp fit --config config`` (plus ``extra_args``) and the plain loop of the
    same work ``rounds`` times, interleaved (run then loop, loop then run, ...: a machine that
    drifts slows both alike). Returns the timings described in the module docstring for the
    round of median overhead, and every round's under ``"rounds"``."""
    if rounds < 1:
        raise ValueError(f"measure_harness: rounds must be >= 1, got {rounds}")
    measured: list[dict[str, float]] = []
    previous: tuple[Any, RunClock] | None = None  # (cli, clock) of the last run
    for index in range(rounds):
        loop_first = previous is not None and index % 2 == 1
        pure = _plain_loop_of(*previous) if loop_first else None
        cli, clock, startup = _timed_run(config, extra_args)
        if pure is None:
            pure = _plain_loop_of(cli, clock)
        previous = (cli, clock)
        run = clock.test_end - clock.fit_start
        measured.append(
            {
                "startup_s": startup,
                "run_s": run,
                "pure_s": pure,
                "overhead_s": run - pure,
                "overhead_fraction": (run - pure) / run,
            }
        )
    steps = previous[1].steps
    floor = lightning_loop_seconds_per_step() * steps
    middle = statistics.median_low(round_["overhead_fraction"] for round_ in measured)
    median_round = next(r for r in measured if r["overhead_fraction"] == middle)
    result: dict[str, Any] = {"config": config, "steps": steps, **median_round, "rounds": measured}
    result["lightning_floor_s"] = floor
    result["lightning_floor_fraction"] = floor / result["run_s"]
    return result


def _timed_run(config: str, extra_args: Sequence[str]) -> tuple[Any, RunClock, float]:
    """``manualbp fit --config config`` in this process: the CLI, its clock, and the seconds
    from building the CLI to the fit's start."""
    from manualbp.train.cli import cli_main

    with tempfile.TemporaryDirectory() as runs:
        args = [
            "fit",
            "--config",
            config,
            f"--trainer.logger.init_args.save_dir={Path(runs)}",
            "--trainer.callbacks+=manualbp.tools.harness.RunClock",
            *extra_args,
        ]
        started = time.perf_counter()
        cli = cli_main(args)
    clock = next(c for c in cli.trainer.callbacks if isinstance(c, RunClock))
    return cli, clock, clock.fit_start - started


def _plain_loop_of(cli: Any, clock: RunClock) -> float:
    return plain_loop_seconds(cli.model, cli.datamodule, clock, cli.model.optimizer_factory)
