"""The temporal probe: ‖∂L/∂h_t‖ (total derivative) against finite differences and hand-unrolled PyTorch cells."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import gradwatch as gw
from gradwatch.probes.temporal import unroll


class Seq(nn.Module):
    """A recurrent module and a head on its last output (sequence first unless batch_first)."""

    def __init__(self, rnn: nn.RNNBase) -> None:
        super().__init__()
        self.rnn = rnn
        self.head = nn.Linear(rnn.hidden_size * (2 if rnn.bidirectional else 1), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)
        last = out[:, -1] if self.rnn.batch_first else out[-1]
        return self.head(torch.tanh(out).mean((0, 1)) + last)  # every step's output and the last one


def _watch_one_step(model: nn.Module, x: torch.Tensor, store, name: str, **kw):
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with gw.watch(model, opt, temporal=kw.pop("temporal", True), activations=1, store=store, name=name) as w:
        loss = model(x).pow(2).sum()
        loss.backward()
        opt.step()
    return w.open()


def _reference(rnn: nn.RNNBase, head: nn.Linear, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """‖∂L/∂h_t‖ per layer and direction from PyTorch's own cells, unrolled by hand, with retain_grad."""
    cell_cls = {"RNN_TANH": nn.RNNCell, "GRU": nn.GRUCell, "LSTM": nn.LSTMCell}[rnn.mode]
    xs = x.transpose(0, 1) if rnn.batch_first else x
    T, B, _ = xs.shape
    H, dirs = rnn.hidden_size, 2 if rnn.bidirectional else 1
    layer_in = list(xs.unbind(0))
    kept: dict[str, list[torch.Tensor]] = {}
    for layer in range(rnn.num_layers):
        outs = []
        for d in range(dirs):
            sfx = "_reverse" if d else ""
            cell = cell_cls(layer_in[0].shape[1], H).double()
            with torch.no_grad():
                for p in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                    getattr(cell, p).copy_(getattr(rnn, f"{p}_l{layer}{sfx}"))
            h = torch.zeros(B, H, dtype=torch.float64, requires_grad=True)
            c = torch.zeros(B, H, dtype=torch.float64)
            hs = [h]
            for xt in (layer_in[::-1] if d else layer_in):
                if rnn.mode == "LSTM":
                    h, c = cell(xt, (h, c))
                else:
                    h = cell(xt, h)
                h.retain_grad()
                hs.append(h)
            kept[f"l{layer}{sfx}"] = hs
            outs.append(hs[1:][::-1] if d else hs[1:])
        layer_in = [torch.cat([o[t] for o in outs], 1) for t in range(T)]
    out = torch.stack(layer_in)
    last = out[-1]
    loss = head(torch.tanh(out).mean((0, 1)) + last).pow(2).sum()
    loss.backward()
    ref = {}
    for name, hs in kept.items():
        norms = torch.stack([h.grad.norm() for h in hs])
        ref[name] = norms.flip(0) if name.endswith("_reverse") else norms
    return ref


@pytest.mark.parametrize("mode", ["RNN", "GRU", "LSTM"])
@pytest.mark.parametrize("batch_first,bidirectional", [(False, False), (True, True)])
def test_matches_hand_unrolled_pytorch_cells(store, mode, batch_first, bidirectional):
    torch.manual_seed(0)
    rnn = getattr(nn, mode)(3, 6, num_layers=2, batch_first=batch_first, bidirectional=bidirectional).double()
    model = Seq(rnn).double()
    x = torch.randn(4, 9, 3, dtype=torch.float64) if batch_first else torch.randn(9, 4, 3, dtype=torch.float64)
    run = _watch_one_step(model, x, store, f"{mode}{batch_first}")
    ref = _reference(rnn, model.head, x)
    for name, norms in ref.items():
        got = run.temporal(f"rnn.{name}")
        assert got.names == [str(t) for t in range(10)]
        torch.testing.assert_close(torch.tensor(got.values[:, 0]), norms.detach(), rtol=1e-6, atol=1e-12)


