"""The ``manualbp`` command end to end on real MNIST (CPU): fit, its TensorBoard logs and
checkpoints, what it prints (the summary, a line per epoch, no third-party noise),
``test``/``validate`` on the checkpoint, the short help and the one-line config errors."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2
from tensorboard.plugins.hparams import plugin_data_pb2

from manualbp.nn import is_handwritten
from manualbp.tools.runs import Series, read_scalars
from manualbp.train.cli import cli_main
from manualbp.train.module import HP_METRICS

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
TENSORBOARD_DOC = Path(__file__).resolve().parents[1] / "docs" / "tensorboard.md"
TRAIN_STEPS = 12
CHECK_EVERY = 4  # grad_check/* and divergence/* at steps 0, 4, 8
NORM_EVERY = 3  # grad_norm/* at steps 0, 3, 6, 9
HISTOGRAM_EVERY = 5  # grad/* and weight/* histograms at steps 0, 5, 10
LOG_EVERY = 4  # train/* at steps 3, 7, 11


def manualbp_command() -> str:
    """The installed console script, next to this interpreter when it is in a venv."""
    script = shutil.which("manualbp", path=str(Path(sys.executable).parent))
    script = script or shutil.which("manualbp")
    assert script, "the manualbp console script is not installed (pip install -e .)"
    return script


@dataclass
class FitRun:
    """One ``manualbp fit`` run of experiments/mnist_mlp.yaml, shrunk to a few batches."""

    result: subprocess.CompletedProcess
    log_dir: Path
    scalars: dict[str, Series]
    """Every scalar tag, NaN placeholders of the hparams tab included."""
    events: EventAccumulator
    """Only for what the scalar reader does not give: histograms and the hparams plugin data."""


def run_options(root: Path, data_dir: Path, name: str) -> list[str]:
    return [
        f"--config={EXPERIMENTS / 'mnist_mlp.yaml'}",
        f"--data.init_args.data_dir={data_dir}",
        f"--trainer.logger.init_args.save_dir={root}",
        f"--trainer.logger.init_args.name={name}",
        "--trainer.max_epochs=1",
        "--trainer.limit_val_batches=2",
        "--trainer.limit_test_batches=2",
    ]


@pytest.fixture(scope="module")
def fit_run(tmp_path_factory, mnist_root) -> FitRun:
    """The real console script in a subprocess, as a user runs it (progress bar on)."""
    root = tmp_path_factory.mktemp("cli")
    command = [
        manualbp_command(),
        "fit",
        *run_options(root, mnist_root, "fit"),
        f"--trainer.limit_train_batches={TRAIN_STEPS}",
        f"--trainer.log_every_n_steps={LOG_EVERY}",
        f"--model.check_every_n_steps={CHECK_EVERY}",
        f"--gradient_monitor.norm_every_n_steps={NORM_EVERY}",
        f"--gradient_monitor.histogram_every_n_steps={HISTOGRAM_EVERY}",
    ]
    result = subprocess.run(
        command, cwd=root, capture_output=True, text=True, timeout=300, env=dict(os.environ)
    )
    log_dir = root / "fit" / "version_0"
    scalars = read_scalars(log_dir, finite_only=False) if log_dir.is_dir() else {}
    events = EventAccumulator(str(log_dir), size_guidance={"histograms": 0, "tensors": 0})
    if log_dir.is_dir():
        events.Reload()
    return FitRun(result, log_dir, scalars, events)


def test_fit_exits_zero_and_saves_checkpoints(fit_run):
    assert fit_run.result.returncode == 0, fit_run.result.stderr[-4000:]
    assert "Traceback" not in fit_run.result.stderr
    checkpoints = sorted(p.name for p in (fit_run.log_dir / "checkpoints").glob("*.ckpt"))
    assert "last.ckpt" in checkpoints
    # The best checkpoint carries the monitored metric in its name.
    assert any(name.startswith("epoch=0-val_acc=0.") for name in checkpoints), checkpoints
    assert (fit_run.log_dir / "config.yaml").is_file()
    assert (fit_run.log_dir / "hparams.yaml").is_file()


def test_fit_prints_the_summary_one_line_per_epoch_and_no_noise(fit_run):
    """Piped (not a terminal): no progress-bar refreshes, one line for the one epoch; at the
    end the summary instead of Lightning's metrics table; none of the third-party notices."""
    out, err = fit_run.result.stdout, fit_run.result.stderr
    lines = out.splitlines()
    epochs = [line for line in lines if line.startswith("epoch ")]
    assert len(epochs) == 1 and epochs[0].startswith(f"epoch 1/1  step {TRAIN_STEPS}  train loss")
    summary = "\n".join(
        lines[lines.index("manualbp fit: fit/version_0, 1 epoch (12 steps), compare=lockstep") :]
    )
    assert re.search(r"test accuracy +manual \d+\.\d\d%  autograd \d+\.\d\d%", summary)
    assert re.search(r"test loss +manual [\d.]+  autograd [\d.]+", summary)
    assert re.search(
        r"gradient check +passed: 3 checks, worst max_rel \d\.\de-\d\d <= 1e-05", summary
    )
    assert re.search(r"weight divergence +\d\.\de[-+]\d\d = max", summary)
    assert "tensorboard --logdir fit/version_0" in summary
    for noise in ("Test metric", "LeafSpec", "litlogger", "Warning", "warn(", "\r"):
        assert noise not in out + err, noise
    assert len(lines) + len(err.splitlines()) < 40, out + err


