"""manualbp: handwritten backpropagation, proven against PyTorch autograd.

``manualbp.functional`` holds the ``torch.autograd.Function`` subclasses with handwritten
backward formulas, ``manualbp.nn`` the drop-in modules and the MLP builder. Lightning pieces
(``manualbp.data``, ``manualbp.module``, ``manualbp.cli``) are imported on demand only, so
``import manualbp`` stays light.
"""

from manualbp import functional, nn

__all__ = ["functional", "nn"]
__version__ = "0.1.0"
