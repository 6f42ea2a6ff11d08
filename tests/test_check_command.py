"""``manualbp check``: the real console script on a user's file, exit codes 0 / 1 / 2, and a
core-only install (the [train] extra unimportable)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from manualbp.check_command import main, parse_shape

TRAIN_EXTRA = ("lightning", "torchvision", "tensorboard", "jsonargparse", "matplotlib", "yaml")

# A user's file, as the documentation shows it: a correct softplus and one with a planted
# mistake (the input kept on ctx instead of saved).
MY_FUNCTIONS = """
import torch
import torch.nn.functional as F


class SoftplusFunction(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return F.softplus(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, grad_output):
        (x,) = ctx.saved_tensors
        return grad_output * torch.sigmoid(x)


class SoftplusKeepsInput(SoftplusFunction):
    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.input = inputs[0]

    @staticmethod
    def backward(ctx, grad_output):
        return grad_output * torch.sigmoid(ctx.input)
"""

SOFTPLUS = "torch.nn.functional:softplus"


def manualbp_command() -> str:
    """The installed console script, next to this interpreter when it is in a venv."""
    script = shutil.which("manualbp", path=str(Path(sys.executable).parent))
    script = script or shutil.which("manualbp")
    assert script, "the manualbp console script is not installed (pip install -e .)"
    return script


@pytest.fixture
def user_folder(tmp_path: Path) -> Path:
    (tmp_path / "my_functions.py").write_text(MY_FUNCTIONS)
    return tmp_path


def run_check(folder: Path, *arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [manualbp_command(), "check", *arguments],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_a_correct_function_exits_0_and_prints_the_table(user_folder: Path) -> None:
    result = run_check(
        user_folder,
        "my_functions:SoftplusFunction.apply",
        "--reference",
        SOFTPLUS,
        "--input",
        "8,5",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "| property " in result.stdout and "| forward " in result.stdout
    assert "ok: no property failed" in result.stdout


def test_a_planted_mistake_exits_1_naming_the_property(user_folder: Path) -> None:
    result = run_check(
        user_folder,
        "my_functions:SoftplusKeepsInput.apply",
        "--reference",
        SOFTPLUS,
        "--input",
        "8,5",
        "--kwargs",
        "{}",
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "FAILED: saved_tensors" in result.stdout


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["my_functions", "--reference", SOFTPLUS, "--input", "3"], "is not MODULE:CALLABLE"),
        (
            ["not_a_module:f", "--reference", SOFTPLUS, "--input", "3"],
            "cannot import 'not_a_module'",
        ),
        (
            ["my_functions:SoftplusFunction.apply", "--reference", SOFTPLUS, "--input", "3,a"],
            "bad shape",
        ),
    ],
    ids=["bad-spec", "unimportable-module", "bad-shape"],
)
def test_a_usage_error_exits_2_with_one_line(
    user_folder: Path, arguments: list[str], message: str
) -> None:
    result = run_check(user_folder, *arguments)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("manualbp check: ")
    assert message in result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["my_functions:Nope", "--reference", SOFTPLUS, "--input", "3"], "has no attribute 'Nope'"),
        (["torch:pi", "--reference", SOFTPLUS, "--input", "3"], "is a float, not a callable"),
        (["my_functions:SoftplusFunction.apply", "--input", "3"], "required: --reference"),
        (
            [
                "my_functions:SoftplusFunction.apply",
                "--reference",
                SOFTPLUS,
                "--input",
                "3",
                "--kwargs",
                "[1]",
            ],
            "expected a JSON object",
        ),
        (
            [
                "my_functions:SoftplusFunction.apply",
                "--reference",
                SOFTPLUS,
                "--input",
                "3",
                "--kwargs",
                "{",
            ],
            "not valid JSON",
        ),
        (
            [
                "my_functions:SoftplusFunction.apply",
                "--reference",
                "torch.nn.functional:linear",
                "--input",
                "3",
            ],
            "the reference torch.nn.functional.linear raised on the samples",
        ),
        (
            [
                "my_functions:SoftplusFunction.apply",
                "--reference",
                SOFTPLUS,
                "--input",
                "3",
                "--dtype",
                "int8",
            ],
            "invalid choice",
        ),
    ],
    ids=[
        "missing-attribute",
        "not-callable",
        "no-reference",
        "kwargs-not-object",
        "kwargs-not-json",
        "reference-raises",
        "bad-dtype",
    ],
)
def test_usage_errors_name_what_is_wrong(
    user_folder: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
    arguments: list[str],
    message: str,
) -> None:
    monkeypatch.chdir(user_folder)
    monkeypatch.syspath_prepend(str(user_folder))
    try:
        code = main(arguments)
    except SystemExit as exit:  # argparse's own errors
        code = exit.code
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


@pytest.mark.parametrize(
    "text, shape",
    [("8,5", (8, 5)), ("8x5", (8, 5)), ("(8, 5)", (8, 5)), ("7", (7,)), ("(3,)", (3,)), ("()", ())],
)
def test_shapes_are_read_in_the_usual_spellings(text: str, shape: tuple[int, ...]) -> None:
    assert parse_shape(text) == shape


def test_check_works_without_the_train_extra(user_folder: Path) -> None:
    """With Lightning, torchvision, TensorBoard, ... unimportable, ``manualbp check`` runs a
    user's file from the working directory and imports none of them."""
    blocked = ", ".join(repr(name) for name in TRAIN_EXTRA)
    script = textwrap.dedent(
        f"""
        import importlib.abc, sys

        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ({blocked}):
                    raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)

        sys.meta_path.insert(0, Block())
        from manualbp.__main__ import main
        try:
            main(["check", "my_functions:SoftplusFunction.apply", "--reference",
                  "torch.nn.functional:softplus", "--input", "6,4"])
        except SystemExit as exit:
            assert exit.code == 0, exit.code
        assert not any(name.split(".")[0] in ({blocked}) for name in sys.modules)
        print("core check ok")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=user_folder, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "ok: no property failed" in result.stdout and "core check ok" in result.stdout
