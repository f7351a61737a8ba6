"""What every integration leans on: the external driver, the loss-scale division, the install hints."""

from __future__ import annotations

import importlib
import math
import sys
from typing import Callable

import pytest
import torch
from torch import nn

import gradwatch as gw
from conftest import at_step, naive_layer_grad_norms


def test_staged_norms_are_divided_by_the_loss_scale_still_on_the_gradients(store):
    """The Hugging Face path with float16: gradients read before the scaler unscales them, divided by its scale."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 9), nn.Tanh(), nn.Linear(9, 1))
    twin = nn.Sequential(nn.Linear(5, 9), nn.Tanh(), nn.Linear(9, 1))
    twin.load_state_dict(model.state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**14)
    w = gw.watch(model, opt, store=store, name="staged", scaler=scaler, driver="external", temporal=False)
    w.stage_after_backward(lambda: True)
    expect = []
    g = torch.Generator().manual_seed(3)
    for _ in range(3):
        x, y = torch.randn(8, 5, generator=g), torch.randn(8, 1, generator=g)
        twin.zero_grad()
        nn.functional.mse_loss(twin(x), y).backward()
        expect.append(naive_layer_grad_norms(twin))  # float32, unscaled, at the watched model's weights
        opt.zero_grad()
        scaler.scale(nn.functional.mse_loss(model(x), y)).backward()  # staged here, still scaled
        w.gradients_ready()
        scaler.step(opt)
        scaler.update()
        w.step_done()
        with torch.no_grad():  # the twin follows the watched model's weights
            for a, b in zip(twin.parameters(), model.parameters()):
                a.copy_(b)
    w.close()
    run = w.open()
    assert run.meta["steps"] == 3 and "skipped_step" not in run.quantities
    for step, ref in enumerate(expect):
        for name, value in ref.items():
            assert at_step(run, "grad_norm", step)[name] == pytest.approx(value, rel=1e-6)


def _layer_update_ratios(model: nn.Module, before: dict[str, list[torch.Tensor]]) -> dict[str, float]:
    """Per layer: ‖w_after − w_before‖ / ‖w_before‖ over its own parameters, by hand."""
    ratios = {}
    for name, m in model.named_modules():
        if name in before:
            after = [p.detach() for p in m.parameters(recurse=False)]
            d = math.sqrt(sum(float((a - b).double().norm()) ** 2 for a, b in zip(after, before[name])))
            ratios[name] = d / math.sqrt(sum(float(b.double().norm()) ** 2 for b in before[name]))
    return ratios


def _hand_written_loop(start: Callable[..., gw.Watch] | None = None) -> tuple[nn.Module, list[dict], list[dict]]:
    """A loop as another framework runs it: two micro-batches a step, clipping, a step the framework skips (3).

    ``start(model, optimizer)`` makes the watch (None: unwatched). Returns the trained model, and per step the
    naive per-layer norms of the accumulated gradients and the update ratios by hand.
    """
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 12), nn.ReLU(), nn.Linear(12, 2))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    watch = start(model, opt) if start is not None else None
    g = torch.Generator().manual_seed(1)
    norms, ratios = [], []
    for step in range(6):
        opt.zero_grad()
        for _ in range(2):  # gradient accumulation: the step's gradient is the sum of both
            x, y = torch.randn(8, 6, generator=g), torch.randn(8, 2, generator=g)
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
        norms.append(naive_layer_grad_norms(model))
        if watch is not None:
            watch.gradients_ready()  # after the last micro-batch, before clipping
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        before = {n: [p.detach().clone() for p in m.parameters(recurse=False)]
                  for n, m in model.named_modules() if list(m.parameters(recurse=False))}
        if step != 3:
            opt.step()
        ratios.append(_layer_update_ratios(model, before))
        if watch is not None:
            watch.log(loss=loss)
            watch.step_done()
    if watch is not None:
        watch.close()
    return model, norms, ratios


def test_a_hand_written_loop_drives_the_watch_through_the_public_interface(store):
    """A callback for another framework: gradients_ready() and step_done() from the loop, checked against param.grad."""
    watches = []

    def make(model, opt):
        watches.append(gw.watch(model, opt, update_every=1, store=store, name="driven", driver="external"))
        return watches[-1]

    model, norms, ratios = _hand_written_loop(make)
    twin, _, _ = _hand_written_loop()  # the same loop, unwatched
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)  # watching never changes training
    with watches[0].open() as run:
        assert run.meta["steps"] == 6 and run.meta["status"] == "closed"
        skipped = run.series("skipped_step", "run")
        assert skipped.steps.tolist() == [3]  # no optimizer.step() between gradients_ready() and step_done()
        assert run.series("loss", "run").steps.tolist() == list(range(6))
        for step in range(6):
            got = at_step(run, "grad_norm", step)
            assert got.keys() == norms[step].keys()
            for name, value in norms[step].items():  # the accumulated gradient, unclipped
                assert got[name] == pytest.approx(value, rel=1e-6), (step, name)
            for name, value in ratios[step].items():
                assert at_step(run, "update_ratio", step)[name] == pytest.approx(value, rel=1e-5, abs=1e-12)


def test_the_driver_calls_belong_to_an_externally_driven_watch(store):
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
    with gw.watch(model, torch.optim.SGD(model.parameters(), lr=0.1), store=store, name="auto") as w:
        with pytest.raises(RuntimeError, match=r"`Watch.gradients_ready\(\)` drives a watch made with "
                                               r"gw.watch\(\.\.\., driver=\"external\"\); this one is driven by "
                                               r"the optimizer's step hooks"):
            w.gradients_ready()


@pytest.mark.parametrize("module, library", [("gradwatch.integrations.lightning", "lightning"),
                                             ("gradwatch.integrations.hf", "transformers")])
def test_a_missing_library_is_named_with_the_extra_that_installs_it(module, library, monkeypatch):
    for name in [m for m in sys.modules if m == module or m.split(".")[0] in (library, "pytorch_lightning")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, library, None)  # import of it raises ImportError
    monkeypatch.setitem(sys.modules, "pytorch_lightning", None)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    extra = "lightning" if library == "lightning" else "hf"
    with pytest.raises(ImportError, match=rf"needs '(lightning|pytorch_lightning|transformers)'.*pip install 'gradwatch\[{extra}\]'"):
        importlib.import_module(module)


def test_exporters_name_their_install(monkeypatch, store):
    from gradwatch.export import to_tensorboard, to_wandb

    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(ImportError, match=r"pip install wandb \(or gradwatch\[wandb\]\)"):
        to_wandb(store)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(ImportError, match=r"gradwatch\[tensorboard\]"):
        to_tensorboard(store, store)
