"""Deliberately wrong Functions: the meta-tests feed them to the checks to show they can fail."""

from __future__ import annotations

import torch


class SigmoidMissingFactor(torch.autograd.Function):
    """A deliberately broken sigmoid whose backward forgets the ``(1 - y)`` factor: the
    meta-tests feed it to the checks to show that they can fail."""

    @staticmethod
    def forward(input):
        return torch.sigmoid(input)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output)

    @staticmethod
    def backward(ctx, grad_output):
        (output,) = ctx.saved_tensors
        return grad_output * output
