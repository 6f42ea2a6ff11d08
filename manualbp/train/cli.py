"""``manualbp fit``, ``validate`` and ``test``: LightningCLI over :class:`TwinModule` and a
DataModule.

    manualbp fit --config experiments/mnist_mlp.yaml     # train, then test both twins
    manualbp test --config experiments/mnist_mlp.yaml --ckpt_path runs/.../last.ckpt
    manualbp validate --config experiments/mnist_mlp.yaml --ckpt_path runs/.../last.ckpt

Defaults: ``accelerator: auto`` (CUDA when present), a TensorBoard logger under ``runs/``,
checkpoints (best validation accuracy of the manual model, and ``last.ckpt``), the gradient
monitor and (with a logger) the learning-rate monitor. Unknown or ill-typed config keys are
rejected by LightningCLI with the key and the expected type.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from jsonargparse import lazy_instance
from lightning.pytorch import Callback, LightningDataModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, instantiate_class
from lightning.pytorch.loggers import TensorBoardLogger
from torch.optim import Optimizer

from manualbp.data import MNISTDataModule
from manualbp.train.callbacks import GradientMonitor
from manualbp.train.checkpoint import LastStateCheckpoint
from manualbp.train.module import TwinModule

__all__ = ["ManualbpCLI", "cli_main", "trainer_defaults"]


class ManualbpCLI(LightningCLI):
    """LightningCLI with manualbp's defaults and a test run after ``fit``.

    Config sections added to the Trainer's: ``checkpoint`` (a
    :class:`~manualbp.train.checkpoint.LastStateCheckpoint`, whose ``last.ckpt`` is the end of
    the run; off with ``trainer.enable_checkpointing=false``), ``gradient_monitor`` (a
    :class:`GradientMonitor`), ``test_after_fit``. Lightning's own ``optimizer:`` and
    ``lr_scheduler:`` sections build one instance per trained twin. ``test`` and ``validate``
    without ``--ckpt_path`` evaluate the final state (``last.ckpt``) of the latest fit of the
    same experiment, and say so.
    """

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(LastStateCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.monitor": "val/acc/manual",
                "checkpoint.mode": "max",
                "checkpoint.save_last": True,
                "checkpoint.filename": "epoch={epoch}-val_acc={val/acc/manual:.4f}",
                "checkpoint.auto_insert_metric_name": False,
            }
        )
        parser.add_lightning_class_args(GradientMonitor, "gradient_monitor")
        parser.add_argument(
            "--test_after_fit",
            type=bool,
            default=True,
            help="After fit, evaluate the final weights of both twins on the test set.",
        )
        parser.set_defaults({"data": lazy_instance(MNISTDataModule)})

    def before_instantiate_classes(self) -> None:
        """With ``model.backend=autograd`` (``compare=off``) the trained model's accuracy is
        ``val/acc/autograd``: the default checkpoint monitor and file name follow it."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        checkpoint = config.get("checkpoint")
        if config.model.get("backend") != "autograd" or checkpoint is None:
            return
        if checkpoint.monitor == "val/acc/manual":
            checkpoint.monitor = "val/acc/autograd"
            if checkpoint.filename:
                checkpoint.filename = checkpoint.filename.replace(
                    "val/acc/manual", "val/acc/autograd"
                )

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Callback]) -> Trainer:
        # ``trainer.enable_checkpointing=false`` turns the ``checkpoint`` section off instead of
        # failing on the ModelCheckpoint that section always builds; the learning-rate monitor
        # comes only with a logger (``trainer.logger=false`` would make it fail).
        if config.get("enable_checkpointing") is False:
            callbacks = [c for c in callbacks if not isinstance(c, ModelCheckpoint)]
        return super()._instantiate_trainer(config, callbacks)

    def _add_configure_optimizers_method_to_model(self, subcommand: str | None) -> None:
        """The top-level ``optimizer:`` / ``lr_scheduler:`` sections become the module's
        factories, so that every trained twin gets its own instance (LightningCLI would build
        one optimizer over both twins' parameters)."""
        parser = self._parser(subcommand)

        def section(register: dict) -> Any:
            keys = [key for key, (_, link) in register.items() if link == "AUTOMATIC"]
            return self._get(self.config_init, keys[0]) if keys else None

        optimizer_init = section(parser._optimizers)
        if not optimizer_init:
            return
        scheduler_init = section(parser._lr_schedulers)
        if self.model.hparams.get("optimizer") is not None:
            raise ValueError(
                "the optimizer is given twice, as model.optimizer and as the top-level "
                "optimizer section; keep one"
            )
        self.model.optimizer_factory = _factory(optimizer_init)
        if scheduler_init:
            if self.model.hparams.get("lr_scheduler") is not None:
                raise ValueError(
                    "the learning-rate scheduler is given twice, as model.lr_scheduler and as "
                    "the top-level lr_scheduler section; keep one"
                )
            self.model.lr_scheduler_factory = _factory(scheduler_init)

    def before_test(self) -> None:
        self._default_to_the_latest_fit("test")

    def before_validate(self) -> None:
        self._default_to_the_latest_fit("validate")

    def _default_to_the_latest_fit(self, subcommand: str) -> None:
        """Without ``--ckpt_path``, evaluate ``last.ckpt`` of the latest fit of this experiment
        (its logger's ``save_dir/name``), and say which; with none, refuse: untrained weights
        would be evaluated."""
        arguments = self.config_init[subcommand]
        if arguments.get("ckpt_path"):
            return
        logger = self.trainer.logger
        experiment = Path(logger.save_dir) / str(logger.name) if logger is not None else None
        latest = latest_fit_checkpoint(experiment) if experiment is not None else None
        if latest is None:
            where = f" under {experiment}" if experiment is not None else ""
            raise SystemExit(
                f"manualbp {subcommand}: no --ckpt_path given and no checkpoint of a fit found"
                f"{where}; run `manualbp fit` with the same config first, or pass "
                f"--ckpt_path path/to/last.ckpt"
            )
        print(f"manualbp {subcommand}: evaluating {latest}, the final state of the latest fit")
        arguments["ckpt_path"] = str(latest)

    def after_fit(self) -> None:
        if self.config.fit.get("test_after_fit", True) and not self.trainer.interrupted:
            self.trainer.test(self.model, datamodule=self.datamodule, verbose=True)


