"""Layers nobody could measure say so, and the model itself is '(root)' in findings (issue 20)."""

from __future__ import annotations

import html

import torch
from torch import nn

import gradwatch as gw
from gradwatch.diagnosis.findings import layer_name, span
from gradwatch.report.rows import UNMEASURED_NOTE, layer_rows


class _InPlaceAfter3dLinear(nn.Module):
    """(B, T, 6) → (B, 2); the output of the 3-D Linear `a` is modified in place when `inplace`."""

    def __init__(self, inplace: bool) -> None:
        super().__init__()
        self.inplace = inplace
        self.a, self.b, self.c = nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)  # (B, T, 6)
        if self.inplace:
            h += 1.0
        else:
            h = h + 1.0
        return self.c(torch.tanh(self.b(h))).mean(1)


def _hooks_fired(model: nn.Module, x: torch.Tensor) -> set[str]:
    """Plain hooks, the reference: which layers' output tensor hooks autograd actually runs."""
    fired: set[str] = set()
    handles = []
    for name, mod in model.named_children():
        def hook(m: nn.Module, args: tuple, out: torch.Tensor, name: str = name) -> None:
            out.register_hook(lambda g: fired.add(name))
        handles.append(mod.register_forward_hook(hook))
    model(x).pow(2).mean().backward()
    for h in handles:
        h.remove()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())  # gradients reached all
    model.zero_grad(set_to_none=True)
    return fired


def _watched(model: nn.Module, tmp_path) -> gw.Watch:
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gw.watch(model, opt, store=tmp_path, activations=1) as watch:
        for _ in range(6):
            loss = model(torch.randn(4, 5, 6)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    return watch


def test_a_dropped_output_hook_is_reported_unmeasured(tmp_path):
    torch.manual_seed(0)
    model = _InPlaceAfter3dLinear(inplace=True)
    assert _hooks_fired(model, torch.randn(4, 5, 6)) == {"b", "c"}  # autograd drops a's hook
    watch = _watched(model, tmp_path)
    with gw.open_run(watch.path) as run:
        rows = {r.name: r for r in layer_rows(run)}
    assert rows["a"].unmeasured and rows["a"].out_grad_norm != rows["a"].out_grad_norm  # NaN: nothing stored
    assert rows["a"].grad_norm > 0
    assert not rows["b"].unmeasured and not rows["c"].unmeasured
    text = watch.summary()
    line_a = next(line for line in text.splitlines() if line.startswith("a "))
    assert "‖∂L/∂a‖ unmeasured" in line_a
    assert " ".join(UNMEASURED_NOTE.split()[:6]) in " ".join(text.split())
    page = watch.report(tmp_path / "report.html").read_text()  # the HTML report says the same (issue 20)
    row_a = next(r for r in page.split("<tr>") if r.startswith("<td>a</td>"))
    assert 'class="unmeasured"' in row_a and 'id="unmeasured-note"' in page
    assert html.escape(UNMEASURED_NOTE) in page


def test_no_unmeasured_note_when_every_hook_fires(tmp_path):
    torch.manual_seed(0)
    model = _InPlaceAfter3dLinear(inplace=False)
    assert _hooks_fired(model, torch.randn(4, 5, 6)) == {"a", "b", "c"}
    watch = _watched(model, tmp_path)
    with gw.open_run(watch.path) as run:
        assert not any(r.unmeasured for r in layer_rows(run))
    assert "unmeasured" not in watch.summary()
    page = watch.report(tmp_path / "report.html").read_text()
    assert 'class="unmeasured"' not in page and "unmeasured-note" not in page


def test_the_root_module_is_named_root_in_findings():
    assert layer_name("") == "(root)" and layer_name("enc.0") == "enc.0"
    assert span([""]) == "(root)"
    assert span(["0", "1", ""], total=5) == "0…(root) (3 of 5)"
    assert span(["", "head"]) == "(root)…head"
    assert span([]) == "none"
