"""gw.check against theory: isometry, mean-field χ₁, He vs Xavier, exact spectra; and no side effects."""

from __future__ import annotations

import copy
import importlib
import math

import numpy as np
import pytest
import torch
from torch import nn

import gradwatch as gw
from gradwatch import zoo
from gradwatch.cli import main
from gradwatch.spectrum import full_spectrum, lanczos_extremes, top_singular_value


def _chain(depth: int, width: int, act: type[nn.Module] | None, sigma_w2: float, bias: bool = False) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(depth):
        lin = nn.Linear(width, width, bias=bias)
        nn.init.normal_(lin.weight, std=math.sqrt(sigma_w2 / width))
        layers.append(lin)
        if act is not None and i < depth - 1:
            layers.append(act())
    return nn.Sequential(*layers)


def test_deep_linear_orthogonal_net_is_an_isometry():
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(32, 32, bias=False) for _ in range(12)])
    for m in model:
        nn.init.orthogonal_(m.weight)
    report = gw.check(model, torch.randn(8, 32), samples=4)
    sv = report.spectrum.singular_values
    assert len(sv) == 4 * 32
    torch.testing.assert_close(sv, torch.ones_like(sv), atol=1e-5, rtol=0)
    assert report.spectrum.summary.isometry_gap < 1e-5
    assert report.verdict == "trainable"


def _chi(q: float, phi_prime, sigma_w2: float, n: int = 100) -> float:
    """Mean-field χ₁ = σ_w² E[φ'(h)²], h ~ N(0, q), by Gauss–Hermite quadrature (probabilists' weights).

    An even number of nodes, symmetric about 0, integrates ReLU's step exactly (half the weight on each side).
    """
    z, w = np.polynomial.hermite_e.hermegauss(n)
    return float(sigma_w2 * np.sum(w * phi_prime(np.sqrt(q) * z) ** 2) / np.sqrt(2 * np.pi))


@pytest.mark.parametrize("act,phi_prime,sigma_w2", [
    (nn.Tanh, lambda h: 1 - np.tanh(h) ** 2, 1.5),
    (nn.Tanh, lambda h: 1 - np.tanh(h) ** 2, 3.0),
    (nn.ReLU, lambda h: (h > 0).astype(float), 2.0),
])
def test_gradient_ratio_matches_mean_field_chi(act, phi_prime, sigma_w2):
    """‖δ_l‖² / ‖δ_{l+1}‖² against χ₁ from the measured pre-activation variance q_l (Schoenholz et al. 2017)."""
    torch.manual_seed(0)
    width, depth = 512, 10
    model = _chain(depth, width, act, sigma_w2)
    report = gw.check(model, torch.randn(256, width), samples=0)
    rows = report.layers
    measured, predicted = [], []
    for l in range(depth - 1):  # δ_l = φ'(h_l) ⊙ W_{l+1}ᵀ δ_{l+1}
        q = rows[l].out_std ** 2 + rows[l].out_mean ** 2
        measured.append(rows[l].gain ** 2)
        predicted.append(_chi(q, phi_prime, sigma_w2))
    measured, predicted = np.array(measured), np.array(predicted)
    rel = measured / predicted - 1
    assert abs(measured.mean() / predicted.mean() - 1) < 0.02, rel
    assert np.abs(rel).max() < 0.10, rel


@pytest.mark.parametrize("sigma_w2,expect", [(2.0, 1.0), (1.0, 2 ** -0.5)])
def test_relu_he_keeps_the_gradient_and_xavier_shrinks_it(sigma_w2, expect):
    """ReLU halves E[φ'²]: He (σ_w² = 2) keeps ‖δ‖ per layer, Xavier (σ_w² = 1) shrinks it by 2^(−1/2)."""
    torch.manual_seed(1)
    model = _chain(12, 512, nn.ReLU, sigma_w2)
    report = gw.check(model, torch.randn(256, 512), samples=0)
    gains = np.array([r.gain for r in report.layers[:-1]])
    assert gains.mean() == pytest.approx(expect, rel=0.05)
    assert report.per_layer == pytest.approx(expect, rel=0.05)


