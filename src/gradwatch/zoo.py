"""Named, seeded, small set-ups that show each pathology and its healthy twin.

Every set-up builds from a seed with nothing downloaded: data comes from
scikit-learn's bundled sets or is synthetic. A :class:`Setup` makes a fresh
:class:`Trial` (model, optimizer, batches, loss) per seed, so that trials of
the same set-up start identical.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

import torch
from torch import Tensor, nn

from gradwatch.trial import Batch, Setup, Trial

M = TypeVar("M", bound=nn.Module)


@functools.lru_cache(maxsize=1)
def digits() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """scikit-learn's 8×8 digits, standardised: (x_train, y_train, x_test, y_test); 1,500 / 297 images."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32)
    y = torch.tensor(data.target, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    x_train, x_test = x[:1500], x[1500:]
    mean, std = x_train.mean(0), x_train.std(0).clamp_min(1e-3)
    return (x_train - mean) / std, y[:1500], (x_test - mean) / std, y[1500:]


def _batches(x: Tensor, y: Tensor, batch_size: int, seed: int) -> Iterator[Batch]:
    g = torch.Generator().manual_seed(seed)
    while True:
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x) - batch_size + 1, batch_size):
            idx = perm[i : i + batch_size]
            yield x[idx], y[idx]


def _accuracy(x: Tensor, y: Tensor) -> Callable[[nn.Module], float]:
    @torch.no_grad()
    def evaluate(model: nn.Module) -> float:
        was = model.training
        model.eval()
        try:
            return float((model(x).argmax(1) == y).float().mean())
        finally:
            model.train(was)

    return evaluate


def mlp(depth: int, width: int, activation: Callable[[], nn.Module], n_in: int = 64, n_out: int = 10) -> nn.Sequential:
    """``depth`` Linear layers, an activation module after each but the last."""
    dims = [n_in] + [width] * (depth - 1) + [n_out]
    layers: list[nn.Module] = []
    for i in range(depth):
        layers.append(nn.Linear(dims[i], dims[i + 1]))
        if i < depth - 1:
            layers.append(activation())
    return nn.Sequential(*layers)


def _he_init(model: M) -> M:
    from gradwatch.remedies import he_init

    he_init(model, inplace=True)
    return model


DEPTH, WIDTH, BATCH, LR = 20, 64, 64, 0.005


def _digits_model_trial(model: nn.Module, seed: int, lr: float = 0.05, adam: bool = False) -> Trial:
    x, y, xt, yt = digits()
    opt = torch.optim.Adam(model.parameters(), lr=lr) if adam else torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    return Trial(model, opt, _batches(x, y, BATCH, seed), nn.functional.cross_entropy, _accuracy(xt, yt))


def _digits_trial(model: nn.Module, seed: int) -> Trial:
    """The zoo MLPs' recipe: SGD with momentum 0.9 at learning rate LR."""
    return _digits_model_trial(model, seed, lr=LR)


def _deep_tanh_mlp(seed: int) -> Trial:
    torch.manual_seed(seed)
    return _digits_trial(mlp(DEPTH, WIDTH, nn.Tanh), seed)


def _deep_sigmoid_mlp(seed: int) -> Trial:
    torch.manual_seed(seed)
    return _digits_trial(mlp(10, WIDTH, nn.Sigmoid), seed)


def _deep_relu_he_mlp(seed: int) -> Trial:
    torch.manual_seed(seed)
    return _digits_trial(_he_init(mlp(DEPTH, WIDTH, nn.ReLU)), seed)


def _scaled_init(model: M, gain: float, bias: float = 0.0) -> M:
    """Weights N(0, gain²/fan_in), biases constant."""
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=gain / m.in_features**0.5)
            nn.init.constant_(m.bias, bias)
    return model


def _saturated_tanh_mlp(seed: int) -> Trial:
    torch.manual_seed(seed)
    return _digits_trial(_scaled_init(mlp(8, WIDTH, nn.Tanh), gain=8.0), seed)


def _dead_relu_mlp(seed: int) -> Trial:
    torch.manual_seed(seed)
    model = _scaled_init(mlp(6, WIDTH, nn.ReLU), gain=2**0.5, bias=-1.5)
    last = model[-1]
    assert isinstance(last, nn.Linear)
    nn.init.zeros_(last.bias)
    return _digits_trial(model, seed)


