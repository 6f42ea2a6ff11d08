"""A handwritten backward is a formula in forward-type ops: it never calls one of torch's
backward kernels and never runs autograd.

Each case of ``layer_cases.LAYER_CASES`` runs its backward under a ``TorchDispatchMode`` that
records every aten op dispatched; none may be a backward kernel (``convolution_backward``,
``max_pool2d_with_indices_backward``, ``avg_pool2d_backward``, ``native_batch_norm_backward``,
``native_layer_norm_backward``, ``_softmax_backward_data``, ``native_dropout_backward``, ...:
every one has ``backward`` in its name). ``torch.autograd.grad`` and ``backward`` are
replaced by recorders meanwhile, so a backward that ran autograd inside would be caught too.
The same recorder run on torch's own ops sees their backward kernels: the check can fail.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from layer_cases import LAYER_CASES, LayerCase
from torch.utils._python_dispatch import TorchDispatchMode


class AtenRecorder(TorchDispatchMode):
    """Records the name of every aten op dispatched inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.name())
        return func(*args, **(kwargs or {}))


def backward_ops(
    case: LayerCase, function: Callable, monkeypatch: pytest.MonkeyPatch
) -> tuple[list[str], list[str]]:
    """The aten ops the backward of ``function`` on ``case``'s float32 arguments dispatched,
    and the autograd entry points it called."""
    args = case.args(torch.float32)
    output = case.call(function, *args)
    inputs = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    upstream = torch.randn_like(output)
    autograd_calls: list[str] = []
    engine = torch.autograd.grad
    for name in ("grad", "backward"):
        monkeypatch.setattr(
            torch.autograd, name, lambda *a, name=name, **k: autograd_calls.append(name)
        )
    with AtenRecorder() as recorder:
        engine(output, inputs, upstream)
    monkeypatch.undo()
    return recorder.ops, autograd_calls


@pytest.mark.parametrize("case", LAYER_CASES, ids=lambda case: case.id)
def test_backward_calls_no_backward_kernel_and_no_autograd(
    case: LayerCase, monkeypatch: pytest.MonkeyPatch
) -> None:
    ops, autograd_calls = backward_ops(case, case.manual, monkeypatch)
    assert ops, "the recorder saw the backward"
    assert [op for op in ops if "backward" in op] == []
    assert autograd_calls == []


@pytest.mark.parametrize(
    "case_id, kernel",
    [
        ("conv2d", "aten::convolution_backward"),
        ("max_pool2d", "aten::max_pool2d_with_indices_backward"),
        ("avg_pool2d", "aten::avg_pool2d_backward"),
        ("batch_norm-train-4d", "aten::native_batch_norm_backward"),
        ("layer_norm", "aten::native_layer_norm_backward"),
        ("log_softmax", "aten::_log_softmax_backward_data"),
        ("softmax", "aten::_softmax_backward_data"),
    ],
)
def test_the_recorder_sees_torchs_backward_kernels(
    case_id: str, kernel: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    case = next(case for case in LAYER_CASES if case.id == case_id)
    ops, _ = backward_ops(case, case.reference, monkeypatch)
    assert kernel in ops
