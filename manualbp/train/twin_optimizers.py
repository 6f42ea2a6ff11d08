"""One optimizer and one learning-rate scheduler per twin, behind the one Lightning steps.

In lockstep both twins train in one LightningModule under Lightning's automatic optimization,
which drives a single optimizer. If that optimizer held both twins' parameters, anything it does
across its parameters would couple them: gradient clipping by total norm, a closure-based
optimizer such as LBFGS, a plateau scheduler watching one twin's loss. :class:`TwinOptimizers`
is that single optimizer on the outside and an independent optimizer per twin inside, so each
twin trains exactly as its network would alone; :class:`TwinSchedulers` does the same for
schedulers. Gradient clipping per twin is the module's
``configure_gradient_clipping`` (see :class:`~manualbp.train.module.TwinModule`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, MutableMapping
from typing import Any

import torch
from torch.optim import Optimizer

__all__ = ["TwinOptimizers", "TwinSchedulers", "needs_closure"]


def needs_closure(optimizer: Optimizer) -> bool:
    """Whether ``optimizer.step`` re-evaluates the loss itself (LBFGS)."""
    return isinstance(optimizer, torch.optim.LBFGS)


class _MergedState(MutableMapping):
    """The per-parameter state of several optimizers as one mapping (parameters are unique to
    one optimizer, so the union has no clashes)."""

    def __init__(self, optimizers: Mapping[str, Optimizer]) -> None:
        self._optimizers = optimizers

    def _owner(self, key: Any) -> Optimizer:
        for optimizer in self._optimizers.values():
            if key in optimizer.state:
                return optimizer
        raise KeyError(key)

    def __getitem__(self, key: Any) -> Any:
        return self._owner(key).state[key]

    def __setitem__(self, key: Any, value: Any) -> None:
        self._owner(key).state[key] = value

    def __delitem__(self, key: Any) -> None:
        del self._owner(key).state[key]

    def __iter__(self) -> Iterator[Any]:
        for optimizer in self._optimizers.values():
            yield from optimizer.state

    def __len__(self) -> int:
        return sum(len(optimizer.state) for optimizer in self._optimizers.values())


class TwinOptimizers(Optimizer):
    """Independent optimizers, one per twin, stepped as one.

    Args:
        optimizers: twin name → that twin's own optimizer (over that twin's parameters only).
        losses: returns twin name → that twin's loss of the current step; needed only for
            closure-based optimizers (LBFGS), whose closure must report each twin's own loss.

    ``param_groups`` lists every twin's groups (each named after its twin), ``state`` is their
    union, ``state_dict()`` holds one state dict per twin.
    """

    def __init__(
        self,
        optimizers: Mapping[str, Optimizer],
        losses: Callable[[], Mapping[str, torch.Tensor]] | None = None,
    ) -> None:
        # No Optimizer.__init__: this object owns no parameters; every twin's optimizer does.
        self.optimizers = dict(optimizers)
        self.losses = losses
        self.defaults: dict[str, Any] = {}
        self._optimizer_step_pre_hooks: dict = {}
        self._optimizer_step_post_hooks: dict = {}
        self._optimizer_state_dict_pre_hooks: dict = {}
        self._optimizer_state_dict_post_hooks: dict = {}
        self._optimizer_load_state_dict_pre_hooks: dict = {}
        self._optimizer_load_state_dict_post_hooks: dict = {}
        for name, optimizer in self.optimizers.items():
            for group in optimizer.param_groups:
                group.setdefault("name", name)

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [group for optimizer in self.optimizers.values() for group in optimizer.param_groups]

    @property
    def state(self) -> _MergedState:
        return _MergedState(self.optimizers)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for optimizer in self.optimizers.values():
            optimizer.zero_grad(set_to_none=set_to_none)

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Step every twin's optimizer. ``closure`` (Lightning's: forward and backward of both
        twins) runs once; a closure-based optimizer gets a closure of its own that reruns it
        and returns its twin's loss alone."""
        if not any(needs_closure(optimizer) for optimizer in self.optimizers.values()):
            loss = None
            if closure is not None:
                with torch.enable_grad():
                    loss = closure()
            for optimizer in self.optimizers.values():
                optimizer.step()
            return loss
        if closure is None or self.losses is None:
            raise RuntimeError(
                "TwinOptimizers: a closure-based optimizer needs a closure and losses"
            )
        loss = None
        for name, optimizer in self.optimizers.items():

            def twin_closure(name: str = name) -> torch.Tensor:
                nonlocal loss
                loss = closure()
                return self.losses()[name]

            optimizer.step(twin_closure)
        return loss

    def state_dict(self) -> dict[str, Any]:
        return {name: optimizer.state_dict() for name, optimizer in self.optimizers.items()}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        if set(state_dict) != set(self.optimizers):
            raise ValueError(
                f"TwinOptimizers: the state holds optimizers {sorted(state_dict)}, this module "
                f"trains {sorted(self.optimizers)}"
            )
        for name, optimizer in self.optimizers.items():
            optimizer.load_state_dict(state_dict[name])

    def __repr__(self) -> str:
        inner = ", ".join(f"{name}={type(opt).__name__}" for name, opt in self.optimizers.items())
        return f"TwinOptimizers({inner})"


class TwinSchedulers:
    """One learning-rate scheduler per twin, stepped as one (Lightning calls
    ``TwinModule.lr_scheduler_step``, which steps each with its twin's own metric).

    Args:
        optimizer: the :class:`TwinOptimizers` the schedulers' optimizers belong to.
        schedulers: twin name → that twin's scheduler.
    """

    def __init__(self, optimizer: TwinOptimizers, schedulers: Mapping[str, Any]) -> None:
        self.optimizer = optimizer
        self.schedulers = dict(schedulers)

    def state_dict(self) -> dict[str, Any]:
        return {name: scheduler.state_dict() for name, scheduler in self.schedulers.items()}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        for name, scheduler in self.schedulers.items():
            scheduler.load_state_dict(state_dict[name])

    def __repr__(self) -> str:
        inner = ", ".join(f"{name}={type(s).__name__}" for name, s in self.schedulers.items())
        return f"TwinSchedulers({inner})"
