"""Set-ups ported by a helper who did not know gradwatch's catalogue (tenth session), labelled by plain measurement.

They were found by running gradwatch on them as a user would; what they showed wrong (a double softmax and a
crawling raw-target regression called healthy, a weight decay never named, a diverging GRU blamed on its init and
clipped too late) was fixed in the same session, so they are not held out any more: they keep those fixes from
coming undone. Sources: Stack Overflow's recurring questions, PyTorch's tutorials and Pascanu et al. (2013).
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch
from torch import Tensor, nn

from .common import BenchSetup, Trial


def _split(n: int) -> tuple[Tensor, Tensor]:
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    k = int(0.8 * n)
    return order[:k], order[k:]


def _batches(x: Tensor, y: Tensor, idx: Tensor, size: int, seed: int) -> Iterator[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(seed)
    while True:
        b = idx[torch.randint(0, len(idx), (size,), generator=g)]
        yield x[b], y[b]


def _accuracy(x: Tensor, y: Tensor, idx: Tensor, get: Callable = lambda o: o) -> Callable[[nn.Module], float]:
    @torch.no_grad()
    def evaluate(model: nn.Module) -> float:
        was = model.training
        model.eval()
        try:
            return float((get(model(x[idx])).argmax(-1) == y[idx]).float().mean())
        finally:
            model.train(was)

    return evaluate


def _r2(x: Tensor, y: Tensor, idx: Tensor) -> Callable[[nn.Module], float]:
    @torch.no_grad()
    def evaluate(model: nn.Module) -> float:
        was = model.training
        model.eval()
        try:
            value = float(1 - ((model(x[idx]) - y[idx]) ** 2).sum() / ((y[idx] - y[idx].mean()) ** 2).sum())
            return value if value == value else -1.0
        finally:
            model.train(was)

    return evaluate


def _standardised(x) -> Tensor:
    t = torch.tensor(x, dtype=torch.float32)
    return (t - t.mean(0)) / t.std(0)


def double_softmax(seed: int) -> Trial:
    """Stack Overflow's recurring "loss stuck at 2.30" (e.g. "Should I use softmax as output when using cross
    entropy loss in PyTorch?"): nn.Softmax after the last layer of a digits classifier trained with
    nn.CrossEntropyLoss, which applies log-softmax itself. 64-128-64-10 ReLU MLP, SGD at 0.05."""
    from sklearn.datasets import load_digits

    xd, yd = load_digits(return_X_y=True)
    x, y = torch.tensor(xd / 16.0, dtype=torch.float32), torch.tensor(yd)
    train, test = _split(len(x))
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10),
                          nn.Softmax(dim=1))
    return Trial(model, torch.optim.SGD(model.parameters(), lr=0.05), _batches(x, y, train, 64, seed),
                 nn.CrossEntropyLoss(), evaluate=_accuracy(x, y, test))


def smooth_l1_raw_targets(seed: int) -> Trial:
    """Stack Overflow's "regression loss not decreasing: targets not normalised", with a smooth-L1 loss:
    scikit-learn's diabetes set (targets 25–346), features standardised, a 10-64-64-1 ReLU MLP, SGD at 1e-3."""
    from sklearn.datasets import load_diabetes

    xd, yd = load_diabetes(return_X_y=True)
    x, y = _standardised(xd), torch.tensor(yd, dtype=torch.float32)[:, None]
    train, test = _split(len(x))
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(10, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1))
    return Trial(model, torch.optim.SGD(model.parameters(), lr=1e-3), _batches(x, y, train, 32, seed),
                 nn.SmoothL1Loss(), evaluate=_r2(x, y, test))


def huge_weight_decay(seed: int) -> Trial:
    """Stack Overflow's "model predicts the same class for every input" (weight_decay=1 with SGD; Krogh & Hertz
    1992 on weight decay): breast cancer, standardised, a 30-64-64-2 ReLU MLP, SGD at 0.1."""
    from sklearn.datasets import load_breast_cancer

    xd, yd = load_breast_cancer(return_X_y=True)
    x, y = _standardised(xd), torch.tensor(yd)
    train, test = _split(len(x))
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(30, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 2))
    return Trial(model, torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=1.0),
                 _batches(x, y, train, 64, seed), nn.functional.cross_entropy, evaluate=_accuracy(x, y, test))