def test_power_iteration_and_lanczos_match_the_full_spectrum():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 24))
    x = torch.randn(40)
    f = lambda xi: model(xi[None])[0]  # noqa: E731
    jac = torch.autograd.functional.jacobian(f, x)
    sv = torch.linalg.svdvals(jac.double())
    torch.testing.assert_close(full_spectrum(f, x), sv, rtol=1e-5, atol=1e-7)
    top = top_singular_value(f, x)
    assert top.sigma_max == pytest.approx(float(sv[0]), rel=1e-3)
    ext = lanczos_extremes(f, x, k=64)
    assert ext.sigma_max == pytest.approx(float(sv[0]), rel=1e-6)
    # the Gram operator runs in float32: agreement to float32 precision, beyond the Ritz residual bound
    assert abs(ext.sigma_min - float(sv[-1])) <= max(ext.min_error, 1e-5 * float(sv[-1]))


def test_iterative_path_of_check(monkeypatch):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(30, 50), nn.Tanh(), nn.Linear(50, 20))
    x = torch.randn(3, 30)
    exact = gw.check(model, x, samples=3).spectrum
    monkeypatch.setattr(importlib.import_module("gradwatch.checkup"), "FULL_SPECTRUM_UP_TO", 0)
    approx = gw.check(model, x, samples=3).spectrum
    assert "power iteration" in approx.method and approx.singular_values is None
    assert approx.summary.sigma_max == pytest.approx(exact.summary.sigma_max, rel=1e-3)
    assert approx.summary.sigma_min == pytest.approx(exact.summary.sigma_min, rel=1e-3)


@pytest.mark.parametrize("name,verdict", [("deep_tanh_mlp", "vanishing"), ("deep_sigmoid_mlp", "vanishing"),
                                          ("exploding_relu_mlp", "exploding"), ("deep_relu_he_mlp", "trainable"),
                                          ("small_resnet", "trainable"), ("transformer_encoder", "trainable"),
                                          ("lstm_rows", "trainable")])
def test_zoo_verdicts(name, verdict):
    trial = zoo.get(name)(0)
    x, y = next(trial.batches)
    report = gw.check(trial.model, x, loss_fn=trial.loss_fn, target=y)
    assert report.verdict == verdict, str(report)
    if name == "deep_sigmoid_mlp":
        assert any("activations' derivative" in r for r in report.reasons)
        assert report.remedies[0].startswith("swap tanh/sigmoid")
    if name == "deep_tanh_mlp":
        assert any("weights' gain" in r for r in report.reasons)


def test_check_changes_nothing():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.5), nn.Conv2d(4, 4, 3),
                          nn.BatchNorm2d(4, momentum=None), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))
    model.train()
    model[1].eval()  # a mixed state must come back as it was
    with torch.no_grad():  # running statistics that batch statistics would move
        for bn in (model[1], model[5]):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
            bn.num_batches_tracked.fill_(7)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert any("num_batches_tracked" in k for k in state)
    x, y = torch.randn(5, 1, 8, 8), torch.tensor([0, 1, 2, 0, 1])
    rng = torch.random.get_rng_state()
    gw.check(model, x, loss_fn=nn.functional.cross_entropy, target=y)
    gw.check(model, x)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k  # BatchNorm running stats and num_batches_tracked included
    assert torch.equal(torch.random.get_rng_state(), rng)
    assert model.training and not model[1].training and model[3].training and model[5].training
    assert model[1].track_running_stats and model[5].track_running_stats and model[5].momentum is None
    assert all(p.grad is None for p in model.parameters())
    assert all(not m._forward_hooks for m in model.modules())


def _plain_cnn(depth: int, bn: bool, width: int = 8) -> nn.Sequential:
    """A plain conv net (no shortcuts) at PyTorch's default init: conv, [BatchNorm], ReLU, … , pool, linear."""
    layers: list[nn.Module] = [nn.Conv2d(3, width, 3, padding=1)]
    for i in range(depth):
        layers += [nn.BatchNorm2d(width)] if bn else []
        layers.append(nn.ReLU())
        if i < depth - 1:
            layers.append(nn.Conv2d(width, width, 3, padding=1))
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 10))


def _vgg_like(bn: bool) -> nn.Sequential:
    """VGG's shape, small: stages of 3×3 convs, max-pooling between them, two linear layers."""
    layers: list[nn.Module] = []
    c_in = 3
    for c_out, n in ((8, 4), (16, 4), (32, 4)):
        for _ in range(n):
            layers.append(nn.Conv2d(c_in, c_out, 3, padding=1))
            layers += [nn.BatchNorm2d(c_out)] if bn else []
            layers.append(nn.ReLU())
            c_in = c_out
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(32 * 2 * 2, 32), nn.ReLU(), nn.Linear(32, 10))


