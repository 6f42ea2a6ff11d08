"""What does a handwritten backward cost? Manual vs builtin autograd, measured in one process.

Method (the same for every figure):

* both backends are built from one seed with identical weights (:func:`autograd_twin`);
* a training step is forward + backward + ``SGD(momentum=0.9).step()`` on a fixed batch;
* warm-up steps are run and discarded; then ``repeats`` rounds, each timing ``steps`` steps of
  the manual model and ``steps`` steps of the autograd model back to back, in alternating
  order (AB, BA, AB, ...) so drift in clock speed or load hits both alike;
* CUDA is synchronised before each clock read; each round gives a ratio manual/autograd and
  the reported ratio is the **median** of the rounds' ratios;
* memory of one step: on CUDA the allocator's peak (``max_memory_allocated``) above the
  memory held before the step; on CPU, which has no allocator statistics, the bytes of the
  tensors autograd saves for backward (unique storages, counted by a saved-tensor hook), the
  part of a step's memory that the handwritten Functions control.

Run it with ``python scripts/benchmark.py`` (``--quick`` for a short smoke run).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from manualbp.direct import DirectBackprop
from manualbp.nn import MLP, CrossEntropyLoss, LeNet5, autograd_twin
from manualbp.train.cuda_graph import CUDAGraphStep

__all__ = ["CASES", "BenchmarkCase", "main", "measure_case", "run_benchmarks", "to_markdown"]

Step = Callable[[], None]


@dataclass(frozen=True)
class BenchmarkCase:
    """One network and batch size: ``sizes`` widths (input first), ``activation``, ``batch``;
    ``network="lenet5"`` is :class:`~manualbp.nn.LeNet5` instead of an MLP (``sizes`` then
    gives only the classes, last)."""

    name: str
    sizes: tuple[int, ...]
    activation: str
    batch: int
    quick: bool = False  # part of the --quick set
    heavy: bool = False  # compute-bound: few steps, skipped on CPU unless --full
    network: str = "mlp"

    @property
    def label(self) -> str:
        return f"{self.name} @ batch {self.batch}"

    @property
    def input_shape(self) -> tuple[int, ...]:
        """One example's shape: ``(784,)`` for an MLP on MNIST, ``(1, 28, 28)`` for LeNet-5."""
        return (1, 28, 28) if self.network == "lenet5" else (self.sizes[0],)

    def build(self) -> nn.Module:
        """The manual network (from the current random state)."""
        if self.network == "lenet5":
            return LeNet5(self.activation, num_classes=self.sizes[-1])
        return MLP(list(self.sizes), self.activation, "manual")


DEEP_SIGMOID = (784, 128, 128, 128, 128, 128, 128, 10)
WIDE = (784, 4096, 4096, 4096, 10)

CASES: tuple[BenchmarkCase, ...] = (
    BenchmarkCase("784-200-10 relu", (784, 200, 10), "relu", 64, quick=True),
    BenchmarkCase("784-200-10 relu", (784, 200, 10), "relu", 512, quick=True),
    BenchmarkCase("784-256-128-10 relu", (784, 256, 128, 10), "relu", 128),
    BenchmarkCase("784-[128x6]-10 sigmoid", DEEP_SIGMOID, "sigmoid", 128),
    BenchmarkCase("784-2048x3-10 relu", (784, 2048, 2048, 2048, 10), "relu", 512, heavy=True),
    BenchmarkCase("784-4096x3-10 relu", WIDE, "relu", 1024, heavy=True),
    BenchmarkCase("784-4096x3-10 relu", WIDE, "relu", 8192, heavy=True),
    BenchmarkCase("LeNet-5 relu, max pooling", (784, 10), "relu", 256, network="lenet5"),
)


@dataclass
class CaseResult:
    case: str
    device: str
    step_ms_manual: float
    step_ms_autograd: float
    step_ratio: float
    step_ratio_spread: tuple[float, float]
    memory_kind: str
    memory_manual_bytes: int
    memory_autograd_bytes: int
    memory_ratio: float
    compiled: dict[str, float] = field(default_factory=dict)
    direct: dict[str, object] = field(default_factory=dict)
    cuda_graph: dict[str, float] = field(default_factory=dict)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _twins(case: BenchmarkCase, device: torch.device, seed: int = 0) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(seed)
    manual = case.build().to(device)
    return manual, autograd_twin(manual)


