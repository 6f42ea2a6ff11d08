"""The report (figures + results table) on real, tiny training runs.

Three runs through the ``manualbp`` CLI, in process, a few MNIST steps each: a lockstep
two-layer net, and a deep sigmoid net with its ReLU twin (check mode, so the autograd twin has
no validation/test metrics: the report must say so instead of crashing). The table's numbers
are compared with the event files read back here with the shared reader, keeping every logged
value (``read_scalars(..., finite_only=False)``), not taken from the report's ``Run`` objects.
"""

from __future__ import annotations

import math
import runpy
from pathlib import Path

import pytest
from lightning.pytorch.loggers import TensorBoardLogger

from manualbp.data import MNISTDataModule
from manualbp.nn import MLP
from manualbp.tools.report import Published, write_report
from manualbp.tools.runs import discover_runs, read_scalars
from manualbp.train.cli import cli_main
from manualbp.train.module import TwinModule

REPO = Path(__file__).resolve().parents[1]
DEEP_SIZES = "[784, 16, 16, 16, 16, 10]"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _fit(root: Path, data_dir: Path, name: str, *extra: str) -> Path:
    """Train a few steps with the CLI; returns the run's ``version_N`` directory."""
    cli_main(
        [
            "fit",
            f"--trainer.logger.init_args.save_dir={root}",
            f"--trainer.logger.init_args.name={name}",
            f"--data.init_args.data_dir={data_dir}",
            "--data.init_args.batch_size=32",
            "--data.init_args.eval_batch_size=500",
            "--trainer.max_epochs=2",
            "--trainer.limit_train_batches=5",
            "--trainer.limit_val_batches=1",
            "--trainer.limit_test_batches=1",
            "--trainer.log_every_n_steps=1",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false",
            "--trainer.enable_checkpointing=false",
            "--gradient_monitor.norm_every_n_steps=1",
            "--gradient_monitor.histogram_every_n_steps=0",
            "--model.check_every_n_steps=1",
            "--model.net=manualbp.nn.MLP",
            *extra,
        ]
    )
    (version,) = (root / name).glob("version_*")
    return version


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, mnist_root: Path) -> Path:
    """A ``runs/`` root with a lockstep net and a deep sigmoid/ReLU pair."""
    root = tmp_path_factory.mktemp("runs")
    _fit(
        root,
        mnist_root,
        "tiny_lockstep",
        "--model.net.sizes=[784, 24, 10]",
        "--optimizer=torch.optim.SGD",
        "--optimizer.lr=0.05",
        "--optimizer.momentum=0.9",
    )
    for activation in ("sigmoid", "relu"):
        _fit(
            root,
            mnist_root,
            f"tiny_{activation}",
            f"--model.net.sizes={DEEP_SIZES}",
            f"--model.net.activation={activation}",
            "--model.compare=check",
        )
    return root