def test_tensorboard_overlays_the_twins_in_custom_scalars(fit_run):
    """The CUSTOM SCALARS layout is written once, and every chart in it draws tags the run
    logged: both twins' training losses on one chart, and so on."""
    tensors = fit_run.events.Tensors("custom_scalars__config__")
    assert len(tensors) == 1
    layout = layout_pb2.Layout.FromString(tensors[0].tensor_proto.string_val[0])
    charts = {
        chart.title: list(chart.multiline.tag)
        for category in layout.category
        for chart in category.chart
    }
    assert charts["train loss"] == ["^train/loss/(manual|autograd)$"]
    for title, patterns in charts.items():
        drawn = [tag for tag in fit_run.scalars if any(re.match(p, tag) for p in patterns)]
        assert drawn, f"chart {title!r} matches no logged tag"
    assert len([t for t in fit_run.scalars if re.match(charts["train loss"][0], t)]) == 2
    assert "gradient norm per layer, manual vs autograd" in {c.title for c in layout.category}


def documented_tags() -> list[re.Pattern]:
    """The tags of the table under ``## Tags`` in docs/tensorboard.md, as patterns
    (``<twin>``: manual or autograd, ``<param>``: a parameter name)."""
    text = TENSORBOARD_DOC.read_text()
    start = text.index("## Tags")
    table = text[start : text.index("\n## ", start)]
    patterns = []
    for line in table.splitlines():
        if line.startswith("| `"):
            for tag in re.findall(r"`([^`]+)`", line.split(" | ")[0]):
                regex = re.escape(tag).replace("<twin>", "(manual|autograd)")
                patterns.append(re.compile(regex.replace("<param>", r"[^/]+")))
    return patterns


def test_the_docs_list_every_tag_of_a_run(fit_run):
    patterns = documented_tags()
    tags = set(fit_run.scalars) | set(fit_run.events.Tags()["histograms"])
    undocumented = sorted(tag for tag in tags if not any(p.fullmatch(tag) for p in patterns))
    assert not undocumented, undocumented
    unused = [p.pattern for p in patterns if not any(p.fullmatch(tag) for tag in tags)]
    assert not unused, unused


