"""The CUDA-graph fast path: ``CUDAGraphStep`` and ``TwinModule(cuda_graph=True)``.

On a GPU a replayed step must train exactly like the eager step it recorded (same kernels,
same order): parameters, losses and optimizer state are compared bit for bit, for the
manual and the builtin-autograd model, with SGD and a capturable Adam, through a short last
batch that falls back to the eager step; through ``TwinModule`` in every comparison mode, the
lockstep twins in one graph, with BatchNorm buffers. Without a GPU only the argument checks
run.
"""

from __future__ import annotations

import functools

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import manualbp.nn as mnn
from manualbp.nn import MLP, CrossEntropyLoss, autograd_twin
from manualbp.train.cuda_graph import CUDAGraphStep
from manualbp.train.module import TwinModule

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return MLP([12, 16, 5], "relu", "manual")


# ------------------------------------------------------------------ argument checks (CPU)
@pytest.mark.parametrize(
    ("make_optimizer", "message"),
    [
        (
            lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, dampening=0.5),
            "SGD must have dampening=0",
        ),
        (lambda p: torch.optim.Adam(p, lr=0.1), "Adam must be built with capturable=True"),
        (lambda p: torch.optim.RMSprop(p, lr=0.1), "RMSprop is not supported"),
    ],
)
def test_uncapturable_optimizers_are_refused(make_optimizer, message) -> None:
    model = tiny_model()
    with pytest.raises(ValueError, match=message):
        CUDAGraphStep(
            model,
            CrossEntropyLoss(),
            torch.randn(4, 12),
            torch.zeros(4, dtype=torch.long),
            optimizer=make_optimizer(model.parameters()),
        )


def test_cpu_tensors_are_refused_with_a_clear_error() -> None:
    with pytest.raises(ValueError, match="inputs must be a tensor on a CUDA device, got cpu"):
        CUDAGraphStep(
            tiny_model(), CrossEntropyLoss(), torch.randn(4, 12), torch.zeros(4, dtype=torch.long)
        )


def test_warmup_steps_must_be_positive() -> None:
    with pytest.raises(ValueError, match="warmup_steps must be an int >= 1, got 0"):
        CUDAGraphStep(
            tiny_model(),
            CrossEntropyLoss(),
            torch.randn(4, 12),
            torch.zeros(4, dtype=torch.long),
            warmup_steps=0,
        )


@pytest.mark.parametrize("compare", ["off", "check", "lockstep"])
def test_twin_module_refuses_cuda_graph_on_the_cpu(quiet_trainer, compare) -> None:
    loader = DataLoader(TensorDataset(torch.randn(8, 12), torch.zeros(8, dtype=torch.long)))
    module = TwinModule(net=MLP([12, 16, 5]), compare=compare, cuda_graph=True)
    trainer = quiet_trainer()
    with pytest.raises(ValueError, match=r"cuda_graph=True needs a CUDA device.*runs on cpu"):
        trainer.fit(module, loader)


@pytest.mark.parametrize("compare", ["off", "lockstep"])
def test_twin_module_refuses_cuda_graph_with_a_closure_based_optimizer(
    quiet_trainer, compare
) -> None:
    loader = DataLoader(TensorDataset(torch.randn(8, 12), torch.zeros(8, dtype=torch.long)))
    lbfgs = functools.partial(torch.optim.LBFGS, lr=0.1)
    module = TwinModule(net=MLP([12, 16, 5]), compare=compare, cuda_graph=True, optimizer=lbfgs)
    with pytest.raises(ValueError, match=r"cuda_graph=True replays one forward.*LBFGS"):
        quiet_trainer().fit(module, loader)


# ------------------------------------------------------------------------- on a GPU
def batches(count: int, rows: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(rows, 12, generator=generator).cuda(),
            torch.randint(0, 5, (rows,), generator=generator).cuda(),
        )
        for _ in range(count)
    ]


OPTIMIZERS = {
    "sgd": lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=1e-3),
    "adam": lambda params: torch.optim.Adam(params, lr=1e-2, capturable=True),
}