def _hooked_ratio(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_stats: bool) -> float:
    """Plain hooks on a copy: ‖∂L/∂a‖ at the first parameterised module's output over the last one's.

    Dropout off; BatchNorm in train mode (batch statistics) when ``batch_stats``, else in eval mode.
    """
    m = copy.deepcopy(model).eval()
    if batch_stats:
        for bn in m.modules():
            if isinstance(bn, nn.modules.batchnorm._BatchNorm):
                bn.train()
    owners = [mod for mod in m.modules() if any(True for _ in mod.parameters(recurse=False))]
    norms: dict[int, float] = {}

    def hook(mod: nn.Module, args: tuple, out: torch.Tensor) -> None:
        out.register_hook(lambda g: norms.__setitem__(id(mod), float(g.double().norm())))

    for mod in owners:
        mod.register_forward_hook(hook)
    nn.functional.cross_entropy(m(x), y).backward()
    return norms[id(owners[0])] / norms[id(owners[-1])]


def _batch(seed: int, n: int = 16, size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g), torch.randint(0, 10, (n,), generator=g)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("depth,verdict", [(20, "trainable"), (80, "exploding")])
def test_check_on_batchnorm_follows_train_mode_not_eval_mode(seed, depth, verdict):
    """Issue 20: in eval mode BatchNorm's init statistics (mean 0, var 1) normalise nothing, and check said
    "vanishing" on plain BN CNNs that train (20 layers) or explode (80, as Yang et al. 2019 predict for
    BatchNorm without shortcuts); batch statistics are what training sees."""
    torch.manual_seed(seed)
    model = _plain_cnn(depth, bn=True)
    x, y = _batch(seed)
    train = _hooked_ratio(model, x, y, batch_stats=True)
    frozen = _hooked_ratio(model, x, y, batch_stats=False)
    assert train > 1e4 * frozen  # the two profiles really differ by orders of magnitude
    th = gw.Thresholds()
    assert frozen < th.vanish_below
    assert (th.vanish_below < train < th.explode_above) if verdict == "trainable" else train > th.explode_above
    report = gw.check(model, x, loss_fn=nn.functional.cross_entropy, target=y, samples=0)
    assert report.ratio == pytest.approx(train, rel=1e-4)
    assert report.verdict == verdict, str(report)
    assert "dropout off; BatchNorm uses batch statistics, as in training" in str(report)


def test_vgg_like_net_with_batchnorm_trains_and_without_it_vanishes():
    torch.manual_seed(0)
    plain = _vgg_like(bn=False)
    torch.manual_seed(0)  # BatchNorm's init draws nothing: the same convs and linears as `plain`
    with_bn = _vgg_like(bn=True)
    x, y = _batch(0, size=16)
    rep_plain = gw.check(plain, x, loss_fn=nn.functional.cross_entropy, target=y, samples=0)
    rep_bn = gw.check(with_bn, x, loss_fn=nn.functional.cross_entropy, target=y, samples=0)
    assert rep_plain.ratio == pytest.approx(_hooked_ratio(plain, x, y, batch_stats=False), rel=1e-4)
    assert rep_bn.ratio == pytest.approx(_hooked_ratio(with_bn, x, y, batch_stats=True), rel=1e-4)
    # the bug: eval-mode BN at init is the identity, so the BN net read exactly as the plain one
    assert _hooked_ratio(with_bn, x, y, batch_stats=False) == pytest.approx(rep_plain.ratio, rel=1e-4)
    assert rep_plain.verdict == "vanishing", str(rep_plain)
    assert rep_bn.verdict == "trainable", str(rep_bn)
    assert rep_bn.ratio / rep_plain.ratio > 1e3


def test_check_turns_dropout_off():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Dropout(0.9), nn.Linear(32, 32), nn.ReLU(),
                          nn.Dropout(0.9), nn.Linear(32, 10)).train()
    x, y = torch.randn(16, 12), torch.randint(0, 10, (16,))
    reference = _hooked_ratio(model, x, y, batch_stats=True)
    with_dropout = copy.deepcopy(model).train()  # one draw of the masks: a different profile
    torch.manual_seed(1)
    owners = [with_dropout[0], with_dropout[6]]
    norms: list[float] = []

    def hook(mod: nn.Module, args: tuple, out: torch.Tensor) -> None:
        out.register_hook(lambda g: norms.append(float(g.double().norm())))

    for mod in owners:
        mod.register_forward_hook(hook)
    nn.functional.cross_entropy(with_dropout(x), y).backward()
    assert abs(norms[1] / norms[0] / reference - 1) > 1e-3  # backward runs last layer first
    first = gw.check(model, x, loss_fn=nn.functional.cross_entropy, target=y, samples=0)
    again = gw.check(model, x, loss_fn=nn.functional.cross_entropy, target=y, samples=0)
    assert first.ratio == again.ratio == pytest.approx(reference, rel=1e-6)
    assert "dropout off" in str(first) and "BatchNorm uses" not in str(first)


