"""The drop-in modules: ``manualbp.nn.Conv2d``, ``MaxPool2d``, ``AvgPool2d``, ``BatchNorm1d``,
``BatchNorm2d``, ``LayerNorm``, ``Dropout``, ``LogSoftmax``, ``Softmax`` (and ``Flatten``,
torch's own).

Each takes its torch namesake's constructor, holds the same parameters and buffers under the
same names, initialised the same way from the same seed, so a ``state_dict`` moves between
the two unchanged; ``autograd_twin``/``manual_twin`` convert one into the other; a training
step of each gives torch's outputs, gradients and (batch norm) running statistics.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import manualbp.nn as mnn
from manualbp.compare import agreement
from manualbp.nn import autograd_twin, is_handwritten, manual_twin

# manual class, torch class, constructor arguments, input shape
MODULES: list[tuple[type[nn.Module], type[nn.Module], tuple, dict, tuple[int, ...]]] = [
    (mnn.Conv2d, nn.Conv2d, (3, 5, 3), {"padding": 1}, (4, 3, 7, 7)),
    (
        mnn.Conv2d,
        nn.Conv2d,
        (4, 6, (3, 2)),
        {"stride": 2, "groups": 2, "bias": False},
        (2, 4, 9, 8),
    ),
    (mnn.Conv2d, nn.Conv2d, (3, 4, 4), {"padding": "same", "dilation": 2}, (2, 3, 8, 8)),
    (mnn.Conv2d, nn.Conv2d, (3, 4, 3), {"padding": 2, "padding_mode": "reflect"}, (2, 3, 7, 7)),
    (mnn.Conv2d, nn.Conv2d, (3, 4, 3), {"padding": 1, "padding_mode": "replicate"}, (2, 3, 6, 6)),
    (
        mnn.Conv2d,
        nn.Conv2d,
        (3, 4, 3),
        {"padding": (1, 2), "padding_mode": "circular"},
        (2, 3, 6, 6),
    ),
    (
        mnn.MaxPool2d,
        nn.MaxPool2d,
        (3,),
        {"stride": 2, "padding": 1, "ceil_mode": True},
        (2, 3, 8, 8),
    ),
    (mnn.MaxPool2d, nn.MaxPool2d, (2,), {"return_indices": True}, (2, 3, 8, 8)),
    (
        mnn.AvgPool2d,
        nn.AvgPool2d,
        (3,),
        {"stride": 2, "padding": 1, "count_include_pad": False},
        (2, 3, 8, 8),
    ),
    (mnn.BatchNorm1d, nn.BatchNorm1d, (5,), {}, (8, 5)),
    (mnn.BatchNorm1d, nn.BatchNorm1d, (5,), {"momentum": None, "affine": False}, (8, 5, 3)),
    (mnn.BatchNorm1d, nn.BatchNorm1d, (5,), {"track_running_stats": False}, (8, 5)),
    (mnn.BatchNorm2d, nn.BatchNorm2d, (3,), {"eps": 1e-3, "momentum": 0.3}, (4, 3, 5, 5)),
    (mnn.BatchNorm2d, nn.BatchNorm2d, (3,), {"bias": False}, (4, 3, 5, 5)),
    (mnn.LayerNorm, nn.LayerNorm, ((4, 5),), {}, (3, 4, 5)),
    (mnn.LayerNorm, nn.LayerNorm, (5,), {"elementwise_affine": False}, (3, 5)),
    (mnn.LayerNorm, nn.LayerNorm, (5,), {"bias": False}, (3, 5)),
    (mnn.Dropout, nn.Dropout, (0.4,), {}, (6, 7)),
    (mnn.LogSoftmax, nn.LogSoftmax, (1,), {}, (4, 6)),
    (mnn.Softmax, nn.Softmax, (-1,), {}, (4, 6)),
]


def _id(entry) -> str:
    manual_cls, _, args, kwargs, _ = entry
    return f"{manual_cls.__name__}-{args}-{'-'.join(f'{k}={v}' for k, v in kwargs.items())}"


def _built(cls: type[nn.Module], args: tuple, kwargs: dict) -> nn.Module:
    torch.manual_seed(0)
    return cls(*args, **kwargs)


def _step(module: nn.Module, x: torch.Tensor) -> tuple[Any, dict[str, torch.Tensor]]:
    """One forward and backward from seed 1: outputs and the gradients of input and
    parameters."""
    x = x.detach().clone().requires_grad_()
    torch.manual_seed(1)
    output = module(x)
    first = output[0] if isinstance(output, tuple) else output
    first.backward(torch.linspace(-1, 1, first.numel()).view(first.shape))
    grads = {"input": x.grad, **{name: p.grad for name, p in module.named_parameters()}}
    return output, grads


@pytest.mark.parametrize("entry", MODULES, ids=_id)
def test_same_parameters_buffers_and_step_as_torch(entry) -> None:
    manual_cls, torch_cls, args, kwargs, shape = entry
    manual, reference = _built(manual_cls, args, kwargs), _built(torch_cls, args, kwargs)
    assert isinstance(manual, torch_cls) and is_handwritten(manual)
    assert repr(manual) == "manual." + repr(reference)
    state, reference_state = manual.state_dict(), reference.state_dict()
    assert list(state) == list(reference_state)
    assert all(torch.equal(state[k], reference_state[k]) for k in state)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    for training in (True, False):
        manual.train(training)
        reference.train(training)
        (out_m, grads_m), (out_r, grads_r) = _step(manual, x), _step(reference, x)
        for a, b in zip(_tensors(out_m), _tensors(out_r), strict=True):
            assert torch.equal(a, b)  # torch's forward kernel
        for name, grad in grads_m.items():
            assert float(agreement(grad, grads_r[name])["max_rel"]) <= 1e-6, name
        for (name, a), b in zip(manual.named_buffers(), reference.buffers(), strict=True):
            assert torch.equal(a, b), name  # running statistics, num_batches_tracked
        manual.zero_grad()
        reference.zero_grad()


def _tensors(output: Any) -> list[torch.Tensor]:
    return list(output) if isinstance(output, tuple) else [output]


@pytest.mark.parametrize("entry", MODULES, ids=_id)
def test_state_dict_moves_and_twins_convert(entry) -> None:
    manual_cls, torch_cls, args, kwargs, _ = entry
    manual, reference = _built(manual_cls, args, kwargs), _built(torch_cls, args, kwargs)
    for parameter in reference.parameters():
        parameter.data.add_(1.0)  # other values, same layout
    manual.load_state_dict(reference.state_dict())
    pairs = zip(manual.parameters(), reference.parameters(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)
    twin = autograd_twin(manual)
    assert type(twin) is torch_cls and manual_cls is not torch_cls
    assert type(manual_twin(reference)) is manual_cls
    assert twin.state_dict().keys() == manual.state_dict().keys()


def test_flatten_is_torchs_and_stays_as_it_is_in_both_twins() -> None:
    assert mnn.Flatten is nn.Flatten
    model = nn.Sequential(mnn.Conv2d(1, 2, 3), mnn.Flatten(), mnn.Linear(8, 3))
    twin = autograd_twin(model)
    assert [type(m) for m in twin] == [nn.Conv2d, nn.Flatten, nn.Linear]


def test_batch_norm_running_statistics_follow_torch_over_many_steps() -> None:
    """Momentum 0.1 and the cumulative average (momentum=None), ten training steps then
    evaluation: running mean and variance, num_batches_tracked and the eval outputs are
    torch's, bit for bit."""
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(16, 4, 3, generator=gen) * 3 + 1 for _ in range(10)]
    for momentum in (0.1, None):
        manual, reference = (
            mnn.BatchNorm1d(4, momentum=momentum),
            nn.BatchNorm1d(4, momentum=momentum),
        )
        for batch in batches:
            manual(batch)
            reference(batch)
        for a, b in zip(manual.buffers(), reference.buffers(), strict=True):
            assert torch.equal(a, b)
        assert int(manual.num_batches_tracked) == 10
        manual.eval()
        reference.eval()
        assert torch.equal(manual(batches[0]), reference(batches[0]))


