"""``manualbp check``: :func:`manualbp.check` from the shell (core only: torch, no Lightning).

    manualbp check my_functions:SoftplusFunction.apply \\
        --reference torch.nn.functional:softplus --input 8,5

``MODULE:CALLABLE`` names any importable callable (the working directory is on ``sys.path``, so
a file ``my_functions.py`` there is module ``my_functions``); ``CALLABLE`` may be dotted
(``SoftplusFunction.apply``). Every ``--input SHAPE`` is drawn from a standard normal (seeded)
in ``--dtype`` on ``--device`` and requires grad; ``--kwargs`` is a JSON object passed to both
callables. Prints the report; exits 0 when no property failed, 1 when one did, 2 on a usage
error (a bad spec, an unimportable module, a bad shape, a reference that cannot run on the
inputs), with a one-line message.
"""

from __future__ import annotations

import argparse
import importlib
import json
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

import torch

from manualbp.checks import CheckUsageError, check_properties

__all__ = ["main"]

DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


class UsageError(Exception):
    """A mistake in the command line; its message is the one line printed."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="manualbp check",
        description="Prove a callable (e.g. your autograd.Function's apply) against a "
        "reference: forward, backward, gradcheck, gradgradcheck, vmap, compile, autocast, "
        "non_contiguous, saved_tensors, needs_input_grad.",
    )
    parser.add_argument("function", metavar="MODULE:CALLABLE", help="the callable under test")
    parser.add_argument(
        "--reference",
        required=True,
        metavar="MODULE:CALLABLE",
        help="what it must agree with, e.g. torch.nn.functional:softplus",
    )
    parser.add_argument(
        "--input",
        action="append",
        required=True,
        metavar="SHAPE",
        type=parse_shape,
        help="one positional tensor argument, e.g. 8,5 (repeat for more; () for a scalar)",
    )
    parser.add_argument(
        "--dtype", default="float32", choices=tuple(DTYPES), help="of every input (float32)"
    )
    parser.add_argument(
        "--kwargs",
        default={},
        metavar="JSON",
        type=parse_kwargs,
        help="keyword arguments of both callables, e.g. '{\"beta\": 2.0}'",
    )
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda, ...")
    parser.add_argument("--seed", type=int, default=0, help="of the inputs and upstream gradients")
    parser.add_argument(
        "--compile-backend",
        default="aot_eager",
        help="torch.compile backend of the compile property (aot_eager; inductor is slower)",
    )
    return parser


def parse_shape(text: str) -> tuple[int, ...]:
    """``"8,5"``, ``"8x5"``, ``"(8, 5)"`` → ``(8, 5)``; ``"()"`` → ``()``."""
    inner = text.strip().strip("()[]").strip()
    if not inner:
        return ()
    parts = [part.strip() for part in re.split(r"[,x]", inner)]
    if parts[-1] == "":  # "(8,)"
        parts.pop()
    if not parts or not all(part.isdigit() for part in parts):
        raise argparse.ArgumentTypeError(
            f"bad shape {text!r}: expected non-negative integers separated by commas, e.g. 8,5"
        )
    return tuple(int(part) for part in parts)


def parse_kwargs(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"--kwargs is not valid JSON ({error})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(
            f"expected a JSON object, e.g. '{{\"beta\": 2.0}}', got {text!r}"
        )
    return value


def resolve(spec: str) -> Callable[..., Any]:
    """``"package.module:Name.attribute"`` → that object, which must be callable."""
    module_name, colon, attribute = spec.partition(":")
    if not colon or not module_name or not attribute:
        raise UsageError(f"{spec!r} is not MODULE:CALLABLE, e.g. my_functions:Softplus.apply")
    try:
        target: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name and module_name.startswith(error.name):
            raise UsageError(
                f"cannot import {module_name!r}: no such module (run from the folder that "
                f"holds it, or install it)"
            ) from None
        raise UsageError(f"importing {module_name!r} failed: {_one_line(error)}") from None
    except Exception as error:
        raise UsageError(f"importing {module_name!r} failed: {_one_line(error)}") from None
    path = module_name
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise UsageError(f"{spec!r}: {path!r} has no attribute {part!r}")
        target = getattr(target, part)
        path = f"{path}.{part}"
    if not callable(target):
        raise UsageError(f"{spec!r} is a {type(target).__name__}, not a callable")
    return target


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}"


def _inputs(
    shapes: Sequence[tuple[int, ...]], dtype: torch.dtype, device: str, seed: int
) -> list[torch.Tensor]:
    try:
        device_ = torch.device(device)
        torch.empty(0, device=device_)
    except (RuntimeError, AssertionError) as error:
        raise UsageError(f"--device {device}: {_one_line(error)}") from None
    generator = torch.Generator().manual_seed(seed)
    return [
        torch.randn(shape, generator=generator, dtype=torch.float64)
        .to(dtype=dtype, device=device_)
        .requires_grad_()
        for shape in shapes
    ]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; returns the exit code (0 ok, 1 a property failed, 2 usage error)."""
    arguments = _parser().parse_args(None if argv is None else list(argv))
    try:
        function = resolve(arguments.function)
        reference = resolve(arguments.reference)
        inputs = _inputs(arguments.input, DTYPES[arguments.dtype], arguments.device, arguments.seed)
        report = check_properties(
            function,
            reference,
            inputs,
            arguments.kwargs,
            seed=arguments.seed,
            compile_backend=arguments.compile_backend,
        )
    except (UsageError, CheckUsageError) as error:
        message = " ".join(str(error).removeprefix("check: ").split())
        print(f"manualbp check: {message}", file=sys.stderr)
        return 2
    print(report)
    return 0 if report.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