def test_spectrum_on_batchnorm_is_the_jacobian_within_the_batch():
    """A sample's output depends on the others through the batch statistics; the Jacobian is taken with the
    rest of the batch held fixed (BatchNorm1d would refuse a batch of one sample in train mode)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Linear(16, 5))
    x = torch.randn(8, 6)
    ref_model = copy.deepcopy(model).train()
    svs = []
    for i in range(3):
        f = lambda xi, i=i: ref_model(torch.cat([x[:i], xi[None], x[i + 1:]]))[i]  # noqa: E731
        svs.append(torch.linalg.svdvals(torch.autograd.functional.jacobian(f, x[i]).double()))
    report = gw.check(model, x, samples=3)
    torch.testing.assert_close(report.spectrum.singular_values, torch.cat(svs), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("scale,word", [(0.8, "sufficient condition for vanishing holds"), (1.5, "explosion possible")])
def test_pascanu_condition_on_a_vanilla_rnn(scale, word):
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn = nn.RNN(3, 16, batch_first=True)
            self.head = nn.Linear(16, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.rnn(x)[0][:, -1])

    net = Net()
    with torch.no_grad():
        w = net.rnn.weight_hh_l0
        w *= scale / torch.linalg.matrix_norm(w, ord=2)
    report = gw.check(net, torch.randn(4, 10, 3))
    (r,) = report.recurrent
    assert r.lambda1 == pytest.approx(scale, rel=1e-5) and r.gamma == 1.0
    assert word in r.verdict
    if scale < 1:
        assert report.verdict == "vanishing"


@pytest.mark.parametrize("kwargs,error,message", [
    (dict(model="net"), TypeError, r"`check\(model=…\)` expects a torch.nn.Module"),
    (dict(example_input=[1, 2]), TypeError, r"`check\(example_input=…\)` expects a tensor"),
    (dict(example_input=torch.zeros(0, 4)), ValueError, r"`check\(example_input=…\)` expects a batch"),
    (dict(loss_fn=3), TypeError, r"`check\(loss_fn=…\)`"),
    (dict(target=torch.zeros(2)), ValueError, r"`check\(target=…\)` needs loss_fn"),
    (dict(samples=-1), ValueError, r"`check\(samples=…\)`"),
])
def test_bad_arguments(kwargs, error, message):
    args = dict(model=nn.Linear(4, 2), example_input=torch.randn(2, 4)) | kwargs
    with pytest.raises(error, match=message):
        gw.check(**args)


def test_cli_check(tmp_path, capsys):
    (tmp_path / "nets.py").write_text(
        "import torch.nn as nn\n"
        "def deep_sigmoid():\n"
        "    layers = []\n"
        "    for _ in range(12):\n"
        "        layers += [nn.Linear(32, 32), nn.Sigmoid()]\n"
        "    return nn.Sequential(*layers)\n"
    )
    assert main(["check", f"{tmp_path / 'nets.py'}:deep_sigmoid", "--input-shape", "16,32"]) == 0
    out = capsys.readouterr().out
    assert "gw.check: VANISHING" in out
    assert main(["check", f"{tmp_path / 'nets.py'}:missing", "--input-shape", "16,32"]) == 2
    assert "has no factory 'missing'" in capsys.readouterr().err


def test_check_names_the_model_itself_root():
    """A model that is one layer is named "" by named_modules(); the reasons said "reaching layer  is"."""
    report = gw.check(nn.Linear(4, 2), torch.randn(3, 4), samples=0)
    assert report.layers[0].name == ""
    assert report.reasons[0].startswith("the gradient reaching layer (root) is")
    assert any(line.startswith("(root) ") for line in str(report).splitlines())


def test_check_on_batchnorm1d_with_one_sample_says_why():
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
    with pytest.raises(ValueError, match=r"`check\(example_input=…\)`: BatchNorm normalises with the batch's "):
        gw.check(model, torch.randn(1, 4))
    assert all(m.track_running_stats for m in model.modules() if isinstance(m, nn.BatchNorm1d))
    assert model.training and all(m.training for m in model.modules())
