"""The Lightning callback, in a real ``Trainer.fit`` on the CPU, against a naive reference callback."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

pl = pytest.importorskip("lightning.pytorch")

import gradwatch as gw  # noqa: E402
from conftest import at_step, naive_layer_grad_norms  # noqa: E402
from gradwatch.integrations.lightning import GradwatchCallback  # noqa: E402

BATCHES = 12


class Net(pl.LightningModule):
    def __init__(self, bad_batches: tuple[int, ...] = ()) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 1))
        self.bad_batches = bad_batches

    def training_step(self, batch, batch_idx):
        x, y = batch
        if batch_idx in self.bad_batches:
            x = x.clone()
            x[0, 0] = float("inf")
        return nn.functional.mse_loss(self.net(x).float(), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class Reference(pl.Callback):
    """What a user would write by hand: a loop over param.grad where Lightning hands over the gradients."""

    def __init__(self) -> None:
        self.norms: list[dict[str, float]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.norms.append({f"net.{k}": v for k, v in naive_layer_grad_norms(pl_module.net).items()})


def _loader():
    g = torch.Generator().manual_seed(1)
    data = torch.utils.data.TensorDataset(torch.randn(BATCHES * 8, 8, generator=g), torch.randn(BATCHES * 8, 1, generator=g))
    return torch.utils.data.DataLoader(data, batch_size=8)


def _fit(module, callbacks, **trainer_kwargs):
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", callbacks=callbacks, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         **trainer_kwargs)
    trainer.fit(module, _loader())
    return trainer


def test_records_equal_the_gradients_lightning_hands_over_before_clipping(store):
    cb, ref = GradwatchCallback(store=store, name="pl"), Reference()
    _fit(Net(), [cb, ref], accumulate_grad_batches=2, gradient_clip_val=0.05)
    run = cb.watch.open()
    assert cb.watch.closed and run.meta["status"] == "closed"
    assert run.meta["steps"] == BATCHES // 2 == len(ref.norms)  # one step per optimizer step
    for step, expect in enumerate(ref.norms):
        got = at_step(run, "grad_norm", step)
        assert got.keys() == expect.keys()
        for name, value in expect.items():
            assert got[name] == pytest.approx(value, rel=1e-6), (step, name)
    totals = [math.sqrt(sum(v * v for v in n.values())) for n in ref.norms]
    assert max(totals) > 0.05 * 2  # the norms recorded are the unclipped ones
    assert len(run.series("loss", "run").steps) == BATCHES // 2
    assert "update_ratio" in run.quantities


def test_training_is_bit_identical_with_and_without_the_callback(store):
    plain, watched = Net(), Net()
    _fit(plain, [])
    _fit(watched, [GradwatchCallback(store=store, name="same", every=1, activations=1, update_every=1)])
    for a, b in zip(plain.parameters(), watched.parameters()):
        assert torch.equal(a, b)


def test_skipped_mixed_precision_step_is_recorded(store):
    from lightning.pytorch.plugins import MixedPrecision

    def plugin():
        return MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=2.0**12))

    cb, ref = GradwatchCallback(store=store, name="amp"), Reference()
    _fit(Net(bad_batches=(4,)), [cb, ref], plugins=[plugin()])
    fp32 = Reference()
    _fit(Net(), [fp32])
    run = cb.watch.open()
    assert run.meta["steps"] == BATCHES
    skipped = run.series("skipped_step", "run")
    assert skipped.steps.tolist() == [4]
    assert run.series("loss_scale", "run").values[0].tolist() == [2.0**12]
    assert at_step(run, "nonfinite", 4)["net.0"] == 1
    # unscaled: the float16 run's first gradients are the float32 run's, not 4096 times them
    for name, value in fp32.norms[0].items():
        assert at_step(run, "grad_norm", 0)[name] == pytest.approx(value, rel=0.02)
    for step in (0, 5, 11):
        for name, value in ref.norms[step].items():
            assert at_step(run, "grad_norm", step)[name] == pytest.approx(value, rel=1e-6)
    assert "nonfinite" not in gw.diagnose(run).kinds


def test_bad_arguments_are_caught_when_the_callback_is_made():
    with pytest.raises(ValueError, match=r"GradwatchCallback\(every=…\)` expects a positive int"):
        GradwatchCallback(every=0)
    with pytest.raises(ValueError, match=r"GradwatchCallback\(name=…\)"):
        GradwatchCallback(name="a/b")
    with pytest.raises(TypeError, match=r"GradwatchCallback\(store=…\)"):
        GradwatchCallback(store=3)


DDP_SCRIPT = '''
import os, sys, torch
from torch import nn
import lightning.pytorch as pl
from gradwatch.integrations.lightning import GradwatchCallback


class Net(pl.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


if __name__ == "__main__":
    g = torch.Generator().manual_seed(1)
    data = torch.utils.data.TensorDataset(torch.randn(64, 6, generator=g), torch.randint(0, 3, (64,), generator=g))
    callback = GradwatchCallback(store=sys.argv[1], name="ddp", activations=False)
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", devices=2, strategy="ddp", callbacks=[callback],
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, use_distributed_sampler=False)
    rank = int(os.environ.get("LOCAL_RANK", 0))  # Lightning's launcher sets it for the ranks it starts
    mine = torch.utils.data.Subset(data, range(rank, 64, 2))  # samples r, r+2, … (no shuffling)
    trainer.fit(Net(), torch.utils.data.DataLoader(mine, batch_size=8))
    print(f"rank {trainer.global_rank}: {callback.watch!r}", flush=True)
'''


def test_ddp_trainer_rank0_records_equal_the_single_process_run(tmp_path):
    """Lightning's own DDP launcher, 2 CPU processes: rank 0 records the all-reduced gradients."""
    import os
    import subprocess
    import sys

    script = tmp_path / "train_ddp.py"  # Lightning starts rank 1 by running the script again
    script.write_text(DDP_SCRIPT)
    out = subprocess.run([sys.executable, str(script), str(tmp_path / "runs")], capture_output=True, text=True,
                         timeout=300, cwd=tmp_path, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "rank 1: <gradwatch.Watch follower on rank 1" in out.stdout
    # the reference: one process; rank r trains on samples r, r+2, …, so step i's two halves together are
    # samples 16i … 16i+15, and DDP averages their two mean losses
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 6, generator=g), torch.randint(0, 3, (64,), generator=g)
    run = gw.open_run(tmp_path / "runs" / "ddp")
    assert run.meta["steps"] == 4
    for step in range(4):
        opt.zero_grad()
        nn.functional.cross_entropy(net(x[16 * step:16 * step + 16]), y[16 * step:16 * step + 16]).backward()
        expect = {f"net.{k}": v for k, v in naive_layer_grad_norms(net).items()}
        assert at_step(run, "grad_norm", step) == pytest.approx(expect, rel=1e-6)
        opt.step()


