"""Third-party messages that tell a manualbp user nothing, silenced one by one.

Each filter matches one exact message of one library (and its warning category); every other
warning and log line still shows. The ``manualbp`` command and the benchmark install them;
``pyproject.toml`` repeats the warning filters for pytest. Why each is harmless:

* torch 2.14 deprecates ``LeafSpec``, which Lightning 2.6 still calls in
  ``lightning/pytorch/utilities/_pytree.py`` (``FutureWarning``, once per process);
* torch deprecates ``torch.distributed.nn.functional.all_gather``, which Lightning's
  ``LightningModule.all_gather`` calls under DDP (``FutureWarning``);
* jsonargparse 4.49 deprecates APIs LightningCLI still calls (``add_instantiator``,
  ``instantiate_classes``, ``skip_none``): a ``JsonargparseDeprecationWarning`` from
  ``lightning.pytorch.cli``;
* Lightning logs an advertisement for its cloud logger (``💡 Tip: ... litlogger``) whenever a
  Trainer has no LitLogger;
* torch's C++-extension loader logs ``No CUDA runtime is found, using CUDA_HOME=...`` when
  ``torch.compile`` runs on a machine with a CUDA toolkit but no GPU.
"""

from __future__ import annotations

import logging
import warnings

__all__ = ["silence_third_party_noise"]

LEAFSPEC_DEPRECATION = r"`isinstance\(treespec, LeafSpec\)` is deprecated"
ALL_GATHER_DEPRECATION = r"torch\.distributed\.nn\.functional\.all_gather is deprecated"
LITLOGGER_TIP = "💡 Tip: For seamless cloud logging and experiment tracking"
NO_CUDA_RUNTIME = "No CUDA runtime is found, using CUDA_HOME="

# The loggers that emit the two log lines: Lightning's rank-zero logger (the name of
# lightning_utilities' module-level logger once lightning.pytorch is imported; fabric's before)
# and torch's C++-extension loader.
_TIP_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")
_CPP_EXTENSION_LOGGER = "torch.utils.cpp_extension"


class _DropMessage(logging.Filter):
    """Drops log records whose message starts with ``prefix``."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def _add_log_filter(logger_name: str, prefix: str) -> None:
    logger = logging.getLogger(logger_name)
    if not any(isinstance(f, _DropMessage) and f.prefix == prefix for f in logger.filters):
        logger.addFilter(_DropMessage(prefix))


def silence_third_party_noise() -> None:
    """Install the filters listed in the module docstring (idempotent)."""
    warnings.filterwarnings("ignore", message=LEAFSPEC_DEPRECATION, category=FutureWarning)
    warnings.filterwarnings("ignore", message=ALL_GATHER_DEPRECATION, category=FutureWarning)
    try:
        from jsonargparse._deprecated import JsonargparseDeprecationWarning
    except ImportError:  # an older jsonargparse has nothing deprecated to warn about
        pass
    else:
        warnings.filterwarnings(
            "ignore", category=JsonargparseDeprecationWarning, module=r"lightning\.pytorch\.cli"
        )
    for name in _TIP_LOGGERS:
        _add_log_filter(name, LITLOGGER_TIP)
    _add_log_filter(_CPP_EXTENSION_LOGGER, NO_CUDA_RUNTIME)
