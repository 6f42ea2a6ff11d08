"""torch's own sample inputs (``op_db``, ``module_db``), shared by the OpInfo test files."""

from __future__ import annotations

import functools
from typing import Any

import torch


@functools.cache
def torch_test_db() -> tuple[list[Any], list[Any]]:
    """torch's ``op_db`` and ``module_db``, imported on first use (the import takes seconds).

    Importing torch's test utilities freezes the ``torch.backends`` flags for the whole
    process (``disable_global_flags``); that is undone, so that later tests may still set
    them. The flag lives in the globals of ``torch.backends``' functions."""
    frozen_before = torch.backends.flags_frozen()
    from torch.testing._internal.common_methods_invocations import op_db
    from torch.testing._internal.common_modules import module_db

    if not frozen_before:
        torch.backends.flags_frozen.__globals__["__allow_nonbracketed_mutation_flag"] = True
    return op_db, module_db
