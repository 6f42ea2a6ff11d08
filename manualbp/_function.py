"""How the aliases in ``manualbp.functional`` apply a handwritten Function.

A ``torch.autograd.Function`` can be written in two styles. The ``forward`` + ``setup_context``
style is the one ``torch.func`` transforms (``vmap``, ``grad``, ...) require, and the one the
Functions here are written in. Its ``apply`` costs more per call in eager mode than the classic
``forward(ctx, *inputs)`` style: torch routes it through the functorch dispatch and binds
``forward``'s signature on every call (about 12 µs more per forward and 30 µs more per
forward+backward on the CPU with torch 2.14), more than the kernels of a small layer.

So in eager mode :func:`apply` runs the Function's *classic form*: a classic-style Function
whose ``forward`` calls the original ``forward`` and ``setup_context`` and whose ``backward`` is
the original ``backward`` — the same code, no formula written twice (a ``backward`` replaced on
the Function, a patch or a planted mistake, is picked up: the form is rebuilt). Under
``torch.compile`` or a ``torch.func`` transform it calls the Function's own ``apply``. Both
give identical results.
"""

from __future__ import annotations

import torch
from torch.autograd import Function

from manualbp.direct import recording

__all__ = ["apply", "classic_form"]

_CLASSIC_FORMS: dict[type[Function], type[Function]] = {}


def classic_form(function: type[Function]) -> type[Function]:
    """``function`` as a classic-style Function running its own forward, setup_context and
    backward (built once per Function and ``backward``, then cached)."""
    form = _CLASSIC_FORMS.get(function)
    if form is None or form.backward is not function.backward:
        form = _CLASSIC_FORMS[function] = _build_classic_form(function)
    return form


def _build_classic_form(function: type[Function]) -> type[Function]:
    def forward(ctx, *inputs):
        output = function.forward(*inputs)
        function.setup_context(ctx, inputs, output)
        return output

    namespace = {
        "__doc__": f"{function.__name__} in the classic forward(ctx, ...) style (faster apply).",
        "__module__": function.__module__,
        "__qualname__": f"{function.__qualname__}.classic_form",
        "forward": staticmethod(forward),
        "backward": staticmethod(function.backward),
    }
    # Built with type() so that the class, and the node autograd names after it, carry the
    # Function's own name: graphs show ``LinearFunctionBackward`` either way.
    return type(function.__name__, (Function,), namespace)


def apply(function: type[Function], *inputs):
    """``function.apply(*inputs)`` under ``torch.compile`` or a ``torch.func`` transform; the
    same computation through the faster classic form in eager mode; and, while a
    :class:`~manualbp.direct.Tape` records (direct backprop), the Function's own forward and
    setup_context without autograd."""
    if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
        return function.apply(*inputs)
    tape = recording()
    if tape is not None:
        return tape.apply(function, *inputs)
    return classic_form(function).apply(*inputs)
