"""Smoke test of the benchmark: ``--quick`` end to end, so the script cannot rot.

Timings are never asserted (they depend on the machine); the test checks that every figure
the benchmark promises is produced, is a measurement (positive, finite) and is consistent
with the numbers it was derived from.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from manualbp.tools.benchmark import CASES, main, parse_args


@pytest.mark.slow
def test_quick_benchmark_writes_every_figure(mnist_root, tmp_path) -> None:
    json_path, markdown_path = tmp_path / "bench.json", tmp_path / "bench.md"
    results = main(
        [
            "--quick",
            "--device", "cpu",
            "--warmup", "1",
            "--steps", "2",
            "--repeats", "2",
            "--epoch-batch", "2048",
            "--conventional-workers", "2",
            "--data-dir", str(mnist_root),
            "--json", str(json_path),
            "--markdown", str(markdown_path),
        ]
    )  # fmt: skip
    assert json.loads(json_path.read_text()) == json.loads(json.dumps(results))
    quick_cases = [c.label for c in CASES if c.quick]
    assert [r["case"] for r in results["cases"]] == quick_cases
    for row in results["cases"]:
        for key in ("step_ms_manual", "step_ms_autograd", "step_ratio"):
            assert math.isfinite(row[key]) and row[key] > 0, (key, row)
        low, high = row["step_ratio_spread"]
        assert low <= row["step_ratio"] <= high
        assert row["memory_manual_bytes"] > 0 and row["memory_autograd_bytes"] > 0
        assert row["memory_ratio"] == row["memory_manual_bytes"] / row["memory_autograd_bytes"]
        # The handwritten Functions save no more for backward than autograd does.
        assert row["memory_ratio"] <= 1.0
    compiled = results["cases"][0]["compiled"]
    for key in ("step_ms_compiled_manual", "step_ms_eager_autograd", "step_ms_compiled_autograd"):
        assert compiled[key] > 0
    # CUDA graphs exist only on CUDA: on the CPU no case carries graph figures.
    assert all(row["cuda_graph"] == {} for row in results["cases"])
    epoch = results["lightning_epoch"]
    assert set(epoch["seconds"]) == {"manual", "autograd"}
    assert epoch["seconds"]["manual"] == epoch["seconds_manual"] > 0
    assert epoch["seconds"]["autograd"] == epoch["seconds_autograd"] > 0
    conventional = epoch["conventional"]
    assert conventional["seconds"] > 0 and conventional["num_workers"] == 2
    markdown = markdown_path.read_text()
    for label in quick_cases:
        assert f"| {label} |" in markdown
    assert "through the Lightning Trainer" in markdown
    assert "| torchvision MNIST + DataLoader (2 workers), manual |" in markdown


def test_benchmark_rejects_bad_arguments(capsys) -> None:
    with pytest.raises(SystemExit):
        parse_args(["--repeats", "0"])
    assert "--repeats must be positive" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["--conventional-workers", "-1"])
    assert "--conventional-workers must be >= 0, got -1" in capsys.readouterr().err


def test_batch_sweep_measures_every_path_and_plots_it(tmp_path) -> None:
    plot = tmp_path / "sweep.png"
    results = main(
        ["--sweep", "--warmup", "1", "--steps", "1", "--repeats", "1", "--plot", str(plot)]
    )
    rows = results["sweep"]
    assert [row["batch"] for row in rows] == [16, 32, 64, 128, 256, 512, 1024]
    for row in rows:
        for key in ("step_ms_manual", "step_ms_autograd", "step_ms_direct"):
            assert math.isfinite(row[key]) and row[key] > 0
    assert plot.stat().st_size > 0


@pytest.mark.slow
def test_harness_overhead_is_the_run_minus_a_plain_loop_of_the_same_work(mnist_root) -> None:
    from manualbp.tools.harness import measure_harness

    limits = [
        "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=30",
        "--trainer.limit_val_batches=2",
        "--trainer.limit_test_batches=2",
        f"--data.init_args.data_dir={mnist_root}",
        "--trainer.enable_progress_bar=false",
    ]
    timings = measure_harness("experiments/mnist_mlp.yaml", limits, rounds=3)
    assert timings["steps"] == 30
    rounds = timings["rounds"]
    assert len(rounds) == 3
    for figures in rounds:
        assert figures["startup_s"] > 0 and figures["run_s"] > 0 and figures["pure_s"] > 0
        assert figures["overhead_s"] == pytest.approx(figures["run_s"] - figures["pure_s"])
        assert figures["overhead_fraction"] == pytest.approx(
            figures["overhead_s"] / figures["run_s"]
        )
    # the headline figures are those of the round of median overhead
    fractions = sorted(figures["overhead_fraction"] for figures in rounds)
    assert timings["overhead_fraction"] == fractions[1]
    assert {key: timings[key] for key in rounds[0]} in rounds
    assert 0 < timings["lightning_floor_s"] < timings["run_s"]
    assert timings["lightning_floor_fraction"] == pytest.approx(
        timings["lightning_floor_s"] / timings["run_s"]
    )


def test_harness_refuses_no_rounds() -> None:
    from manualbp.tools.harness import measure_harness

    with pytest.raises(ValueError, match="rounds must be >= 1, got 0"):
        measure_harness(rounds=0)


def test_function_bodies_step_trains_as_autograd_and_is_timed_against_it() -> None:
    from manualbp.tools.bounds import _bodies_step, function_bodies_ratio

    generator = torch.Generator().manual_seed(0)
    layers = [torch.nn.Linear(12, 7), torch.nn.Linear(7, 3)]
    inputs = torch.randn(5, 12, generator=generator)
    targets = torch.randint(0, 3, (5,), generator=generator)
    parameters = [p for layer in layers for p in (layer.weight, layer.bias)]
    twin = [p.detach().clone().requires_grad_() for p in parameters]
    _bodies_step(layers, inputs, targets)()  # one SGD step from the Functions' bodies
    w1, b1, w2, b2 = twin
    logits = torch.relu(inputs @ w1.T + b1) @ w2.T + b2
    torch.nn.functional.cross_entropy(logits, targets).backward()
    for trained, start in zip(parameters, twin, strict=True):
        torch.testing.assert_close(trained, start.detach() - 1e-3 * start.grad)
    timings = function_bodies_ratio((12, 7, 3), batch=5, steps=3, repeats=3)
    assert set(timings) == {"bodies_ms", "autograd_ms", "ratio"}
    assert all(math.isfinite(value) and value > 0 for value in timings.values())


def test_bounds_time_a_node_of_each_kind_a_python_op_call_and_a_lightning_step() -> None:
    from manualbp.tools.bounds import node_costs, op_call_us
    from manualbp.tools.harness import lightning_loop_seconds_per_step

    costs = node_costs(length=4, calls=20, repeats=3)
    assert set(costs) == {"builtin op", "classic Function", "setup_context Function"}
    assert op_call_us(calls=100, repeats=3) > 0
    for automatic in (True, False):
        # a difference of two timings: positive in practice, but only its finiteness is certain
        assert math.isfinite(lightning_loop_seconds_per_step(steps=50, automatic=automatic))
