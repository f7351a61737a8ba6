"""Exporters, read back with the real libraries."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gradwatch as gw
from gradwatch.export import to_tensorboard


def _watched_run(store, name):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gw.watch(model, opt, activations=2, store=store, name=name) as w:
        for _ in range(6):
            loss = model(torch.randn(4, 3)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            w.log(loss=loss)
    return w.open()


def test_tensorboard_scalars_read_back_equal_the_records(store, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = _watched_run(store, "tb")
    logdir = to_tensorboard(run.path, tmp_path / "tb")
    acc = EventAccumulator(str(logdir))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"grad_norm/0", "grad_norm/2", "loss", "saturated_frac/1", "out_grad_norm/0"} <= tags
    for tag, (quantity, kind, layer) in {"grad_norm/2": ("grad_norm", "layer", "2"), "loss": ("loss", "run", "loss"),
                                        "saturated_frac/1": ("saturated_frac", "activation", "1")}.items():
        rec = run.records(quantity, kind)
        sel = rec["layer"] == layer
        expect = list(zip(rec["step"][sel].tolist(), rec["value"][sel].tolist()))
        got = [(e.step, e.value) for e in acc.Scalars(tag)]
        assert [s for s, _ in got] == [s for s, _ in expect]
        assert [v for _, v in got] == pytest.approx([v for _, v in expect], rel=1e-6)  # TensorBoard stores float32


def _read_wandb_history(directory, wait_s: float = 30.0) -> list[dict]:
    """The history rows of an offline W&B run, read from its .wandb file (LevelDB-style log of protobufs).

    wandb's core process may still be writing the file when ``finish()`` returns (seen on a fresh machine:
    no history yet, or a record cut short); read again until the run's closing ``exit`` record is there.
    """
    import json
    import struct
    import time

    from google.protobuf.message import DecodeError
    from wandb.proto import wandb_internal_pb2

    deadline = time.monotonic() + wait_s
    while True:
        records = []
        paths = list(directory.glob("wandb/offline-run-*/run-*.wandb"))
        if len(paths) == 1:
            data = paths[0].read_bytes()
            assert data[:4] == b":W&B"
            partial, pos, block = b"", 7, 32768
            while pos + 7 <= len(data):
                if block - pos % block < 7:  # a block's tail too short for a header is padding
                    pos += block - pos % block
                    continue
                _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
                chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
                if kind == 0 or pos > len(data):
                    break
                partial = chunk if kind in (1, 2) else partial + chunk  # full, first, middle, last
                if kind in (1, 4):
                    rec = wandb_internal_pb2.Record()
                    try:
                        rec.ParseFromString(partial)
                    except DecodeError:
                        break  # cut short: still being written
                    records.append(rec)
        kinds = [rec.WhichOneof("record_type") for rec in records]
        if "exit" in kinds:
            return [{i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item}
                    for rec in records if rec.WhichOneof("record_type") == "history"]
        assert time.monotonic() < deadline, f"no complete offline W&B run under {directory} after {wait_s} s"
        time.sleep(0.2)

def test_wandb_offline_history_equals_the_records(store, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    from gradwatch.export import scalars, to_wandb

    monkeypatch.setenv("WANDB_SILENT", "true")
    run = _watched_run(store, "wb")
    to_wandb(run, project="gradwatch-test", mode="offline", dir=str(tmp_path))
    rows = _read_wandb_history(tmp_path)
    assert [r["_step"] for r in rows] == list(range(6))
    # every record of the store, against the store itself (a naive read of the records table)
    rec = run.records(positioned=False)
    n = 0
    for step, layer, kind, quantity, value in zip(rec["step"], rec["layer"], rec["kind"], rec["quantity"],
                                                  rec["value"]):
        tag = quantity if kind == "run" else f"{quantity}/{layer}"
        assert rows[int(step)][tag] == pytest.approx(float(value), rel=1e-12), tag
        n += 1
    assert n == sum(len(row) for _, row in scalars(run)) > 50
    assert {"grad_norm/0", "grad_norm/2.weight", "loss", "saturated_frac/1"} <= set(rows[0])


def test_wandb_into_an_open_run_and_bad_arguments(store, tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    from gradwatch.export import to_wandb

    monkeypatch.setenv("WANDB_SILENT", "true")
    run = _watched_run(store, "wb2")
    live = wandb.init(project="gradwatch-test", mode="offline", dir=str(tmp_path))
    try:
        assert to_wandb(run, live) is live
        with pytest.raises(TypeError, match=r"to_wandb\(wandb_run=…\)"):
            to_wandb(run, live, project="x")
    finally:
        live.finish()
    assert len(_read_wandb_history(tmp_path)) == 6
    with pytest.raises(TypeError, match=r"to_wandb\(wandb_run=…\)` expects an active wandb run"):
        to_wandb(run, "not a run")
