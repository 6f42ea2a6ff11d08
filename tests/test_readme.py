"""The README runs as written: every Python block is executed, every shell command is checked
(the table :data:`SHELL_CHECKS` says how), and the Function it shows is the one in the package.

The shell commands, one by one:

* ``python -m venv .venv && source .venv/bin/activate``: run as written in an empty directory;
  the activated interpreter must live in the new ``.venv``.
* ``pip install torch torchvision --index-url .../whl/cpu`` and ``pip install -e ".[dev]"``:
  always, the project's requirements must accept the CPU builds (``2.x+cpu``) so that the second
  line keeps them; the two lines themselves run, in that order, in a fresh venv only when
  ``MANUALBP_TEST_INSTALL=1`` (they download torch and the ``[dev]`` extra: minutes, about a GB).
* ``manualbp fit --config experiments/mnist_mlp.yaml``: run as written from a directory holding
  ``experiments/``, with MNIST from the test data root (``MANUALBP_DATA_DIR``) and these options
  appended to shorten it to 2 training batches and one epoch: :data:`SHORTEN`. It must end with
  the summary and leave ``runs/mnist_mlp/version_0``.
* ``tensorboard --logdir runs``: run with ``--inspect`` (which reads the event files and exits
  instead of serving them) in the directory of that fit; it must find the run's tags.
* ``pytest``: run with ``--collect-only`` from the repository root (running the suite inside
  itself would recurse); it must collect the suite without errors, this file included.
"""

from __future__ import annotations

import importlib.metadata
import inspect
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement

import manualbp.functional as MF

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SHORTEN = [
    "--trainer.max_epochs=1",
    "--trainer.limit_train_batches=2",
    "--trainer.limit_val_batches=1",
    "--trainer.limit_test_batches=1",
    "--trainer.log_every_n_steps=1",
]
VENV = "python -m venv .venv && source .venv/bin/activate"
CPU_TORCH = "pip install torch torchvision --index-url https://download.pytorch.org/whl/cpu"
INSTALL = 'pip install -e ".[dev]"'
FIT = "manualbp fit --config experiments/mnist_mlp.yaml"
TENSORBOARD = "tensorboard --logdir runs"
PYTEST = "pytest"
SHELL_CHECKS = {
    VENV: "test_the_venv_line_makes_and_activates_a_venv",
    CPU_TORCH: "test_the_install_lines_in_a_fresh_venv",
    INSTALL: "test_the_install_lines_in_a_fresh_venv",
    FIT: "test_the_fit_line_runs_and_ends_with_the_summary",
    TENSORBOARD: "test_the_tensorboard_line_finds_the_run",
    PYTEST: "test_the_pytest_line_collects_the_suite",
}
"""Every shell command of the README → the test that checks it."""


def code_blocks(language: str) -> list[str]:
    """Every fenced code block of the README in ``language``, in order."""
    return re.findall(rf"^```{language}\n(.*?)^```", README.read_text(), flags=re.M | re.S)


def shell_commands() -> list[str]:
    return [
        line.strip()
        for block in code_blocks("bash")
        for line in block.splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]


def bash(script: str, cwd: Path, env: dict[str, str] | None = None, timeout: int = 600):
    return subprocess.run(
        ["bash", "-c", script],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


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
    assert len(README.read_text().splitlines()) <= 160


def test_every_shell_command_of_the_readme_is_checked() -> None:
    assert sorted(shell_commands()) == sorted(SHELL_CHECKS)
    tests = {name for name, _ in inspect.getmembers(sys.modules[__name__], inspect.isfunction)}
    assert set(SHELL_CHECKS.values()) <= tests


@pytest.mark.slow
def test_the_venv_line_makes_and_activates_a_venv(tmp_path: Path) -> None:
    result = bash(f'{VENV} && python -c "import sys; print(sys.prefix)"', tmp_path)
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.strip()) == tmp_path / ".venv"


def test_the_cpu_torch_build_satisfies_the_projects_requirement() -> None:
    """``pip install -e ".[dev]"`` after the CPU line keeps the CPU builds: the requirements
    admit their local versions, so pip has nothing to replace."""
    requirements = [Requirement(r) for r in importlib.metadata.requires("manualbp") or []]
    (torch,) = [r for r in requirements if r.name == "torch" and r.marker is None]
    assert torch.specifier.contains("2.14.1+cpu")
    (torchvision,) = [r for r in requirements if r.name == "torchvision"]
    assert torchvision.specifier.contains("0.29.1+cpu")
    assert "dev" in (importlib.metadata.metadata("manualbp").get_all("Provides-Extra") or [])
    assert CPU_TORCH.split("--index-url ")[1] == "https://download.pytorch.org/whl/cpu"


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("MANUALBP_TEST_INSTALL") != "1",
    reason="downloads torch and the [dev] extra into a fresh venv (minutes, about a GB); "
    "set MANUALBP_TEST_INSTALL=1 to run it",
)
def test_the_install_lines_in_a_fresh_venv(tmp_path: Path) -> None:
    script = (
        f"{VENV} && {CPU_TORCH} && cd {shlex.quote(str(ROOT))} && {INSTALL} && "
        'python -c "import torch; print(torch.version.cuda)" && manualbp --help'
    )
    result = bash(script, tmp_path, timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "\nNone\n" in result.stdout  # the CPU build stayed: no CUDA
    assert "fetch-data" in result.stdout


@pytest.fixture(scope="module")
def readme_fit(tmp_path_factory, mnist_root) -> tuple[Path, subprocess.CompletedProcess]:
    """The README's fit command, as written plus :data:`SHORTEN`, in a directory holding
    ``experiments/`` (a link to the repository's)."""
    workdir = tmp_path_factory.mktemp("readme")
    (workdir / "experiments").symlink_to(ROOT / "experiments")
    bin_dir = Path(sys.executable).parent
    command = f"{FIT} {' '.join(SHORTEN)}"
    env = {"MANUALBP_DATA_DIR": str(mnist_root), "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    return workdir, bash(command, workdir, env=env)


@pytest.mark.slow
def test_the_fit_line_runs_and_ends_with_the_summary(readme_fit) -> None:
    workdir, result = readme_fit
    assert result.returncode == 0, result.stderr[-3000:]
    tail = result.stdout.splitlines()[-6:]
    assert tail[0] == "manualbp fit: runs/mnist_mlp/version_0, 1 epoch (2 steps), compare=lockstep"
    assert tail[-1].startswith("  open it            tensorboard --logdir runs/mnist_mlp/version_0")
    assert (workdir / "runs" / "mnist_mlp" / "version_0" / "checkpoints" / "last.ckpt").is_file()


@pytest.mark.slow
def test_the_tensorboard_line_finds_the_run(readme_fit) -> None:
    workdir, fit = readme_fit
    assert fit.returncode == 0
    bin_dir = Path(sys.executable).parent
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}"}
    result = bash(f"{TENSORBOARD} --inspect", workdir, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "runs/mnist_mlp/version_0" in result.stdout
    assert "train/loss/autograd" in result.stdout and "grad_check/max_rel" in result.stdout


@pytest.mark.slow
def test_the_pytest_line_collects_the_suite() -> None:
    bin_dir = Path(sys.executable).parent
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}"}
    result = bash(f"{PYTEST} --collect-only -q -p no:cacheprovider", ROOT, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "tests/test_readme.py::test_the_pytest_line_collects_the_suite" in result.stdout
    assert re.search(r"\d+ tests collected", result.stdout)
