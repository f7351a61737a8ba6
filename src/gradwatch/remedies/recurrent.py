"""The recurrent-net remedies of Pascanu et al. (2013) and their successors, from PyTorch's own pieces."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from gradwatch._errors import bad_argument
from gradwatch.probes.temporal import LayerRun


def pascanu_regularizer(runs: list[LayerRun], loss: Tensor) -> Tensor:
    """Pascanu et al. (2013)'s norm-preserving regulariser Ω (SGD-CR), to add to the loss with a weight α.

    Ω = Σ_k ( ‖δ_{k+1} · ∂x_{k+1}/∂x_k‖ / ‖δ_{k+1}‖ − 1 )², δ_{k+1} = ∂E/∂x_{k+1}

    with δ held constant (only the one-step Jacobians, i.e. the recurrent
    weights, are pushed towards preserving the gradient's norm). ``runs`` are
    the layer runs of :func:`gradwatch.probes.temporal.unroll` with its
    weights attached (``detach_weights=False``), the forward pass that produced
    ``loss``. Norms are over the minibatch at each step, as in the paper's code.
    """
    omega = loss.new_zeros(())
    for run in runs:
        states = run.states
        raw = torch.autograd.grad(loss, states[1:], retain_graph=True, allow_unused=True)
        deltas = [torch.zeros_like(s) if d is None else d.detach() for s, d in zip(states[1:], raw)]
        T, B = len(run.inputs), states[0].shape[0]
        prev = torch.stack(states[:-1]).detach().reshape(T * B, -1).requires_grad_(True)
        x = torch.stack(run.inputs).detach().reshape(T * B, -1)
        nxt = run.step(x, prev)
        delta = torch.stack(deltas).reshape(T * B, -1)
        (back,) = torch.autograd.grad(nxt, prev, delta, create_graph=True)  # δ_{k+1} ∂x_{k+1}/∂x_k, for every k
        num = back.reshape(T, -1).norm(dim=1)
        den = delta.reshape(T, -1).norm(dim=1)
        keep = den > 0
        omega = omega + ((num[keep] / den[keep] - 1) ** 2).sum()
    return omega


def orthogonal_recurrent(rnn: nn.RNN | nn.RNNCell | nn.Linear) -> nn.RNN | nn.RNNCell | nn.Linear:
    """Keep every recurrent weight orthogonal during training (in place; returns ``rnn``), on a fused vanilla
    ``nn.RNN``, an ``nn.RNNCell`` called in a loop, or the square ``nn.Linear`` that is W_hh of an RNN written by
    hand (called once per time step on the state).

    ``torch.nn.utils.parametrizations.orthogonal``: the weight is the image of an
    unconstrained matrix under the matrix exponential / Cayley map, so every
    optimizer step stays on the orthogonal manifold (the expRNN approach,
    Lezcano-Casado & Martínez-Rubio 2019). For gated cells each gate's block is
    square but the stacked W_hh is not, so only vanilla RNNs and cells are supported.
    """
    from torch.nn.utils.parametrizations import orthogonal

    if isinstance(rnn, nn.Linear) and rnn.in_features == rnn.out_features:
        orthogonal(rnn, "weight")
        return rnn
    if not isinstance(rnn, (nn.RNN, nn.RNNCell)):
        raise TypeError(bad_argument("orthogonal_recurrent", "rnn",
                                     "a torch.nn.RNN or nn.RNNCell (vanilla), or a square nn.Linear", rnn))

    for name in [n for n, _ in rnn.named_parameters() if n.startswith("weight_hh")]:
        orthogonal(rnn, name)
    return rnn


def irnn(input_size: int, hidden_size: int, num_layers: int = 1, batch_first: bool = False) -> nn.RNN:
    """A ReLU RNN with identity recurrent weights and zero biases (IRNN, Le, Jaitly & Hinton 2015)."""
    rnn = nn.RNN(input_size, hidden_size, num_layers, nonlinearity="relu", batch_first=batch_first)
    with torch.no_grad():
        for name, p in rnn.named_parameters():
            if name.startswith("weight_hh"):
                p.copy_(torch.eye(hidden_size))
            elif name.startswith("bias"):
                p.zero_()
            else:
                nn.init.normal_(p, std=0.001)  # Le et al.: small input weights
    return rnn


def smart_init(rnn: nn.RNN, radius: float = 0.95, nonzero: int = 15, generator: torch.Generator | None = None) -> nn.RNN:
    """Pascanu et al. (2013)'s "smart" initialisation (after Sutskever et al. 2013), in place.

    Each unit gets ``nonzero`` incoming recurrent weights drawn from N(0, 1),
    the rest zero; the matrix is scaled to spectral radius ``radius``.
    """
    if not isinstance(rnn, nn.RNN):
        raise TypeError(bad_argument("smart_init", "rnn", "a torch.nn.RNN (vanilla)", rnn))
    H = rnn.hidden_size
    k = min(nonzero, H)
    with torch.no_grad():
        for name, p in rnn.named_parameters():
            if not name.startswith("weight_hh"):
                continue
            w = torch.zeros(H, H)
            for i in range(H):
                cols = torch.randperm(H, generator=generator)[:k]
                w[i, cols] = torch.randn(k, generator=generator)
            rho = torch.linalg.eigvals(w).abs().max()
            p.copy_(w * (radius / rho))
    return rnn


def lstm_forget_bias(lstm: nn.LSTM | nn.LSTMCell, value: float = 1.0) -> nn.LSTM | nn.LSTMCell:
    """Set the forget gates' bias to ``value`` (Gers et al. 2000; Jozefowicz et al. 2015 recommend 1), in place.

    PyTorch orders the gates (input, forget, cell, output) and adds ``bias_ih``
    and ``bias_hh``: the forget slice of ``bias_ih`` gets ``value``, that of ``bias_hh`` zero.
    """
    if not isinstance(lstm, (nn.LSTM, nn.LSTMCell)):
        raise TypeError(bad_argument("lstm_forget_bias", "lstm", "a torch.nn.LSTM or nn.LSTMCell", lstm))
    H = lstm.hidden_size
    with torch.no_grad():
        for name, p in lstm.named_parameters():
            if name.startswith("bias_ih"):
                p[H : 2 * H] = value
            elif name.startswith("bias_hh"):
                p[H : 2 * H] = 0.0
    return lstm


def lstm_chrono_init(lstm: nn.LSTM | nn.LSTMCell, t_max: float,
                     generator: torch.Generator | None = None) -> nn.LSTM | nn.LSTMCell:
    """Chrono initialisation (Tallec & Ollivier 2018, §4), in place: each unit's forget-gate bias
    b_f = log u with u ~ U(1, t_max − 1), its input-gate bias −b_f, so that the units' characteristic forgetting
    times spread over 1 … t_max − 1 steps, the dependencies the task is expected to span.

    The values go into ``bias_ih``; the same slices of ``bias_hh`` get zero (PyTorch adds the two, gates ordered
    input, forget, cell, output). ``generator`` draws the u's (the global generator when None).
    """
    if not isinstance(lstm, (nn.LSTM, nn.LSTMCell)):
        raise TypeError(bad_argument("lstm_chrono_init", "lstm", "a torch.nn.LSTM or nn.LSTMCell", lstm))
    if not t_max > 2:
        raise ValueError(bad_argument("lstm_chrono_init", "t_max", "the longest dependency in steps, above 2", t_max))
    H = lstm.hidden_size
    with torch.no_grad():
        for name, p in lstm.named_parameters():
            if name.startswith("bias_ih"):
                u = torch.empty(H, dtype=torch.float64).uniform_(1.0, float(t_max) - 1.0, generator=generator)
                b_f = torch.log(u).to(p.dtype)
                p[H : 2 * H] = b_f
                p[:H] = -b_f
            elif name.startswith("bias_hh"):
                p[: 2 * H] = 0.0
    return lstm