def _exploding_relu_mlp(seed: int) -> Trial:
    torch.manual_seed(seed)
    model = _scaled_init(mlp(DEPTH, WIDTH, nn.ReLU), gain=3.0)
    return _digits_model_trial(model, seed, lr=0.01)  # SGD with momentum at a learning rate a practitioner would use


def _diverging_mlp(seed: int) -> Trial:
    torch.manual_seed(seed)
    model = _he_init(mlp(6, WIDTH, nn.ReLU))
    x, y, xt, yt = digits()
    opt = torch.optim.SGD(model.parameters(), lr=3.0)  # far too large: the loss overflows
    return Trial(model, opt, _batches(x, y, BATCH, seed), nn.functional.cross_entropy, _accuracy(xt, yt))


def _stalled_mlp(seed: int) -> Trial:
    torch.manual_seed(seed)
    model = _he_init(mlp(6, WIDTH, nn.ReLU))
    x, y, xt, yt = digits()
    early = [p for m in list(model)[:4] for p in m.parameters()]
    late = [p for m in list(model)[4:] for p in m.parameters()]
    # a misconfigured parameter group: the first two layers' learning rate is 10⁻⁶ of the rest
    groups: list[dict[str, Any]] = [{"params": early, "lr": LR * 1e-6}, {"params": late}]
    opt = torch.optim.SGD(groups, lr=LR, momentum=0.9)
    return Trial(model, opt, _batches(x, y, BATCH, seed), nn.functional.cross_entropy, _accuracy(xt, yt))


def _layernorm_mlp(seed: int) -> Trial:
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Linear(64, WIDTH)]
    for _ in range(7):
        layers += [nn.LayerNorm(WIDTH), nn.GELU(), nn.Linear(WIDTH, WIDTH)]
    layers += [nn.LayerNorm(WIDTH), nn.GELU(), nn.Linear(WIDTH, 10)]
    return _digits_trial(nn.Sequential(*layers), seed)