def test_total_derivative_against_finite_differences(store):
    """Perturb the hidden state at step t inside a hand-written loop: the loss moves by ⟨∂L/∂h_t, u⟩."""
    torch.manual_seed(1)
    rnn = nn.RNN(2, 5).double()
    model = Seq(rnn).double()
    x = torch.randn(8, 3, 2, dtype=torch.float64)
    got = _watch_one_step(model, x, store, "fd").temporal("rnn.l0").values[:, 0]
    W_ih, W_hh, b = rnn.weight_ih_l0, rnn.weight_hh_l0, rnn.bias_ih_l0 + rnn.bias_hh_l0

    def loss_with(t: int, delta: torch.Tensor) -> float:
        with torch.no_grad():
            h = torch.zeros(3, 5, dtype=torch.float64)
            outs = []
            if t == 0:
                h = h + delta
            for k in range(8):
                h = torch.tanh(x[k] @ W_ih.T + h @ W_hh.T + b)
                if k + 1 == t:
                    h = h + delta
                outs.append(h)
            out = torch.stack(outs)
            return float(model.head(torch.tanh(out).mean((0, 1)) + out[-1]).pow(2).sum())

    eps = 1e-6
    for t in range(9):
        # the directional derivative along every unit vector, one coordinate at a time: the gradient itself
        grad = torch.zeros(3, 5, dtype=torch.float64)
        for i in range(3):
            for j in range(5):
                e = torch.zeros(3, 5, dtype=torch.float64)
                e[i, j] = eps
                grad[i, j] = (loss_with(t, e) - loss_with(t, -e)) / (2 * eps)
        assert got[t] == pytest.approx(float(grad.norm()), rel=1e-6, abs=1e-10), t


