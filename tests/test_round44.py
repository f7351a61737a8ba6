"""The thirty-eighth session: rounds 44 and 45 (written from the README alone, each ported from a public source),
each against its reference: a hand-written Adam that multiplies by √v̂ where it divides; a VAE whose summed
reconstruction loss is large by construction; a WGAN-GP whose penalty's gradient has no graph; a binary
classifier's confident sigmoid output; a clip applied before a GradScaler's unscale_; a clip handed a generator."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import gradwatch as gw
from gradwatch.doctor import surgery
from conftest import (ALL_SLOW, SEED_0_FAST, adam_moments, digits_in_order_123, drawn_batches, held_out_accuracy,
                      held_out_r2, watched_pair, watched_trial)


def _problems(w) -> list:
    return [f for f in w.diagnose() if f.severity != "info"]


# -- a hand-written Adam that multiplies by √v̂ where it divides (oracle/tribuo#401) ---------------------------------

class _HandAdam(torch.optim.Optimizer):
    """Adam written out as a user does (Kingma & Ba 2015, Alg. 1); ``multiply``: the step m̂·(√v̂ + ε) of
    tribuo#401, "multiplying by the squared gradient accumulator rather than dividing by it"."""

    def __init__(self, params, lr: float, multiply: bool, betas=(0.9, 0.999), eps: float = 1e-8) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps))
        self.multiply = multiply

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                m, v, t = adam_moments(self, group, p)
                m = m / (1 - b1 ** t)
                root = (v / (1 - b2 ** t)).sqrt().add_(group["eps"])
                p.add_(m * root if self.multiply else m / root, alpha=-group["lr"])


class _Factors(nn.Module):
    """Matrix factorisation with a bias per user and per item (tables of one column, at 0)."""

    def __init__(self, users: int, items: int, dim: int = 16) -> None:
        super().__init__()
        self.u, self.i = nn.Embedding(users, dim), nn.Embedding(items, dim)
        self.ub, self.ib = nn.Embedding(users, 1), nn.Embedding(items, 1)
        for table in (self.u, self.i):
            nn.init.normal_(table.weight, std=0.1)
        for table in (self.ub, self.ib):
            nn.init.zeros_(table.weight)

    def forward(self, x):
        u, i = x[:, 0], x[:, 1]
        return (self.u(u) * self.i(i)).sum(1) + self.ub(u).squeeze(1) + self.ib(i).squeeze(1)


def _ratings(users: int = 300, items: int = 200, n: int = 20000) -> tuple[torch.Tensor, torch.Tensor]:
    """Ratings of a rank-4 model with biases and noise (a fixed draw); the first 16,000 to train on."""
    g = torch.Generator().manual_seed(44)
    u, v = torch.randn(users, 4, generator=g), torch.randn(items, 4, generator=g)
    bu, bi = 0.5 * torch.randn(users, generator=g), 0.5 * torch.randn(items, generator=g)
    uu, ii = torch.randint(0, users, (n,), generator=g), torch.randint(0, items, (n,), generator=g)
    r = (u[uu] * v[ii]).sum(1) / 2 + bu[uu] + bi[ii] + 0.3 * torch.randn(n, generator=g)
    return torch.stack([uu, ii], 1), r


def _factors(seed: int, multiply: bool = True) -> gw.Trial:
    x, y = _ratings()
    torch.manual_seed(seed)
    model = _Factors(300, 200)
    return gw.Trial(model, _HandAdam(model.parameters(), lr=1e-2, multiply=multiply),
                    drawn_batches(x, y, 16000, 256, 1000 + seed), F.mse_loss, evaluate=held_out_r2(x, y, 16000))


@pytest.mark.parametrize("seed", SEED_0_FAST)
def test_a_hand_written_adam_whose_steps_are_far_below_its_rate_is_told_first(tmp_path, seed):
    bug, twin = _factors(seed), _factors(seed, multiply=False)
    w_bug, w_twin = watched_pair(bug, twin, tmp_path, steps=600)
    # the reference: the bug's embeddings moved, over the run, less than 1e-3 of what one step of lr·‖g‖ moves them
    # (a loop over .grad at the end), and it does not learn where torch's rule, the twin, does
    xb, yb = next(_factors(seed).batches)
    F.mse_loss(bug.model(xb), yb).backward()
    before = _factors(seed).model.u.weight
    moved = float((bug.model.u.weight - before).detach().norm())
    assert moved < 1e-3 * 1e-2 * float(bug.model.u.weight.grad.norm()) * 600
    assert bug.evaluate(bug.model) < 0.05 and twin.evaluate(twin.model) > 0.85
    problems = _problems(w_bug)
    assert problems and problems[0].remedy_keys[0] == "torch_optimizer", str(w_bug.diagnose())
    assert "_HandAdam" in problems[0].cause and "symmetry" not in problems[0].cause
    assert not _problems(w_twin), str(w_twin.diagnose())


