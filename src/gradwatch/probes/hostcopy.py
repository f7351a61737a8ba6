"""Small tensors built on the host (index lists, pooling weights), on the device without making the host wait.

``torch.tensor(values, device="cuda")`` copies from pageable host memory, which the CUDA runtime does
synchronously: the host waits for every kernel queued before it, and a watched step that does this loses the
host's lead over the device (on an H200, ResNet-50 with activation statistics on every step: 2.45× the plain
step with these waits, 1.83× without; ``benchmarks/RESULTS.md``). Here the values go through pinned memory
with a non-blocking copy, and the device tensor is kept for the next step that asks for the same values: a
watch asks for the same index lists step after step, so after the first step nothing is copied at all. The
tensors handed out are shared: read them, never write into them.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import torch
from torch import Tensor

KEEP = 512  # device tensors kept, the least recently used dropped first
_kept: OrderedDict[tuple, Tensor] = OrderedDict()


def device_tensor(values: Sequence[float] | Sequence[int], dtype: torch.dtype, device: torch.device | str) -> Tensor:
    """``torch.tensor(values, dtype=dtype, device=device)``, without a host synchronisation on a CUDA device.

    On the CPU (and any device but CUDA) a fresh tensor, as ``torch.tensor`` makes it.
    """
    device = torch.device(device)
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype, device=device)
    key = (tuple(values), dtype, device)
    t = _kept.get(key)
    if t is None:
        t = torch.tensor(values, dtype=dtype).pin_memory().to(device, non_blocking=True)
        _kept[key] = t
        if len(_kept) > KEEP:
            _kept.popitem(last=False)
    else:
        _kept.move_to_end(key)
    return t


def device_scalar(value: float, dtype: torch.dtype, device: torch.device | str) -> Tensor:
    """A 0-dim tensor holding ``value``: filled on the device (a kernel argument), never copied from the host."""
    return torch.full((), value, dtype=dtype, device=device)
