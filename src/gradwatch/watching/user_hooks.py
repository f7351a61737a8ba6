"""Backward hooks of the user's own: what may rewrite the gradient between the loss and the optimizer.

A hook that returns a tensor replaces the gradient with it: a parameter's
``register_hook`` (MuZero's gradient scaling written as
``weight.register_hook(lambda g: g * 0.5)``) or a module's
``register_full_backward_hook`` (guided backpropagation's clamp of every
ReLU's gradient to ≥ 0, Springenberg et al. 2015, for saliency maps). Round
41: the ×0.5 hook registered inside ``forward()``, so that one more piled up on
the embeddings at every call (302 by the end, the gradient ×0.5³⁰² = 0, R²
−0.06 against 0.73–0.96 registered once), told "a zero initialisation"; and a
guided-backprop visualiser's hooks left on a CNN being trained (0.09–0.12
against 0.96–0.97), told "negative biases".

The watch counts them, at its start and whenever it notes the set-up (at each
flush and at the end): hooks whose function is gradwatch's own or a
library's (:data:`LIBRARIES`: Opacus computes per-sample gradients in
module backward hooks that return nothing) are not counted. Counting reads
the hook dictionaries' lengths; nothing runs on the gradients.
"""

from __future__ import annotations

from typing import Any

from torch import nn

# the packages whose hooks are no user's: they read gradients, or are the machinery of a wrapper
LIBRARIES = ("gradwatch", "torch", "opacus", "lightning", "pytorch_lightning", "transformers", "accelerate",
             "deepspeed", "peft", "timm", "functorch")


def _library(fn: Any) -> bool:
    """Whether a hook's function comes from :data:`LIBRARIES` (a bound method, a functools.partial, a callable
    object: the module of what it wraps)."""
    f = getattr(fn, "func", fn)  # functools.partial
    f = getattr(f, "__func__", f)  # a bound method
    module = getattr(f, "__module__", None) or getattr(type(f), "__module__", None) or ""
    return str(module).split(".")[0] in LIBRARIES


def own_hooks(hooks: Any) -> list[Any]:
    """The keys of the hooks in a hook dictionary (or None) that are the user's own."""
    return [key for key, fn in (hooks or {}).items() if not _library(fn)]


def _users(hooks: Any) -> int:
    """How many of the hooks in a hook dictionary (or None) are the user's own."""
    return len(own_hooks(hooks))


def param_hooks(model: nn.Module) -> dict[str, int]:
    """Each parameter with gradient hooks of the user's own (``tensor.register_hook``): name -> how many."""
    found = {}
    for name, p in model.named_parameters():
        n = _users(getattr(p, "_backward_hooks", None))
        if n:
            found[name] = n
    return found


def module_hooks(model: nn.Module) -> dict[str, int]:
    """Each module with backward hooks of the user's own (``register_full_backward_hook``,
    ``register_backward_hook``, ``register_full_backward_pre_hook``): name -> how many; the global ones
    (``nn.modules.module.register_module_full_backward_hook``) under the name ``*``."""
    found = {}
    for name, m in model.named_modules():
        n = _users(getattr(m, "_backward_hooks", None)) + _users(getattr(m, "_backward_pre_hooks", None))
        if n:
            found[name or "(the model)"] = n
    from torch.nn.modules import module as torch_module

    n = (_users(getattr(torch_module, "_global_backward_hooks", None))
         + _users(getattr(torch_module, "_global_backward_pre_hooks", None)))
    if n:
        found["*"] = n
    return found


class HookCount:
    """The user's backward hooks on the model's parameters and modules when the watch began, and now: meta
    ``backward_hooks`` = {"params": {name: [at start, now]}, "modules": {name: [at start, now]}}, those with any
    now."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.params_at_start = param_hooks(model)
        self.modules_at_start = module_hooks(model)

    def meta(self) -> dict[str, Any]:
        params, modules = param_hooks(self.model), module_hooks(self.model)
        if not params and not modules:
            return {}
        return {"backward_hooks": {
            "params": {n: [self.params_at_start.get(n, 0), k] for n, k in params.items()},
            "modules": {n: [self.modules_at_start.get(n, 0), k] for n, k in modules.items()}}}