def test_the_doctor_puts_torch_s_adam_in_place_of_the_hand_written_one():
    report = gw.doctor(_factors, steps=600, progress=False)
    assert report.best is not None and report.best.parts == ("torch_optimizer",), str(report)
    assert report.best.verdict == "fixes it" and report.best.score > 0.85  # the twin's 0.90


def test_the_row_takes_the_torch_class_the_name_names_with_the_groups_settings():
    model = nn.Linear(3, 2)

    class MyAdamW(_HandAdam):
        pass

    class Lion(_HandAdam):
        pass

    for cls, expected, lr in ((_HandAdam, torch.optim.Adam, 0.05), (MyAdamW, torch.optim.AdamW, 0.05),
                              (Lion, torch.optim.Adam, 1e-3)):
        old = cls([{"params": [model.weight], "lr": 0.05}, {"params": [model.bias], "lr": 0.05, "eps": 1e-4}],
                  lr=0.05, multiply=False, betas=(0.8, 0.99))
        trial = surgery.torch_optimizer(gw.Trial(model, old, iter(()), F.mse_loss), {})
        new = trial.optimizer
        assert type(new) is expected and [g["params"] for g in new.param_groups] == [[model.weight], [model.bias]]
        assert [g["lr"] for g in new.param_groups] == [lr, lr]
        if expected is torch.optim.AdamW:  # the settings kept where the name names the class
            assert new.param_groups[0]["betas"] == (0.8, 0.99) and new.param_groups[1]["eps"] == 1e-4
    assert surgery.torch_optimizer(gw.Trial(model, torch.optim.Adam(model.parameters()), iter(()), F.mse_loss),
                                   {}) is None


# -- a VAE's reconstruction summed over pixels, as pytorch/examples' VAE (pytorch/examples#296) -------------------

class _Vae(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU())
        self.mu, self.logvar = nn.Linear(128, 8), nn.Linear(128, 8)
        self.dec = nn.Sequential(nn.Linear(8, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 64))

    def forward(self, x):
        h = self.enc(x)
        mu, logvar = self.mu(h), self.logvar(h)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        return torch.sigmoid(self.dec(z)), mu, logvar


def _elbo(out, x):
    recon, mu, logvar = out
    return (F.binary_cross_entropy(recon, x, reduction="sum")
            - 0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp()))


def _explained(x, start):
    """The held-out share of the pixels' variance that the reconstruction from μ explains."""
    def score(m):
        with torch.no_grad():
            recon = torch.sigmoid(m.dec(m.mu(m.enc(x[start:]))))
        return float(1 - ((x[start:] - recon) ** 2).sum() / ((x[start:] - x[:start].mean(0)) ** 2).sum())
    return score


def _vae(seed: int) -> gw.Trial:
    x, _ = digits_in_order_123()
    torch.manual_seed(seed)
    model = _Vae()
    return gw.Trial(model, torch.optim.Adam(model.parameters(), lr=1e-3), drawn_batches(x, x, 1400, 64, 1000 + seed),
                    _elbo, evaluate=_explained(x, 1400))


@pytest.mark.parametrize("seed", SEED_0_FAST)
def test_a_loss_summed_over_pixels_in_0_1_is_not_told_as_raw_regression_targets(tmp_path, seed):
    from gradwatch.zoo.train import readme_watched

    trial = _vae(seed)
    w = readme_watched(trial, tmp_path, "vae", 800)
    # the reference: a summed ELBO starts at about 64 pixels × 64 samples × ln 2 and has a floor far above half of
    # it (the pixels' own entropy), while the run learns: its reconstructions explain half the pixels' variance
    fresh = _vae(seed)
    x = next(fresh.batches)[0]
    with torch.no_grad():
        first = float(_elbo(fresh.model(x), x))
    assert first > 100 and trial.evaluate(trial.model) > 0.4
    assert not _problems(w), str(w.diagnose())


