"""The watch: ``gw.watch`` places hooks and returns a :class:`Watch` handle that records every step.

- :mod:`~gradwatch.watching.entry` — ``watch()``: the checks, this rank's watch, its run directory;
- :mod:`~gradwatch.watching.options` — the options, checked once (``gw.watch`` and the callbacks);
- :mod:`~gradwatch.watching.handle` — the handle: its public API and its hooks;
- :mod:`~gradwatch.watching.steps` — one step's sequence;
- :mod:`~gradwatch.watching.budget` — what each family costs, and the schedules that keep to the budget;
- :mod:`~gradwatch.watching.drivers` — who says "gradients ready" and "step done";
- :mod:`~gradwatch.watching.sampled` — the forward-side probes of sampled steps;
- :mod:`~gradwatch.watching.buffer` — the steps' values, one host copy per batch of steps;
- :mod:`~gradwatch.watching.depth`, :mod:`~gradwatch.watching.metadata`, :mod:`~gradwatch.watching.rundir`;
- :mod:`~gradwatch.watching.distributed` — which watch each rank of a job gets.
"""

from gradwatch.watching.distributed import FollowerWatch, ShardFollowerWatch
from gradwatch.watching.handle import Watch
from gradwatch.watching.options import WatchOptions
from gradwatch.watching.entry import start, watch

__all__ = ["FollowerWatch", "ShardFollowerWatch", "Watch", "WatchOptions", "start", "watch"]
