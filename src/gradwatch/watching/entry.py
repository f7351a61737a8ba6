"""``gw.watch``: every argument checked, then this rank's watch, its run directory, its hooks."""

from __future__ import annotations

import warnings

import functools
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gradwatch._errors import bad_argument
from gradwatch.probes.temporal import find_recurrent
from gradwatch.schedules import Schedule
from gradwatch.watching.distributed import FollowerWatch, ShardFollowerWatch, is_sharded, rank, uses_fsdp1
from gradwatch.watching.handle import Watch
from gradwatch.watching.metadata import not_in_optimizer
from gradwatch.watching.options import DEFAULT_BUDGET, WatchOptions
from gradwatch.watching.rundir import open_run_dir

DRIVERS = ("auto", "external")


def watch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    every: int | Schedule | None = None,
    activations: bool | int | Schedule = True,
    update_every: bool | int | Schedule = True,
    budget: float | None = DEFAULT_BUDGET,
    store: str | Path | None = None,
    name: str | None = None,
    overwrite: bool = False,
    temporal: bool | str | list[str] = "auto",
    attention: bool | int | Schedule = True,
    flight: bool | int | str = "auto",
    scaler: torch.amp.GradScaler | None = None,
    driver: str = "auto",
) -> Watch:
    """Watch a model's gradients while it trains; returns the :class:`Watch` handle.

    Args:
        model: the module to watch. Its *layers* are the modules that directly
            own trainable parameters, named by their ``named_modules()`` path.
        optimizer: when given, a step is one ``optimizer.step()`` and update
            ratios are measured across it; otherwise a step is one backward pass.
        every: gradient norms and non-finite counts on these steps (an int n:
            steps 0, n, 2n, …, ``every=1`` every step whatever the budget; or
            a callable ``step -> bool``). None (the default): every step for
            the first 128 steps (where most runs that blow up or collapse do
            it), then every step where they fit the budget and at least every
            8th where they do not (a tiny model's step, where reading the
            norms costs several times the budget). A spike later in the run
            still shows in the loss you log on every step.
        activations: activation statistics and the back-propagated gradient
            ‖∂L/∂a‖ at each layer's output, on these steps. True (the default):
            on, as often as the budget allows (every 10th step with
            ``budget=None``); False: never.
        update_every: weight norms and update ratios on these steps (needs an
            optimizer; each costs a copy of the weights during that step).
            True: as often as the budget allows (every 10th with ``budget=None``).
        budget: the share of the step time that watching may cost (0.02: 2 %,
            the default). The watch times its own work per family (gradient
            norms, ‖∂L/∂a‖, activation statistics, re-runs through time, weight
            copies) and the step itself, and samples the families left to it
            every k-th step, k a power of two chosen from cost / step time and
            revised every 16 steps, never sparser than the diagnosis needs
            (every 16th step early on, every 64th from step 256; see
            :mod:`gradwatch.watching.budget`). Gradient norms as ``every``
            says, and a schedule you give (``every=5``,
            ``activations=10``) wins over the budget; ``meta["schedules"]``
            says who set each one, ``meta["budget"]`` what was measured and
            whether the budget was kept. Which steps are sampled then depends
            on measured time: pass ``budget=None`` (every 10th step) or your
            own schedules for records that are the same run after run.
        store: directory that holds the runs (default ``runs``).
        name: this run's name, a directory under ``store`` (default: the model's
            class and the time).
        overwrite: replace an existing run of the same name.
        temporal: record ‖∂L/∂h_t‖ at every time step of recurrent modules, on
            the ``activations`` schedule. "auto" (the default): every
            ``nn.RNN``/``nn.GRU``/``nn.LSTM`` (fused modules are re-run
            unrolled on those steps) and every ``nn.RNNCell``/``GRUCell``/
            ``LSTMCell`` that one forward pass calls more than once (a cell in
            a Python loop), every other layer that it calls again on its own
            earlier output (W_hh as an ``nn.Linear`` in a loop,
            :mod:`gradwatch.probes.loops`), and nothing when
            ``activations=False``. True: every
            fused module and every cell, however often it is called; or the
            names of the modules to follow (a cell of your own, called once per
            time step, whose output is its new hidden state). See
            :mod:`gradwatch.probes.temporal` for what it costs.
        attention: per-head max and rms attention logit and attention entropy
            of every attention module (``nn.MultiheadAttention`` and the
            Transformer layers, Hugging Face GPT-2/Llama-style attention), and
            log Z at the LM head, on these steps
            (:mod:`gradwatch.probes.attention`). True (the default): as often as
            the budget allows, where the model has attention; False: never.
        flight: the flight recorder (:mod:`gradwatch.probes.flight`): every
            step's per-layer gradient and weight norms kept in a ring buffer on
            the device; when a step's total gradient norm is a robust outlier
            or non-finite, the buffered steps before it go to the store and
            every sampled family records for the next 20 steps. "auto" (the
            default): on, 64 steps kept, for a model with attention (its
            per-step cost, mostly a read of the weights for their norms, is
            ~1.5 % of a small Transformer's CPU step but 10–25 % of a 20-layer
            MLP's; benchmarks/RESULTS.md); True: on for any model; an int: that
            many steps kept (at least 16); False: off.
        scaler: the ``torch.amp.GradScaler`` of a mixed-precision loop. The
            statistics are always of the unscaled gradients (the scaler
            unscales before ``optimizer.step()``); with the scaler given, a step
            it skips for inf/NaN gradients is recorded too — its gradient
            statistics, ``skipped_step`` = 1 and ``loss_scale`` — instead of
            vanishing from the record, and ‖∂L/∂a‖, ‖∂L/∂h_t‖ (read during
            backward, while the scale is on them) are divided by the scale.
        driver: who says when a step's gradients are ready and when it is over.
            "auto": the optimizer's step hooks, or without an optimizer the end
            of each backward pass. "external": your code, by calling
            :meth:`Watch.gradients_ready` and :meth:`Watch.step_done` (a
            callback for a framework that owns the loop; see the README).

    In a ``torch.distributed`` job only rank 0 records. Under DDP every rank
    holds the same all-reduced gradients, and the other ranks get a
    :class:`~gradwatch.watching.FollowerWatch` that does nothing. With sharded
    parameters (FSDP2's ``fully_shard``) every rank must call ``watch`` with
    the same schedules: each reads its slices, one all-reduce of squared norms
    per recorded step gives the whole tensors' norms, and rank 0 writes.
    """
    options = WatchOptions(every=every, activations=activations, update_every=update_every, budget=budget,
                           store=store, name=name, overwrite=overwrite, temporal=temporal, attention=attention,
                           flight=flight)
    return start(model, optimizer, options, scaler=scaler, driver=driver)