# -- a WGAN-GP whose penalty's gradient is taken without create_graph (mlpack/mlpack#2891) --------------------------

MODES = torch.tensor([[2.0, 2.0], [2.0, -2.0], [-2.0, 2.0], [-2.0, -2.0]])


def _mlp(n_in: int, n_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(n_in, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, n_out))


class _WganGp(gw.Trial):
    """Gulrajani et al. 2017, Alg. 1 on four Gaussians at (±2, ±2), sd 0.2: five critic steps (the trial's model
    and optimizer) per generator step, λ = 10; ``graph``: the penalty's gradient taken with create_graph=True."""

    def __init__(self, seed: int, graph: bool) -> None:
        torch.manual_seed(seed)
        self.generator, critic = _mlp(2, 2), _mlp(2, 1)
        self.g_opt = torch.optim.Adam(self.generator.parameters(), lr=1e-3, betas=(0.5, 0.9))
        self.noise, self.graph = torch.Generator().manual_seed(seed), graph
        data = torch.Generator().manual_seed(100 + seed)

        def batches():
            while True:
                yield MODES[torch.randint(0, 4, (128,), generator=data)] + 0.2 * torch.randn(128, 2, generator=data), 0

        super().__init__(critic, torch.optim.Adam(critic.parameters(), lr=1e-3, betas=(0.5, 0.9)), batches(),
                         lambda out, y: out.mean(), evaluate=self.modes_covered, judge_by_score=True)

    def modes_covered(self, model=None) -> float:
        """Σ over the modes of min(the share of 2,000 samples within 3 sd of it, ¼): 1 for all four evenly."""
        with torch.no_grad():
            samples = self.generator(torch.randn(2000, 2, generator=torch.Generator().manual_seed(99)))
        return float((torch.cdist(samples, MODES) < 0.6).float().mean(0).clamp(max=0.25).sum())

    def step(self):
        critic, generator = self.model, self.generator
        for _ in range(5):
            real, _ = next(self.batches)
            fake = generator(torch.randn(128, 2, generator=self.noise)).detach()
            mix = torch.rand(128, 1, generator=self.noise)
            between = (mix * real + (1 - mix) * fake).requires_grad_(True)
            slope, = torch.autograd.grad(critic(between).sum(), between, create_graph=self.graph)
            loss = critic(fake).mean() - critic(real).mean() + 10.0 * ((slope.norm(dim=1) - 1) ** 2).mean()
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()
        self.g_opt.zero_grad()
        (-critic(generator(torch.randn(128, 2, generator=self.noise))).mean()).backward()
        self.g_opt.step()
        return loss.detach()


@pytest.mark.parametrize("seed", ALL_SLOW)  # 600 steps of 5 critic steps each: about a minute a run
def test_a_gradient_penalty_taken_without_a_graph_is_told_first(tmp_path, seed):
    bug, twin = _WganGp(seed, graph=False), _WganGp(seed, graph=True)
    w_bug, w_twin = watched_trial(bug, tmp_path, "bug", 600), watched_trial(twin, tmp_path, "twin", 600)
    # the reference: without a graph the penalty passes no gradient to the critic (a loop over .grad), with one it does
    probe = _WganGp(seed, graph=False).model
    x = torch.randn(8, 2, requires_grad=True)
    slope, = torch.autograd.grad(probe(x).sum(), x)
    assert not slope.requires_grad
    assert bug.modes_covered() < 0.45 and twin.modes_covered() > 0.6
    problems = _problems(w_bug)
    assert problems and problems[0].remedy_keys[0] == "create_graph", str(w_bug.diagnose())
    assert "never with a graph" in problems[0].cause
    assert not _problems(w_twin), str(w_twin.diagnose())


