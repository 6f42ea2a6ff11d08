"""TensorBoard's CUSTOM SCALARS tab for a twin run: manual and autograd on the same chart.

The SCALARS tab draws one chart per tag, so ``train/loss/manual`` and ``train/loss/autograd``
sit side by side; the layout written here overlays them. :func:`twin_layout` builds it for
:meth:`SummaryWriter.add_custom_scalars <torch.utils.tensorboard.SummaryWriter.add_custom_scalars>`
(written once per run by :class:`~manualbp.train.module.TwinModule`); each chart is a list of
tag regular expressions, every matching tag one line:

* ``manual vs autograd``: train loss, train accuracy, validation accuracy, validation loss,
  learning rate, each with both twins (lockstep), or the trained twin and, in check mode, the
  twin's loss at the manual weights;
* ``gradient check``: ``max_rel``, ``max_ulp`` and ``cosine`` of every parameter on one chart
  each, the worst ``max_rel`` at each check and over the run, ``|loss_manual − loss_autograd|``;
* ``weight divergence`` (lockstep): ``divergence/<param>`` and ``divergence/max``;
* ``gradient norm per layer`` (lockstep): ``grad_norm/manual/<param>`` over
  ``grad_norm/autograd/<param>``, one chart per parameter.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

__all__ = ["twin_layout"]

Layout = dict[str, dict[str, list]]


def _tags(*patterns: str) -> list:
    """A multi-line chart of the tags matching any of ``patterns`` (anchored regexes)."""
    return ["Multiline", [f"^{pattern}$" for pattern in patterns]]


def twin_layout(params: Sequence[str], compare: str, trained: Sequence[str]) -> Layout:
    """The custom-scalars layout of a run.

    Args:
        params: the manual network's parameter names (``"fc1.weight"``, ...).
        compare: the module's mode, ``"lockstep"``, ``"check"`` or ``"off"``.
        trained: the twins that train (``["manual", "autograd"]`` in lockstep).
    """
    twins = "(manual|autograd)"
    layout: Layout = {
        "manual vs autograd": {
            "train loss": _tags(f"train/loss/{twins}"),
            "train accuracy": _tags(f"train/acc/{twins}"),
            "validation accuracy": _tags(f"val/acc/{twins}"),
            "validation loss": _tags(f"val/loss/{twins}"),
            "learning rate": _tags(f"lr/{twins}"),
        }
    }
    if compare != "off":
        layout["gradient check (same weights, same batch)"] = {
            "max_rel, every parameter": _tags(r"grad_check/[^/]+/max_rel"),
            "max_ulp, every parameter": _tags(r"grad_check/[^/]+/max_ulp"),
            "cosine, every parameter": _tags(r"grad_check/[^/]+/cosine"),
            "worst max_rel: at each check, over the run": _tags(
                "grad_check/max_rel", "grad_check/worst_max_rel"
            ),
            "|loss_manual − loss_autograd|": _tags("grad_check/loss_diff"),
        }
    if compare == "lockstep":
        layout["weight divergence (twins trained apart)"] = {
            "max |θ_manual − θ_autograd|, every parameter": _tags(r"divergence/.+"),
        }
    if len(trained) > 1:
        layout["gradient norm per layer, manual vs autograd"] = {
            param: _tags(f"grad_norm/{twins}/{re.escape(param)}") for param in params
        }
    return layout