class ResidualBlock(nn.Module):
    """x + conv(relu(bn(conv(relu(bn(x)))))), pre-activation style (He et al. 2016)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(channels), nn.Conv2d(channels, channels, 3, padding=1)
        self.bn2, self.conv2 = nn.BatchNorm2d(channels), nn.Conv2d(channels, channels, 3, padding=1)
        self.relu1, self.relu2 = nn.ReLU(), nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(self.relu1(self.bn1(x)))
        return x + self.conv2(self.relu2(self.bn2(h)))


class SmallResNet(nn.Module):
    """A stem, residual blocks (four pre-activation ones by default) and a linear head, for 8×8 digit images."""

    def __init__(self, channels: int = 16, blocks: int = 4, block: Callable[[int], nn.Module] = ResidualBlock) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, channels, 3, padding=1)
        self.blocks = nn.Sequential(*[block(channels) for _ in range(blocks)])
        self.head = nn.Linear(channels, 10)

    def forward(self, x: Tensor) -> Tensor:
        h = self.blocks(self.stem(x.reshape(-1, 1, 8, 8)))
        return self.head(h.mean((2, 3)))


def _small_resnet(seed: int) -> Trial:
    torch.manual_seed(seed)
    model = SmallResNet()
    x, y, xt, yt = digits()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    return Trial(model, opt, _batches(x, y, BATCH, seed), nn.functional.cross_entropy, _accuracy(xt, yt))


class RowSequenceModel(nn.Module):
    """Reads an 8×8 digit as a sequence of its 8 rows (tokens of 8 pixels)."""

    def __init__(self, kind: str, width: int = 32) -> None:
        super().__init__()
        self.kind = kind
        self.embed = nn.Linear(8, width)
        if kind == "transformer":
            self.pos = nn.Parameter(torch.randn(8, width) * 0.1)
            layer = nn.TransformerEncoderLayer(width, nhead=4, dim_feedforward=64, dropout=0.0, batch_first=True)
            self.body: nn.Module = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        else:
            self.body = nn.LSTM(width, width, batch_first=True)
        self.head = nn.Linear(width, 10)

    def forward(self, x: Tensor) -> Tensor:
        h = self.embed(x.reshape(-1, 8, 8))  # (B, T=8, width)
        if self.kind == "transformer":
            return self.head(self.body(h + self.pos).mean(1))
        out, _ = self.body(h)
        return self.head(out[:, -1])


def _sequence_trial(kind: str, seed: int) -> Trial:
    torch.manual_seed(seed)
    model = RowSequenceModel(kind)
    x, y, xt, yt = digits()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    return Trial(model, opt, _batches(x, y, BATCH, seed), nn.functional.cross_entropy, _accuracy(xt, yt))


class TaskRNN(nn.Module):
    """A recurrent net for the synthetic tasks: cell → linear read-out (of the last step, or of every step).

    Sequence first: inputs (T, B, n_in). With ``unrolled=True`` the forward pass
    runs the same weights step by step (for Pascanu's regulariser, which needs
    every hidden state); ``last_runs`` then holds them.
    """

    def __init__(self, cell: str, n_in: int, hidden: int, n_out: int, output: str = "last",
                 nonlinearity: str = "tanh") -> None:
        super().__init__()
        self.output, self.unrolled = output, False
        self.rnn: nn.RNNBase
        if cell == "rnn":
            self.rnn = nn.RNN(n_in, hidden, nonlinearity=nonlinearity)
        elif cell == "lstm":
            self.rnn = nn.LSTM(n_in, hidden)
        elif cell == "gru":
            self.rnn = nn.GRU(n_in, hidden)
        else:
            raise ValueError(f"`TaskRNN(cell=…)` expects 'rnn', 'lstm' or 'gru', got {cell!r}")
        self.head = nn.Linear(hidden, n_out)
        self.last_runs: list = []

    def forward(self, x: Tensor) -> Tensor:
        if self.unrolled:
            from gradwatch.probes.temporal import unroll

            out, _, _, self.last_runs = unroll(self.rnn, x)
        else:
            out, _ = self.rnn(x)
        return self.head(out[-1] if self.output == "last" else out)


def _scale_recurrent(rnn: nn.RNNBase, norm: float) -> None:
    w = rnn.weight_hh_l0
    assert isinstance(w, Tensor)
    with torch.no_grad():
        nn.init.orthogonal_(w)
        w.mul_(norm)


def _task_trial(task_name: str, T: int, cell: str, seed: int, hidden: int = 32, lr: float = 0.01,
                recurrent_norm: float | None = None, nonlinearity: str = "tanh", batch: int = 32,
                adam: bool = False) -> Trial:
    from gradwatch.tasks import task

    torch.manual_seed(seed)
    t = task(task_name)
    model = TaskRNN(cell, t.n_in, hidden, t.n_out, t.output, nonlinearity)
    if recurrent_norm is not None:
        _scale_recurrent(model.rnn, recurrent_norm)
    if cell == "lstm":
        from gradwatch.remedies import lstm_forget_bias

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


class DigitsCNN(nn.Module):
    """A plain CNN for the 8×8 digits: ``depth`` 3×3 convolutions (optionally BatchNorm), global pooling, a head."""

    def __init__(self, depth: int, act: Callable[[], nn.Module], norm: bool = False, width: int = 16) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = 1
        for _ in range(depth):
            layers.append(nn.Conv2d(c, width, 3, padding=1))
            if norm:
                layers.append(nn.BatchNorm2d(width))
            layers.append(act())
            c = width
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(width, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x.reshape(-1, 1, 8, 8)).mean((2, 3)))


class PlainResBlock(nn.Module):
    """x + conv(relu(conv(x))) without normalisation."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1, self.relu, self.conv2 = nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(), nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv2(self.relu(self.conv1(x)))


class PlainResNet(SmallResNet):
    """The same residual CNN with eight blocks that have no normalisation."""

    def __init__(self, blocks: int = 8, channels: int = 16) -> None:
        super().__init__(channels, blocks, PlainResBlock)


def _seeded(seed: int, build: Callable[[], nn.Module]) -> nn.Module:
    torch.manual_seed(seed)
    return build()


