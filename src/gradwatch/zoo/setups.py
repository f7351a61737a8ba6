"""How each named set-up is built from a seed: the model, its initialisation and its optimizer.

Every builder seeds torch's global generator with the seed before it builds
the model, so that the same seed gives the same trial.
"""

from __future__ import annotations

from typing import Any, Iterator

import torch
from torch import nn

from gradwatch.remedies import add_residual, lstm_forget_bias
from gradwatch.tasks import task
from gradwatch.trial import Batch, Trial
from gradwatch.zoo.data import digits_trial
from gradwatch.zoo.models import (
    DigitsCNN,
    PlainResBlock,
    PlainResNet,
    RowSequenceModel,
    SmallResNet,
    TaskRNN,
    he_initialised,
    mlp,
    scale_recurrent,
    scaled_init,
)

DEPTH, WIDTH, LR = 20, 64, 0.005  # the deep MLPs' depth and width; their SGD learning rate (momentum 0.9)


def deep_tanh_mlp(seed: int) -> Trial:
    torch.manual_seed(seed)
    return digits_trial(mlp(DEPTH, WIDTH, nn.Tanh), seed, LR)


def deep_sigmoid_mlp(seed: int) -> Trial:
    torch.manual_seed(seed)
    return digits_trial(mlp(10, WIDTH, nn.Sigmoid), seed, LR)


def deep_relu_he_mlp(seed: int) -> Trial:
    torch.manual_seed(seed)
    return digits_trial(he_initialised(mlp(DEPTH, WIDTH, nn.ReLU)), seed, LR)


def saturated_tanh_mlp(seed: int) -> Trial:
    torch.manual_seed(seed)
    return digits_trial(scaled_init(mlp(8, WIDTH, nn.Tanh), gain=8.0), seed, LR)


def dead_relu_mlp(seed: int) -> Trial:
    torch.manual_seed(seed)
    model = scaled_init(mlp(6, WIDTH, nn.ReLU), gain=2**0.5, bias=-1.5)
    last = model[-1]
    assert isinstance(last, nn.Linear)
    nn.init.zeros_(last.bias)
    return digits_trial(model, seed, LR)


def exploding_relu_mlp(seed: int) -> Trial:
    torch.manual_seed(seed)
    model = scaled_init(mlp(DEPTH, WIDTH, nn.ReLU), gain=3.0)
    return digits_trial(model, seed, 0.01)  # SGD with momentum at a learning rate a practitioner would use


def diverging_mlp(seed: int) -> Trial:
    torch.manual_seed(seed)
    model = he_initialised(mlp(6, WIDTH, nn.ReLU))
    return digits_trial(model, seed, 3.0, momentum=0)  # plain SGD at a far too large rate: the loss overflows


def stalled_mlp(seed: int) -> Trial:
    torch.manual_seed(seed)
    model = he_initialised(mlp(6, WIDTH, nn.ReLU))
    early = [p for m in list(model)[:4] for p in m.parameters()]
    late = [p for m in list(model)[4:] for p in m.parameters()]
    # a misconfigured parameter group: the first two layers' learning rate is 10⁻⁶ of the rest
    groups: list[dict[str, Any]] = [{"params": early, "lr": LR * 1e-6}, {"params": late}]
    return digits_trial(model, seed, LR, params=groups)


def layernorm_mlp(seed: int) -> Trial:
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Linear(64, WIDTH)]
    for _ in range(7):
        layers += [nn.LayerNorm(WIDTH), nn.GELU(), nn.Linear(WIDTH, WIDTH)]
    layers += [nn.LayerNorm(WIDTH), nn.GELU(), nn.Linear(WIDTH, 10)]
    return digits_trial(nn.Sequential(*layers), seed, LR)


def sigmoid_cnn(seed: int) -> Trial:
    torch.manual_seed(seed)
    return digits_trial(DigitsCNN(8, nn.Sigmoid), seed, 0.05)


def bn_cnn(seed: int) -> Trial:
    torch.manual_seed(seed)
    return digits_trial(DigitsCNN(8, nn.ReLU, norm=True), seed, 0.05)


def shallow_sigmoid_mlp(seed: int) -> Trial:
    torch.manual_seed(seed)
    return digits_trial(mlp(2, WIDTH, nn.Sigmoid), seed, 0.1)


def small_resnet(seed: int) -> Trial:
    torch.manual_seed(seed)
    return digits_trial(SmallResNet(), seed, 0.05)


