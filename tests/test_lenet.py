"""LeNet-5 (``manualbp.nn.LeNet5``): the network, its autograd twin, training it through
``TwinModule`` on MNIST images, and its benchmark case. (``torch.compile`` of every layer it
is built from: ``test_layer_transforms.py``.)
"""

from __future__ import annotations

import functools

import lightning as L
import pytest
import torch
from torch import nn

from manualbp.compare import compare_gradients
from manualbp.data import MNISTDataModule
from manualbp.nn import CrossEntropyLoss, LeNet5, autograd_twin, is_handwritten
from manualbp.tools.benchmark import CASES, measure_case
from manualbp.train.module import TwinModule

IMAGES = torch.randn(16, 1, 28, 28, generator=torch.Generator().manual_seed(0))
LABELS = torch.arange(16) % 10


def test_lenet5_layers_and_parameters() -> None:
    net = LeNet5()
    assert list(dict(net.named_children())) == [
        "conv1", "act1", "pool1", "conv2", "act2", "pool2", "flatten",
        "fc1", "act3", "fc2", "act4", "fc3",
    ]  # fmt: skip
    assert sum(p.numel() for p in net.parameters()) == 61_706
    assert net(IMAGES).shape == (16, 10)
    assert tuple(net.conv1.weight.shape) == (6, 1, 5, 5) and net.conv1.padding == (2, 2)
    assert tuple(net.conv2.weight.shape) == (16, 6, 5, 5)


@pytest.mark.parametrize(
    "activation, pooling", [("relu", "max"), ("tanh", "avg"), ("sigmoid", "max")]
)
def test_both_backends_hold_the_same_weights_and_the_twin_converts_every_layer(
    activation: str, pooling: str
) -> None:
    torch.manual_seed(0)
    manual = LeNet5(activation, pooling, backend="manual")
    torch.manual_seed(0)
    builtin = LeNet5(activation, pooling, backend="autograd")
    assert all(is_handwritten(m) for m in manual.children() if not isinstance(m, nn.Flatten))
    assert not any(is_handwritten(m) for m in builtin.modules())
    twin = autograd_twin(manual)
    assert [type(m) for m in twin.children()] == [type(m) for m in builtin.children()]
    for name, value in manual.state_dict().items():
        assert torch.equal(value, builtin.state_dict()[name]), name
    report = compare_gradients(
        manual, twin, CrossEntropyLoss(), nn.CrossEntropyLoss(), IMAGES, LABELS
    )
    report.assert_close(rtol=1e-5)
    assert {"Conv2dFunction", "LinearFunction"} <= set(report.handwritten)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"activation": "gelu"}, "activation must be one of"),
        ({"pooling": "lp"}, "pooling must be 'max' or 'avg'"),
        ({"backend": "jax"}, "backend must be one of"),
        ({"num_classes": 0}, "num_classes must be a positive int"),
    ],
)
def test_lenet5_refuses_bad_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        LeNet5(**kwargs)


def test_lenet5_trains_in_lockstep_on_mnist_images(mnist_root, quiet_trainer) -> None:
    """``MNISTDataModule(flatten=False)`` serves ``(N, 1, 28, 28)`` images; both twins train
    on them and every gradient check agrees to round-off."""
    L.seed_everything(0)
    data = MNISTDataModule(data_dir=str(mnist_root), batch_size=32, flatten=False)
    module = TwinModule(
        net=LeNet5(),
        optimizer=functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9),
        check_every_n_steps=5,
    )
    trainer = quiet_trainer(max_steps=15, max_epochs=-1, limit_val_batches=1)
    trainer.fit(module, datamodule=data)
    assert data.dims == (1, 28, 28)
    assert data.split_tensors("train")[0].shape == (55_000, 1, 28, 28)
    assert trainer.global_step == 15
    assert 0 < float(module.worst_grad_max_rel) < 1e-5
    (metrics,) = trainer.validate(module, datamodule=data, verbose=False)
    assert metrics["val/acc/manual"] > 0.15 and metrics["val/acc/autograd"] > 0.15  # chance: 0.1


def test_benchmark_lenet5_case_saves_no_more_than_autograd() -> None:
    """The benchmark's LeNet-5 case at batch 256: a step of each twin (timings are not
    asserted), and the bytes saved for backward, which are: no more than autograd's."""
    case = next(case for case in CASES if case.network == "lenet5")
    assert case.batch == 256
    result = measure_case(case, torch.device("cpu"), warmup=1, steps=1, repeats=1, compiled=False)
    assert result.step_ms_manual > 0 and result.step_ms_autograd > 0
    assert 0 < result.memory_manual_bytes <= result.memory_autograd_bytes