def _exploding_resnet(seed: int) -> Trial:
    torch.manual_seed(seed)
    model = PlainResNet()
    with torch.no_grad():
        for b in model.blocks.children():
            assert isinstance(b, PlainResBlock)
            for conv in (b.conv1, b.conv2):
                nn.init.normal_(conv.weight, std=2.0 / (conv.in_channels * 9) ** 0.5)
    return _digits_model_trial(model, seed, lr=0.01)  # SGD with momentum at a learning rate a practitioner would use


def _fixup_resnet(seed: int) -> Trial:
    torch.manual_seed(seed)
    model = PlainResNet()
    with torch.no_grad():
        for b in model.blocks.children():
            assert isinstance(b, PlainResBlock)
            nn.init.zeros_(b.conv2.weight)
            nn.init.zeros_(b.conv2.bias)  # type: ignore[arg-type]
    return _digits_model_trial(model, seed, lr=1e-3, adam=True)


def _closed_forget_lstm(seed: int) -> Trial:
    trial = _task_trial("adding", 30, "lstm", seed, lr=0.01)
    lstm = trial.model.rnn
    assert isinstance(lstm, nn.LSTM)
    with torch.no_grad():  # forget gates shut: the cell forgets at every step
        H = lstm.hidden_size
        b_ih, b_hh = getattr(lstm, "bias_ih_l0"), getattr(lstm, "bias_hh_l0")
        b_ih[H : 2 * H] = -6.0
        b_hh[H : 2 * H] = 0.0
    return trial


def _diverging_transformer(seed: int) -> Trial:
    trial = _sequence_trial("transformer", seed)
    trial.optimizer = torch.optim.SGD(trial.model.parameters(), lr=20.0)  # far too large
    return trial


def _prenorm_transformer(seed: int) -> Trial:
    torch.manual_seed(seed)
    model = RowSequenceModel("transformer")
    layer = nn.TransformerEncoderLayer(32, nhead=4, dim_feedforward=64, dropout=0.0, batch_first=True, norm_first=True)
    model.body = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
    return _digits_model_trial(model, seed, lr=3e-3, adam=True)


def _residual_tanh_mlp(seed: int) -> Trial:
    from gradwatch.remedies import add_residual

    torch.manual_seed(seed)
    return _digits_model_trial(add_residual(mlp(DEPTH, WIDTH, nn.Tanh), inplace=True), seed, lr=LR)


def _xavier_tanh_mlp(seed: int) -> Trial:
    torch.manual_seed(seed)
    model = mlp(6, WIDTH, nn.Tanh)
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_normal_(m.weight, gain=nn.init.calculate_gain("tanh"))
            nn.init.zeros_(m.bias)
    return _digits_model_trial(model, seed, lr=0.01)