def test_fit_logs_the_stable_tags_at_their_steps(fit_run):
    scalars = fit_run.scalars
    params = ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")
    for model in ("manual", "autograd"):
        for metric in ("loss", "acc"):
            tag = f"train/{metric}/{model}"
            assert scalars[tag].steps.tolist() == [3, 7, 11], tag
        for tag in (f"val/acc/{model}", f"val/loss/{model}", f"test/acc/{model}"):
            assert tag in scalars
        for param in params:
            assert scalars[f"grad_norm/{model}/{param}"].steps.tolist() == [0, 3, 6, 9]
    for param in params:
        for statistic in ("exact", "max_abs", "max_rel", "max_ulp", "cosine", "norm_ratio"):
            assert scalars[f"grad_check/{param}/{statistic}"].steps.tolist() == [0, 4, 8]
        assert scalars[f"divergence/{param}"].steps.tolist() == [0, 4, 8]
    for value in scalars["grad_check/max_rel"].values:
        assert value < 1e-5
    for tag in (
        "grad_check/worst_max_rel",
        "grad_check/all_exact",
        "divergence/max",
        "lr/manual",
        "lr/autograd",
    ):
        assert tag in scalars
    assert (
        scalars["lr/manual"].pairs() == scalars["lr/autograd"].pairs() == [(0, pytest.approx(0.01))]
    )

    histograms = set(fit_run.events.Tags()["histograms"])
    for model in ("manual", "autograd"):
        for param in params:
            for kind in ("grad", "weight"):
                tag = f"{kind}/{model}/{param}"
                assert tag in histograms
                assert [h.step for h in fit_run.events.Histograms(tag)] == [0, 5, 10]


def test_fit_writes_the_hparams_tab_and_final_hp_metrics(fit_run):
    content = fit_run.events.PluginTagToContent("hparams")
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"])
    metric_names = {info.name.tag for info in experiment.experiment.metric_infos}
    assert metric_names == set(HP_METRICS)
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    hparams = start.session_start_info.hparams
    assert hparams["lr"].number_value == pytest.approx(0.01)
    assert hparams["optimizer"].string_value == "SGD"
    assert hparams["net"].string_value == "MLP"
    assert hparams["compare"].string_value == "lockstep"
    assert not any(name.startswith("_") for name in hparams)
    assert hparams["data.batch_size"].number_value == 64
    # Every hp/* metric of a fit + test run gets a real value after its placeholder.
    scalars = fit_run.scalars
    for metric in HP_METRICS:
        step, value = scalars[metric].pairs()[-1]
        assert step > 0 and value == value, metric  # not the step-0 NaN placeholder
    assert scalars["hp/val_acc_manual"].last == scalars["val/acc/manual"].last
    assert scalars["hp/test_acc_manual"].last == pytest.approx(scalars["test/acc/manual"].last)
    worst = scalars["grad_check/max_rel"].values.max()
    assert scalars["hp/worst_grad_max_rel"].last == pytest.approx(worst)


@pytest.mark.parametrize("subcommand", ["test", "validate"])
def test_test_and_validate_run_on_the_checkpoint(fit_run, mnist_root, tmp_path, capsys, subcommand):
    assert fit_run.result.returncode == 0
    checkpoint = fit_run.log_dir / "checkpoints" / "last.ckpt"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cli = cli_main(
            [
                subcommand,
                *run_options(tmp_path, mnist_root, subcommand),
                f"--ckpt_path={checkpoint}",
                "--trainer.enable_progress_bar=false",
            ]
        )
    # The evaluation writes no checkpoint: Lightning's "dirpath has changed" does not apply.
    assert not [str(w.message) for w in caught], [str(w.message) for w in caught]
    out = capsys.readouterr().out
    label = "test" if subcommand == "test" else "val"
    assert f"manualbp {subcommand}: " in out and f"{label} accuracy" in out
    assert "trained 1 epoch (12 steps)" in out and "passed: 3 checks" in out
    assert f"trained in         {fit_run.log_dir}" in out
    assert "Test metric" not in out and "Validate metric" not in out
    stage = "test" if subcommand == "test" else "val"
    metrics = cli.trainer.callback_metrics
    # The checkpoint holds the weights the fit run evaluated at its end.
    for model in ("manual", "autograd"):
        expected = fit_run.scalars[f"{stage}/acc/{model}"].last
        assert metrics[f"{stage}/acc/{model}"].item() == pytest.approx(expected, rel=1e-6)
    assert metrics[f"{stage}/loss/manual"].item() == pytest.approx(
        fit_run.scalars[f"{stage}/loss/manual"].last, rel=1e-6
    )
    assert cli.model.manual_model.backend == "manual"


