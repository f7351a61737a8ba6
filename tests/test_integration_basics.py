"""What every integration leans on: the external driver, the loss-scale division, the install hints."""

from __future__ import annotations

import importlib
import sys

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
