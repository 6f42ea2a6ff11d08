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

from collections.abc import Sequence
from typing import Any

from jsonargparse import lazy_instance
from lightning.pytorch import Callback, LightningDataModule, Trainer
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger

from manualbp.data import MNISTDataModule
from manualbp.train.callbacks import GradientMonitor
from manualbp.train.module import TwinModule

__all__ = ["ManualbpCLI", "cli_main", "trainer_defaults"]


class ManualbpCLI(LightningCLI):
    """LightningCLI with manualbp's defaults and a test run after ``fit``.

    Config sections added to the Trainer's: ``checkpoint`` (a ``ModelCheckpoint``; off with
    ``trainer.enable_checkpointing=false``), ``gradient_monitor`` (a :class:`GradientMonitor`),
    ``test_after_fit``.
    """

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
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
        if config.get("logger", True) not in (False, None):
            callbacks = [*callbacks, LearningRateMonitor(logging_interval="epoch")]
        return super()._instantiate_trainer(config, callbacks)

    def after_fit(self) -> None:
        if self.config.fit.get("test_after_fit", True) and not self.trainer.interrupted:
            self.trainer.test(self.model, datamodule=self.datamodule, verbose=True)


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
