"""Recurrent set-ups: Pascanu et al.'s regimes on the adding task, and small LSTM/GRU language models.

- Pascanu, Mikolov & Bengio (2013), "On the difficulty of training recurrent
  neural networks", §2.1 (eq. 7: a largest singular value of W_hh above 1 is
  necessary for exploding, below 1/γ sufficient for vanishing) and §5.1
  (the adding problem of Hochreiter & Schmidhuber 1997). One net is a fused
  ``nn.RNN`` with W_hh at spectral radius 2.5; one is the same recurrence
  written by hand as an ``nn.RNNCell`` called in a Python loop, at PyTorch's
  default init (spectral radius ≈ 0.6 at 32 units), over 40 steps. Both
  train for 500 steps: 150 show the pathology, but no change of the net can
  show a repair in 150 (measured: a gated cell with Adam at 10⁻² ends at the
  mean's loss Var(y) = 1/6 after 150 steps; at 500 it reaches a held-out
  score of 0.99 on seeds 0 and 1, the fused LSTM at T = 20 as the cell at
  T = 40). The repair is judged on the run the doctor trains, as long as this.
- Zaremba, Sutskever & Vinyals (2014), "Recurrent neural network
  regularization", §4 (the "small" word-level LSTM language model: embedding,
  two LSTM layers, a linear decoder), at width 32 on a 32-token Markov
  chain; the GRU of Cho et al. (2014) in the same place.
"""

from __future__ import annotations

import torch
from torch import nn

from .common import BenchSetup, Trial, adding_score, adding_task, lm_loss, lm_score, markov_tokens


class AddingRNN(nn.Module):
    """nn.RNN over (T, B, 2) and a linear readout of the last state: (B, 1)."""

    def __init__(self, hidden: int, nonlinearity: str = "tanh") -> None:
        super().__init__()
        self.rnn = nn.RNN(2, hidden, nonlinearity=nonlinearity)
        self.readout = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)  # (T, B, H)
        return self.readout(out[-1])


