"""The ``manualbp`` command: LightningCLI over :class:`TwinModule` and a DataModule.

    manualbp fit --config experiments/mnist_mlp.yaml     # train, then test both twins
    manualbp test --config experiments/mnist_mlp.yaml --ckpt_path runs/.../last.ckpt
    manualbp fetch-data --root ./data                     # provision MNIST only

Defaults: ``accelerator: auto`` (CUDA when present), a TensorBoard logger under ``runs/``,
checkpoints (best validation accuracy of the manual model, and ``last.ckpt``), the gradient
monitor and the learning-rate monitor. Unknown or ill-typed config keys are rejected by
LightningCLI with the key and the expected type.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from jsonargparse import lazy_instance
from lightning.pytorch import LightningDataModule
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger

from manualbp.callbacks import GradientMonitor
from manualbp.data import MNISTDataModule, fetch_main
from manualbp.module import TwinModule

__all__ = ["ManualbpCLI", "main"]


class ManualbpCLI(LightningCLI):
    """LightningCLI with manualbp's defaults and a test run after ``fit``.

    Config sections added to the Trainer's: ``checkpoint`` (a ``ModelCheckpoint``),
    ``gradient_monitor`` (a :class:`GradientMonitor`), ``test_after_fit``.
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
        "callbacks": [LearningRateMonitor(logging_interval="epoch")],
    }


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``manualbp`` console script."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["fetch-data"]:
        raise SystemExit(fetch_main(args[1:]))
    ManualbpCLI(
        TwinModule,
        LightningDataModule,
        subclass_mode_data=True,
        trainer_defaults=trainer_defaults(),
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        args=args,
    )


if __name__ == "__main__":
    main()