SETUPS: dict[str, Setup] = {
    s.name: s
    for s in [
        Setup(
            "deep_tanh_mlp",
            f"{DEPTH}-layer tanh MLP (width {WIDTH}, PyTorch's default init) on digits: the default "
            "init's weight gain (std 1/sqrt(3·fan_in)) times tanh' ≤ 1 shrinks the gradient at every layer",
            "vanishing",
            _deep_tanh_mlp,
        ),
        Setup(
            "deep_relu_he_mlp",
            f"its healthy twin: the same {DEPTH} layers with ReLU and He initialisation",
            None,
            _deep_relu_he_mlp,
        ),
        Setup(
            "deep_sigmoid_mlp",
            f"10-layer sigmoid MLP (width {WIDTH}, default init) on digits: sigmoid' ≤ 1/4 at every layer",
            "vanishing",
            _deep_sigmoid_mlp,
        ),
        Setup(
            "saturated_tanh_mlp",
            f"8-layer tanh MLP initialised with weight std 8/sqrt(fan_in): the units sit in tanh's flat tails",
            "saturation",
            _saturated_tanh_mlp,
        ),
        Setup(
            "dead_relu_mlp",
            "6-layer ReLU MLP whose hidden biases start at -1.5: most units never fire",
            "dead_units",
            _dead_relu_mlp,
        ),
        Setup(
            "exploding_relu_mlp",
            f"{DEPTH}-layer ReLU MLP initialised at weight std 3/sqrt(fan_in), about twice He's: the back-propagated gradient grows ~2× per layer",
            "exploding",
            _exploding_relu_mlp,
        ),
        Setup(
            "diverging_mlp",
            "6-layer ReLU MLP (He init) trained with SGD at learning rate 3: the loss overflows to NaN",
            "nonfinite",
            _diverging_mlp,
        ),
        Setup(
            "stalled_mlp",
            "6-layer ReLU MLP whose first two layers sit in a parameter group with learning rate 10⁻⁶ of the rest",
            "stalled",
            _stalled_mlp,
        ),
        Setup("layernorm_mlp", "healthy: 9-layer GELU MLP with LayerNorm before every activation", None,
              _layernorm_mlp),
        Setup("small_resnet", "healthy: pre-activation ResNet (4 blocks, BatchNorm) on 8×8 digits", None,
              _small_resnet),
        Setup("transformer_encoder", "healthy: 2-layer Transformer encoder reading digits row by row", None,
              functools.partial(_sequence_trial, "transformer")),
        Setup("lstm_rows", "healthy: LSTM reading digits row by row", None, functools.partial(_sequence_trial, "lstm")),
        Setup("rnn_vanishing", "vanilla tanh RNN on the adding task (T = 50) with W_hh = 0.5 × orthogonal: "
              "λ₁ = 0.5 < 1/γ, the gradient through time shrinks at least ×0.5 per step", "vanishing",
              lambda seed: _task_trial("adding", 50, "rnn", seed, recurrent_norm=0.5)),
        Setup("rnn_exploding", "ReLU RNN on the adding task (T = 20) with W_hh = 2.5 × orthogonal: "
              "the gradient through time grows ~×1.8 per step", "exploding",
              lambda seed: _task_trial("adding", 20, "rnn", seed, recurrent_norm=2.5, nonlinearity="relu", lr=0.01)),
        Setup("lstm_adding", "healthy: LSTM (forget-gate bias 1) on the adding task, T = 10", None,
              lambda seed: _task_trial("adding", 10, "lstm", seed, lr=0.01, adam=True)),
        Setup("sigmoid_cnn", "8-layer plain sigmoid CNN on 8×8 digits, PyTorch's default init", "vanishing",
              lambda seed: _digits_model_trial(_seeded(seed, lambda: DigitsCNN(8, nn.Sigmoid)), seed)),
        Setup("exploding_resnet", "8-block residual CNN without normalisation, branch weights at std 2/sqrt(fan_in): "
              "every block adds a branch larger than its input", "exploding", _exploding_resnet),
        Setup("closed_forget_lstm", "LSTM on the adding task (T = 30) with its forget-gate bias at −6: "
              "the cell forgets at every step", "vanishing", _closed_forget_lstm),
        Setup("diverging_transformer", "2-layer Transformer encoder on digit rows, SGD at learning rate 20",
              "nonfinite", _diverging_transformer),
        Setup("bn_cnn", "healthy: 8-layer CNN with BatchNorm and ReLU on 8×8 digits", None,
              lambda seed: _digits_model_trial(_seeded(seed, lambda: DigitsCNN(8, nn.ReLU, norm=True)), seed)),
        Setup("fixup_resnet", "healthy: the same residual CNN without normalisation, branches zero-initialised "
              "(Fixup)", None, _fixup_resnet),
        Setup("gru_adding", "healthy: GRU on the adding task, T = 10", None,
              lambda seed: _task_trial("adding", 10, "gru", seed, lr=0.01, adam=True)),
        Setup("xavier_tanh_mlp", "healthy: 6-layer tanh MLP with Xavier initialisation (gain 5/3)", None,
              _xavier_tanh_mlp),
        Setup("prenorm_transformer", "healthy: pre-LayerNorm Transformer encoder on digit rows", None,
              _prenorm_transformer),
        Setup("residual_tanh_mlp", f"healthy: the {DEPTH}-layer tanh MLP with every Linear(64, 64) + tanh in a skip "
              "connection (gradwatch.remedies.add_residual)", None, _residual_tanh_mlp),
        Setup("shallow_sigmoid_mlp", "healthy: 2-layer sigmoid MLP on digits", None,
              lambda seed: _digits_model_trial(_seeded(seed, lambda: mlp(2, WIDTH, nn.Sigmoid)), seed, lr=0.1)),
    ]
}