def _batch(case: BenchmarkCase, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(case.batch, *case.input_shape, generator=generator).to(device)
    targets = torch.randint(0, case.sizes[-1], (case.batch,), generator=generator).to(device)
    return inputs, targets


def training_step(
    model: nn.Module,
    loss_fn: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
) -> Step:
    """A closure running forward + backward + SGD-momentum step on ``inputs (N, in)``."""
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model(inputs), targets).backward()
        optimizer.step()

    return step


def _time(step: Step, steps: int, device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return (time.perf_counter() - start) / steps


def interleaved_ratio(
    step_a: Step, step_b: Step, device: torch.device, *, warmup: int, steps: int, repeats: int
) -> tuple[float, float, float, tuple[float, float]]:
    """Median seconds per step of A and B and the median (and range) of per-round A/B."""
    for _ in range(warmup):
        step_a()
        step_b()
    times_a, times_b, ratios = [], [], []
    for round_index in range(repeats):
        if round_index % 2 == 0:
            a, b = _time(step_a, steps, device), _time(step_b, steps, device)
        else:
            b, a = _time(step_b, steps, device), _time(step_a, steps, device)
        times_a.append(a)
        times_b.append(b)
        ratios.append(a / b)
    spread = (min(ratios), max(ratios))
    return statistics.median(times_a), statistics.median(times_b), statistics.median(ratios), spread


def saved_tensor_bytes(
    model: nn.Module, loss_fn: nn.Module, inputs: torch.Tensor, targets: torch.Tensor
) -> int:
    """Bytes of the distinct storages autograd saves for backward during one forward."""
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = loss_fn(model(inputs), targets)
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(storages.values())


def cuda_peak_step_bytes(step: Step, device: torch.device) -> int:
    """Peak allocator bytes of one step above what was allocated before it."""
    step()  # optimizer state and gradient buffers exist from here on
    _sync(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    _sync(device)
    return torch.cuda.max_memory_allocated(device) - before


def measure_case(
    case: BenchmarkCase,
    device: torch.device,
    *,
    warmup: int,
    steps: int,
    repeats: int,
    compiled: bool,
) -> CaseResult:
    """Step time and memory of ``case``, manual vs autograd (and compiled, if asked)."""
    manual, autograd = _twins(case, device)
    inputs, targets = _batch(case, device)
    manual_loss, autograd_loss = CrossEntropyLoss(), nn.CrossEntropyLoss()
    step_m = training_step(manual, manual_loss, inputs, targets)
    step_a = training_step(autograd, autograd_loss, inputs, targets)
    time_m, time_a, ratio, spread = interleaved_ratio(
        step_m, step_a, device, warmup=warmup, steps=steps, repeats=repeats
    )
    if device.type == "cuda":
        kind = "CUDA allocator peak of one step"
        memory_m, memory_a = (
            cuda_peak_step_bytes(step_m, device),
            cuda_peak_step_bytes(step_a, device),
        )
    else:
        kind = "bytes saved for backward"
        memory_m = saved_tensor_bytes(manual, manual_loss, inputs, targets)
        memory_a = saved_tensor_bytes(autograd, autograd_loss, inputs, targets)
    result = CaseResult(
        case=case.label,
        device=str(device),
        step_ms_manual=time_m * 1e3,
        step_ms_autograd=time_a * 1e3,
        step_ratio=ratio,
        step_ratio_spread=spread,
        memory_kind=kind,
        memory_manual_bytes=memory_m,
        memory_autograd_bytes=memory_a,
        memory_ratio=memory_m / memory_a,
    )
    if compiled:
        result.compiled = measure_compiled(
            case, device, warmup=warmup, steps=steps, repeats=repeats
        )
    return result


def direct_training_step(
    model: nn.Module, loss_fn: nn.Module, inputs: torch.Tensor, targets: torch.Tensor
) -> Step:
    """:func:`training_step` with the forward and backward driven by hand
    (:class:`~manualbp.direct.DirectBackprop`) instead of the autograd engine."""
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    backprop = DirectBackprop(model, loss_fn)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        backprop(inputs, targets)
        optimizer.step()

    return step


def measure_direct(
    case: BenchmarkCase, device: torch.device, *, warmup: int, steps: int, repeats: int
) -> dict[str, object]:
    """The opt-in direct path (the same Functions' forward and backward chained without the
    autograd engine) against builtin autograd eager, interleaved; ``{"refused": reason}``
    for a network direct backprop cannot differentiate."""
    manual, autograd = _twins(case, device)
    inputs, targets = _batch(case, device)
    step_d = direct_training_step(manual, CrossEntropyLoss(), inputs, targets)
    try:
        step_d()
    except RuntimeError as error:
        return {"refused": str(error).split(";")[0]}
    step_a = training_step(autograd, nn.CrossEntropyLoss(), inputs, targets)
    time_d, time_a, ratio, spread = interleaved_ratio(
        step_d, step_a, device, warmup=warmup, steps=steps, repeats=repeats
    )
    return {
        "step_ms_direct": time_d * 1e3,
        "step_ms_autograd": time_a * 1e3,
        "ratio": ratio,
        "ratio_spread": spread,
    }


SWEEP_BATCHES = (16, 32, 64, 128, 256, 512, 1024)


def batch_sweep(
    device: torch.device, batches: Sequence[int], *, warmup: int, steps: int, repeats: int
) -> list[dict[str, float]]:
    """Step time of 784-200-10 ReLU at each batch size: eager manual, direct and autograd,
    each path interleaved with autograd (medians)."""
    rows = []
    for batch in batches:
        case = BenchmarkCase("784-200-10 relu", (784, 200, 10), "relu", batch)
        eager = measure_case(
            case, device, warmup=warmup, steps=steps, repeats=repeats, compiled=False
        )
        direct = measure_direct(case, device, warmup=warmup, steps=steps, repeats=repeats)
        rows.append(
            {
                "batch": batch,
                "step_ms_manual": eager.step_ms_manual,
                "step_ms_autograd": eager.step_ms_autograd,
                "ratio_manual": eager.step_ratio,
                "step_ms_direct": direct["step_ms_direct"],
                "ratio_direct": direct["ratio"],
            }
        )
        print(f"  sweep batch {batch}: manual {eager.step_ratio:.3f}, direct {direct['ratio']:.3f}")
    return rows


def measure_compiled(
    case: BenchmarkCase, device: torch.device, *, warmup: int, steps: int, repeats: int
) -> dict[str, float]:
    """The opt-in fast path: ``torch.compile`` of the manual model (CUDA graphs on CUDA, via
    ``mode="reduce-overhead"``) against builtin autograd eager and compiled."""
    mode = "reduce-overhead" if device.type == "cuda" else "default"
    manual, autograd = _twins(case, device)
    eager_autograd = autograd_twin(manual)
    inputs, targets = _batch(case, device)
    compiled_manual = torch.compile(manual, mode=mode, fullgraph=True)
    compiled_autograd = torch.compile(autograd, mode=mode, fullgraph=True)
    step_cm = training_step(compiled_manual, CrossEntropyLoss(), inputs, targets)
    step_ca = training_step(compiled_autograd, nn.CrossEntropyLoss(), inputs, targets)
    step_ea = training_step(eager_autograd, nn.CrossEntropyLoss(), inputs, targets)
    warm = max(warmup, 3)  # compilation happens in the first calls
    time_cm, time_ea, vs_eager, _ = interleaved_ratio(
        step_cm, step_ea, device, warmup=warm, steps=steps, repeats=repeats
    )
    _, time_ca, vs_compiled, _ = interleaved_ratio(
        step_cm, step_ca, device, warmup=warm, steps=steps, repeats=repeats
    )
    return {
        "compile_mode": mode,
        "step_ms_compiled_manual": time_cm * 1e3,
        "step_ms_eager_autograd": time_ea * 1e3,
        "step_ms_compiled_autograd": time_ca * 1e3,
        "ratio_vs_eager_autograd": vs_eager,
        "ratio_vs_compiled_autograd": vs_compiled,
    }


def measure_cuda_graph(
    case: BenchmarkCase, device: torch.device, *, warmup: int, steps: int, repeats: int
) -> dict[str, float]:
    """The opt-in fast path on CUDA: the whole step (forward, backward, SGD-momentum step)
    captured as one CUDA graph (:class:`CUDAGraphStep`), against builtin autograd eager and
    against the autograd model captured the same way."""
    manual, autograd = _twins(case, device)
    eager_autograd = autograd_twin(manual)
    inputs, targets = _batch(case, device)

    def graphed(model: nn.Module, loss_fn: nn.Module) -> Step:
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        graph_step = CUDAGraphStep(model, loss_fn, inputs, targets, optimizer=optimizer)
        return lambda: graph_step(inputs, targets)

    step_gm = graphed(manual, CrossEntropyLoss())
    step_ga = graphed(autograd, nn.CrossEntropyLoss())
    step_ea = training_step(eager_autograd, nn.CrossEntropyLoss(), inputs, targets)
    time_gm, time_ea, vs_eager, _ = interleaved_ratio(
        step_gm, step_ea, device, warmup=warmup, steps=steps, repeats=repeats
    )
    _, time_ga, vs_graphed, _ = interleaved_ratio(
        step_gm, step_ga, device, warmup=warmup, steps=steps, repeats=repeats
    )
    return {
        "step_ms_graphed_manual": time_gm * 1e3,
        "step_ms_eager_autograd": time_ea * 1e3,
        "step_ms_graphed_autograd": time_ga * 1e3,
        "ratio_vs_eager_autograd": vs_eager,
        "ratio_vs_graphed_autograd": vs_graphed,
    }


def _epoch_timer(device: torch.device):
    """A Lightning callback recording the wall time of the last training epoch, CUDA
    synchronised (defined here so that Lightning is imported only when an epoch is timed)."""
    import lightning as L

    class EpochTimer(L.Callback):
        seconds = float("nan")

        def on_train_epoch_start(self, trainer, pl_module) -> None:
            _sync(device)
            self.start = time.perf_counter()

        def on_train_epoch_end(self, trainer, pl_module) -> None:
            _sync(device)
            self.seconds = time.perf_counter() - self.start

    return EpochTimer()


def _bare_trainer(device: torch.device, callbacks: list):
    import lightning as L

    return L.Trainer(
        accelerator=device.type,
        devices=1,
        max_epochs=1,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )


def conventional_epoch_seconds(
    device: torch.device,
    batch_size: int,
    data_dir: str | None,
    num_workers: int = 4,
    seed: int = 0,
) -> float:
    """Wall time of one MNIST epoch (60k samples) through ``Trainer.fit`` the conventional
    way: ``torchvision.datasets.MNIST`` with ``ToTensor`` + ``Normalize`` per sample and a
    ``DataLoader`` with ``num_workers`` workers, for the manual 784-200-10 model."""
    import lightning as L
    from torch.utils.data import DataLoader
    from torchvision import datasets, transforms

    from manualbp.data import MNIST_MEAN, MNIST_STD, default_data_dir, ensure_mnist
    from manualbp.train.module import TwinModule

    root = data_dir if data_dir is not None else default_data_dir()
    ensure_mnist(root)
    transform = transforms.Compose(
        [
            transforms.ToTensor(),
            transforms.Normalize((MNIST_MEAN,), (MNIST_STD,)),
            transforms.Lambda(torch.flatten),
        ]
    )
    dataset = datasets.MNIST(str(root), train=True, transform=transform, download=False)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=True,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
    )
    L.seed_everything(seed, verbose=False)
    timer = _epoch_timer(device)
    model = TwinModule(net=MLP([784, 200, 10]), compare="off", backend="manual")
    with warnings.catch_warnings():  # timing an epoch: no validation data, on purpose
        warnings.filterwarnings(
            "ignore", "You defined a `validation_step` but have no `val_dataloader`"
        )
        _bare_trainer(device, [timer]).fit(model, train_dataloaders=loader)
    return timer.seconds


def lightning_epoch_seconds(
    backend: str,
    device: torch.device,
    batch_size: int,
    data_dir: str | None,
    seed: int = 0,
    cuda_graph: bool = False,
) -> float:
    """Wall time of one MNIST training epoch (55k samples) through ``Trainer.fit`` with the
    device-resident DataModule, no validation, logging or checkpoints (``cuda_graph``: the
    module's CUDA-graph fast path)."""
    import lightning as L

    from manualbp.data import MNISTDataModule
    from manualbp.train.module import TwinModule

    L.seed_everything(seed, verbose=False)
    timer = _epoch_timer(device)
    model = TwinModule(
        net=MLP([784, 200, 10]), compare="off", backend=backend, cuda_graph=cuda_graph
    )
    data = MNISTDataModule(data_dir=data_dir, batch_size=batch_size, device_resident=True)
    _bare_trainer(device, [timer]).fit(model, datamodule=data)
    return timer.seconds


def run_benchmarks(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    cases = [c for c in CASES if (c.quick or not args.quick) and args.case in c.label]
    results: dict = {
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "settings": {"warmup": args.warmup, "steps": args.steps, "repeats": args.repeats},
        "cases": [],
        "skipped": [],
        "lightning_epoch": {},
    }
    for case in cases:
        if case.heavy and device.type == "cpu" and not args.full:
            results["skipped"].append(
                f"{case.label}: compute-bound, up to seconds a step on a CPU (--full runs it)"
            )
            continue
        steps = max(1, args.steps // 10) if case.heavy else args.steps
        # The opt-in compiled path is measured where its target is set: 784-200-10 at batch
        # 64 and 512 (only the first in --quick: each compile costs seconds).
        compiled = args.compile and case.name.startswith("784-200-10")
        compiled = compiled and not (args.quick and results["cases"])
        result = measure_case(
            case, device, warmup=args.warmup, steps=steps, repeats=args.repeats, compiled=compiled
        )
        if args.direct and not case.heavy:
            result.direct = measure_direct(
                case, device, warmup=args.warmup, steps=steps, repeats=args.repeats
            )
        if device.type == "cuda" and args.cuda_graph:
            result.cuda_graph = measure_cuda_graph(
                case, device, warmup=args.warmup, steps=steps, repeats=args.repeats
            )
        results["cases"].append(asdict(result))
        ratios = f"ratio {result.step_ratio:.3f}, memory ratio {result.memory_ratio:.3f}"
        print(f"  {case.label}: {ratios}", flush=True)
    if args.lightning_epoch:
        results["lightning_epoch"] = _lightning_epochs(args, device)
    return results


def _lightning_epochs(args: argparse.Namespace, device: torch.device) -> dict:
    """Interleaved epochs of every variant, medians; plus the conventional pipeline."""
    variants = ["manual", "autograd"]
    if device.type == "cuda" and args.cuda_graph:
        variants += ["manual+cuda_graph", "autograd+cuda_graph"]
    times: dict[str, list[float]] = {variant: [] for variant in variants}
    for round_index in range(args.epoch_repeats):
        order = variants if round_index % 2 == 0 else variants[::-1]
        for variant in order:
            backend, _, graph = variant.partition("+")
            seconds = lightning_epoch_seconds(
                backend, device, args.epoch_batch, args.data_dir, cuda_graph=bool(graph)
            )
            times[variant].append(seconds)
    ratios = [m / a for m, a in zip(times["manual"], times["autograd"], strict=True)]
    epoch = {
        "batch_size": args.epoch_batch,
        "samples": 55_000,
        "seconds": {variant: statistics.median(values) for variant, values in times.items()},
        "seconds_manual": statistics.median(times["manual"]),
        "seconds_autograd": statistics.median(times["autograd"]),
        "ratio": statistics.median(ratios),
        "rounds": args.epoch_repeats,
    }
    if args.conventional_epoch:
        conventional = [
            conventional_epoch_seconds(
                device, args.epoch_batch, args.data_dir, num_workers=args.conventional_workers
            )
            for _ in range(args.conventional_repeats)
        ]
        epoch["conventional"] = {
            "samples": 60_000,
            "num_workers": args.conventional_workers,
            "seconds": statistics.median(conventional),
            "rounds": args.conventional_repeats,
        }
    return epoch


def _bytes(n: int) -> str:
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def to_markdown(results: dict) -> str:
    """The results as markdown tables (step time and memory; compiled; Lightning epoch)."""
    lines = [
        f"Device: {results['device']} (torch {results['torch']}, {results['threads']} threads); "
        f"warm-up {results['settings']['warmup']}, {results['settings']['steps']} steps x "
        f"{results['settings']['repeats']} interleaved rounds, medians.",
        "",
        "| case | manual ms/step | autograd ms/step | ratio (min-max) "
        "| memory manual | memory autograd | memory ratio |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results["cases"]:
        low, high = r["step_ratio_spread"]
        lines.append(
            f"| {r['case']} | {r['step_ms_manual']:.3f} | {r['step_ms_autograd']:.3f} | "
            f"{r['step_ratio']:.3f} ({low:.2f}-{high:.2f}) | {_bytes(r['memory_manual_bytes'])} | "
            f"{_bytes(r['memory_autograd_bytes'])} | {r['memory_ratio']:.3f} |"
        )
    if results["cases"]:
        lines.append("")
        lines.append(f"Memory: {results['cases'][0]['memory_kind']}.")
    compiled = [r for r in results["cases"] if r["compiled"]]
    if compiled:
        lines += [
            "",
            "| case | compiled manual ms | eager autograd ms | compiled autograd ms "
            "| vs eager autograd | vs compiled autograd |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for r in compiled:
            c = r["compiled"]
            lines.append(
                f"| {r['case']} | {c['step_ms_compiled_manual']:.3f} | "
                f"{c['step_ms_eager_autograd']:.3f} | "
                f"{c['step_ms_compiled_autograd']:.3f} | {c['ratio_vs_eager_autograd']:.3f} | "
                f"{c['ratio_vs_compiled_autograd']:.3f} |"
            )
    direct = [r for r in results["cases"] if r.get("direct")]
    if direct:
        lines += [
            "",
            "Direct backprop (the same Functions chained without the autograd engine), "
            "interleaved with eager autograd:",
            "",
            "| case | direct ms/step | autograd ms/step | ratio (min-max) |",
            "| --- | --- | --- | --- |",
        ]
        for r in direct:
            d = r["direct"]
            if "refused" in d:
                lines.append(f"| {r['case']} | refused: {d['refused']} | | |")
                continue
            low, high = d["ratio_spread"]
            lines.append(
                f"| {r['case']} | {d['step_ms_direct']:.3f} | {d['step_ms_autograd']:.3f} | "
                f"{d['ratio']:.3f} ({low:.2f}-{high:.2f}) |"
            )
    graphed = [r for r in results["cases"] if r.get("cuda_graph")]
    if graphed:
        lines += [
            "",
            "| case | CUDA-graph manual ms | eager autograd ms | CUDA-graph autograd ms "
            "| vs eager autograd | vs CUDA-graph autograd |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for r in graphed:
            g = r["cuda_graph"]
            lines.append(
                f"| {r['case']} | {g['step_ms_graphed_manual']:.3f} | "
                f"{g['step_ms_eager_autograd']:.3f} | {g['step_ms_graphed_autograd']:.3f} | "
                f"{g['ratio_vs_eager_autograd']:.3f} | {g['ratio_vs_graphed_autograd']:.3f} |"
            )
    epoch = results.get("lightning_epoch")
    if epoch:
        lines += [
            "",
            f"One MNIST epoch through the Lightning Trainer (784-200-10, batch "
            f"{epoch['batch_size']}, SGD momentum; median of {epoch['rounds']} interleaved "
            "rounds):",
            "",
            "| pipeline | seconds | samples/s |",
            "| --- | --- | --- |",
        ]
        for variant, seconds in epoch["seconds"].items():
            lines.append(
                f"| device-resident DataModule, {variant} | {seconds:.3f} | "
                f"{epoch['samples'] / seconds:,.0f} |"
            )
        conventional = epoch.get("conventional")
        if conventional:
            lines.append(
                f"| torchvision MNIST + DataLoader ({conventional['num_workers']} workers), "
                f"manual | {conventional['seconds']:.3f} | "
                f"{conventional['samples'] / conventional['seconds']:,.0f} |"
            )
        lines += [
            "",
            f"Manual/autograd epoch ratio {epoch['ratio']:.3f}. The device-resident epoch has "
            f"{epoch['samples']:,} samples (5,000 are held out for validation), the "
            "conventional one 60,000.",
        ]
    for skipped in results["skipped"]:
        lines.append(f"\nSkipped: {skipped}")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    parser.add_argument("--device", default=default_device, help=f"default: {default_device}")
    parser.add_argument("--quick", action="store_true", help="two small cases, few steps")
    parser.add_argument("--full", action="store_true", help="run the compute-bound cases on CPU")
    parser.add_argument("--case", default="", help="only cases whose label contains this text")
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None, help="steps per timed round")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved rounds")
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    parser.add_argument("--no-lightning-epoch", dest="lightning_epoch", action="store_false")
    parser.add_argument(
        "--sweep",
        action="store_true",
        help="step time of 784-200-10 against batch size (manual, direct, autograd) instead",
    )
    parser.add_argument("--plot", default=None, help="with --sweep: write the figure here")
    parser.add_argument(
        "--harness",
        action="store_true",
        help="time an experiment through `manualbp fit` against a plain loop of the same work",
    )
    parser.add_argument("--harness-config", default="experiments/mnist_mlp.yaml")
    parser.add_argument(
        "--harness-rounds",
        type=int,
        default=3,
        help="interleaved rounds of run and plain loop (default: 3)",
    )
    parser.add_argument(
        "--bounds",
        action="store_true",
        help="the host costs no formula removes: a Function node, a Python op call, a Lightning "
        "step, and the Functions' bodies alone against autograd",
    )
    parser.add_argument(
        "--no-direct", dest="direct", action="store_false", help="skip the direct-backprop path"
    )
    parser.add_argument("--no-cuda-graph", dest="cuda_graph", action="store_false")
    parser.add_argument("--epoch-batch", type=int, default=512)
    parser.add_argument("--epoch-repeats", type=int, default=None)
    parser.add_argument(
        "--no-conventional-epoch",
        dest="conventional_epoch",
        action="store_false",
        help="skip the torchvision MNIST + DataLoader epoch",
    )
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    parser.add_argument(
        "--conventional-workers",
        type=int,
        default=min(4, cores or 1),
        help="DataLoader workers (default: 4, at most the cores available)",
    )
    parser.add_argument("--conventional-repeats", type=int, default=None)
    parser.add_argument("--data-dir", default=None, help="MNIST root (default: ./data)")
    parser.add_argument("--json", default=None, help="write the results here as JSON")
    parser.add_argument("--markdown", default=None, help="write the tables here")
    args = parser.parse_args(argv)
    quick = args.quick
    args.warmup = args.warmup if args.warmup is not None else (2 if quick else 10)
    args.steps = args.steps if args.steps is not None else (5 if quick else 50)
    args.repeats = args.repeats if args.repeats is not None else (3 if quick else 11)
    args.epoch_repeats = (
        args.epoch_repeats if args.epoch_repeats is not None else (1 if quick else 5)
    )
    args.conventional_repeats = (
        args.conventional_repeats if args.conventional_repeats is not None else (1 if quick else 3)
    )
    positive = (
        "steps",
        "repeats",
        "epoch_batch",
        "epoch_repeats",
        "conventional_repeats",
        "harness_rounds",
    )
    for name in ("warmup", "conventional_workers", *positive):
        lowest, expected = (1, "positive") if name in positive else (0, ">= 0")
        if getattr(args, name) < lowest:
            flag = name.replace("_", "-")
            parser.error(f"--{flag} must be {expected}, got {getattr(args, name)}")
    return args


def main(argv: Sequence[str] | None = None) -> dict:
    from manualbp.train.quiet import silence_third_party_noise

    silence_third_party_noise()
    args = parse_args(argv)
    if args.harness:
        from manualbp.tools.harness import measure_harness

        extra = [f"--data.init_args.data_dir={args.data_dir}"] if args.data_dir else []
        extra.append("--trainer.enable_progress_bar=false")
        harness = measure_harness(args.harness_config, extra, rounds=args.harness_rounds)
        print(json.dumps(harness, indent=2))
        return {"harness": harness}
    if args.bounds:
        from manualbp.tools.bounds import function_bodies_ratio, node_costs, op_call_us
        from manualbp.tools.harness import lightning_loop_seconds_per_step

        bounds = {
            "node_us": node_costs(),
            "python_op_call_us": op_call_us(),
            "lightning_step_us": {
                "automatic optimization": lightning_loop_seconds_per_step(automatic=True) * 1e6,
                "manual optimization": lightning_loop_seconds_per_step(automatic=False) * 1e6,
            },
            "function_bodies_step_784_200_10_batch_64": function_bodies_ratio(),
        }
        print(json.dumps(bounds, indent=2))
        return {"bounds": bounds}
    if args.sweep:
        device = torch.device(args.device)
        rows = batch_sweep(
            device, SWEEP_BATCHES, warmup=args.warmup, steps=args.steps, repeats=args.repeats
        )
        print(json.dumps(rows, indent=2))
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=2))
        if args.plot:
            from manualbp.tools.figures import plot_step_time_vs_batch

            plot_step_time_vs_batch(rows, Path(args.plot))
        return {"sweep": rows}
    results = run_benchmarks(args)
    table = to_markdown(results)
    print(table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table + "\n")
    return results
