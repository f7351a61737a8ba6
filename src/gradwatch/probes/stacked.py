"""Norms of a fixed set of tensors read into rows of a preallocated block, with no allocation per read.

On the CPU every reduction is a kernel call of its own, so small same-shape
tensors are read as stacks (:class:`~gradwatch.probes.grads.GradProbe`).
:class:`StackedNorms` keeps one buffer per group of same-shape tensors, copies
each group into its buffer with ``torch.stack(out=)`` and reduces it with one
``vector_norm(dim=1, out=)`` straight into the row; the other tensors go
through one ``torch._foreach_norm``. A 20-layer MLP's 40 norms take 6 calls.
Measured in a loop of watch steps, a fresh 311 KB stack of its 19 weight
gradients cost ~37 µs a call, into the kept buffer ~8.5 µs. Inside a real
training step (caches just filled by the forward and backward passes) every
way of reading the 40 norms costs about the same, 120–180 µs of a 2 ms step on
this CPU (benchmarks/overhead.py --norms): what is left there is reading the
gradients at all.

Rows come from a block of ``ROWS``; a used row is never written again (a full
block is replaced by a fresh one), so a row handed out stays valid for as long
as its holder keeps it: the step buffer holds rows until their batch is sent.
"""

from __future__ import annotations

import operator
from typing import Callable, Sequence

import torch
from torch import Tensor


class StackedNorms:
    """L2 norms of tensors shaped like ``shapes``, one read per call, into a fresh row of a device block.

    ``stacks``: groups of positions among the tensors (same shape each), read
    as one stack per group; ``rest``: the other positions, read by one fused
    call. A row lists the norms in the order stacks, then rest. ``acc``: the
    dtype to accumulate in (float32 for half precision), None for the tensors'.
    """

    ROWS = 64

    def __init__(self, shapes: Sequence[tuple[int, ...]], stacks: list[list[int]], rest: list[int], dtype: torch.dtype,
                 acc: torch.dtype | None, device: torch.device) -> None:
        self._acc = acc
        self._out_dtype = acc or dtype  # vector_norm's result dtype (it writes into out= without a cast)
        self._device = device
        self._n = sum(len(idx) for idx in stacks) + len(rest)
        # (pick the group's tensors out of the list, its buffer (g, *shape), that buffer as (g, numel), its columns)
        self._groups: list[tuple[Callable[[Sequence[Tensor]], tuple[Tensor, ...]], Tensor, Tensor, slice]] = []
        at = 0
        for idx in stacks:
            buf = torch.empty((len(idx), *shapes[idx[0]]), dtype=dtype, device=device)
            self._groups.append((_picker(idx), buf, buf.view(len(idx), -1), slice(at, at + len(idx))))
            at += len(idx)
        self._rest = _picker(rest) if rest else None
        self._rest_at = at
        self._block = torch.empty(0)
        self._row = self.ROWS

    def read(self, tensors: Sequence[Tensor]) -> Tensor:
        """(n,) the norms of ``tensors`` (dense, shaped as given), in the order stacks, then rest."""
        if self._row == self.ROWS:  # a fresh block: rows handed out before stay as they were
            self._block = torch.empty((self.ROWS, self._n), dtype=self._out_dtype, device=self._device)
            self._row = 0
        out = self._block[self._row]
        self._row += 1
        for pick, buf, flat, columns in self._groups:
            torch.stack(pick(tensors), out=buf)
            torch.linalg.vector_norm(flat, 2, dim=1, dtype=self._acc, out=out[columns])
        if self._rest is not None:
            torch.stack(torch._foreach_norm(self._rest(tensors), 2, dtype=self._acc), out=out[self._rest_at:])
        return out


def _picker(idx: list[int]) -> Callable[[Sequence[Tensor]], tuple[Tensor, ...]]:
    """A function that picks the items at ``idx`` out of a sequence, as a tuple (one C call)."""
    get = operator.itemgetter(*idx)
    if len(idx) == 1:
        return lambda seq: (get(seq),)
    return get  # type: ignore[return-value]