def test_user_written_cell_in_a_python_loop(store):
    torch.manual_seed(2)

    class Loop(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.cell = nn.GRUCell(3, 7)
            self.head = nn.Linear(7, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.zeros(x.shape[1], 7)
            for xt in x:
                h = self.cell(xt, h)
            return self.head(h)

    model = Loop()
    x = torch.randn(6, 4, 3)
    hs = []
    hook = model.cell.register_forward_hook(lambda m, a, o: (o.retain_grad(), hs.append(o)) and None)
    run = _watch_one_step(model, x, store, "cell", temporal=["cell"])
    hook.remove()
    got = run.temporal("cell").values[:, 0]
    assert run.temporal("cell").names == [str(t) for t in range(1, 7)]
    torch.testing.assert_close(torch.tensor(got), torch.stack([h.grad.norm() for h in hs]).double(), rtol=1e-5, atol=0)


def test_step_jacobian_norm_and_lambda1(store):
    """Vanilla RNN: ∂h_{t+1}/∂h_t = diag(1 − h_{t+1}²) W_hh; its spectral norm, and λ₁(W_hh)."""
    torch.manual_seed(3)
    rnn = nn.RNN(2, 6).double()
    model = Seq(rnn).double()
    x = torch.randn(7, 5, 2, dtype=torch.float64)
    run = _watch_one_step(model, x, store, "jac")
    got = run.temporal("rnn.l0", "step_jacobian_norm").values[:, 0]
    _, _, _, runs = unroll(rnn, x)
    states = runs[0].states
    W = rnn.weight_hh_l0.detach()
    expect = []
    for t in range(7):
        d = 1 - states[t + 1].detach() ** 2  # (B, H)
        J = d[:, :, None] * W[None]  # (B, H, H)
        expect.append(torch.linalg.matrix_norm(J, ord=2).mean())
    torch.testing.assert_close(torch.tensor(got), torch.stack(expect), rtol=2e-3, atol=0)
    lam = run.series("lambda1", "recurrent").values[0, 0]
    assert lam == pytest.approx(float(torch.linalg.svdvals(W)[0]), rel=1e-9)


def test_unroll_equals_the_fused_kernel():
    torch.manual_seed(4)
    for cls in (nn.RNN, nn.GRU, nn.LSTM):
        m = cls(3, 5, num_layers=2, bidirectional=True)
        x = torch.randn(6, 2, 3)
        out, h = m(x)
        out2, hn2, cn2, _ = unroll(m, x)
        torch.testing.assert_close(out2, out, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(hn2, h[0] if cls is nn.LSTM else h, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kwargs,error,message", [
    (dict(temporal=True), ValueError, r"`watch\(temporal=True\)` found no nn.RNN"),
    (dict(temporal=["nope"]), ValueError, r"no module named 'nope'"),
    (dict(temporal=3), TypeError, r"`watch\(temporal=…\)` expects True, False or a list of module names"),
    (dict(temporal=["0"], activations=False), ValueError, r"rides the activations schedule"),
])
def test_bad_temporal_arguments(store, kwargs, error, message):
    model = nn.Sequential(nn.Linear(2, 2))
    with pytest.raises(error, match=message):
        gw.watch(model, store=store, **kwargs)
    assert not model[0]._forward_hooks


class Unrolled(nn.Module):
    """An nn.RNNCell called once per time step in a Python loop; the loss reads only the last state."""

    def __init__(self, radius: float) -> None:
        super().__init__()
        self.cell = nn.RNNCell(4, 16)
        self.head = nn.Linear(16, 1)
        with torch.no_grad():  # a contracting recurrent weight: largest singular value `radius`
            self.cell.weight_hh.mul_(radius / torch.linalg.matrix_norm(self.cell.weight_hh, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (T, B, 4)
        h = torch.zeros(x.shape[1], 16)
        for xt in x:
            h = self.cell(xt, h)
        return self.head(h)


def test_hand_unrolled_cell_vanishing_through_time_is_found_without_temporal(store):
    """Regression (issue 12): a cell in a Python loop was watched without `temporal=`, so its vanishing went unseen."""
    torch.manual_seed(0)
    model = Unrolled(radius=0.5)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(30, 8, 4), torch.randn(8, 1)
    hs: list[torch.Tensor] = []
    hook = model.cell.register_forward_hook(lambda m, a, o: (o.retain_grad(), hs.append(o)) and None)
    reference = None
    with gw.watch(model, opt, store=store, name="unrolled") as w:  # no temporal=: the default finds the loop
        for step in range(40):
            hs.clear()
            loss = nn.functional.mse_loss(model(x), y)
            opt.zero_grad()
            loss.backward()
            if step == 0:
                reference = torch.stack([h.grad.norm() for h in hs]).double()  # ‖∂L/∂h_t‖, t = 1 … 30
            opt.step()
    hook.remove()
    run = w.open()
    series = run.temporal("cell")
    assert series.names == [str(t) for t in range(1, 31)]
    torch.testing.assert_close(torch.tensor(series.values[:, 0]), reference, rtol=1e-5, atol=0)
    assert reference[0] < 1e-6 * reference[-1]  # it does vanish: 0.5²⁹ bounds the first against the last
    found = [f for f in w.diagnose().problems if f.kind == "vanishing" and "cell" in f.layers]
    assert found, str(w.diagnose())


def test_a_cell_called_once_per_pass_is_not_followed_by_default(store):
    class Once(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.cell = nn.RNNCell(4, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.cell(x).sum()

    model = Once()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with gw.watch(model, opt, activations=1, store=store, name="once") as w:
        model(torch.randn(5, 4)).backward()
        opt.step()
    assert "temporal_grad_norm" not in w.open().quantities


class _LastState(nn.Module):
    """A fused LSTM read at its last state only (the adding problem's shape): the loss sees h_T."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(2, 16)
        self.head = nn.Linear(16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(x)
        return self.head(out[-1])


@pytest.mark.zoo
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_fused_lstm_is_followed_through_time_without_temporal(store, seed):
    """Measured (an LSTM on the adding problem at T = 200 that never learns): a plain `gw.watch` said "healthy",
    since "auto" followed cells only, while the doctor's baseline found the vanishing through time. Now the default
    records ‖∂L/∂h_t‖ of a fused module too, equal to a hand-unrolled nn.LSTMCell's (retain_grad)."""
    torch.manual_seed(seed)
    model = _LastState()
    x = torch.randn(60, 4, 2)
    with torch.no_grad():  # a forget gate that forgets: bias −3 on it (gates i, f, g, o)
        model.lstm.bias_ih_l0[16:32] = -3.0
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with gw.watch(model, opt, store=store, name=f"fused-{seed}") as w:  # no temporal=
        loss = model(x).pow(2).sum()
        loss.backward()
        opt.step()
    series = w.open().temporal("lstm.l0")
    cell = nn.LSTMCell(2, 16).double()
    with torch.no_grad():
        for p in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            getattr(cell, p).copy_(getattr(model.lstm, f"{p}_l0"))
    h = torch.zeros(4, 16, dtype=torch.float64, requires_grad=True)
    c = torch.zeros(4, 16, dtype=torch.float64)
    hs = [h]
    for xt in x.double():
        h, c = cell(xt, (h, c))
        h.retain_grad()
        hs.append(h)
    copy.deepcopy(model.head).double()(h).pow(2).sum().backward()
    reference = torch.stack([s.grad.norm() for s in hs])
    torch.testing.assert_close(torch.tensor(series.values[:, 0]), reference, rtol=1e-4, atol=1e-30)
    assert reference[1] < 1e-6 * reference[-1]  # the gradient at the first states has vanished
