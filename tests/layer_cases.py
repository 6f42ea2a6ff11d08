"""The cases that prove the layers beyond the MLP: convolution, pooling, normalization,
dropout and softmax, each a manualbp alias beside its ``torch.nn.functional`` namesake.

A :class:`LayerCase` builds its arguments from a dtype and a seeded generator, in float64
first so that every dtype sees the same numbers. The test files parametrize over
:data:`LAYER_CASES`: parity with torch (``test_layer_parity.py``), finite differences
(``test_layer_gradcheck.py``), ``vmap`` / ``torch.compile`` / autocast
(``test_layer_transforms.py``) and the rule that a backward never calls one of torch's
backward kernels (``test_no_backward_kernels.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

import manualbp.functional as MF

Args = tuple[Any, ...]

# Normwise agreement (max |a - r| / max |r|) every gradient must reach: a few roundings of
# the longest reduction in the cases (a weight gradient sums N·Ho·Wo products).
MAX_REL: dict[torch.dtype, float] = {torch.float32: 1e-5, torch.float64: 1e-13}

# Entrywise closeness, looser than the normwise bound: an entry near zero, where a long sum
# cancels, may differ from torch's by a few ulps of the largest entry.
ENTRYWISE: dict[torch.dtype, dict[str, float]] = {
    torch.float32: {"rtol": 1e-4, "atol": 1e-4},
    torch.float64: {"rtol": 1e-10, "atol": 1e-11},
}


@dataclass(frozen=True)
class LayerCase:
    """One call of a manualbp alias and its torch namesake.

    ``make_args(dtype, generator)`` returns the positional arguments; floating tensors that
    should be differentiated come back with ``requires_grad=True``. ``exact`` claims bit-exact
    gradients on the CPU (the forward is always torch's own kernel, so always exact);
    ``random`` runs both sides from the same seed (dropout); ``ties_free`` marks inputs whose
    values are well apart (max pooling under finite differences).
    """

    id: str
    manual: Callable[..., Any]
    reference: Callable[..., Any]
    make_args: Callable[[torch.dtype, torch.Generator], Args]
    kwargs: dict[str, Any] = field(default_factory=dict)
    exact: bool = False
    random: bool = False

    def args(self, dtype: torch.dtype) -> Args:
        generator = torch.Generator().manual_seed(sum(map(ord, self.id)))
        return self.make_args(dtype, generator)

    def call(self, function: Callable[..., Any], *args: Any) -> Any:
        """``function(*args, **kwargs)``, from seed 0 when the case draws random numbers."""
        if self.random:
            torch.manual_seed(0)
        return function(*args, **self.kwargs)


def randn(
    shape: Sequence[int],
    dtype: torch.dtype,
    generator: torch.Generator,
    *,
    grad: bool = True,
    scale: float = 1.0,
) -> torch.Tensor:
    values = torch.randn(tuple(shape), generator=generator, dtype=torch.float64) * scale
    return values.to(dtype).requires_grad_(grad)


def distinct(shape: Sequence[int], dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    """Values spread evenly over [-2, 2) in random order: no two within 4/numel, so a finite
    difference never changes which entry of a pooling window is the largest."""
    count = int(torch.Size(shape).numel())
    order = torch.randperm(count, generator=generator).to(torch.float64)
    return (order / count * 4 - 2).view(tuple(shape)).to(dtype).requires_grad_()


def leaf(view: torch.Tensor) -> torch.Tensor:
    """A (non-contiguous) view made its own leaf, keeping its strides."""
    return view.detach().requires_grad_()


def _conv(
    id: str,
    input_shape: Sequence[int],
    weight_shape: Sequence[int],
    *,
    bias: bool = True,
    layout: str = "contiguous",
    input_grad: bool = True,
    **kwargs: Any,
) -> LayerCase:
    def make(dtype, gen):
        if layout == "transposed":  # the last two dimensions swapped: a non-contiguous input
            *lead, h, w = input_shape
            x = leaf(randn((*lead, w, h), dtype, gen).transpose(-1, -2))
        elif layout == "channels_last":
            x = leaf(randn(input_shape, dtype, gen).to(memory_format=torch.channels_last))
        else:
            x = randn(input_shape, dtype, gen, grad=input_grad)
        weight = randn(weight_shape, dtype, gen, scale=0.5)
        b = randn(weight_shape[:1], dtype, gen) if bias else None
        return x, weight, b

    return LayerCase(id, MF.conv2d, F.conv2d, make, kwargs)


def _pool(
    id: str,
    manual: Callable,
    reference: Callable,
    shape: Sequence[int],
    *,
    channels_last: bool = False,
    **kwargs: Any,
) -> LayerCase:
    exact = manual is MF.max_pool2d or _non_overlapping(kwargs)

    def make(dtype, gen):
        x = distinct(shape, dtype, gen)
        return (leaf(x.to(memory_format=torch.channels_last)),) if channels_last else (x,)

    return LayerCase(id, manual, reference, make, kwargs, exact=exact)


def _non_overlapping(kwargs: dict[str, Any]) -> bool:
    """Average pooling whose windows do not overlap gives each input one share: exact."""
    stride = kwargs.get("stride") or kwargs["kernel_size"]
    return stride == kwargs["kernel_size"] and not kwargs.get("ceil_mode", False)


def _batch_norm(
    id: str,
    shape: Sequence[int],
    *,
    training: bool,
    affine: bool = True,
    running: bool = True,
    **kwargs: Any,
) -> LayerCase:
    channels = shape[1]

    def make(dtype, gen):
        x = randn(shape, dtype, gen, scale=2.0)
        mean = randn((channels,), dtype, gen, grad=False) if running else None
        var = (randn((channels,), dtype, gen, grad=False).abs() + 0.5) if running else None
        weight = randn((channels,), dtype, gen) if affine else None
        bias = randn((channels,), dtype, gen) if affine else None
        return x, mean, var, weight, bias

    return LayerCase(id, MF.batch_norm, F.batch_norm, make, {"training": training, **kwargs})


def _layer_norm(
    id: str, shape: Sequence[int], normalized: Sequence[int], *, affine: bool = True, **kwargs
) -> LayerCase:
    def make(dtype, gen):
        x = randn(shape, dtype, gen, scale=2.0)
        if not affine:
            return x, tuple(normalized)
        return x, tuple(normalized), randn(normalized, dtype, gen), randn(normalized, dtype, gen)

    return LayerCase(id, MF.layer_norm, F.layer_norm, make, kwargs)


def _softmax(
    id: str,
    manual: Callable,
    reference: Callable,
    shape: Sequence[int],
    dim: int,
    *,
    transposed: bool = False,
) -> LayerCase:
    def make(dtype, gen):
        if transposed:
            return (leaf(randn(shape[::-1], dtype, gen, scale=3.0).t()),)
        return (randn(shape, dtype, gen, scale=3.0),)

    return LayerCase(id, manual, reference, make, {"dim": dim})


def _dropout(id: str, shape: Sequence[int], p: float, **kwargs: Any) -> LayerCase:
    def make(dtype, gen):
        return (randn(shape, dtype, gen),)

    return LayerCase(id, MF.dropout, F.dropout, make, {"p": p, **kwargs}, exact=True, random=True)


LAYER_CASES: list[LayerCase] = [
    # convolution: dx is a transposed convolution, dW a convolution of x with dy
    _conv("conv2d", (2, 3, 7, 7), (4, 3, 3, 3), padding=1),
    _conv("conv2d-no-bias", (2, 3, 6, 5), (4, 3, 3, 2), bias=False),
    _conv("conv2d-strided", (2, 3, 9, 8), (4, 3, 3, 3), stride=2, padding=1),
    _conv("conv2d-stride-pad-pairs", (2, 2, 9, 11), (3, 2, 3, 2), stride=(2, 3), padding=(2, 1)),
    _conv("conv2d-dilated", (1, 2, 9, 9), (2, 2, 3, 3), dilation=(2, 3), padding=1),
    _conv("conv2d-groups", (2, 4, 8, 8), (6, 2, 3, 3), groups=2, stride=(2, 1)),
    _conv("conv2d-depthwise", (2, 4, 6, 6), (8, 1, 3, 3), groups=4),
    _conv("conv2d-same-odd", (2, 3, 6, 7), (4, 3, 3, 5), padding="same"),
    _conv("conv2d-same-even", (2, 3, 6, 7), (4, 3, 2, 4), padding="same"),
    _conv("conv2d-same-dilated", (1, 4, 7, 7), (2, 4, 2, 3), padding="same", dilation=3),
    _conv("conv2d-valid", (1, 4, 7, 6), (2, 4, 2, 3), padding="valid", stride=2),
    _conv("conv2d-unbatched", (3, 6, 6), (2, 3, 3, 3), padding=1),
    _conv("conv2d-transposed-input", (2, 3, 7, 6), (4, 3, 3, 3), layout="transposed"),
    _conv("conv2d-channels-last", (2, 3, 7, 7), (4, 3, 3, 3), layout="channels_last"),
    _conv("conv2d-frozen-input", (4, 1, 12, 12), (6, 1, 5, 5), input_grad=False, padding=2),
    _conv("conv2d-lenet-c3", (4, 6, 14, 14), (16, 6, 5, 5)),
    # max pooling: the gradient goes to each window's argmax (bit-exact)
    _pool("max_pool2d", MF.max_pool2d, F.max_pool2d, (2, 3, 8, 8), kernel_size=2),
    _pool("max_pool2d-overlap", MF.max_pool2d, F.max_pool2d, (2, 2, 7, 6), kernel_size=3, stride=1),
    _pool(
        "max_pool2d-padding-dilation-ceil",
        MF.max_pool2d,
        F.max_pool2d,
        (2, 2, 9, 8),
        kernel_size=(3, 2),
        stride=(2, 1),
        padding=1,
        dilation=(1, 2),
        ceil_mode=True,
    ),
    _pool("max_pool2d-unbatched", MF.max_pool2d, F.max_pool2d, (3, 9, 8), kernel_size=3, stride=2),
    _pool(
        "max_pool2d-channels-last",
        MF.max_pool2d,
        F.max_pool2d,
        (2, 3, 8, 8),
        kernel_size=3,
        stride=2,
        channels_last=True,
    ),
    # average pooling: g / divisor spread back over each window
    _pool("avg_pool2d", MF.avg_pool2d, F.avg_pool2d, (2, 3, 8, 8), kernel_size=2),
    _pool(
        "avg_pool2d-overlap-padding",
        MF.avg_pool2d,
        F.avg_pool2d,
        (2, 2, 9, 9),
        kernel_size=3,
        stride=1,
        padding=1,
    ),
    _pool(
        "avg_pool2d-exclude-padding",
        MF.avg_pool2d,
        F.avg_pool2d,
        (2, 2, 9, 9),
        kernel_size=3,
        stride=2,
        padding=1,
        count_include_pad=False,
    ),
    _pool(
        "avg_pool2d-ceil",
        MF.avg_pool2d,
        F.avg_pool2d,
        (1, 2, 7, 6),
        kernel_size=4,
        stride=3,
        padding=2,
        ceil_mode=True,
    ),
    _pool(
        "avg_pool2d-ceil-exclude-padding",
        MF.avg_pool2d,
        F.avg_pool2d,
        (1, 2, 6, 6),
        kernel_size=4,
        stride=2,
        padding=2,
        ceil_mode=True,
        count_include_pad=False,
    ),
    _pool(
        "avg_pool2d-divisor",
        MF.avg_pool2d,
        F.avg_pool2d,
        (2, 2, 6, 6),
        kernel_size=(3, 2),
        stride=(1, 2),
        divisor_override=5,
    ),
    _pool("avg_pool2d-unbatched", MF.avg_pool2d, F.avg_pool2d, (3, 7, 7), kernel_size=3, stride=2),
    # batch normalization: training (batch statistics) and evaluation (running ones)
    _batch_norm("batch_norm-train-2d", (8, 3), training=True),
    _batch_norm("batch_norm-train-3d", (4, 3, 5), training=True, momentum=0.3),
    _batch_norm("batch_norm-train-4d", (4, 3, 3, 4), training=True, eps=1e-3),
    _batch_norm("batch_norm-train-no-affine", (4, 3, 3, 3), training=True, affine=False),
    _batch_norm("batch_norm-train-no-running", (6, 2, 4), training=True, running=False),
    _batch_norm("batch_norm-eval-2d", (8, 3), training=False),
    _batch_norm("batch_norm-eval-4d", (4, 3, 3, 4), training=False),
    _batch_norm("batch_norm-eval-no-affine", (4, 3, 5), training=False, affine=False),
    # layer normalization
    _layer_norm("layer_norm", (4, 6), (6,)),
    _layer_norm("layer_norm-3d", (2, 3, 8), (8,), eps=1e-3),
    _layer_norm("layer_norm-two-dims", (2, 3, 4), (3, 4)),
    _layer_norm("layer_norm-no-affine", (5, 7), (7,), affine=False),
    # softmax and log-softmax
    _softmax("log_softmax", MF.log_softmax, F.log_softmax, (4, 7), 1),
    _softmax("log_softmax-dim0", MF.log_softmax, F.log_softmax, (4, 7), 0),
    _softmax("log_softmax-3d", MF.log_softmax, F.log_softmax, (2, 5, 3), 1),
    _softmax("log_softmax-transposed", MF.log_softmax, F.log_softmax, (4, 7), -1, transposed=True),
    _softmax("softmax", MF.softmax, F.softmax, (4, 7), 1),
    _softmax("softmax-dim0", MF.softmax, F.softmax, (4, 7), 0),
    _softmax("softmax-3d-last", MF.softmax, F.softmax, (2, 5, 3), -1),
    # dropout: the same seed drops the same units, bit for bit
    _dropout("dropout", (8, 9), 0.3),
    _dropout("dropout-half", (4, 5, 6), 0.5),
    _dropout("dropout-all", (4, 5), 1.0),
]
