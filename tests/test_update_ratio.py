"""The update ratio ‖w_after − w_before‖ / ‖w_before‖ across the real optimizer step."""

from __future__ import annotations

import math

import pytest
import torch

import gradwatch as gw
from conftest import at_step, make_case


@pytest.mark.parametrize("optimizer_cls", [torch.optim.Adam, torch.optim.SGD])
def test_update_ratio_matches_hand_computation(optimizer_cls, store):
    model, batch, loss_fn = make_case("cnn")
    opt = optimizer_cls(model.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(0)
    expected = []
    with gw.watch(model, opt, update_every=3, store=store, name="upd") as w:
        for _ in range(7):
            x, y = batch(g)
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            before = {n: [p.detach().clone() for p in m.parameters(recurse=False)]
                      for n, m in model.named_modules() if list(m.parameters(recurse=False))}
            opt.step()
            ratios = {}
            for n, m in model.named_modules():
                if n in before:
                    after = list(m.parameters(recurse=False))
                    d = math.sqrt(sum(float((a.detach() - b).double().norm()) ** 2 for a, b in zip(after, before[n])))
                    wn = math.sqrt(sum(float(b.double().norm()) ** 2 for b in before[n]))
                    ratios[n] = d / wn
            expected.append(ratios)
    run = w.open()
    assert sorted(set(run.records("update_ratio")["step"].tolist())) == [0, 3, 6]
    for step in (0, 3, 6):
        got = at_step(run, "update_ratio", step)
        assert got.keys() == expected[step].keys()
        for name, value in expected[step].items():
            assert got[name] == pytest.approx(value, rel=1e-5), (step, name)


def test_zero_weights_have_no_ratio(store):
    lin = torch.nn.Linear(3, 2)
    torch.nn.init.zeros_(lin.bias)
    opt = torch.optim.SGD(lin.parameters(), lr=0.1)
    with gw.watch(lin, opt, update_every=1, store=store, name="zero") as w:
        lin(torch.randn(4, 3)).sum().backward()
        opt.step()
    run = w.open()
    got = at_step(run, "update_ratio", 0, "param")
    assert "bias" not in got and "weight" in got  # ‖b_before‖ = 0: undefined, left out
    assert at_step(run, "weight_norm", 0, "param")["bias"] == 0.0