def start(model: nn.Module, optimizer: torch.optim.Optimizer | None, options: WatchOptions, *,
          scaler: Any = None, driver: str = "auto") -> Watch:
    """A watch with ``options`` (checked already) on ``model``: every check before any hook or file."""
    caller = options.caller
    if driver not in DRIVERS:
        raise ValueError(bad_argument(caller, "driver", " or ".join(repr(d) for d in DRIVERS), driver))
    _check_model(model, optimizer, caller)
    if optimizer is None and options.updates_need_optimizer and driver != "external":  # (callbacks: the trainer's)
        raise ValueError(f"`{caller}(update_every=…)` measures updates across optimizer.step(): "
                         f"pass optimizer=… as well")
    _check_scaler(scaler, optimizer, caller)
    recurrent = find_recurrent(model, options.temporal_modules, caller)
    _check_not_watched(model, optimizer, caller)
    here = rank()
    if here != 0 and is_sharded(model):  # FSDP: every rank holds a slice; all take part, rank 0 writes
        # the flight recorder too: it reads the gradient (and weight) norms on every step, an all-reduce
        shard = WatchOptions(every=options.every, activations=False, update_every=options.update_every,
                             budget=options.budget, temporal=False, attention=False, flight=options.flight,
                             caller=caller)
        return ShardFollowerWatch(here, model, optimizer, shard, run_dir=None, driver=driver, scaler=scaler)
    if here != 0:  # DDP: the gradients are the same on every rank after backward; rank 0 writes
        return FollowerWatch(here)
    run_dir, lock = open_run_dir(options.root, options.name, model, options.overwrite, caller)
    try:
        return Watch(model, optimizer, options, run_dir=run_dir, lock=lock, recurrent=recurrent, driver=driver,
                     scaler=scaler)
    except BaseException:
        lock.release()  # (idempotent: the writer may have released it already)
        raise


