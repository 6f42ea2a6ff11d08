"""Bad input to the new layers gets torch's answer or a clear error, with torch's error type.

Each case calls a manualbp alias with one mistake; the message must name what was wrong.
Where ``torch.nn.functional`` raises for the same mistake, the same call on torch must raise
the same type, so code that catches torch's errors catches manualbp's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

import manualbp.functional as MF

X = torch.randn(2, 3, 6, 6)
W = torch.randn(4, 3, 3, 3)
C3 = torch.zeros(3), torch.ones(3)


@dataclass(frozen=True)
class BadCall:
    id: str
    call: Callable[[], object]
    error: type[Exception]
    match: str
    torch_call: Callable[[], object] | None = None


BAD_CALLS = [
    # conv2d: ranks checked by manualbp, the rest by torch's own kernel, with its message
    BadCall(
        "conv2d-weight-3d",
        lambda: MF.conv2d(X, torch.randn(4, 3, 3)),
        RuntimeError,
        r"weight must be 4-D \(out_channels, in_channels/groups, kH, kW\), got shape \(4, 3, 3\)",
        lambda: F.conv2d(X, torch.randn(4, 3, 3)),
    ),
    BadCall(
        "conv2d-input-2d",
        lambda: MF.conv2d(torch.randn(6, 6), W),
        RuntimeError,
        r"input must be 4-D \(N, C_in, H, W\) or unbatched 3-D \(C_in, H, W\), got shape \(6, 6\)",
        lambda: F.conv2d(torch.randn(6, 6), W),
    ),
    BadCall(
        "conv2d-channels",
        lambda: MF.conv2d(torch.randn(2, 5, 6, 6), W),
        RuntimeError,
        r"expected input\[2, 5, 6, 6\] to have 3 channels, but got 5 channels",
        lambda: F.conv2d(torch.randn(2, 5, 6, 6), W),
    ),
    BadCall(
        "conv2d-bias-size",
        lambda: MF.conv2d(X, W, torch.randn(3)),
        RuntimeError,
        r"expected bias to be 1-dimensional with 4 elements, but got bias of size \[3\]",
        lambda: F.conv2d(X, W, torch.randn(3)),
    ),
    BadCall(
        "conv2d-padding-string",
        lambda: MF.conv2d(X, W, padding="full"),
        RuntimeError,
        "Invalid padding string: 'full'",
        lambda: F.conv2d(X, W, padding="full"),
    ),
    BadCall(
        "conv2d-same-strided",
        lambda: MF.conv2d(X, W, padding="same", stride=2),
        RuntimeError,
        "padding='same' is not supported for strided convolutions",
        lambda: F.conv2d(X, W, padding="same", stride=2),
    ),
    BadCall(
        "conv2d-kernel-larger-than-input",
        lambda: MF.conv2d(torch.randn(1, 3, 2, 2), W),
        RuntimeError,
        "Kernel size can't be greater than actual input size",
        lambda: F.conv2d(torch.randn(1, 3, 2, 2), W),
    ),
    BadCall(
        "conv2d-dtypes",
        lambda: MF.conv2d(X.double(), W),
        RuntimeError,
        "expected scalar type Double but found Float|should be the same",
        lambda: F.conv2d(X.double(), W),
    ),
    BadCall(
        "conv2d-complex",
        lambda: MF.conv2d(X.to(torch.complex64), W.to(torch.complex64)),
        RuntimeError,
        "input has dtype torch.complex64; complex tensors are not supported",
    ),
    BadCall(
        "conv2d-not-a-tensor",
        lambda: MF.conv2d([1.0], W),
        TypeError,
        "input must be a torch.Tensor",
    ),
    # pooling: torch's kernels check the windows
    BadCall(
        "max_pool2d-padding",
        lambda: MF.max_pool2d(X, 2, padding=2),
        RuntimeError,
        "pad should be at most half of effective kernel size",
        lambda: F.max_pool2d(X, 2, padding=2),
    ),
    BadCall(
        "max_pool2d-input-2d",
        lambda: MF.max_pool2d(torch.randn(6, 6), 2),
        RuntimeError,
        r"3D or 4D \(batch mode\) tensor",
        lambda: F.max_pool2d(torch.randn(6, 6), 2),
    ),
    BadCall(
        "avg_pool2d-divisor-zero",
        lambda: MF.avg_pool2d(X, 2, divisor_override=0),
        RuntimeError,
        "divisor must be not zero",
        lambda: F.avg_pool2d(X, 2, divisor_override=0),
    ),
    BadCall(
        "avg_pool2d-negative-padding",
        lambda: MF.avg_pool2d(X, 2, padding=-1),
        RuntimeError,
        "pad must be non-negative",
        lambda: F.avg_pool2d(X, 2, padding=-1),
    ),
    # batch norm: torch's checks, made before its kernel (which would crash without them)
    BadCall(
        "batch_norm-eval-without-running-statistics",
        lambda: MF.batch_norm(X, None, None, training=False),
        RuntimeError,
        "running_mean must be defined in evaluation mode",
        lambda: F.batch_norm(X, None, None, training=False),
    ),
    BadCall(
        "batch_norm-statistics-size",
        lambda: MF.batch_norm(X, torch.zeros(4), torch.ones(4)),
        RuntimeError,
        r"running_mean should contain 3 elements not 4",
        lambda: F.batch_norm(X, torch.zeros(4), torch.ones(4)),
    ),
    BadCall(
        "batch_norm-weight-size",
        lambda: MF.batch_norm(X, *C3, torch.ones(2), training=True),
        RuntimeError,
        r"weight should contain 3 elements not 2",
        lambda: F.batch_norm(X, *C3, torch.ones(2), training=True),
    ),
    BadCall(
        "batch_norm-one-value-per-channel",
        lambda: MF.batch_norm(torch.randn(1, 3), *C3, training=True),
        ValueError,
        r"more than 1 value per channel when training, got input size torch.Size\(\[1, 3\]\)",
        lambda: F.batch_norm(torch.randn(1, 3), *C3, training=True),
    ),
    BadCall(
        "batch_norm-eps-zero-training",
        lambda: MF.batch_norm(X, *C3, training=True, eps=0.0),
        ValueError,
        "batch_norm eps must be positive during training, but got 0.0",
        lambda: F.batch_norm(X, *C3, training=True, eps=0.0),
    ),
    BadCall(
        "batch_norm-one-statistic",
        lambda: MF.batch_norm(X, torch.zeros(3), None, training=True),
        ValueError,
        "running_mean and running_var must either both be None or neither be None",
        lambda: F.batch_norm(X, torch.zeros(3), None, training=True),
    ),
    BadCall(
        "batch_norm-no-channel-dimension",
        lambda: MF.batch_norm(torch.randn(3), *C3),
        RuntimeError,
        r"input must be \(N, C\) or \(N, C, \*\), with channels in dimension 1, got shape \(3,\)",
        lambda: F.batch_norm(torch.randn(3), *C3),
    ),
    # layer norm
    BadCall(
        "layer_norm-shape",
        lambda: MF.layer_norm(X, (5,)),
        RuntimeError,
        r"Given normalized_shape=\[5\], expected input with shape \[\*, 5\]",
        lambda: F.layer_norm(X, (5,)),
    ),
    BadCall(
        "layer_norm-int-shape",
        lambda: MF.layer_norm(X, 6),
        TypeError,
        "normalized_shape",
        lambda: F.layer_norm(X, 6),
    ),
    # dropout and softmax
    BadCall(
        "dropout-p",
        lambda: MF.dropout(X, 1.5),
        ValueError,
        "dropout probability has to be between 0 and 1, but got 1.5",
        lambda: F.dropout(X, 1.5),
    ),
    BadCall(
        "dropout-complex",
        lambda: MF.dropout(X.to(torch.complex64)),
        RuntimeError,
        "complex tensors are not supported",
    ),
    BadCall(
        "softmax-integer-input",
        lambda: MF.softmax(torch.ones(3, dtype=torch.long), 0),
        NotImplementedError,
        "not implemented for 'Long'",
        lambda: F.softmax(torch.ones(3, dtype=torch.long), 0),
    ),
    BadCall(
        "log_softmax-dim",
        lambda: MF.log_softmax(X, 4),
        IndexError,
        r"Dimension out of range",
        lambda: F.log_softmax(X, 4),
    ),
]


@pytest.mark.parametrize("case", BAD_CALLS, ids=lambda case: case.id)
def test_bad_input_raises_a_clear_error_of_torchs_type(case: BadCall) -> None:
    with pytest.raises(case.error, match=case.match):
        case.call()
    if case.torch_call is not None:
        with pytest.raises(case.error):
            case.torch_call()