def test_the_watch_counts_input_gradients_taken_with_and_without_a_graph_and_changes_nothing(tmp_path):
    def train(watched: bool) -> tuple[nn.Module, dict | None]:
        torch.manual_seed(0)
        critic = _mlp(2, 1)
        opt = torch.optim.SGD(critic.parameters(), lr=0.05)
        data = torch.Generator().manual_seed(1)
        counted = {"with_graph": 0, "without_graph": 0}  # the reference: a count kept by the loop itself

        def steps():
            for i in range(12):
                x = torch.randn(16, 2, generator=data).requires_grad_(True)
                graph = i % 3 == 0
                slope, = torch.autograd.grad(critic(x).sum(), x, create_graph=graph)
                counted["with_graph" if graph else "without_graph"] += 1
                loss = critic(x.detach()).mean() + ((slope.norm(dim=1) - 1) ** 2).mean()
                opt.zero_grad()
                loss.backward()  # (reaches x through the graph on the steps that built one)
                counted["without_graph"] += graph
                opt.step()
                yield loss

        if not watched:
            for _ in steps():
                pass
            return critic, None
        with gw.watch(critic, opt, store=tmp_path, name="penalty") as w:
            for loss in steps():
                w.log(loss=loss)
        from gradwatch.store import Run
        return critic, {"counted": counted, "meta": Run(w.path).meta["input_gradients"]}

    plain, _ = train(False)
    watched, got = train(True)
    assert all(torch.equal(a, b) for a, b in zip(plain.parameters(), watched.parameters()))
    assert got["meta"] == {"inputs": 12, **got["counted"]}
    assert got["counted"] == {"with_graph": 4, "without_graph": 12}


@pytest.mark.slow  # two trials of 600 steps of 5 critic steps each
def test_the_doctor_takes_the_penalty_s_gradient_with_a_graph():
    report = gw.doctor(lambda seed: _WganGp(seed, graph=False), steps=600, budget_s=150, progress=False)
    assert report.best is not None and report.best.parts == ("create_graph",), str(report)
    assert report.best.verdict == "fixes it" and report.best.score > 0.6  # the twin's 0.73–0.77



# -- round 45: a binary classifier's sigmoid output, confident once it learned (stats.stackexchange.com/q/481881) ----

def _cancer_cnn(seed: int) -> gw.Trial:
    """The Keras 1-D CNN of the question, its Dense(1) under a sigmoid (the twin of a softmax over one unit), on
    breast cancer's standardised features under nn.BCELoss; held-out accuracy."""
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer()
    order = torch.randperm(len(data.target), generator=torch.Generator().manual_seed(0))
    x = torch.tensor(data.data, dtype=torch.float32)[order]
    y = torch.tensor(data.target, dtype=torch.float32)[order]
    x = ((x - x[:426].mean(0)) / x[:426].std(0)).unsqueeze(1)
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv1d(1, 16, 4, padding="same"), nn.BatchNorm1d(16), nn.LeakyReLU(), nn.Dropout(0.2),
        nn.Conv1d(16, 8, 4, padding="same"), nn.BatchNorm1d(8), nn.LeakyReLU(), nn.Dropout(0.2),
        nn.Flatten(), nn.Linear(8 * 30, 64), nn.BatchNorm1d(64), nn.LeakyReLU(), nn.Linear(64, 1), nn.Sigmoid())

    def accuracy(m):
        m.eval()
        with torch.no_grad():
            right = float(((m(x[426:]).squeeze(1) > 0.5).float() == y[426:]).float().mean())
        m.train()
        return right

    return gw.Trial(model, torch.optim.Adam(model.parameters(), lr=1e-3), drawn_batches(x, y, 426, 64, 1000 + seed),
                    lambda out, t: F.binary_cross_entropy(out.squeeze(1), t), evaluate=accuracy)


@pytest.mark.parametrize("seed", SEED_0_FAST)
def test_a_confident_sigmoid_output_on_a_loss_that_fell_fourfold_is_no_warning(tmp_path, seed):
    from gradwatch.zoo.train import readme_watched

    trial = _cancer_cnn(seed)
    w = readme_watched(trial, tmp_path, "twin", 300)
    # the reference: the classifier learned (held out) and its output sits in the sigmoid's tails on a share of the
    # samples — confident answers, not a fault
    assert trial.evaluate(trial.model) > 0.9
    with torch.no_grad():
        trial.model.eval()
        p = trial.model(next(_cancer_cnn(seed + 5).batches)[0]).squeeze(1)
    assert float(((p < 0.01) | (p > 0.99)).float().mean()) > 0.1
    assert not _problems(w), str(w.diagnose())
    assert any(f.kind == "saturation" and f.severity == "info" for f in w.diagnose())  # (seen, and told as the fit)


# -- round 45: clip_grad_norm_ on gradients a GradScaler still scales (pytorch/pytorch#40907) ------------------------

