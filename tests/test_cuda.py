"""The watch on a CUDA device: it changes nothing, its numbers are the gradients', and a step never waits for it.

Skipped without a CUDA device (CI has none); run on one with
``CUBLAS_WORKSPACE_CONFIG=:4096:8 pytest -m gpu``. References: the same loop
unwatched (bit-identical parameters), a naive loop over ``param.grad``
(the norms), and ``torch.cuda.set_sync_debug_mode`` (every host
synchronisation the step's code asks for, with the Python frames that asked).
"""

from __future__ import annotations

import math
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from torch import nn

import gradwatch as gw
from gradwatch._errors import GradwatchWarning

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
STEPS = 24


def conv_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 32, 3, padding=1, stride=2), nn.BatchNorm2d(32), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))


class Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(8, 64)
        layer = nn.TransformerEncoderLayer(64, 4, 128, dropout=0.0, batch_first=True)
        self.body = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.embed(x)).mean(1))


MODELS = {"conv": (conv_net, (64, 3, 16, 16)), "transformer": (Encoder, (32, 12, 8))}


@pytest.fixture
def deterministic():
    before = torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    yield
    torch.use_deterministic_algorithms(before[0])
    torch.backends.cudnn.benchmark = before[1]


def train(kind: str, watch: dict[str, Any] | None, store: Path, *, on_grads: Callable[[nn.Module], None] | None = None,
          steps: int = STEPS) -> tuple[list[torch.Tensor], Any]:
    """`steps` steps of AdamW under bf16 autocast, seed 0; the parameters after, and the watch (or None)."""
    build, shape = MODELS[kind]
    torch.manual_seed(0)
    model = build().cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    gen = torch.Generator(device="cuda").manual_seed(1)
    w = None
    if watch is not None:
        w = gw.watch(model, opt, store=store, name=f"{kind}-{len(list(store.iterdir()))}", **watch)
    for _ in range(steps):
        x = torch.randn(shape, device="cuda", generator=gen)
        y = torch.randint(0, 10, (shape[0],), device="cuda", generator=gen)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if on_grads is not None:
            on_grads(model)
        opt.step()
    if w is not None:
        w.close()
    return [p.detach().cpu().clone() for p in model.parameters()], w


EVERYTHING = dict(every=1, activations=1, update_every=1, attention=1)


@pytest.mark.parametrize("kind", list(MODELS))
@pytest.mark.parametrize("watch", [dict(), dict(budget=None), EVERYTHING], ids=["default", "budget-none", "everything"])
def test_watching_changes_no_parameter_bit(kind, watch, deterministic, tmp_path):
    plain, _ = train(kind, None, tmp_path)
    again, _ = train(kind, None, tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(plain, again)), "the plain loop is not reproducible on this device"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        watched, w = train(kind, watch, tmp_path)
    assert not [c for c in caught if issubclass(c.category, GradwatchWarning)]
    assert all(torch.equal(a, b) for a, b in zip(plain, watched))
    assert w.open().meta["status"] == "closed"


@pytest.mark.parametrize("kind", list(MODELS))
def test_gradient_norms_are_the_gradients_norms(kind, tmp_path):
    naive: list[dict[str, float]] = []

    def read(model: nn.Module) -> None:  # the user's own loop over param.grad, in float64 on the host
        naive.append({n: math.sqrt(float((p.grad.double() ** 2).sum())) for n, p in model.named_parameters()})

    _, w = train(kind, dict(every=1, activations=False, update_every=False), tmp_path, on_grads=read)
    recs = w.open().records("grad_norm", "param")
    seen = 0
    for step, name, value in zip(recs["step"], recs["layer"], recs["value"]):
        assert value == pytest.approx(naive[int(step)][name], rel=1e-4), (step, name)
        seen += 1
    assert seen == STEPS * len(naive[0])


@pytest.mark.parametrize("kind", list(MODELS))
@pytest.mark.parametrize("watch", [dict(), EVERYTHING], ids=["default", "everything"])
def test_a_watched_step_never_waits_for_the_device(kind, watch, tmp_path):
    """No host synchronisation in the watch's part of a step: the hooks, the optimizer hooks, the budget's clocks."""
    build, shape = MODELS[kind]
    torch.manual_seed(0)
    model = build().cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    syncs: list[str] = []

    def note(message: Any, category: Any, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
        frames = [f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in traceback.extract_stack()
                  if "gradwatch" in f.filename and "test_cuda" not in f.filename]
        if frames:
            syncs.append(f"{message} <- {' / '.join(frames[-3:])}")

    def step() -> None:
        x = torch.randn(shape, device="cuda")
        y = torch.randint(0, 10, (shape[0],), device="cuda")
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    with gw.watch(model, opt, store=tmp_path, name="syncs", **watch):
        for _ in range(2):  # the first step settles the layer order and writes the set-up
            step()
        with warnings.catch_warnings():  # (restores showwarning on the way out)
            warnings.simplefilter("always")
            warnings.showwarning = note
            torch.cuda.set_sync_debug_mode("warn")
            try:
                for _ in range(40):  # past the budget's first decisions (every 16 steps)
                    step()
            finally:
                torch.cuda.set_sync_debug_mode(0)
    assert syncs == []
