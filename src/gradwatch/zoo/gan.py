"""GANs on 2-D Gaussian mixtures (after VEEGAN, Srivastava et al. 2017): a trial training two nets, its metrics."""

from __future__ import annotations

import math
from functools import partial

import torch
from torch import Tensor, nn

from gradwatch.trial import Setup, Trial
from gradwatch.zoo.models import mlp


D_STEPS, G_LR, D_LR = 5, 1e-3, 1e-3
# The generator's Adam uses ε = 10⁻³, not PyTorch's 10⁻⁸: ε is the gradient scale below which Adam stops
# normalising the step. At 10⁻⁸ a gradient that fell ×10⁻⁴ still gets full-size steps, so Adam hides the
# collapse the minimax loss causes and the saturating generator escapes on most seeds (measured here).
G_EPS = 1e-3
RING_OFFSET = 8.0  # the ring's centre, away from the origin where a freshly initialised generator puts its samples


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
    less) and it covers none of the 8 modes; the non-saturating one covers 5
    to 8 after 300 steps (which ones hop with the seed and the CPU's float
    rounding: seeds 0–5 under three kernel sets, benchmarks/RESULTS.md).

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
        # judge_by_score: the generator loss need not fall while the samples reach the modes (gradwatch.trial)
        super().__init__(generator, g_opt, iter(()), nn.functional.mse_loss, self._evaluate, judge_by_score=True)

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


def gan_trial(seed: int, nonsaturating: bool, kind: str = "ring") -> GANTrial:
    """A GAN on the mixture ``kind`` ("ring", offset by :data:`RING_OFFSET`, or "grid"): 3-hidden-layer ReLU MLPs."""
    torch.manual_seed(seed)
    centers, std = mixture_centers(kind)
    if kind == "ring":
        centers = centers + torch.tensor([RING_OFFSET, 0.0])
    g, d = mlp(4, 128, nn.ReLU, n_in=2, n_out=2), mlp(4, 128, nn.ReLU, n_in=2, n_out=1)
    # D takes 5 steps per generator step, so that it wins early, as in Goodfellow et al.'s warning
    g_opt = torch.optim.Adam(g.parameters(), lr=G_LR, betas=(0.5, 0.999), eps=G_EPS)
    d_opt = torch.optim.Adam(d.parameters(), lr=D_LR, betas=(0.5, 0.999))
    return GANTrial(g, d, g_opt, d_opt, centers, std, nonsaturating, seed)


GAN = (
    Setup("gan_ring_saturating", "GAN on 8 Gaussians on a ring with the saturating (minimax) generator loss "
          "log(1 − D(G(z))): once D wins, the generator's gradient vanishes", "vanishing",
          partial(gan_trial, nonsaturating=False)),
    Setup("gan_ring_nonsaturating", "healthy: the same GAN with the non-saturating generator loss −log D(G(z))",
          None, partial(gan_trial, nonsaturating=True)),
)
