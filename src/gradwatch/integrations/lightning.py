"""PyTorch Lightning: ``Trainer(callbacks=[GradwatchCallback()])``.

Lightning runs ``training_step`` and ``backward`` inside the closure it hands
to ``optimizer.step``, so the optimizer's own step hooks fire before the
gradients exist. The callback therefore measures in
``on_before_optimizer_step``: after backward, after a mixed-precision scaler
has unscaled the gradients, before Lightning clips them. The step closes in
``on_train_batch_end``; with ``accumulate_grad_batches=k`` that is once every
k batches, of the accumulated gradient. A step the 16-bit scaler skips
(inf/NaN gradients, ``optimizer.step`` never called) is recorded with
``skipped_step`` = 1 and the ``loss_scale``.

Needs ``pip install 'gradwatch[lightning]'`` (either ``lightning`` or
``pytorch_lightning``).
"""

from __future__ import annotations

import importlib.util
from typing import Any

from gradwatch.integrations._common import WatchingCallback, require

if importlib.util.find_spec("lightning") is not None:
    _pl = require("lightning.pytorch", "lightning", "gradwatch.integrations.lightning")
else:
    _pl = require("pytorch_lightning", "lightning", "gradwatch.integrations.lightning")


class GradwatchCallback(WatchingCallback, _pl.Callback):  # type: ignore[misc,name-defined]
    """Watch a LightningModule's gradients while ``Trainer.fit`` trains it.

    Takes :func:`gradwatch.watch`'s keyword arguments. After ``fit``,
    ``callback.watch`` is the (closed) :class:`~gradwatch.Watch`: call
    ``diagnose()``, ``summary()`` or ``report()`` on it, or open
    ``callback.path`` with :func:`gradwatch.open_run`. The batch loss (the
    ``loss`` that ``training_step`` returns) is logged as ``loss``.

    Under DDP only rank 0 records, as with ``gw.watch``.
    """

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        optimizers = trainer.optimizers
        optimizer = optimizers[0] if len(optimizers) == 1 else None  # several: update ratios without skip checks
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        self._start(pl_module, optimizer, scaler, "Trainer.fit")

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        if self.watch is not None and not self._measured:
            self.watch.gradients_ready()
            self._measured = True

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.watch is None or not self._measured:
            return  # accumulating: no optimizer step in this batch
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if loss is not None and getattr(loss, "numel", lambda: 0)() == 1:
            self.watch.log(loss=loss)
        self.watch.step_done()
        self._measured = False

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        if self.watch is not None:
            self.watch.close()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        if self.watch is not None and not self.watch.closed:
            self.watch.close(interrupted_by=exception)