def _check_model(model: Any, optimizer: Any, caller: str) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(bad_argument(caller, "model", "a torch.nn.Module", model))
    if uses_fsdp1(model):
        raise NotImplementedError(
            f"`{caller}(model=…)`: the model is wrapped in FullyShardedDataParallel (FSDP1), whose flat parameters "
            f"hide the layers' own tensors; shard it with torch.distributed.fsdp.fully_shard (FSDP2) instead, "
            f"which gradwatch measures exactly"
        )
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError(
            f"`{caller}(model=…)`: {type(model).__name__} has no parameters that require grad, so there is nothing to watch"
        )
    if optimizer is not None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(bad_argument(caller, "optimizer", "a torch.optim.Optimizer or None", optimizer))
        own = {id(p) for p in model.parameters()}
        held = [p for g in optimizer.param_groups for p in g["params"]]
        foreign = sum(1 for p in held if id(p) not in own)
        if foreign == len(held):
            # round 17: a head replaced after the optimizer was built (the tutorial's fixed feature extractor), or an
            # optimizer built on a copy of the model — the user's bug to see, not a reason to refuse the run
            missing = not_in_optimizer(model, optimizer)
            warnings.warn(
                f"`{caller}(optimizer=…)`: the optimizer holds none of the model's parameters ({foreign} of its own "
                f"are not the model's), so the model's {len(missing)} trainable tensor(s) ({', '.join(missing[:4])}"
                f"{', …' if len(missing) > 4 else ''}) never move: an optimizer built on a copy of the model, or "
                f"before its layers were replaced? gradwatch watches the model all the same", UserWarning,
                stacklevel=3)
        elif foreign:  # a learnable temperature, loss weights: trained beside the model, not watched
            warnings.warn(f"`{caller}(optimizer=…)`: the optimizer also trains {foreign} parameter(s) outside the "
                          f"model (a learnable temperature or loss weight?); gradwatch watches the model's own "
                          f"parameters only", UserWarning, stacklevel=3)


def _check_scaler(scaler: Any, optimizer: Any, caller: str) -> None:
    if scaler is None:
        return
    if not isinstance(scaler, torch.amp.GradScaler):
        raise TypeError(bad_argument(caller, "scaler", "a torch.amp.GradScaler or None", scaler))
    if optimizer is None:
        raise ValueError(f"`{caller}(scaler=…)` needs the optimizer the scaler steps: pass optimizer=… as well")
    if "step" in scaler.__dict__:
        raise RuntimeError(f"`{caller}(scaler=…)`: this GradScaler's step() is already wrapped "
                           f"(another watch holds it); close that watch first")


def _check_not_watched(model: nn.Module, optimizer: torch.optim.Optimizer | None, caller: str) -> None:
    other = _already_watched(model, optimizer)
    if other is None:
        return
    shared = _shared_module(model, other)
    if shared is not None:
        raise RuntimeError(
            f"`{caller}(model=…)`: its module {shared[0]!r} ({shared[1]}) is shared with a model another watch holds "
            f"(store {str(other.path)!r}); one module's hooks cannot tell the two models' passes apart: "
            f"give each model its own instance, or close that watch first"
        )
    raise RuntimeError(f"`{caller}(model=…)`: this model is already watched (store {str(other.path)!r}); "
                       f"close that watch first")


def _owner(hooks: Any) -> Watch | None:
    """The watch that placed one of ``hooks`` (a dict of hooks), if any: its own method, or its driver's."""
    for h in (hooks or {}).values():
        h = h.func if isinstance(h, functools.partial) else h
        owner = getattr(h, "__self__", None)
        owner = getattr(owner, "watch", owner)  # a driver's hook: the driver's watch
        if isinstance(owner, Watch):
            return owner
    return None


def _already_watched(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> Watch | None:
    for m in model.modules():
        found = _owner(m._forward_hooks) or _owner(m._forward_pre_hooks)
        if found is not None:
            return found
    for p in model.parameters():
        found = _owner(getattr(p, "_post_accumulate_grad_hooks", None))
        if found is not None:
            return found
    if optimizer is not None:
        return _owner(optimizer._optimizer_step_pre_hooks)
    return None


def _shared_module(model: nn.Module, other: Watch) -> tuple[str, str] | None:
    """(name, class) of a module of ``model`` that another watch's model also holds, if ``model`` is not that model."""
    if other.model is model:
        return None
    theirs = {id(m) for m in other.model.modules()}
    for name, m in model.named_modules():
        if id(m) in theirs:
            return name or "(root)", type(m).__name__
    return None