@needs_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("optimizer_name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("backend", ["manual", "autograd"])
def test_replayed_steps_train_exactly_like_eager_steps(backend, optimizer_name) -> None:
    """Six full batches and one short one (eager fallback), graph vs eager: every loss,
    parameter and optimizer-state tensor equal bit for bit."""
    eager_model = tiny_model().cuda()
    if backend == "autograd":
        eager_model = autograd_twin(eager_model)
    graph_model = autograd_twin(eager_model) if backend == "autograd" else tiny_model().cuda()
    loss_fn = nn.CrossEntropyLoss() if backend == "autograd" else CrossEntropyLoss()
    eager_optimizer = OPTIMIZERS[optimizer_name](eager_model.parameters())
    graph_optimizer = OPTIMIZERS[optimizer_name](graph_model.parameters())
    data = batches(6, 8, seed=1)
    data.insert(3, batches(1, 3, seed=2)[0])  # a short batch in the middle

    step = CUDAGraphStep(graph_model, loss_fn, *data[0], optimizer=graph_optimizer)
    for index, (inputs, targets) in enumerate(data):
        if index == 2:  # as Lightning does before validation: the step must re-attach them
            graph_optimizer.zero_grad(set_to_none=True)
        eager_optimizer.zero_grad(set_to_none=True)
        eager_loss = loss_fn(eager_model(inputs), targets)
        eager_loss.backward()
        eager_optimizer.step()
        graph_loss, outputs = step(inputs, targets)
        assert torch.equal(graph_loss, eager_loss.detach())
        assert outputs.shape == (inputs.shape[0], 5)
    for (name, eager_param), graph_param in zip(
        eager_model.named_parameters(), graph_model.parameters(), strict=True
    ):
        assert torch.equal(graph_param, eager_param), name
        assert torch.equal(graph_param.grad, eager_param.grad), name
    for eager_state, graph_state in zip(
        eager_optimizer.state.values(), graph_optimizer.state.values(), strict=True
    ):
        for key, value in eager_state.items():
            assert torch.equal(graph_state[key], value), key


@needs_cuda
@pytest.mark.cuda
def test_capture_leaves_weights_and_optimizer_untouched() -> None:
    """The warm-up steps before capture are undone: the first replay is the first step."""
    model = tiny_model().cuda()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    step = CUDAGraphStep(model, CrossEntropyLoss(), *batches(1, 8, seed=3)[0], optimizer=optimizer)
    for (name, p), static_grad in zip(model.named_parameters(), step.static_grads, strict=True):
        assert torch.equal(p, before[name]), name
        assert p.grad is static_grad, name  # the buffer every replay writes
        assert torch.count_nonzero(optimizer.state[p]["momentum_buffer"]) == 0, name


def bn_net() -> nn.Module:
    return nn.Sequential(mnn.Linear(12, 16), mnn.BatchNorm1d(16), mnn.ReLU(), mnn.Linear(16, 5))


def dropout_net() -> nn.Module:
    return nn.Sequential(mnn.Linear(12, 16), mnn.ReLU(), mnn.Dropout(0.3), mnn.Linear(16, 5))


def fit_twice(quiet_trainer, make_net, **module_args) -> dict[bool, TwinModule]:
    """The same two epochs (a short last batch, a validation loop, before which Lightning
    sets every ``.grad`` to None, and a step scheduler) eagerly and with ``cuda_graph``."""
    torch.backends.cuda.matmul.allow_tf32 = False
    generator = torch.Generator().manual_seed(0)
    dataset = TensorDataset(torch.randn(50, 12, generator=generator), torch.arange(50) % 5)
    modules = {}
    for cuda_graph in (False, True):
        L.seed_everything(0)
        module = TwinModule(
            net=make_net(),
            cuda_graph=cuda_graph,
            lr_scheduler=functools.partial(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.5),
            check_every_n_steps=2,
            **module_args,
        )
        trainer = quiet_trainer(accelerator="gpu", max_epochs=2, num_sanity_val_steps=0)
        loader = DataLoader(dataset, batch_size=16)  # 16, 16, 16, 2 rows
        trainer.fit(module, train_dataloaders=loader, val_dataloaders=loader)
        assert trainer.global_step == 8
        assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.01 * 0.25)
        modules[cuda_graph] = module
    return modules


def state_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: t.detach().cpu() for name, t in model.state_dict().items()}


