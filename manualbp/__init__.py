"""manualbp: handwritten backpropagation, proven against PyTorch autograd.

The core needs only torch:

* :mod:`manualbp.functional` — ``torch.autograd.Function`` subclasses whose ``backward`` is a
  handwritten formula, and their ``torch.nn.functional``-style aliases;
* :mod:`manualbp.nn` — drop-in modules, the autograd twin of a model, the MLP builder;
* :mod:`manualbp.compare` — the statistics of agreement (exact, max_abs, max_rel, max_ulp,
  cosine) and the gradient check of a model against its twin;
* ``manualbp.check(fn, reference, *sample_args, **kwargs)`` — prove any Function against a
  reference in one call (forward, backward, gradcheck, gradgradcheck, vmap, compile, autocast,
  non_contiguous, saved_tensors, needs_input_grad); a :class:`CheckReport` comes back. It lives
  in :mod:`manualbp.checks` (plural: a module named ``check`` would be shadowed by the function
  on the package, so that ``import manualbp.check as m`` gave the function).

The wings around it are imported on demand: :mod:`manualbp.data` (MNIST provisioning and
DataModules), :mod:`manualbp.train` (the Lightning module, callbacks, CLI) and
:mod:`manualbp.tools` (reading runs, reports, benchmarks); they need the ``[train]`` extra.
"""

from manualbp import checks, compare, functional, nn
from manualbp.checks import CheckReport, check

__all__ = ["CheckReport", "check", "checks", "compare", "functional", "nn"]
__version__ = "0.1.0"
