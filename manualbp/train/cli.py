"""``manualbp fit``, ``validate`` and ``test``: LightningCLI over :class:`TwinModule` and a
DataModule.

    manualbp fit --config experiments/mnist_mlp.yaml     # train, then test both twins
    manualbp test --config experiments/mnist_mlp.yaml --ckpt_path runs/.../last.ckpt
    manualbp validate --config experiments/mnist_mlp.yaml --ckpt_path runs/.../last.ckpt

Defaults: ``accelerator: auto`` (CUDA when present), a TensorBoard logger under ``runs/``,
checkpoints (best validation accuracy of the manual model, and ``last.ckpt``) and the gradient
monitor. What a person sees:

* ``--help``: the common keys, the DataModule's included (:func:`~.cli_messages.short_help`);
  ``--help-all`` is LightningCLI's full help, ``--print_config`` the resolved config;
* an unknown, abbreviated (``--trainer.max_epoch``) or ill-typed key, or a value a constructor
  refuses: one line naming the key, what it expects and what it got, exit status 2;
* progress: a tqdm bar in a terminal, one line per epoch otherwise
  (:func:`~.progress.progress_bar`);
* at the end of ``fit``, ``test`` and ``validate``: the run summary
  (:mod:`~manualbp.train.summary`) instead of Lightning's metrics table;
* none of the third-party notices listed in :mod:`~manualbp.train.quiet`.
"""

from __future__ import annotations

import logging
import re
import sys
from argparse import ArgumentError
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import torch
from jsonargparse import ArgumentParser, Namespace, lazy_instance
from lightning.pytorch import Callback, LightningDataModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, instantiate_class
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch.optim import Optimizer

from manualbp.data import MNISTDataModule
from manualbp.train.callbacks import GradientMonitor
from manualbp.train.checkpoint import LastStateCheckpoint
from manualbp.train.cli_messages import (
    short_help,
    short_instantiation_error,
    short_parse_error,
)
from manualbp.train.module import TwinModule
from manualbp.train.progress import progress_bar
from manualbp.train.quiet import silence_third_party_noise
from manualbp.train.summary import RunRecord, summarize

__all__ = ["ManualbpCLI", "cli_main", "trainer_defaults"]