def test_batch_norm_refuses_torchs_bad_input_dimensions() -> None:
    with pytest.raises(ValueError, match="expected 4D input"):
        mnn.BatchNorm2d(3)(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="expected 2D or 3D input"):
        mnn.BatchNorm1d(3)(torch.randn(2, 3, 4, 5))


def test_dropout_module_is_the_identity_in_eval_and_drops_torchs_units_in_training() -> None:
    x = torch.randn(20, 30)
    manual, reference = mnn.Dropout(0.3), nn.Dropout(0.3)
    manual.eval()
    assert manual(x) is x
    manual.train()
    torch.manual_seed(7)
    dropped = manual(x)
    torch.manual_seed(7)
    assert torch.equal(dropped, reference(x))


def test_dropout_module_in_place_like_torch() -> None:
    x = torch.randn(5, 6)
    a, b = x.clone(), x.clone()
    torch.manual_seed(3)
    out = mnn.Dropout(0.5, inplace=True)(a)
    torch.manual_seed(3)
    nn.Dropout(0.5, inplace=True)(b)
    assert out is a and torch.equal(a, b)


@pytest.mark.parametrize("cls", [mnn.Softmax, mnn.LogSoftmax])
def test_softmax_without_dim_warns_and_picks_torchs_dimension(cls: Callable) -> None:
    x = torch.randn(3, 4, 5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = cls()(x)
    torch_cls = getattr(nn, cls.__name__)
    with pytest.warns(UserWarning, match="Implicit dimension choice"):
        expected = torch_cls()(x)
    assert any("Implicit dimension choice" in str(w.message) for w in caught)
    assert torch.equal(out, expected)
