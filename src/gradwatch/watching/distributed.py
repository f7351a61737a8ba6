"""``torch.distributed``: which watch each rank gets.

Under DDP every rank holds the same all-reduced gradients after backward, so
rank 0 records and the other ranks hold a :class:`FollowerWatch` that does
nothing. With sharded parameters (FSDP2's ``fully_shard``, DTensor) each rank
holds a slice of every tensor: every rank measures its slices, one all-reduce
of squared norms per recorded step gives the whole tensors' norms, and only
rank 0 keeps them (:class:`ShardFollowerWatch` elsewhere).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from torch import Tensor, nn

from gradwatch.diagnosis import Diagnosis, Thresholds
from gradwatch.probes.grads import _is_dtensor
from gradwatch.store import Run
from gradwatch.watching.handle import Watch


def rank() -> int:
    """This process's rank in an initialised torch.distributed job, else 0."""
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_sharded(model: nn.Module) -> bool:
    """Whether the model's parameters are DTensor slices (FSDP2)."""
    return any(_is_dtensor(p) for p in model.parameters())


def uses_fsdp1(model: nn.Module) -> bool:
    """Whether the model is wrapped in FSDP1's FullyShardedDataParallel (flat parameters: not measurable)."""
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:
        return False
    return any(isinstance(m, FullyShardedDataParallel) for m in model.modules())


class _NotRankZero(Watch):
    """What the watches of ranks other than 0 share: reading back is rank 0's."""

    rank: int

    def flush(self) -> None:
        return None

    def _only_rank_0(self, what: str) -> RuntimeError:
        return RuntimeError(f"`Watch.{what}()` on rank {self.rank}: only rank 0 records and writes the store; "
                            f"call it on rank 0 (torch.distributed.get_rank() == 0)")

    def open(self) -> Run:
        raise self._only_rank_0("open")

    def diagnose(self, thresholds: Thresholds | None = None) -> Diagnosis:
        raise self._only_rank_0("diagnose")

    def report(self, path: str | Path = "report.html", thresholds: Thresholds | None = None,
               redact: bool = False) -> Path:
        raise self._only_rank_0("report")

    def summary(self, thresholds: Thresholds | None = None) -> str:
        raise self._only_rank_0("summary")


class FollowerWatch(_NotRankZero):
    """What ``watch`` returns on a rank other than 0 of a ``torch.distributed`` job: it records nothing.

    Under DDP every rank holds the same, all-reduced gradients after backward,
    so rank 0's records are the job's; the other ranks place no hook and open
    no store. Logging, closing and the driver calls work (as no-ops); reading
    back is rank 0's.
    """

    def __init__(self, rank: int) -> None:  # noqa: D107 - no hooks, no store
        self.rank = rank
        self.path = None  # type: ignore[assignment]
        self._closed = False

    @property
    def step(self) -> int:
        return 0

    def log(self, **scalars: float | Tensor) -> None:
        return None

    def _close(self, status: str) -> None:
        self._closed = True

    # The driver calls of a callback: nothing to record on this rank.
    def gradients_ready(self) -> None:
        return None

    def step_done(self) -> None:
        return None

    def stage_after_backward(self, when: Callable[[], bool]) -> None:
        return None

    def __repr__(self) -> str:
        return f"<gradwatch.Watch follower on rank {self.rank}: only rank 0 records>"


class ShardFollowerWatch(_NotRankZero):
    """What ``watch`` returns on a rank other than 0 when the model's parameters are sharded (FSDP2).

    Each rank holds a slice of every parameter, so every rank reads its own
    slices and takes part in the all-reduce of squared norms (the flight
    recorder's, on every step, too); only rank 0 keeps the result. Activation statistics are rank 0's alone (its batch).
    Reading back is rank 0's.
    """

    def __init__(self, rank: int, *args: Any, **kwargs: Any) -> None:
        self.rank = rank
        super().__init__(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<gradwatch.Watch shard follower on rank {self.rank}, step {self.step}: only rank 0 records>"
