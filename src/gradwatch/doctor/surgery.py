"""What the catalogue's remedies need to read or change a user's model: found by measuring it, never by its class.

Each helper runs the model on a real batch of the trial (read with
:func:`gradwatch.trial.peek`, which puts it back) and decides from what it
computes: a deep *linear* net, the residual branches of the user's own blocks;
or wraps the model in an input standardisation fitted on its batches.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from gradwatch.trial import Trial


def rebuild_optimizer(trial: Trial, before: set[int]) -> None:
    """After a structural change: new parameters join the optimizer (with group 0's settings); removed ones leave."""
    params = [p for p in trial.model.parameters() if p.requires_grad]
    now = {id(p) for p in params}
    opt = trial.optimizer
    if now - before and not (before - now):
        opt.add_param_group({"params": [p for p in params if id(p) not in before]})
    elif before - now:
        trial.optimizer = type(opt)(params, **opt.defaults)


class Standardise(nn.Module):
    """(x − mean) / std with per-feature statistics fitted on training batches (buffers, nothing to learn)."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mean", mean)  # (1, *features)
        self.register_buffer("std", std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class Standardised(nn.Module):
    """The user's model behind an input standardisation layer."""

    def __init__(self, norm: Standardise, model: nn.Module) -> None:
        super().__init__()
        self.norm, self.model = norm, model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(self.norm(x))


WEIGHTED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


@torch.no_grad()
def zero_residual_branches(model: nn.Module, x: torch.Tensor) -> int:
    """Fixup on residual blocks of the user's own class (Zhang et al. 2019): a block is a module whose output
    equals its input (or relu of it) once its last weighted layer is zero; that layer stays zero. Returns how many."""
    seen: dict[int, tuple[nn.Module, Any]] = {}
    blocks = [mod for mod in model.modules() if mod is not model and list(mod.children())
              and sum(isinstance(c, WEIGHTED) for c in mod.modules()) >= 2]
    def keep(mod: nn.Module, a: tuple, o: Any) -> None:  # (returns None: the output stays the module's own)
        seen.setdefault(id(mod), (mod, a))

    hooks = [b.register_forward_hook(keep) for b in blocks]
    was = model.training
    model.eval()
    try:
        model(x)
    except Exception:
        return 0
    finally:
        for h in hooks:
            h.remove()
        model.train(was)
    found = 0
    for mod, args in seen.values():
        if not args or not isinstance(args[0], torch.Tensor):
            continue
        last = [c for c in mod.modules() if isinstance(c, WEIGHTED)][-1]
        kept = [t.clone() for t in (last.weight, last.bias) if t is not None]
        for t in (last.weight, last.bias):
            if t is not None:
                t.zero_()
        try:
            out = mod(*args)
        except Exception:
            out = None
        a = args[0]
        if (isinstance(out, torch.Tensor) and out.shape == a.shape and bool(a.abs().max() > 0)
                and (torch.allclose(out, a) or torch.allclose(out, a.relu()))):
            found += 1
        else:  # not a residual branch: restore
            for t, k in zip([t for t in (last.weight, last.bias) if t is not None], kept):
                t.copy_(k)
    return found


@torch.no_grad()
def is_affine(model: nn.Module, batches: list[Any]) -> bool:
    """A deep *linear* net, measured (activations may be functional): f(2x) − f(x) = f(x) − f(0) on a real batch."""
    if not batches or not isinstance(batches[0], (tuple, list)) or not isinstance(batches[0][0], torch.Tensor):
        return False
    x = batches[0][0]
    if not x.is_floating_point():
        return False
    was = model.training
    model.eval()
    try:
        f0, f1, f2 = model(torch.zeros_like(x)), model(x), model(2 * x)
    except Exception:
        return False
    finally:
        model.train(was)
    if not all(isinstance(t, torch.Tensor) and torch.isfinite(t).all() for t in (f0, f1, f2)):
        return False
    return bool(torch.allclose(f2 - f1, f1 - f0, rtol=1e-3, atol=1e-5 * float(f1.abs().max().clamp_min(1))))