@pytest.mark.parametrize(
    ("options", "config", "message"),
    [
        (
            ["--optimizer.init_args.lr=abc"],
            None,
            "--optimizer.init_args.lr: expected a float, got 'abc'",
        ),
        (
            ["--model.compare=sideways"],
            None,
            "--model.compare: expected one of 'check', 'lockstep', 'off', got 'sideways'",
        ),
        (["--data.batch_size=x"], None, "--data.init_args.batch_size: expected an int, got 'x'"),
        (["--model.bogus=1"], None, "--model.bogus: no such option"),
        (
            ["--trainer.max_epoch", "1"],
            None,
            "--trainer.max_epoch: no such option; did you mean --trainer.max_epochs?",
        ),
        ([], "model:\n  bogus_key: 3\n", "--model.bogus_key: no such config key"),
        (
            [],
            "trainer:\n  max_epochs: many\n",
            "--trainer.max_epochs: expected an int (or null), got 'many'",
        ),
        (
            ["--data.init_args.batch_size=-3"],
            None,
            "manualbp.data.MNISTDataModule: batch_size must be a positive int, got -3",
        ),
        (["--model.check_every_n_steps=0"], None, "check_every_n_steps must be >= 1, got 0"),
    ],
    ids=[
        "ill-typed-float",
        "not-a-choice",
        "ill-typed-data-key",
        "unknown-flag",
        "abbreviated",
        "unknown-yaml-key",
        "ill-typed-yaml",
        "refused-by-the-datamodule",
        "refused-by-the-module",
    ],
)
def test_a_bad_key_or_value_gets_one_line_naming_it(
    tmp_path, capsys, monkeypatch, options, config, message
):
    """No usage, no traceback: the key, what it expects and what it got, then a pointer to
    --help (LightningCLI printed ~84 lines of usage first; abbreviations were accepted)."""
    monkeypatch.chdir(tmp_path)  # a run that started would log to ./runs
    arguments = ["fit", f"--config={EXPERIMENTS / 'mnist_mlp.yaml'}"]
    if config is not None:
        (tmp_path / "bad.yaml").write_text(config)
        arguments.append(f"--config={tmp_path / 'bad.yaml'}")
    with pytest.raises(SystemExit) as excinfo:
        cli_main([*arguments, *options])
    assert excinfo.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line != "Seed set to 0"]
    assert err[0].startswith("manualbp fit: ") and err[0].endswith(message), err
    assert err[1:] == ["(manualbp fit --help lists the common keys)"]
    assert not (tmp_path / "runs").exists()  # nothing ran


def test_fit_help_is_short_and_names_the_data_keys(capsys):
    with pytest.raises(SystemExit) as excinfo:
        cli_main(["fit", "--help"])
    assert excinfo.value.code == 0
    out = capsys.readouterr().out
    assert len(out.splitlines()) < 100
    for key in (
        "--config FILE",
        "--trainer.max_epochs INT",
        "--model.compare {check,lockstep,off}",
        "--optimizer CLASS",
        "--data.batch_size INT",
        "--data.data_dir PATH",
        "manualbp fit --help-all",
    ):
        assert key in out, key


def test_help_all_is_lightnings_full_help(capsys):
    with pytest.raises(SystemExit) as excinfo:
        cli_main(["fit", "--help-all"])
    assert excinfo.value.code == 0
    out = capsys.readouterr().out
    assert "--trainer.gradient_clip_val" in out and len(out.splitlines()) > 500


def test_predict_is_not_offered(capsys):
    with pytest.raises(SystemExit) as excinfo:
        cli_main(["predict"])
    assert excinfo.value.code == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "predict" in err[0], err