def sequence_trial(kind: str, seed: int) -> Trial:
    """A :class:`RowSequenceModel` of ``kind`` ("transformer" or "lstm") on the digits, Adam at 3·10⁻³."""
    torch.manual_seed(seed)
    return digits_trial(RowSequenceModel(kind), seed, 3e-3, adam=True)


def task_trial(task_name: str, T: int, cell: str, seed: int, hidden: int = 32, lr: float = 0.01,
               recurrent_norm: float | None = None, nonlinearity: str = "tanh", batch: int = 32,
               adam: bool = False) -> Trial:
    """A :class:`TaskRNN` on one of Pascanu et al.'s synthetic tasks at length ``T``; its score is 1 − error rate."""
    torch.manual_seed(seed)
    t = task(task_name)
    model = TaskRNN(cell, t.n_in, hidden, t.n_out, t.output, nonlinearity)
    if recurrent_norm is not None:
        scale_recurrent(model.rnn, recurrent_norm)
    if cell == "lstm":
        lstm_forget_bias(model.rnn)  # type: ignore[arg-type]
    g = torch.Generator().manual_seed(seed)

    def batches() -> Iterator[Batch]:
        while True:
            yield t.generate(batch, T, g)

    opt = torch.optim.Adam(model.parameters(), lr=lr) if adam else torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    x_test, y_test = t.generate(1000, T, torch.Generator().manual_seed(10_000 + seed))

    @torch.no_grad()
    def evaluate(m: nn.Module) -> float:  # 1 − Pascanu's error rate on 1,000 held-out sequences
        return 1.0 - t.error_rate(m(x_test), y_test)

    return Trial(model, opt, batches(), t.loss, evaluate)


def _plain_resnet(seed: int) -> tuple[PlainResNet, list[PlainResBlock]]:
    """A :class:`PlainResNet` built at ``seed``, and its blocks."""
    torch.manual_seed(seed)
    model = PlainResNet()
    return model, [b for b in model.blocks.children() if isinstance(b, PlainResBlock)]


def exploding_resnet(seed: int) -> Trial:
    model, blocks = _plain_resnet(seed)
    with torch.no_grad():
        for conv in [c for b in blocks for c in (b.conv1, b.conv2)]:
            nn.init.normal_(conv.weight, std=2.0 / (conv.in_channels * 9) ** 0.5)
    return digits_trial(model, seed, 0.01)  # SGD with momentum at a learning rate a practitioner would use


def fixup_resnet(seed: int) -> Trial:
    model, blocks = _plain_resnet(seed)
    with torch.no_grad():
        for b in blocks:
            nn.init.zeros_(b.conv2.weight)
            nn.init.zeros_(b.conv2.bias)  # type: ignore[arg-type]
    return digits_trial(model, seed, 1e-3, adam=True)


def closed_forget_lstm(seed: int) -> Trial:
    trial = task_trial("adding", 30, "lstm", seed, lr=0.01)
    lstm = trial.model.rnn
    assert isinstance(lstm, nn.LSTM)
    with torch.no_grad():  # forget gates shut: the cell forgets at every step
        H = lstm.hidden_size
        b_ih, b_hh = getattr(lstm, "bias_ih_l0"), getattr(lstm, "bias_hh_l0")
        b_ih[H : 2 * H] = -6.0
        b_hh[H : 2 * H] = 0.0
    return trial


def diverging_transformer(seed: int) -> Trial:
    trial = sequence_trial("transformer", seed)
    trial.optimizer = torch.optim.SGD(trial.model.parameters(), lr=20.0)  # far too large
    return trial


def prenorm_transformer(seed: int) -> Trial:
    torch.manual_seed(seed)
    model = RowSequenceModel("transformer")
    layer = nn.TransformerEncoderLayer(32, nhead=4, dim_feedforward=64, dropout=0.0, batch_first=True, norm_first=True)
    model.body = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
    return digits_trial(model, seed, 3e-3, adam=True)


def residual_tanh_mlp(seed: int) -> Trial:
    torch.manual_seed(seed)
    return digits_trial(add_residual(mlp(DEPTH, WIDTH, nn.Tanh), inplace=True), seed, LR)


def xavier_tanh_mlp(seed: int) -> Trial:
    torch.manual_seed(seed)
    model = mlp(6, WIDTH, nn.Tanh)
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_normal_(m.weight, gain=nn.init.calculate_gain("tanh"))
            nn.init.zeros_(m.bias)
    return digits_trial(model, seed, 0.01)
