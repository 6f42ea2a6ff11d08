"""The README's code runs as written, and the Function it shows is the one in the package."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

import manualbp.functional as MF

README = Path(__file__).resolve().parents[1] / "README.md"


def code_blocks(language: str) -> list[str]:
    """Every fenced code block of the README in ``language``, in order."""
    return re.findall(rf"^```{language}\n(.*?)^```", README.read_text(), flags=re.M | re.S)


def test_the_readme_has_python_blocks() -> None:
    assert len(code_blocks("python")) >= 2


@pytest.mark.parametrize("index", range(len(code_blocks("python"))))
def test_python_block_runs_as_written(index: int, capsys: pytest.CaptureFixture[str]) -> None:
    block = code_blocks("python")[index]
    exec(compile(block, f"README.md python block {index}", "exec"), {"__name__": "readme"})


def test_the_function_shown_is_the_packages_own() -> None:
    """The SigmoidFunction in the README is a verbatim copy of manualbp.functional's."""
    shown = next(block for block in code_blocks("python") if "class SigmoidFunction" in block)
    source = inspect.getsource(MF.SigmoidFunction)
    assert source in shown, "README's SigmoidFunction differs from manualbp/functional.py"
    assert "def backward" in source


def test_readme_is_a_front_door() -> None:
    assert len(README.read_text().splitlines()) <= 135