class ManualbpCLI(LightningCLI):
    """LightningCLI with manualbp's defaults and a test run after ``fit``.

    Config sections added to the Trainer's: ``checkpoint`` (a
    :class:`~manualbp.train.checkpoint.LastStateCheckpoint`, whose ``last.ckpt`` is the end of
    the run; off with ``trainer.enable_checkpointing=false``), ``gradient_monitor`` (a
    :class:`GradientMonitor`), ``test_after_fit``. Lightning's own ``optimizer:`` and
    ``lr_scheduler:`` sections build one instance per trained twin. ``test`` and ``validate``
    without ``--ckpt_path`` evaluate the final state (``last.ckpt``) of the latest fit of the
    same experiment, and say so. ``predict`` is not offered (a twin run has nothing to
    predict that ``test`` does not measure).
    """

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {
            name: skip
            for name, skip in LightningCLI.subcommands().items()
            if name in ("fit", "validate", "test")
        }

    def _prepare_subcommand_parser(
        self, klass: type, subcommand: str, **kwargs: Any
    ) -> LightningArgumentParser:
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        if subcommand in ("validate", "test"):
            parser.set_defaults(verbose=False)  # the run summary replaces Lightning's table
        return parser

    # ------------------------------------------------------------------ parsing
    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Parse ``args`` (``None``: the command line), answering ``--help`` with the short
        help and a bad key or value with one line (LightningCLI prints its usage first)."""
        if isinstance(args, (dict, Namespace)):
            self.config = self._parsed(lambda: parser.parse_object(args), None)
            return
        argv = list(sys.argv[1:] if args is None else args)
        subcommands = getattr(self, "_subcommand_parsers", {})  # none with run=False
        subcommand = argv[0] if argv and argv[0] in subcommands else None
        if subcommand and any(arg in ("-h", "--help") for arg in argv[1:]):
            print(self._short_help(subcommand))
            raise SystemExit(0)
        argv = ["--help" if arg == "--help-all" else arg for arg in argv]
        self.config = self._parsed(lambda: parser.parse_args(argv), subcommand)

    def _parsed(self, parse: Any, subcommand: str | None) -> Namespace:
        try:
            return parse()
        except ArgumentError as error:
            options = self._parser(subcommand)._option_string_actions if subcommand else {}
            self._refuse(subcommand, short_parse_error(str(error), options))

    @staticmethod
    def _refuse(subcommand: str | None, message: str) -> NoReturn:
        command = f"manualbp {subcommand}" if subcommand else "manualbp"
        print(f"{command}: {message}", file=sys.stderr)
        if subcommand:
            print(f"({command} --help lists the common keys)", file=sys.stderr)
        raise SystemExit(2)

    def _short_help(self, subcommand: str) -> str:
        data_parser = ArgumentParser()
        data_parser.add_class_arguments(MNISTDataModule, "data")
        data_actions = [a for a in data_parser._actions if a.dest.startswith("data.")]
        data_class = "manualbp.data.MNISTDataModule"
        return short_help(subcommand, self._parser(subcommand)._actions, data_actions, data_class)

    def _parse_ckpt_path(self) -> None:
        try:
            super()._parse_ckpt_path()
        except ArgumentError as error:
            subcommand = self.config.get("subcommand")
            message = short_parse_error(str(error))
            self._refuse(subcommand, f"the hyperparameters in --ckpt_path do not parse: {message}")

    def instantiate_classes(self) -> None:
        """Build the configured objects; a value a constructor refuses (a negative batch size)
        ends the command with its message instead of a traceback."""
        try:
            super().instantiate_classes()
        except (ValueError, TypeError, MisconfigurationException) as error:
            self._refuse(self.subcommand, short_instantiation_error(error))

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
        # failing on the ModelCheckpoint that section always builds. ``fast_dev_run`` writes no
        # checkpoint (Lightning's ModelCheckpoint would still write last.ckpt at the end, into
        # ./checkpoints as fast_dev_run has no logger).
        if config.get("fast_dev_run"):
            config["enable_checkpointing"] = False
        if config.get("enable_checkpointing") is False:
            callbacks = [c for c in callbacks if not isinstance(c, ModelCheckpoint)]
        callbacks = [*callbacks, RunRecord()]
        given = [*callbacks, *(config.get("callbacks") or [])]
        if config.get("enable_progress_bar") is not False and not any(
            isinstance(c, ProgressBar) for c in given
        ):
            callbacks.append(progress_bar())
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
        self._restore_checkpoint_callbacks_in_place("test")

    def before_validate(self) -> None:
        self._default_to_the_latest_fit("validate")
        self._restore_checkpoint_callbacks_in_place("validate")

    def _restore_checkpoint_callbacks_in_place(self, subcommand: str) -> None:
        """Evaluating a checkpoint restores the state of the ModelCheckpoint that wrote it; in
        the evaluation's own run directory Lightning would warn that the directory changed.
        An evaluation writes no checkpoint, so the callback takes the directory it had."""
        path = self.config_init[subcommand].get("ckpt_path")
        if not path or not Path(path).is_file():
            return
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        states = checkpoint.get("callbacks") or {}
        for callback in self.trainer.checkpoint_callbacks:
            state = states.get(callback.state_key)
            if isinstance(state, dict) and state.get("dirpath"):
                callback.dirpath = state["dirpath"]

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
            self.trainer.test(self.model, datamodule=self.datamodule, verbose=False)
        self._print_summary("fit")

    def after_test(self) -> None:
        self._print_summary("test")

    def after_validate(self) -> None:
        self._print_summary("validate")

    def _print_summary(self, subcommand: str) -> None:
        if self.trainer.is_global_zero:
            print(f"\n{summarize(self.trainer, self.model, subcommand)}", flush=True)


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


def _show_progress_messages() -> None:
    """manualbp's own messages (``MNIST: fetching ...`` on the first run) go to standard error,
    as Lightning's do; without a handler Python would drop them."""
    logger = logging.getLogger("manualbp")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


def cli_main(args: Sequence[str] | None = None, run: bool = True) -> ManualbpCLI:
    """Build (and by default run) the CLI; ``args=None`` reads ``sys.argv``.

    In-process callers (tests, notebooks) get the :class:`ManualbpCLI` back, with its
    ``trainer``, ``model`` and ``datamodule``. Options are never abbreviated.
    """
    silence_third_party_noise()
    _show_progress_messages()
    strict = {"allow_abbrev": False, "exit_on_error": False}
    return ManualbpCLI(
        TwinModule,
        LightningDataModule,
        subclass_mode_data=True,
        trainer_defaults=trainer_defaults(),
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={**strict, **{name: dict(strict) for name in ("fit", "validate", "test")}},
        args=None if args is None else list(args),
        run=run,
    )