class _RowLstm(nn.Module):
    """Reads a digit row by row (8 steps of 8 pixels), classified from the last hidden state."""

    def __init__(self, cell: type[nn.Module] = nn.LSTM) -> None:
        super().__init__()
        self.rnn, self.head = cell(8, 64, batch_first=True), nn.Linear(64, 10)

    def forward(self, x):
        out, _ = self.rnn(x.view(-1, 8, 8))
        return self.head(out[:, -1])


def _scaled_clip(seed: int, unscale: bool = False):
    """An LSTM at SGD 5 clipping at 0.5 under a CPU GradScaler; ``unscale``: scaler.unscale_ before the clip (the
    torch.amp docs' order)."""
    x, y = digits_in_order_123()
    torch.manual_seed(seed)
    model = _RowLstm()
    opt, scaler = torch.optim.SGD(model.parameters(), lr=5.0), torch.amp.GradScaler("cpu")
    batches = drawn_batches(x, y, 1400, 64, 1000 + seed)

    def step():
        xb, yb = next(batches)
        opt.zero_grad()
        loss = F.cross_entropy(model(xb), yb)
        scaler.scale(loss).backward()
        if unscale:
            scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        scaler.step(opt)
        scaler.update()
        return loss

    return model, opt, scaler, step, held_out_accuracy(x, y, 1400)


@pytest.mark.parametrize("seed", SEED_0_FAST)
def test_a_clip_before_the_scaler_s_unscale_is_told_with_the_user_s_bound(tmp_path, seed):
    runs = {}
    for unscale in (False, True):
        model, opt, scaler, step, accuracy = _scaled_clip(seed, unscale)
        with gw.watch(model, opt, scaler=scaler, store=tmp_path, name=f"unscale_{unscale}") as w:
            for _ in range(300):
                w.log(loss=step())
        runs[unscale] = (w, accuracy(model), scaler.get_scale())
    (w_bug, bug, scale), (w_twin, twin, _) = runs[False], runs[True]
    # the reference: with the clip on the scaled gradients each step's gradient is 0.5/scale long once unscaled
    assert scale == 2.0 ** 16 and bug < 0.2 and twin > 0.9
    problems = _problems(w_bug)
    assert problems and problems[0].remedy_keys[0] == "unscale_before_clip", str(w_bug.diagnose())
    assert "max_norm≈0.5) ran before scaler.unscale_" in problems[0].cause
    assert problems[0].numbers["clip_bound"] == pytest.approx(0.5 / scale, rel=1e-3)
    assert not _problems(w_twin), str(w_twin.diagnose())


# -- round 45: d2l's grad_clipping handed model.parameters(), a generator (ShusenTang/Dive-into-DL-PyTorch#101) -----

def _clip_by_hand(params, theta: float) -> None:
    """d2l's grad_clipping: its first loop takes the norm, its second scales — over nothing where ``params`` is a
    generator the first loop used up."""
    norm = torch.tensor([0.0])
    for p in params:
        norm += (p.grad.data ** 2).sum()
    norm = norm.sqrt().item()
    if norm > theta:
        for p in params:
            p.grad.data *= theta / norm


@pytest.mark.parametrize("seed", SEED_0_FAST)
def test_a_loss_that_climbs_from_the_first_steps_names_the_bound_on_the_step_before_skipping_steps(tmp_path, seed):
    x, y = digits_in_order_123()
    torch.manual_seed(seed)
    model = _RowLstm(nn.RNN)
    opt = torch.optim.SGD(model.parameters(), lr=100.0)
    batches = drawn_batches(x, y, 1400, 64, 1000 + seed)
    with gw.watch(model, opt, store=tmp_path, name="generator") as w:
        for _ in range(300):
            xb, yb = next(batches)
            opt.zero_grad()
            loss = F.cross_entropy(model(xb), yb)
            loss.backward()
            _clip_by_hand(model.parameters(), 1e-2)  # (the source's bug: a generator, used up by the first loop)
            opt.step()
            w.log(loss=loss)
    # the reference: nothing was clipped — the loss climbed far above chance's ln 10
    assert float(loss) > 100 * math.log(10)
    diverged = [f for f in _problems(w) if f.kind == "exploding" and "diverged" in f.summary]
    assert diverged and diverged[0].remedy_keys[:2] == ("clip_norm", "lower_lr"), str(w.diagnose())
