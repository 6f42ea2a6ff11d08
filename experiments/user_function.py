"""A user's own Function in a manualbp experiment: a handwritten GELU, its module declared the
twin of ``torch.nn.GELU``, and a small network built from it and manualbp layers.

    manualbp check experiments.user_function:gelu --reference torch.nn.functional:gelu \\
        --input 64,128
    manualbp fit --config experiments/user_function.yaml

Run both from the repository root: ``manualbp`` puts the working directory on ``sys.path``, so
this file is the module ``experiments.user_function`` and the config names the network by
class path. Importing the file registers the twin, so the autograd twin of ``GELUNet`` is the
same network with ``torch.nn.GELU`` and ``torch.nn.Linear``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import Function

import manualbp.nn as mnn


class GELUFunction(Function):
    """``y = x Φ(x)`` (the exact, erf form);  ``dL/dx = g · (Φ(x) + x φ(x))``.

    ``Φ`` and ``φ`` are the standard normal CDF and density. Input and output: any shape ``(*)``.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(input):
        return F.gelu(input)  # torch's forward kernel: every difference comes from the backward

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, grad_output):
        (x,) = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None
        cdf = 0.5 * (1 + torch.erf(x / math.sqrt(2)))  # (*)  Φ(x)
        pdf = torch.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)  # (*)  φ(x)
        return grad_output * (cdf + x * pdf)  # (*)


def gelu(input: torch.Tensor) -> torch.Tensor:
    """GELU of ``input (*)`` → ``(*)`` with the handwritten backward."""
    return GELUFunction.apply(input)


class GELU(nn.GELU):
    """``torch.nn.GELU`` (exact form) computed by :class:`GELUFunction`. Shape ``(*)`` → ``(*)``.

    Takes no ``approximate`` argument: the handwritten formula is the exact GELU's, and a twin
    with ``approximate="tanh"`` would compute another function.
    """

    def __init__(self) -> None:
        super().__init__(approximate="none")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return gelu(input)


# GELU subclasses torch.nn.GELU and only overrides forward: the twin is the same module with
# its class changed back.
mnn.register_twin(GELU, nn.GELU)


class GELUNet(nn.Module):
    """``fc1 → GELU → fc2 → GELU → fc3``: a user's network of manualbp layers and GELU.

    Args:
        in_features: input features (784 for MNIST).
        hidden: width of both hidden layers.
        num_classes: outputs (logits).

    Shape: input ``(N, in_features)``, output ``(N, num_classes)``.
    """

    def __init__(self, in_features: int = 784, hidden: int = 128, num_classes: int = 10) -> None:
        super().__init__()
        self.fc1 = mnn.Linear(in_features, hidden)
        self.act1 = GELU()
        self.fc2 = mnn.Linear(hidden, hidden)
        self.act2 = GELU()
        self.fc3 = mnn.Linear(hidden, num_classes)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        hidden = self.act1(self.fc1(input))  # (N, hidden)
        hidden = self.act2(self.fc2(hidden))  # (N, hidden)
        return self.fc3(hidden)  # (N, num_classes)