def _factory(init: dict[str, Any]):
    """``class_path`` + ``init_args`` → a function building the object from its first
    argument (parameters for an optimizer, an optimizer for a scheduler)."""

    def build(first: Any) -> Optimizer | Any:
        return instantiate_class(first, init)

    return build


def latest_fit_checkpoint(experiment: Path) -> Path | None:
    """``last.ckpt`` of the newest ``version_N`` under ``experiment`` that has one."""
    if not experiment.is_dir():
        return None
    found = []
    for version in experiment.iterdir():
        match = re.fullmatch(r"version_(\d+)", version.name)
        checkpoint = version / "checkpoints" / "last.ckpt"
        if match and checkpoint.is_file():
            found.append((int(match.group(1)), checkpoint))
    return max(found)[1] if found else None


def trainer_defaults() -> dict:
    """Trainer settings every experiment starts from; a config file overrides any of them."""
    return {
        "accelerator": "auto",
        "devices": 1,
        "max_epochs": 10,
        "log_every_n_steps": 50,
        "logger": lazy_instance(
            TensorBoardLogger, save_dir="runs", name="default", default_hp_metric=False
        ),
    }


def cli_main(args: Sequence[str] | None = None, run: bool = True) -> ManualbpCLI:
    """Build (and by default run) the CLI; ``args=None`` reads ``sys.argv``.

    In-process callers (tests, notebooks) get the :class:`ManualbpCLI` back, with its
    ``trainer``, ``model`` and ``datamodule``.
    """
    return ManualbpCLI(
        TwinModule,
        LightningDataModule,
        subclass_mode_data=True,
        trainer_defaults=trainer_defaults(),
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        args=None if args is None else list(args),
        run=run,
    )