class _GRUNext(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gru = nn.GRU(1, 64, batch_first=True)
        self.out = nn.Linear(64, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.gru(x)[0])


def _sines(seed: int, batch: int, length: int = 50) -> Iterator[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(seed)
    while True:
        phase, freq = torch.rand(batch, 1, generator=g) * 6.28, 0.1 + 0.3 * torch.rand(batch, 1, generator=g)
        t = torch.arange(length + 1).float()[None]
        s = 3 * torch.sin(freq * t + phase) + 2 * torch.sin(0.37 * freq * t) + 0.1 * torch.randn(batch, length + 1,
                                                                                                 generator=g)
        yield s[:, :length, None], s[:, 1:, None]


def gru_sgd_momentum(seed: int) -> Trial:
    """Pascanu, Mikolov & Bengio (2013)'s exploding gradients, as Stack Overflow's "GRU loss suddenly becomes nan":
    a GRU (hidden 64) predicting the next value of a noisy sum of sines (T = 50), plain SGD at 0.5, momentum 0.9,
    no clipping."""
    test_x, test_y = next(_sines(999, 256))
    torch.manual_seed(seed)
    model = _GRUNext()

    @torch.no_grad()
    def r2(m: nn.Module) -> float:
        value = float(1 - ((m(test_x) - test_y) ** 2).sum() / ((test_y - test_y.mean()) ** 2).sum())
        return value if value == value else -1.0

    return Trial(model, torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9), _sines(seed, 32),
                 nn.functional.mse_loss, evaluate=r2)


class _TextClassifier(nn.Module):
    """PyTorch's text-classification tutorial model: nn.EmbeddingBag + nn.Linear, weights uniform(±0.5)."""

    def __init__(self, vocab: int, dim: int, classes: int) -> None:
        super().__init__()
        self.embedding = nn.EmbeddingBag(vocab, dim)
        self.fc = nn.Linear(dim, classes)
        self.embedding.weight.data.uniform_(-0.5, 0.5)
        self.fc.weight.data.uniform_(-0.5, 0.5)
        self.fc.bias.data.zero_()

    def forward(self, text: Tensor) -> Tensor:
        return self.fc(self.embedding(text))


def embedding_bag_text(seed: int) -> Trial:
    """PyTorch's tutorial "Text classification with the torchtext library" (TextClassificationModel, SGD at lr 5) on
    synthetic AG_NEWS-like token bags: 4 classes, each with 50 topical words among 2000, 15 % of 40 tokens topical."""
    g = torch.Generator().manual_seed(7)
    y = torch.randint(0, 4, (4000,), generator=g)
    noise = torch.randint(200, 2000, (4000, 40), generator=g)
    topical = y[:, None] * 50 + torch.randint(0, 50, (4000, 40), generator=g)
    x = torch.where(torch.rand(4000, 40, generator=g) < 0.15, topical, noise)
    train, test = _split(len(x))
    torch.manual_seed(seed)
    model = _TextClassifier(2000, 64, 4)
    return Trial(model, torch.optim.SGD(model.parameters(), lr=5.0), _batches(x, y, train, 64, seed),
                 nn.functional.cross_entropy, evaluate=_accuracy(x, y, test))


class _FrozenBackbone(nn.Module):
    """A frozen feature extractor (requires_grad=False) and a trained head; the output a dict, as Hugging Face's."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(30, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU())
        for p in self.backbone.parameters():
            p.requires_grad = False
        self.head = nn.Sequential(nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 2))

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        features = self.backbone(x)
        return {"logits": self.head(features), "features": features}


def frozen_backbone_dict(seed: int) -> Trial:
    """PyTorch's tutorial "Finetuning Torchvision Models" (feature extraction: a frozen backbone) with a model that
    returns a dict: breast cancer, standardised, SGD at 0.05 with momentum on the head's parameters only."""
    from sklearn.datasets import load_breast_cancer

    xd, yd = load_breast_cancer(return_X_y=True)
    x, y = _standardised(xd), torch.tensor(yd)
    train, test = _split(len(x))
    torch.manual_seed(seed)
    model = _FrozenBackbone()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05, momentum=0.9)
    return Trial(model, opt, _batches(x, y, train, 32, seed), lambda out, t: nn.functional.cross_entropy(out["logits"], t),
                 evaluate=_accuracy(x, y, test, get=lambda o: o["logits"]))


_SO = "Stack Overflow: "
SETUPS = [
    BenchSetup("so_double_softmax", "fails", 300, double_softmax,
               _SO + "the double-softmax bug (nn.Softmax before nn.CrossEntropyLoss), e.g. 'Should I use softmax as "
               "output when using cross entropy loss in pytorch?'"),
    BenchSetup("so_smooth_l1_raw_targets", "fails", 300, smooth_l1_raw_targets,
               _SO + "'regression loss not decreasing' on unnormalised targets, with nn.SmoothL1Loss"),
    BenchSetup("so_huge_weight_decay", "dead_units", 300, huge_weight_decay,
               _SO + "'model predicts the same class for every input' with weight_decay=1"),
    BenchSetup("pascanu_gru_sgd_momentum", "nonfinite", 150, gru_sgd_momentum,
               "Pascanu, Mikolov & Bengio (2013), §3; Stack Overflow 'GRU loss suddenly becomes nan'"),
    BenchSetup("tutorial_embedding_bag", "healthy", 300, embedding_bag_text,
               "pytorch/tutorials beginner_source/text_sentiment_ngrams_tutorial.py (TextClassificationModel)"),
    BenchSetup("tutorial_frozen_backbone_dict", "healthy", 200, frozen_backbone_dict,
               "pytorch/tutorials beginner_source/finetuning_torchvision_models_tutorial.py (feature extraction)"),
]
