"""manualbp: handwritten backpropagation, proven against PyTorch autograd.

The core needs only torch:

* :mod:`manualbp.functional` — ``torch.autograd.Function`` subclasses whose ``backward`` is a
  handwritten formula, and their ``torch.nn.functional``-style aliases;
* :mod:`manualbp.nn` — drop-in modules, the autograd twin of a model, the MLP builder;
* :mod:`manualbp.compare` — the statistics of agreement (exact, max_abs, max_rel, max_ulp,
  cosine) and the gradient check of a model against its twin.

The wings around it are imported on demand: :mod:`manualbp.data` (MNIST provisioning and
DataModules), :mod:`manualbp.train` (the Lightning module, callbacks, CLI) and
:mod:`manualbp.tools` (reading runs, reports, benchmarks); they need the ``[train]`` extra.
"""

from manualbp import compare, functional, nn

__all__ = ["compare", "functional", "nn"]
__version__ = "0.1.0"