def get(name: str) -> Setup:
    """The set-up of that name."""
    try:
        return SETUPS[name]
    except KeyError:
        raise KeyError(f"`zoo.get(name=…)` expects one of {sorted(SETUPS)}, got {name!r}") from None


def names() -> list[str]:
    return list(SETUPS)


def train_watched(name: str, seed: int, steps: int, store: str | Path, run_name: str | None = None,
                  **watch_options: Any) -> tuple[Path, Trial]:
    """Train set-up ``name`` at ``seed`` for ``steps`` steps under a watch, logging the loss; (its store, the trial).

    Recurrent set-ups are watched with ``temporal=True``. The tests, the
    benchmarks and the demo all train the zoo through this one function.
    """
    import gradwatch as gw

    trial = get(name)(seed)
    watch_options.setdefault("temporal", any(isinstance(m, nn.RNNBase) for m in trial.model.modules()))
    with gw.watch(trial.model, trial.optimizer, store=store, name=run_name or f"{name}-seed{seed}",
                  **watch_options) as w:
        for _ in range(steps):
            w.log(loss=trial.step())
    return w.path, trial


# -- GANs on 2-D Gaussian mixtures -------------------------------------------------------


def mixture_centers(kind: str) -> tuple[Tensor, float]:
    """Mode centres and std: 8 on a ring of radius 2 (σ 0.1), or 25 on a 5×5 grid (σ 0.05), after VEEGAN.

    VEEGAN's ring has σ 0.02; at that width a vanilla GAN's mode coverage swings
    between 1 and 8 modes with the seed and the CPU's float rounding, so the
    zoo's ring is five times wider.
    """
    if kind == "ring":
        angles = torch.arange(8) * (2 * math.pi / 8)
        return torch.stack([2 * torch.cos(angles), 2 * torch.sin(angles)], 1), 0.1
    if kind == "grid":
        g = torch.arange(-2.0, 3.0) * 2
        return torch.cartesian_prod(g, g), 0.05
    raise ValueError(f"`mixture_centers(kind=…)` expects 'ring' or 'grid', got {kind!r}")


def mode_metrics(samples: Tensor, centers: Tensor, std: float) -> tuple[float, float]:
    """(modes covered, fraction of high-quality samples), as in Srivastava et al. (VEEGAN, 2017).

    A sample is high quality within 3σ of its nearest mode; a mode is covered
    when it is the nearest mode of at least one high-quality sample.
    """
    d = torch.cdist(samples, centers)  # (N, modes)
    nearest, which = d.min(1)
    good = nearest < 3 * std
    covered = torch.unique(which[good])
    return float(len(covered)), float(good.float().mean())