def test_fast_dev_run_writes_nothing_into_the_working_directory(mnist_root, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = cli_main(
        [
            "fit",
            f"--config={EXPERIMENTS / 'mnist_mlp.yaml'}",
            f"--data.init_args.data_dir={mnist_root}",
            "--trainer.fast_dev_run=true",
        ]
    )
    assert cli.trainer.global_step == 1
    assert list(tmp_path.iterdir()) == []  # Lightning wrote ./checkpoints/last.ckpt here


@pytest.mark.parametrize("config", sorted(EXPERIMENTS.glob("*.yaml")), ids=lambda path: path.stem)
def test_every_experiment_config_builds(tmp_path, monkeypatch, config):
    """Each experiments/*.yaml parses and instantiates its model, data and trainer (run from
    the repository root, as the configs say, so that experiments/*.py class paths resolve)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(EXPERIMENTS.parent))
    cli = cli_main([f"--config={config}"], run=False)
    assert any(is_handwritten(module) for module in cli.model.manual_model.modules())
    assert cli.model.autograd_model is not None or cli.model.hparams.compare == "off"
    assert cli.trainer.max_epochs >= 1
    assert cli.trainer.checkpoint_callback.monitor.startswith("val/acc/")


def test_autograd_baseline_checkpoints_on_its_own_accuracy(mnist_root, tmp_path):
    """compare=off with backend=autograd trains the twin alone; the default checkpoint
    monitor follows it (there is no val/acc/manual to monitor)."""
    cli = cli_main(
        [
            "fit",
            *run_options(tmp_path, mnist_root, "baseline"),
            "--model.compare=off",
            "--model.backend=autograd",
            "--trainer.limit_train_batches=3",
            "--trainer.log_every_n_steps=1",
            "--trainer.enable_progress_bar=false",
            "--test_after_fit=false",
        ]
    )
    assert cli.trainer.checkpoint_callback.monitor == "val/acc/autograd"
    names = [p.name for p in (tmp_path / "baseline" / "version_0" / "checkpoints").iterdir()]
    assert any(name.startswith("epoch=0-val_acc=0.") for name in names), names
    assert "val/acc/manual" not in cli.trainer.callback_metrics


@pytest.mark.parametrize("switch", ["enable_checkpointing", "logger"])
def test_checkpoints_or_logger_can_be_turned_off(mnist_root, tmp_path, monkeypatch, switch):
    """``--trainer.enable_checkpointing=false`` drops the checkpoint section's callback, and
    ``--trainer.logger=false`` runs without a logger, instead of failing on them."""
    monkeypatch.chdir(tmp_path)  # without a logger, checkpoints go to ./checkpoints
    cli = cli_main(
        [
            "fit",
            *run_options(tmp_path, mnist_root, "switched_off"),
            f"--trainer.{switch}=false",
            "--trainer.limit_train_batches=2",
            "--trainer.log_every_n_steps=1",
            "--trainer.enable_progress_bar=false",
            "--test_after_fit=false",
        ]
    )
    assert cli.trainer.global_step == 2
    callbacks = {type(callback).__name__ for callback in cli.trainer.callbacks}
    if switch == "logger":
        assert cli.trainer.loggers == []
        assert "LastStateCheckpoint" in callbacks
        assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    else:
        assert cli.trainer.checkpoint_callback is None
        assert not (tmp_path / "switched_off" / "version_0" / "checkpoints").exists()


def test_the_optimizer_and_scheduler_sections_build_one_instance_per_twin(tmp_path, monkeypatch):
    """Lightning's top-level optimizer: and lr_scheduler: sections (here from the config file
    and the command line) give each twin its own optimizer and scheduler with those settings."""
    monkeypatch.chdir(tmp_path)
    cli = cli_main(
        [
            f"--config={EXPERIMENTS / 'xor.yaml'}",
            "--optimizer.init_args.weight_decay=0.25",
            "--lr_scheduler=torch.optim.lr_scheduler.StepLR",
            "--lr_scheduler.step_size=7",
        ],
        run=False,
    )
    config = cli.model.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    assert set(optimizer.optimizers) == {"manual", "autograd"}
    for name, inner in optimizer.optimizers.items():
        assert isinstance(inner, torch.optim.SGD)
        group = inner.param_groups[0]
        assert (group["lr"], group["momentum"], group["weight_decay"]) == (2.0, 0.9, 0.25), name
        assert scheduler.schedulers[name].optimizer is inner
        assert scheduler.schedulers[name].step_size == 7


def test_an_optimizer_given_twice_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        cli_main(
            [
                f"--config={EXPERIMENTS / 'xor.yaml'}",
                "--model.optimizer=torch.optim.Adam",
            ],
            run=False,
        )
    assert "the optimizer is given twice" in capsys.readouterr().err
