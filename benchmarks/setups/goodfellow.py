"""A GAN as a user writes it from Goodfellow et al. (2014), "Generative adversarial nets", Algorithm 1 and §3.

Algorithm 1: k discriminator steps, then one generator step (here k = 5; the
generator by plain SGD, the discriminator by Adam with DCGAN's β₁ = 0.5). §3: "Early in learning, when G is poor, D can reject samples
with high confidence … log(1 − D(G(z))) saturates. Rather than training G to
minimize log(1 − D(G(z))) we can train G to maximize log D(G(z))."

The user's data: one 2-D Gaussian, N((6, 6), 0.5² I), far from where a fresh
generator puts its samples. The trial is the user's own class (not
``gradwatch.zoo.GANTrial``); it follows the doctor's documented protocol:
``model``/``optimizer`` are the generator's, ``step()`` trains both nets,
the boolean ``nonsaturating`` says which generator loss it uses, and
``judge_by_score=True`` says that its loss does not show learning (the
held-out fraction of samples near the data does).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .common import BenchSetup, Trial

CENTRE, STD = torch.tensor([6.0, 6.0]), 0.5
K = 5  # discriminator steps per generator step (Algorithm 1's k)


class UserGAN(Trial):
    """Generator and discriminator trained by Algorithm 1 (k = K); ``evaluate`` is the fraction of samples near the data."""

    def __init__(self, seed: int, nonsaturating: bool) -> None:
        torch.manual_seed(seed)
        g = nn.Sequential(nn.Linear(2, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 2))
        self.discriminator = nn.Sequential(nn.Linear(2, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 1))
        self.d_opt = torch.optim.Adam(self.discriminator.parameters(), lr=1e-3, betas=(0.5, 0.999))
        self.nonsaturating = nonsaturating
        self.rng = torch.Generator().manual_seed(seed)
        super().__init__(g, torch.optim.SGD(g.parameters(), lr=0.05), iter(()),
                         nn.functional.mse_loss, self.near_data, judge_by_score=True)

    def step(self) -> Tensor:
        """K discriminator steps, then one generator step; returns the generator's loss."""
        bce = nn.functional.binary_cross_entropy_with_logits
        for _ in range(K):
            real = CENTRE + STD * torch.randn(64, 2, generator=self.rng)
            fake = self.model(torch.randn(64, 2, generator=self.rng)).detach()
            d_real, d_fake = self.discriminator(real), self.discriminator(fake)
            d_loss = bce(d_real, torch.ones_like(d_real)) + bce(d_fake, torch.zeros_like(d_fake))
            self.d_opt.zero_grad()
            d_loss.backward()
            self.d_opt.step()
        logits = self.discriminator(self.model(torch.randn(64, 2, generator=self.rng)))  # (64, 1)
        if self.nonsaturating:  # maximise log D(G(z)): minimise −log σ(l) = softplus(−l)
            g_loss = nn.functional.softplus(-logits).mean()
        else:  # minimise log(1 − D(G(z))) = −softplus(l)
            g_loss = -nn.functional.softplus(logits).mean()
        self.optimizer.zero_grad()
        g_loss.backward()
        self.optimizer.step()
        return g_loss.detach()

    @torch.no_grad()
    def near_data(self, generator: nn.Module) -> float:
        """Fraction of 1,000 generated samples within 3σ of the data's centre."""
        samples = generator(torch.randn(1000, 2, generator=torch.Generator().manual_seed(99)))
        return float(((samples - CENTRE).norm(dim=1) < 3 * STD).float().mean())


def saturating(seed: int) -> Trial:
    """Algorithm 1 with the minimax generator loss log(1 − D(G(z))): D wins early and G's gradient vanishes."""
    return UserGAN(seed, nonsaturating=False)


def nonsaturating(seed: int) -> Trial:
    """The same GAN with §3's non-saturating generator loss −log D(G(z)): G reaches the data."""
    return UserGAN(seed, nonsaturating=True)


SETUPS = [
    BenchSetup("goodfellow_gan_saturating", "vanishing", 300, saturating, "Goodfellow et al. 2014, NeurIPS, Algorithm 1, §3"),
    BenchSetup("goodfellow_gan_nonsaturating", "healthy", 300, nonsaturating, "Goodfellow et al. 2014, NeurIPS, §3"),
]
