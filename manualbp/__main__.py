"""The ``manualbp`` command (also ``python -m manualbp``): one entry point, one subcommand each.

Each subcommand imports only the wing it needs, so ``manualbp --help`` answers at once and a
command whose extra is not installed says which one to install.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence

USAGE = """\
usage: manualbp <command> [options]

Handwritten backpropagation, proven against PyTorch autograd.

commands:
  fit         train a manual network beside its autograd twin, then test both
              (manualbp fit --config experiments/mnist_mlp.yaml)
  validate    evaluate a checkpoint on the validation split
  test        evaluate a checkpoint on the test split
  fetch-data  provision MNIST and verify every file (manualbp fetch-data --root ./data)
  check       prove an autograd.Function against a reference, no [train] extra needed
              (manualbp check mine:Softplus.apply --reference torch.nn.functional:softplus)

`manualbp <command> --help` lists a command's options."""


def _lightning_cli(argv: Sequence[str]) -> int:
    from manualbp.train.cli import cli_main

    cli_main(list(argv))
    return 0


def _fetch_data(argv: Sequence[str]) -> int:
    from manualbp.data.provision import fetch_main

    return fetch_main(list(argv))


def _check(argv: Sequence[str]) -> int:
    from manualbp.check_command import main as check_main

    return check_main(list(argv))


COMMANDS: dict[str, Callable[[Sequence[str]], int]] = {
    "fit": _lightning_cli,
    "validate": _lightning_cli,
    "test": _lightning_cli,
    "fetch-data": lambda argv: _fetch_data(argv[1:]),
    "check": lambda argv: _check(argv[1:]),
}


def main(argv: Sequence[str] | None = None) -> None:
    """Run the subcommand named by ``argv[0]`` (``argv=None`` reads ``sys.argv``)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if os.getcwd() not in sys.path:  # like `python -m`: class paths may name your own files
        sys.path.insert(0, os.getcwd())
    if not args or args[0] in ("-h", "--help"):
        print(USAGE)
        raise SystemExit(0 if args else 2)
    command = COMMANDS.get(args[0])
    if command is None:
        print(
            f"manualbp: unknown command {args[0]!r}; expected one of {', '.join(COMMANDS)}\n",
            file=sys.stderr,
        )
        print(USAGE, file=sys.stderr)
        raise SystemExit(2)
    try:
        code = command(args)
    except ModuleNotFoundError as error:
        if error.name and error.name.split(".")[0] in _TRAIN_EXTRA:
            raise SystemExit(
                f"manualbp {args[0]}: needs {error.name}, part of the [train] extra; install it "
                f'with pip install "manualbp[train]" (or pip install -e ".[dev]" in a checkout)'
            ) from None
        raise
    raise SystemExit(code)


_TRAIN_EXTRA = ("lightning", "torchvision", "tensorboard", "jsonargparse", "matplotlib", "yaml")

if __name__ == "__main__":
    main()