class GANTrial(Trial):
    """A GAN trial: ``model``/``optimizer`` are the generator's (what a watch follows); the discriminator trains too.

    The discriminator takes ``D_STEPS`` (5) Adam steps per generator step, and
    the data sit ``RING_OFFSET`` (8) away from where the generator's samples
    start, so D rejects them with confidence early, as in Goodfellow et al.'s
    warning. The saturating generator's gradient then collapses (×10⁻⁴ or
    less) and it covers none of the 8 modes; the non-saturating one covers 7
    or 8 (seeds 0–4, both CPU kernel sets: benchmarks/RESULTS.md).

    ``nonsaturating=False`` is Goodfellow et al. (2014)'s minimax generator loss
    log(1 − D(G(z))), whose gradient vanishes once D rejects the samples;
    ``True`` the non-saturating −log D(G(z)).
    """

    def __init__(self, generator: nn.Module, discriminator: nn.Module, g_opt: torch.optim.Optimizer,
                 d_opt: torch.optim.Optimizer, centers: Tensor, std: float, nonsaturating: bool, seed: int) -> None:
        self.discriminator, self.d_opt = discriminator, d_opt
        self.centers, self.std, self.nonsaturating = centers, std, nonsaturating
        self.d_steps = D_STEPS
        self.gen = torch.Generator().manual_seed(seed)
        super().__init__(generator, g_opt, iter(()), nn.functional.mse_loss, self._evaluate)

    def _real(self, n: int) -> Tensor:
        idx = torch.randint(len(self.centers), (n,), generator=self.gen)
        return self.centers[idx] + self.std * torch.randn(n, 2, generator=self.gen)

    def _z(self, n: int) -> Tensor:
        return torch.randn(n, 2, generator=self.gen)

    def step(self) -> Tensor:
        """One discriminator step, then one generator step; returns the generator's loss."""
        bce = nn.functional.binary_cross_entropy_with_logits
        for _ in range(self.d_steps):
            real, fake = self._real(128), self.model(self._z(128)).detach()
            d_real, d_fake = self.discriminator(real), self.discriminator(fake)
            d_loss = bce(d_real, torch.ones_like(d_real)) + bce(d_fake, torch.zeros_like(d_fake))
            self.d_opt.zero_grad(set_to_none=True)
            d_loss.backward()
            self.d_opt.step()
        logits = self.discriminator(self.model(self._z(128)))
        # log(1 − σ(l)) = −softplus(l); −log σ(l) = softplus(−l)
        g_loss = nn.functional.softplus(-logits).mean() if self.nonsaturating else -nn.functional.softplus(logits).mean()
        self.optimizer.zero_grad(set_to_none=True)
        self.d_opt.zero_grad(set_to_none=True)
        g_loss.backward()
        self.optimizer.step()
        return g_loss.detach()

    @torch.no_grad()
    def _evaluate(self, generator: nn.Module) -> float:
        """Fraction of the modes covered by 2,500 samples."""
        samples = generator(torch.randn(2500, 2, generator=torch.Generator().manual_seed(123)))
        covered, _ = mode_metrics(samples, self.centers, self.std)
        return covered / len(self.centers)


def _mlp(n_in: int, n_out: int, width: int = 128, depth: int = 3) -> nn.Sequential:
    layers: list[nn.Module] = []
    d = n_in
    for _ in range(depth):
        layers += [nn.Linear(d, width), nn.ReLU()]
        d = width
    return nn.Sequential(*layers, nn.Linear(d, n_out))


D_STEPS, G_LR, D_LR = 5, 1e-3, 1e-3
# The generator's Adam uses ε = 10⁻³, not PyTorch's 10⁻⁸: ε is the gradient scale below which Adam stops
# normalising the step. At 10⁻⁸ a gradient that fell ×10⁻⁴ still gets full-size steps, so Adam hides the
# collapse the minimax loss causes and the saturating generator escapes on most seeds (measured here).
G_EPS = 1e-3
RING_OFFSET = 8.0  # the ring's centre, away from the origin where a freshly initialised generator puts its samples


def _gan_trial(seed: int, nonsaturating: bool, kind: str = "ring") -> GANTrial:
    torch.manual_seed(seed)
    centers, std = mixture_centers(kind)
    if kind == "ring":
        centers = centers + torch.tensor([RING_OFFSET, 0.0])
    g, d = _mlp(2, 2), _mlp(2, 1)
    # D takes 5 steps per generator step, so that it wins early, as in Goodfellow et al.'s warning
    g_opt = torch.optim.Adam(g.parameters(), lr=G_LR, betas=(0.5, 0.999), eps=G_EPS)
    d_opt = torch.optim.Adam(d.parameters(), lr=D_LR, betas=(0.5, 0.999))
    return GANTrial(g, d, g_opt, d_opt, centers, std, nonsaturating, seed)


GAN_SETUPS: dict[str, Setup] = {
    s.name: s
    for s in [
        Setup("gan_ring_saturating", "GAN on 8 Gaussians on a ring with the saturating (minimax) generator loss "
              "log(1 − D(G(z))): once D wins, the generator's gradient vanishes", "vanishing",
              lambda seed: _gan_trial(seed, nonsaturating=False)),
        Setup("gan_ring_nonsaturating", "healthy: the same GAN with the non-saturating generator loss −log D(G(z))",
              None, lambda seed: _gan_trial(seed, nonsaturating=True)),
    ]
}
SETUPS.update(GAN_SETUPS)