class AddingCellLoop(nn.Module):
    """The same recurrence unrolled by hand: one nn.RNNCell call per time step (what many tutorials write)."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.cell = nn.RNNCell(2, hidden)
        self.readout = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.new_zeros(x.shape[1], self.cell.hidden_size)  # (B, H)
        for t in range(x.shape[0]):
            h = self.cell(x[t], h)
        return self.readout(h)


def rnn_radius25(seed: int) -> Trial:
    """Pascanu §2.1: a 32-unit ReLU RNN whose W_hh is scaled to spectral radius 2.5; adding task, T = 20, SGD."""
    torch.manual_seed(seed)
    model = AddingRNN(32, "relu")
    with torch.no_grad():
        w = model.rnn.weight_hh_l0
        w.mul_(2.5 / torch.linalg.eigvals(w).abs().max())
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    return Trial(model, opt, adding_task(seed, 20, 32), nn.functional.mse_loss, adding_score(seed, 20))


def rnncell_loop(seed: int) -> Trial:
    """Pascanu §2.1, vanishing side: a hand-unrolled tanh nn.RNNCell, default init, adding task at T = 40, SGD."""
    torch.manual_seed(seed)
    model = AddingCellLoop(32)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    return Trial(model, opt, adding_task(seed, 40, 32), nn.functional.mse_loss, adding_score(seed, 40))


class WordLM(nn.Module):
    """Embedding → 2-layer LSTM or GRU → linear decoder; (B, T) tokens to (B, T, V) logits."""

    def __init__(self, vocab: int, width: int, cell: str) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.rnn = (nn.LSTM if cell == "lstm" else nn.GRU)(width, width, num_layers=2, batch_first=True)
        self.decoder = nn.Linear(width, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(self.embed(tokens))  # (B, T, width)
        return self.decoder(out)


def _lm(seed: int, cell: str) -> Trial:
    torch.manual_seed(seed)
    model = WordLM(32, 32, cell)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    return Trial(model, opt, markov_tokens(seed, 32, 20, 32), lm_loss, lm_score(seed, 32, 20))


def lstm_lm(seed: int) -> Trial:
    """Zaremba et al. 2014 §4, small: a 2-layer LSTM language model (width 32), Adam 1e-2, on a Markov chain."""
    return _lm(seed, "lstm")


def gru_lm(seed: int) -> Trial:
    """The same language model with a 2-layer GRU (Cho et al. 2014)."""
    return _lm(seed, "gru")


class ExampleLM(nn.Module):
    """pytorch/examples ``word_language_model/model.py``'s RNNModel (LSTM): embedding, dropout, LSTM, dropout, decoder;
    ``init_weights``: embedding and decoder U(±0.1), decoder bias 0. Batch-first; a zero hidden state per batch."""

    def __init__(self, vocab: int, width: int, layers: int = 2, dropout: float = 0.2) -> None:
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.encoder = nn.Embedding(vocab, width)
        self.rnn = nn.LSTM(width, width, layers, dropout=dropout, batch_first=True)
        self.decoder = nn.Linear(width, vocab)
        nn.init.uniform_(self.encoder.weight, -0.1, 0.1)
        nn.init.uniform_(self.decoder.weight, -0.1, 0.1)
        nn.init.zeros_(self.decoder.bias)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(self.drop(self.encoder(tokens)))
        return self.decoder(self.drop(out))


def _example_lm(seed: int, clip: float | None) -> Trial:
    torch.manual_seed(seed)
    model = ExampleLM(50, 128)
    opt = torch.optim.SGD(model.parameters(), lr=20.0)
    if clip is not None:  # main.py clips between backward and the update
        params = list(model.parameters())
        opt.register_step_pre_hook(lambda o, a, k: (nn.utils.clip_grad_norm_(params, clip), None)[1])
    return Trial(model, opt, markov_tokens(seed, 50, 35, 20), lm_loss, lm_score(seed, 50, 35))


def example_lm_noclip(seed: int) -> Trial:
    """pytorch/examples ``word_language_model/main.py`` at its default lr 20 (plain SGD, bptt 35, batch 20, 2 LSTM
    layers, dropout 0.2) with ``--clip`` taken out: the gradient norm grows 10⁶–10¹⁰×. The corpus is a 50-token
    Markov chain (nothing downloaded); width 200 → 128."""
    return _example_lm(seed, clip=None)


def example_lm_clip(seed: int) -> Trial:
    """The same with main.py's default ``--clip 0.25``: it learns the chain (loss 3.9 → 0.87; the floor is ln 2)."""
    return _example_lm(seed, clip=0.25)


_PASCANU = "Pascanu, Mikolov & Bengio 2013, ICML, "
SETUPS = [
    BenchSetup("pascanu_rnn_radius25", "exploding", 500, rnn_radius25, _PASCANU + "§2.1 eq. 7, §5.1 adding problem"),
    BenchSetup("pascanu_rnncell_loop", "vanishing", 500, rnncell_loop, _PASCANU + "§2.1, §5.1 (a hand-unrolled cell)",
               slow=True),
    BenchSetup("zaremba_lstm_lm", "healthy", 200, lstm_lm, "Zaremba, Sutskever & Vinyals 2014, §4 (small LSTM LM)"),
    BenchSetup("gru_lm", "healthy", 200, gru_lm, "Cho et al. 2014 (GRU) in Zaremba et al.'s LM, §4"),
    BenchSetup("example_lm_noclip", "exploding", 200, example_lm_noclip,
               "github pytorch/examples, word_language_model/main.py (lr 20, --clip removed)", slow=True),
    BenchSetup("example_lm_clip", "healthy", 200, example_lm_clip,
               "github pytorch/examples, word_language_model/main.py (lr 20, --clip 0.25)", slow=True),
]
