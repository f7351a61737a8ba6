"""Exporters, read back with the real libraries."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gradwatch as gw
from gradwatch.export import to_tensorboard


def test_tensorboard_scalars_read_back_equal_the_records(store, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gw.watch(model, opt, activations=2, store=store, name="tb") as w:
        for _ in range(6):
            loss = model(torch.randn(4, 3)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            w.log(loss=loss)
    logdir = to_tensorboard(w.path, tmp_path / "tb")
    acc = EventAccumulator(str(logdir))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"grad_norm/0", "grad_norm/2", "loss", "saturated_frac/1", "out_grad_norm/0"} <= tags
    run = w.open()
    for tag, (quantity, kind, layer) in {"grad_norm/2": ("grad_norm", "layer", "2"), "loss": ("loss", "run", "loss"),
                                        "saturated_frac/1": ("saturated_frac", "activation", "1")}.items():
        rec = run.records(quantity, kind)
        sel = rec["layer"] == layer
        expect = list(zip(rec["step"][sel].tolist(), rec["value"][sel].tolist()))
        got = [(e.step, e.value) for e in acc.Scalars(tag)]
        assert [s for s, _ in got] == [s for s, _ in expect]
        assert [v for _, v in got] == pytest.approx([v for _, v in expect], rel=1e-6)  # TensorBoard stores float32
