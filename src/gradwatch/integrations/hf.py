"""Hugging Face ``Trainer``: ``Trainer(..., callbacks=[GradwatchCallback()])``.

The Trainer clips the gradients (``max_grad_norm``, 1.0 by default) before any
callback sees them, and a clipped gradient hides exactly what gradwatch looks
for. So the callback reads the gradient statistics at the end of the backward
pass that completes each optimizer step (the last micro-batch of a
gradient-accumulation window), before clipping; with float16 and a loss
scaler, the norms are divided by the scale still on them. Weights are copied
for the update ratio in ``on_pre_optimizer_step``, and the step closes in
``on_step_end``. The flight recorder's norms, on every step, are read at the
end of backward as well, before clipping (a clipped spike is no spike).
Transformers has no exception event, so a ``Trainer.train`` that raises leaves
the watch open (status ``running``); the next ``train`` with this callback
closes it as interrupted and starts a new run, and closing the callback's
watch by hand (``callback.watch.close()``) works at any time. A step the
float16 scaler skips is recorded with ``skipped_step`` = 1 and the
``loss_scale``. The training loss of each step is logged as ``loss`` when the
Trainer logs it.

Needs ``pip install 'gradwatch[hf]'`` (transformers and accelerate).
"""

from __future__ import annotations

from typing import Any

from gradwatch.integrations._common import WatchingCallback, require

_transformers = require("transformers", "hf", "gradwatch.integrations.hf")


class GradwatchCallback(WatchingCallback, _transformers.TrainerCallback):  # type: ignore[misc,name-defined]
    """Watch a model's gradients while ``Trainer.train`` trains it.

    Takes :func:`gradwatch.watch`'s keyword arguments. After training,
    ``callback.watch`` is the (closed) :class:`~gradwatch.Watch`; its run is
    at ``callback.path``. Under torch.distributed only rank 0 records.
    """

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None,
                       **kwargs: Any) -> None:
        if model is None or optimizer is None:
            raise RuntimeError("GradwatchCallback.on_train_begin: the Trainer passed no model or optimizer")
        stale = self.watch
        if stale is not None and not stale.closed and stale.model is model:
            # Transformers has no exception event: a Trainer.train that raised never reached on_train_end,
            # and this is its retry. Close that watch as interrupted rather than refuse the retry.
            stale.close(interrupted_by="Trainer.train raised before on_train_end")
        inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the torch optimizer
        scaler = getattr(optimizer, "scaler", None)
        watch = self._start(model, inner, scaler, "Trainer.train")
        gradient_state = getattr(optimizer, "gradient_state", None)

        def last_micro_batch() -> bool:  # the backward whose gradients the optimizer will step on
            return gradient_state is None or bool(gradient_state.sync_gradients)

        watch.stage_after_backward(last_micro_batch)  # divided by the scaler's scale, if it has one

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.watch is not None:
            self.watch.gradients_ready()
            self._measured = True

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.watch is not None and self._measured:
            self.watch.step_done()
            self._measured = False

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
        loss = (logs or {}).get("loss")
        if self.watch is not None and not self.watch.closed and isinstance(loss, (int, float)):
            self.watch.log(loss=float(loss))  # after on_step_end: joins the step that just ended

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.watch is not None:
            self.watch.close()