@needs_cuda
@pytest.mark.cuda
@pytest.mark.parametrize(
    ("compare", "backend"),
    [("off", "manual"), ("off", "autograd"), ("check", "manual"), ("lockstep", "manual")],
)
@pytest.mark.parametrize("make_net", [lambda: MLP([12, 16, 5]), bn_net], ids=["mlp", "bn"])
def test_twin_module_cuda_graph_trains_like_the_eager_module(
    quiet_trainer, compare, backend, make_net
) -> None:
    """Every trained twin's weights and buffers (BatchNorm's running statistics), and every
    gradient check and divergence value, equal bit for bit with and without the graph."""
    modules = fit_twice(quiet_trainer, make_net, compare=compare, backend=backend)
    eager, graph = modules[False], modules[True]
    for name, _ in eager._models():
        model = f"{name}_model"
        eager_state, graph_state = state_of(getattr(eager, model)), state_of(getattr(graph, model))
        assert eager_state.keys() == graph_state.keys()
        for key, value in eager_state.items():
            assert torch.equal(graph_state[key], value), (name, key)
    assert graph.last_check_values == eager.last_check_values
    if make_net is bn_net:
        return  # the bias before BatchNorm has a zero gradient: max_rel compares noise there
    if compare != "off":
        assert graph.last_check_values["grad_check/max_rel"] < 1e-5
    if compare == "lockstep":
        assert graph.last_check_values["divergence/max"] < 1e-5


@needs_cuda
@pytest.mark.cuda
def test_lockstep_cuda_graph_refuses_a_network_that_draws_random_numbers(quiet_trainer) -> None:
    loader = DataLoader(TensorDataset(torch.randn(32, 12), torch.arange(32) % 5), batch_size=16)
    module = TwinModule(net=dropout_net(), compare="lockstep", cuda_graph=True)
    with pytest.raises(ValueError, match="in lockstep needs a network that draws no random"):
        quiet_trainer(accelerator="gpu").fit(module, loader)
    module = TwinModule(net=dropout_net(), compare="check", cuda_graph=True)  # one network
    trainer = quiet_trainer(accelerator="gpu")
    trainer.fit(module, loader)
    assert trainer.global_step == 2
    assert module.last_check_values["grad_check/max_rel"] < 1e-5


@needs_cuda
@pytest.mark.cuda
def test_capture_leaves_buffers_and_the_random_generator_untouched() -> None:
    model = nn.Sequential(bn_net(), mnn.Dropout(0.5)).cuda()
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    rng = torch.cuda.get_rng_state()
    step = CUDAGraphStep(model, CrossEntropyLoss(), *batches(1, 8, seed=4)[0])
    assert step.draws_random_numbers
    assert torch.equal(torch.cuda.get_rng_state(), rng)
    for name, buffer in model.named_buffers():
        assert torch.equal(buffer, buffers[name]), name
    assert not CUDAGraphStep(
        tiny_model().cuda(), CrossEntropyLoss(), *batches(1, 8, seed=4)[0]
    ).draws_random_numbers


@needs_cuda
@pytest.mark.cuda
def test_twin_module_cuda_graph_mixed_precision(quiet_trainer) -> None:
    """bfloat16 autocast is captured like any other op; float16 (loss scaling) is refused."""
    dataset = TensorDataset(torch.randn(48, 12), torch.arange(48) % 5)
    loader = DataLoader(dataset, batch_size=16)
    for precision in ("bf16-mixed", "16-mixed"):
        module = TwinModule(net=MLP([12, 16, 5]), compare="off", cuda_graph=True)
        trainer = quiet_trainer(accelerator="gpu", precision=precision)
        if precision == "16-mixed":
            with pytest.raises(ValueError, match="does not support precision='16-mixed'"):
                trainer.fit(module, loader)
        else:
            before = module.manual_model.fc1.weight.detach().clone()
            trainer.fit(module, loader)
            assert trainer.global_step == 3
            assert not torch.equal(module.manual_model.fc1.weight.detach().cpu(), before.cpu())


@needs_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("cuda_graph", [False, True])
@pytest.mark.parametrize("compare", ["lockstep", "check", "off"])
def test_a_non_finite_loss_on_cuda_names_its_step(quiet_trainer, compare, cuda_graph) -> None:
    """NaN inputs at the third batch: the device-side flag names step 2 when it is read (here
    at the epoch's end), eagerly and from a replayed graph."""
    inputs = torch.randn(8, 2)
    inputs[4] = float("nan")
    loader = DataLoader(TensorDataset(inputs, torch.randint(0, 2, (8,))), batch_size=2)
    module = TwinModule(
        net=MLP([2, 4, 2], "sigmoid"),
        compare=compare,
        cuda_graph=cuda_graph,
        check_every_n_steps=100,
    )
    trainer = quiet_trainer(accelerator="gpu", limit_val_batches=0)
    twins = "manual and autograd" if compare == "lockstep" else "manual"
    with pytest.raises(
        FloatingPointError, match=rf"loss of the {twins} model is not finite at step 2;"
    ):
        trainer.fit(module, loader)