class CellLoop(pl.LightningModule):
    """An nn.RNNCell called once per time step in the module's own loop: x (B, T=5, 3) → (B, 1)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.cell, self.head = nn.RNNCell(3, 6), nn.Linear(6, 1)
        self.states: list[torch.Tensor] = []

    def forward(self, x):
        h = x.new_zeros(x.shape[0], 6)
        for t in range(x.shape[1]):
            h = self.cell(x[:, t], h)
            if self.training and h.requires_grad:
                h.retain_grad()  # the reference: ‖∂L/∂h_t‖ by plain autograd
                self.states.append(h)
        return self.head(h)

    def training_step(self, batch, batch_idx):
        self.states = []
        return nn.functional.mse_loss(self(batch[0]), batch[1])

    def on_after_backward(self):
        self.reference = [float(h.grad.norm()) for h in self.states]

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_the_callback_follows_a_cell_in_a_loop_through_time_by_default(tmp_path):
    """Issue 20: the integrations defaulted to temporal=False, so a Lightning user's hand-unrolled RNN was never
    followed through time; the callback now takes gw.watch's default ("auto")."""
    g = torch.Generator().manual_seed(1)
    data = torch.utils.data.TensorDataset(torch.randn(8, 5, 3, generator=g), torch.randn(8, 1, generator=g))
    module = CellLoop()
    cb = GradwatchCallback(store=tmp_path, name="cell", activations=1)
    trainer = pl.Trainer(max_steps=1, accelerator="cpu", callbacks=[cb], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=8))
    with gw.open_run(cb.path) as run:
        s = run.temporal("cell")
        assert s.names == [str(t) for t in range(1, 6)]
        got = s.values[:, 0].tolist()
    assert got == pytest.approx(module.reference, rel=1e-5)


class SpikeNet(Net):
    """Net with its batch's targets scaled ×1000 on one known step (its inputs would only saturate the tanh)."""

    def __init__(self, spike_at: int) -> None:
        super().__init__()
        self.spike_at = spike_at

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y * (1000.0 if batch_idx == self.spike_at else 1.0))


def test_the_flight_recorder_catches_an_injected_spike_through_the_callback(store):
    """40 steps, a batch ×1000 at step 30: the event is at step 30, the weight norms of every step before it are in
    the store (update ratios alone are sampled), and update ratios follow on every step of the detail window."""
    g = torch.Generator().manual_seed(1)
    data = torch.utils.data.TensorDataset(torch.randn(40 * 8, 8, generator=g), torch.randn(40 * 8, 1, generator=g))
    cb = GradwatchCallback(store=store, name="pl-flight", budget=None, flight=True)
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", callbacks=[cb], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(SpikeNet(30), torch.utils.data.DataLoader(data, batch_size=8))
    with gw.open_run(cb.watch.path) as run:
        assert run.meta["flight"]["events"] == [30]
        assert set(range(31)) <= set(run.series("weight_norm").steps.tolist())
        assert set(range(31, 40)) <= set(run.series("update_ratio").steps.tolist())