def _table(markdown: str) -> dict[str, dict[str, str]]:
    """The results table as ``{experiment: {column: cell}}``."""
    lines = [line for line in markdown.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    rows = {}
    for line in lines[2:]:
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        rows[cells[0]] = dict(zip(header, cells, strict=True))
    return rows


def test_discover_takes_latest_version_with_events(runs: Path, tmp_path: Path) -> None:
    found = discover_runs(runs)
    assert [path.parent.name for path in found] == ["tiny_lockstep", "tiny_relu", "tiny_sigmoid"]
    # A newer version without event files (a run that crashed before logging) is skipped.
    empty = tmp_path / "exp" / "version_9"
    empty.mkdir(parents=True)
    assert discover_runs(tmp_path) == []


def test_discover_reads_the_fit_not_the_test_run_beside_it(
    runs: Path, mnist_root: Path, quiet_trainer
) -> None:
    """``manualbp test`` writes a newer version_N holding test scalars only, beside the fit;
    the report reads the fit."""
    logger = TensorBoardLogger(runs, name="tiny_lockstep", default_hp_metric=False)
    data = MNISTDataModule(data_dir=str(mnist_root), eval_batch_size=500)
    trainer = quiet_trainer(logger=logger, limit_test_batches=1)
    trainer.test(TwinModule(net=MLP([784, 24, 10])), datamodule=data)
    versions = sorted(p.name for p in (runs / "tiny_lockstep").iterdir())
    assert versions == ["version_0", "version_1"]
    assert runs / "tiny_lockstep" / "version_0" in discover_runs(runs)


def test_report_writes_every_figure_and_the_event_files_numbers(runs: Path, tmp_path: Path):
    out = tmp_path / "results"
    published = {"tiny_lockstep": Published(0.01, "a made-up reference")}
    written = write_report(discover_runs(runs), out, published=published)

    names = {path.name for path in written}
    expected = {
        "loss_tiny_lockstep.png",
        "loss_tiny_sigmoid.png",
        "loss_tiny_relu.png",
        "grad_check_tiny_lockstep.png",
        "grad_check_tiny_sigmoid.png",
        "grad_check_tiny_relu.png",
        "divergence_tiny_lockstep.png",  # lockstep runs only
        "grad_norms_tiny_sigmoid_vs_tiny_relu.png",
        "test_error.png",
        "results.md",
    }
    assert names == expected
    for path in written:
        assert path.is_file() and path.parent == out
        if path.suffix == ".png":
            assert path.read_bytes()[:8] == PNG_MAGIC
            assert 5_000 < path.stat().st_size < 150_000

    markdown = (out / "results.md").read_text()
    table = _table(markdown)
    assert set(table) == {"tiny_lockstep", "tiny_relu", "tiny_sigmoid"}
    for png in expected - {"results.md"}:
        assert f"({png})" in markdown

    lockstep = read_scalars(runs / "tiny_lockstep" / "version_0", finite_only=False)
    row = table["tiny_lockstep"]
    manual = 100 * (1 - lockstep["test/acc/manual"].last)
    autograd = 100 * (1 - lockstep["test/acc/autograd"].last)
    assert row["test error manual (%)"] == f"{manual:.2f}"
    assert row["test error autograd (%)"] == f"{autograd:.2f}"
    assert row["difference (pp)"] == f"{manual - autograd:+.2f}"
    worst = lockstep["grad_check/max_rel"].values.max()
    assert row["worst grad max_rel"] == f"{worst:.2e}"
    assert row["epochs"] == "2"
    assert row["architecture"] == "784-24-10 relu"
    assert row["loss"] == "cross_entropy"
    assert row["published (%)"] == "0.01 (a made-up reference)"
    assert f"{manual - 0.01:.2f} pp above published" in row["notes"]
    assert "not plotted" not in row["notes"]

    # Check mode: the autograd twin has no test metrics; the table says so.
    for name in ("tiny_sigmoid", "tiny_relu"):
        scalars = read_scalars(runs / name / "version_0", finite_only=False)
        assert "test/acc/autograd" not in scalars
        row = table[name]
        manual = 100 * (1 - scalars["test/acc/manual"].last)
        assert row["test error manual (%)"] == f"{manual:.2f}"
        assert row["test error autograd (%)"] == "n/a"
        assert row["difference (pp)"] == "n/a"
        assert "no test/acc/autograd (check mode)" in row["notes"]
        assert "not plotted: val/loss/autograd" in row["notes"]
        assert row["published (%)"] == "n/a"


def test_deep_sigmoid_gradients_vanish_towards_the_input(runs: Path) -> None:
    """The data behind the norms figure: at step 0 the sigmoid net's first layer gets a far
    smaller gradient than its last, the ReLU net's does not shrink as much."""
    ratios = {}
    for name in ("tiny_sigmoid", "tiny_relu"):
        scalars = read_scalars(runs / name / "version_0", finite_only=False)
        first = dict(scalars["grad_norm/manual/fc1.weight"].pairs())[0]
        last = dict(scalars["grad_norm/manual/fc5.weight"].pairs())[0]
        ratios[name] = first / last
    assert ratios["tiny_sigmoid"] < ratios["tiny_relu"]
    assert math.isfinite(ratios["tiny_sigmoid"]) and ratios["tiny_sigmoid"] > 0


def test_missing_tags_are_skipped_not_fatal(tmp_path: Path) -> None:
    """A run with only a manual training loss: one figure, a table row of n/a with notes."""
    from torch.utils.tensorboard import SummaryWriter

    run_dir = tmp_path / "runs" / "partial" / "version_0"
    writer = SummaryWriter(str(run_dir))
    for step in range(5):
        writer.add_scalar("train/loss/manual", 2.0 / (step + 1), step)
    writer.close()
    written = write_report([run_dir], tmp_path / "out")
    assert [path.name for path in written] == ["loss_partial.png", "results.md"]
    row = _table(written[-1].read_text())["partial"]
    assert row["test error manual (%)"] == "n/a"
    assert row["worst grad max_rel"] == "n/a"
    assert "no test/acc/manual" in row["notes"] and "no gradient check" in row["notes"]


def test_script_discovers_runs_and_fails_cleanly_without(runs: Path, tmp_path: Path) -> None:
    script = runpy.run_path(str(REPO / "scripts" / "report.py"), run_name="report_script")
    out = tmp_path / "out"
    assert script["main"](["--runs", str(runs), "--out", str(out)]) == 0
    assert (out / "results.md").is_file()
    assert (out / "grad_norms_tiny_sigmoid_vs_tiny_relu.png").is_file()
    explicit = tmp_path / "explicit"
    lockstep = runs / "tiny_lockstep" / "version_0"
    assert script["main"](["--out", str(explicit), str(lockstep)]) == 0
    assert set(_table((explicit / "results.md").read_text())) == {"tiny_lockstep"}
    assert script["main"](["--runs", str(tmp_path / "nothing"), "--out", str(explicit)]) == 1
