"""A hook that reaches its owner through a weak reference.

Hooks on tensors and autograd nodes live in C++, where Python's garbage collector cannot see a cycle through them:
watch → model → parameter → hook → watch, or a probe that holds a node of this pass's graph → the hooks placed on
that graph → the probe. A strong hook there keeps a dropped watch (its writer thread and files) alive for ever. A
:class:`WeakHook` does not pin its owner; once the owner is gone it does nothing (a tensor hook returning None leaves
the gradient as it is).
"""

from __future__ import annotations

import weakref
from typing import Any


class WeakHook:
    """``getattr(owner, method)(*args, *hook_args)``, the owner held weakly."""

    def __init__(self, owner: Any, method: str, *args: Any) -> None:
        self._ref = weakref.ref(owner)
        self._method = method
        self._args = args

    @property
    def __self__(self) -> Any:  # (read by the check for a model that is already watched, as a bound method's)
        return self._ref()

    def __call__(self, *args: Any) -> Any:
        owner = self._ref()
        return None if owner is None else getattr(owner, self._method)(*self._args, *args)
