"""``gw.check_attack``: is a robustness claim resting on masked gradients?

Gradient attacks (FGSM, PGD, and token attacks that follow embedding
gradients) climb ∂L/∂x. When that gradient is zero, non-finite or shattered —
a saturated softmax, a rounding or quantisation layer, a deep unrolled
defence — the attack stands still and the model looks robust when it is not
(Athalye, Carlini & Wagner 2018: 7 of 9 ICLR 2018 defences). This module
measures the input gradient's health and runs the sanity checks of Carlini et
al. (2019, "On Evaluating Adversarial Robustness", §4 and appendix):

1. an iterative attack beats a single step (PGD ≥ FGSM);
2. success grows with ε and reaches ~100 % when ε is unbounded;
3. a black-box (score-based) attack is not stronger than the white-box one;
4. a margin (Carlini–Wagner) loss, and BPDA through layers whose gradient is
   zero, are not much stronger than cross-entropy.

The attacks are the Adversarial Robustness Toolbox's (``pip install
'gradwatch[attack]'``): FGSM, PGD and Square. ART has no BPDA for a layer
inside the model, so that one is a forward hook here (straight-through: the
layer's forward, the identity's backward).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import torch
from torch import Tensor, nn

from gradwatch._errors import bad_argument
from gradwatch.attack_health import GradientHealth, MarginLoss, gradient_health, straight_through
from gradwatch.diagnosis.findings import Finding
from gradwatch.diagnosis.remedies import remedies

__all__ = ["AttackReport", "AttackResult", "AttackThresholds", "GradientHealth", "SanityCheck", "check_attack",
           "gradient_health"]

EPS_SWEEP = (0.25, 0.5, 1.0, 2.0)  # multiples of ε for check 2
RANDOM_DRAWS = 100  # random-noise draws per sample for check 3
SEVERE_GAP = 0.2  # another attack flips this fraction more of the correct samples than PGD (CE): the claim is off by that much


@dataclass(frozen=True)
class AttackThresholds:
    """Where a sanity check cuts; success rates are fractions of the correctly classified samples."""

    tolerance: float = 0.1  # a gap in success rate read as "stronger": above the ±5-point spread of PGD restarts
    reach_above: float = 0.95  # "~100 %" for the unbounded attack (Carlini et al. ask for 100 %)
    zero_grad_above: float = 0.1  # samples with an all-zero or non-finite ∂CE/∂x: a smooth net has ~none


@dataclass(frozen=True)
class AttackResult:
    """One attack at one ε: the fraction of correctly classified samples it flips, and the robust accuracy."""

    name: str
    eps: float
    success: float
    robust_accuracy: float


@dataclass(frozen=True)
class SanityCheck:
    """One of Carlini et al.'s checks: passed or not, and the numbers that decided it."""

    name: str
    passed: bool
    evidence: str


@dataclass
class AttackReport:
    """What :func:`check_attack` measured and concluded; its ``str`` is the report a user reads."""

    eps: float | None  # None: gradients at an embedding, no attack
    norm: str
    n: int
    clean_accuracy: float
    health: GradientHealth
    attacks: list[AttackResult] = field(default_factory=list)
    checks: list[SanityCheck] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)

    @property
    def masked(self) -> bool:
        """True when gradient masking is suspected (at least one finding)."""
        return bool(self.findings)

    @property
    def verdict(self) -> str:
        return "gradient masking suspected" if self.findings else "no sign of gradient masking"

    def robust_accuracy(self, name: str) -> float:
        """The robust accuracy of the attack called ``name`` at ε (e.g. "PGD (CE)")."""
        for a in self.attacks:
            if a.name == name and a.eps == self.eps:
                return a.robust_accuracy
        raise KeyError(f"no attack {name!r} at ε = {self.eps}; ran {sorted({a.name for a in self.attacks})}")

    def __str__(self) -> str:
        where = (f"{self.norm} ε = {self.eps:g}" if self.eps is not None
                 else "gradients at the embedding's output (token inputs: no attack run)")
        lines = [f"check_attack: {self.n} samples, clean accuracy {self.clean_accuracy:.1%}, {where}", str(self.health)]
        if self.attacks:
            lines += ["", f"{'attack':<28} {'ε':>8} {'success':>8} {'robust acc':>10}"]
            lines += [f"{a.name:<28} {a.eps:>8.3g} {a.success:>8.1%} {a.robust_accuracy:>10.1%}" for a in self.attacks]
        if self.checks:
            lines += ["", "Carlini et al. (2019) sanity checks:"]
            lines += [f"  {'✓' if c.passed else '✗'} {c.name}: {c.evidence}" for c in self.checks]
        lines += ["", f"verdict: {self.verdict}"]
        lines += ["", *map(str, self.findings)] if self.findings else []
        return "\n".join(lines).rstrip()

    def _repr_html_(self) -> str:
        """The report in a notebook: the verdict in colour over the text report."""
        import html

        colour = "#b00020" if self.findings else "#1b5e20"
        return (f'<div><p style="font-weight:bold;color:{colour}">{html.escape(self.verdict)}</p>'
                f"<pre>{html.escape(str(self))}</pre></div>")

    def __repr__(self) -> str:
        return f"AttackReport(verdict={self.verdict!r}, eps={self.eps}, findings={len(self.findings)})"


def _art() -> Any:
    try:
        from art.attacks import evasion
        from art.estimators.classification import PyTorchClassifier
    except ImportError:
        raise ImportError("check_attack's attacks need the Adversarial Robustness Toolbox: "
                          "pip install 'gradwatch[attack]' (or adversarial-robustness-toolbox)") from None
    return evasion, PyTorchClassifier


@contextlib.contextmanager
def _quiet_state(model: nn.Module, seed: int) -> Iterator[None]:
    """Eval mode, frozen parameters, seeded RNGs (torch and numpy, which ART draws from); all restored after."""
    modes = {m: m.training for m in model.modules()}
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    grads = [p.grad for p in params]
    np_state = np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        np.random.seed(seed)
        model.eval()
        for p in params:
            p.requires_grad_(False)  # input gradients only: no parameter gradient is computed or touched
        try:
            yield
        finally:
            for p, f, g in zip(params, flags, grads):
                p.requires_grad_(f)
                p.grad = g
            for m, mode in modes.items():
                m.training = mode
            np.random.set_state(np_state)


def _validate(model: nn.Module, x: Any, y: Any, eps: Any, steps: Any, embedding: Any) -> None:
    call = "check_attack"
    if not isinstance(model, nn.Module):
        raise TypeError(bad_argument(call, "model", "a torch.nn.Module", model))
    if not isinstance(x, Tensor) or x.dim() < 2:
        raise TypeError(bad_argument(call, "x", "a batch tensor (samples first)", x))
    if embedding is None and not x.is_floating_point():
        raise TypeError(bad_argument(call, "x", "a floating-point batch (for token ids pass embedding=the "
                                     "embedding module or its name)", f"a {x.dtype} tensor"))
    if not isinstance(y, Tensor) or y.dtype != torch.long or y.shape != x.shape[:1]:
        raise TypeError(bad_argument(call, "y", f"class indices, a long tensor of shape ({x.shape[0]},)", y))
    if (eps is not None or embedding is None) and (isinstance(eps, bool) or not isinstance(eps, (int, float))
                                                   or not eps > 0):
        raise ValueError(bad_argument(call, "eps", "a positive number", eps))
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 2:
        raise ValueError(bad_argument(call, "steps", "an int ≥ 2 (PGD iterations)", steps))


def check_attack(model: nn.Module, x: Tensor, y: Tensor, *, eps: float | None, norm: str = "linf", steps: int = 20,
                 clip: tuple[float, float] | None = None, embedding: nn.Module | str | None = None,
                 square: bool = False, seed: int = 0, thresholds: AttackThresholds | None = None) -> AttackReport:
    """Check a classifier's robustness evaluation for gradient masking: input-gradient health and Carlini's checks.

    ``x`` (N, …) with labels ``y`` (N,); ``eps`` the perturbation budget in the
    ``norm`` ("linf" or "l2"); ``clip`` the valid input range, if any (then the
    unbounded attack covers the whole range; otherwise it gets 100·ε). With
    ``embedding`` (a module or its ``named_modules()`` name) ``x`` may be token
    ids: the gradient health is measured at that module's output, the input of
    token-level attacks, no attack runs (the inputs are discrete) and ``eps`` may be None. Nothing
    about the model changes: parameters, ``.grad``, training flags and the RNG
    state are as before. The black-box side of check 3 is random noise (100
    draws a sample); ``square=True`` adds ART's Square attack (1,000 queries a
    sample: thorough, and seconds to minutes).
    """
    _validate(model, x, y, eps, steps, embedding)
    if norm not in ("linf", "l2"):
        raise ValueError(bad_argument("check_attack", "norm", "'linf' or 'l2'", norm))
    th = thresholds or AttackThresholds()
    with _quiet_state(model, seed):
        with torch.no_grad():
            clean = model(x).argmax(1) == y
        health = gradient_health(model, x, y, embedding=embedding)
        report = AttackReport(None if eps is None else float(eps), "L∞" if norm == "linf" else "L2", len(x),
                              float(clean.float().mean()), health)
        if embedding is None:
            assert eps is not None
            report.attacks = _run_attacks(model, x, y, clean, float(eps), norm, steps, clip, health.dies_at, square)
            report.checks = _sanity_checks(report, th, clip is not None)
    report.findings = _findings(report, th)
    return report


def _run_attacks(model: nn.Module, x: Tensor, y: Tensor, clean: Tensor, eps: float, norm: str, steps: int,
                 clip: tuple[float, float] | None, dies_at: tuple[str, ...], square: bool) -> list[AttackResult]:
    evasion, PyTorchClassifier = _art()
    ord_ = np.inf if norm == "linf" else 2
    x_np, y_np = x.detach().cpu().numpy().astype(np.float32), y.cpu().numpy()
    n_classes = int(model(x[:1]).shape[1])
    batch = min(len(x), 1024)  # one batch where it fits: ART's per-batch overhead dominates on small models

    def estimator(loss: nn.Module) -> Any:
        return PyTorchClassifier(model, loss=loss, input_shape=tuple(x.shape[1:]), nb_classes=n_classes,
                                 clip_values=clip, device_type="gpu" if x.is_cuda else "cpu")

    def score(name: str, e: float, adv: np.ndarray) -> AttackResult:
        with torch.no_grad():
            still = model(torch.as_tensor(adv, device=x.device)).argmax(1) == y
        flipped = clean & ~still
        return AttackResult(name, e, float(flipped.sum()) / max(int(clean.sum()), 1), float((clean & still).float().mean()))

    def pgd(est: Any, e: float) -> np.ndarray:  # Madry et al. (2018)'s step: 2.5·ε / steps
        attack = evasion.ProjectedGradientDescent(est, norm=ord_, eps=e, eps_step=2.5 * e / steps, max_iter=steps,
                                                  batch_size=batch, verbose=False)
        return attack.generate(x_np, y_np)

    ce, margin = estimator(nn.CrossEntropyLoss()), estimator(MarginLoss())
    fgsm = evasion.FastGradientMethod(ce, norm=ord_, eps=eps, batch_size=batch)
    results = [score("FGSM (CE)", eps, fgsm.generate(x_np, y_np)), score("PGD (CE)", eps, pgd(ce, eps)),
               score("PGD (margin)", eps, pgd(margin, eps))]
    if dies_at:
        with straight_through(model, dies_at):
            bpda = pgd(ce, eps)
        results.append(score("PGD (CE, BPDA)", eps, bpda))
    results.append(score("random noise", eps, _random_search(model, x, y, eps, norm, clip).cpu().numpy()))
    if square:
        results.append(score("Square (black-box)", eps, _square(evasion, PyTorchClassifier, model, x_np, y_np,
                                                                 n_classes, eps, ord_, clip)))
    for k in EPS_SWEEP:
        if k != 1.0:
            results.append(score("PGD (CE)", eps * k, pgd(ce, eps * k)))
    unbounded = (clip[1] - clip[0]) if clip is not None else 100 * eps
    results.append(score("PGD (CE), unbounded", unbounded, pgd(ce, unbounded)))
    return results


class _AsImage(nn.Module):
    """Lay flat inputs out as a zero-padded square image (N, 1, s, s): ART's Square attack only takes images."""

    def __init__(self, model: nn.Module, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.model, self.shape, self.d = model, shape, int(np.prod(shape))

    def forward(self, img: Tensor) -> Tensor:
        return self.model(img.flatten(1)[:, : self.d].reshape(-1, *self.shape))


@torch.no_grad()
def _random_search(model: nn.Module, x: Tensor, y: Tensor, eps: float, norm: str, clip: tuple[float, float] | None,
                   draws: int = RANDOM_DRAWS) -> Tensor:
    """Random noise of size ε (L∞: a random corner of the box; L2: a random direction), ``draws`` per sample.

    Each sample keeps the first draw that flips its prediction (else it stays as
    it is). ART has no plain random-noise attack; this is Carlini et al.'s check
    that noise should not beat a gradient attack. Batched, in chunks of at most
    2²² input entries.
    """
    adv = x.clone()
    per = max(1, (1 << 22) // (draws * max(x[0].numel(), 1)))
    for i in range(0, len(x), per):
        xs, ys = x[i : i + per], y[i : i + per]
        rep = xs.repeat_interleave(draws, 0)  # (n·draws, …)
        if norm == "linf":
            noise = eps * torch.randint(0, 2, rep.shape, device=x.device).mul(2).sub(1).to(x.dtype)
        else:
            noise = torch.randn_like(rep)
            noise *= eps / noise.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *[1] * (rep.dim() - 1))
        cand = rep + noise
        if clip is not None:
            cand = cand.clamp(*clip)
        flips = (model(cand).argmax(1) != ys.repeat_interleave(draws)).view(len(xs), draws)
        first = flips.float().argmax(1)  # index of the first flipping draw (0 when none flips)
        hit = flips.any(1)
        chosen = cand.view(len(xs), draws, *x.shape[1:])[torch.arange(len(xs)), first]
        adv[i : i + per][hit] = chosen[hit]
    return adv


def _square(evasion: Any, classifier: Any, model: nn.Module, x: np.ndarray, y: np.ndarray, n_classes: int,
            eps: float, ord_: float, clip: tuple[float, float] | None) -> np.ndarray:
    """Andriushchenko et al. (2020)'s score-based Square attack (ART), 1,000 queries a sample, on any input shape."""
    n, shape = len(x), x.shape[1:]
    side = max(4, int(np.ceil(np.sqrt(np.prod(shape)))))  # Square's L2 tiles are at least 3 wide
    wrapped = model if x.ndim == 4 else _AsImage(model, shape)
    img = x if x.ndim == 4 else np.pad(x.reshape(n, -1), ((0, 0), (0, side * side - x[0].size))).reshape(n, 1, side, side)
    est = classifier(wrapped, loss=nn.CrossEntropyLoss(), input_shape=img.shape[1:], nb_classes=n_classes,
                     clip_values=clip, device_type="cpu" if next(model.parameters(), torch.zeros(())).device.type == "cpu" else "gpu")
    attack = evasion.SquareAttack(est, norm=ord_, eps=eps, max_iter=1000, p_init=0.3, nb_restarts=1, batch_size=256,
                                  verbose=False)
    adv = attack.generate(img.astype(np.float32), y)
    return adv if x.ndim == 4 else adv.reshape(n, -1)[:, : x[0].size].reshape(x.shape)


def _sanity_checks(r: AttackReport, th: AttackThresholds, clipped: bool) -> list[SanityCheck]:
    at = {a.name: a for a in r.attacks if a.eps == r.eps}
    pgd, tol = at["PGD (CE)"].success, th.tolerance
    fgsm, margin = at["FGSM (CE)"].success, at["PGD (margin)"].success
    sweep = sorted((a for a in r.attacks if a.name == "PGD (CE)"), key=lambda a: a.eps)
    unbounded = next(a for a in r.attacks if a.name == "PGD (CE), unbounded")
    curve = ", ".join(f"{a.success:.0%} at {a.eps:.3g}" for a in sweep)
    grows = all(b.success >= a.success - tol for a, b in zip(sweep, sweep[1:]))
    reach = "the whole input range" if clipped else f"ε = {unbounded.eps:g}"
    blind = [a for a in at.values() if a.name in ("random noise", "Square (black-box)")]
    strongest = max(blind, key=lambda a: a.success)
    checks = [
        SanityCheck("iterative beats single-step", pgd >= fgsm - tol, f"PGD (CE) {pgd:.0%}, FGSM {fgsm:.0%}"),
        SanityCheck("success grows with ε and reaches ~100 % unbounded", grows and unbounded.success >= th.reach_above,
                    f"PGD (CE) {curve}; {unbounded.success:.0%} over {reach}"),
        SanityCheck("random and black-box search not stronger than white-box", strongest.success <= pgd + tol,
                    ", ".join(f"{a.name} {a.success:.0%}" for a in blind) + f"; PGD (CE) {pgd:.0%}"),
        SanityCheck("margin loss not much stronger than cross-entropy", margin <= pgd + tol,
                    f"PGD (margin) {margin:.0%}, PGD (CE) {pgd:.0%}"),
    ]
    if "PGD (CE, BPDA)" in at:
        bpda = at["PGD (CE, BPDA)"].success
        checks.append(SanityCheck("BPDA not much stronger than plain gradients", bpda <= pgd + tol,
                                  f"PGD (CE, BPDA through {', '.join(r.health.dies_at)}) {bpda:.0%}, PGD (CE) {pgd:.0%}"))
    return checks


def _findings(r: AttackReport, th: AttackThresholds) -> list[Finding]:
    """One finding, "gradient masking suspected", when a check fails or ∂CE/∂x is zero or non-finite on many samples.

    Its evidence lists every failed check and the gradient's health; its
    remedies follow the measured cause (a margin loss for a saturated softmax,
    BPDA for layers that stop the gradient, EOT for a random model; AutoAttack
    always). Critical when another attack flips ``SEVERE_GAP`` (a fifth) more of the
    correct samples than PGD with cross-entropy: the claimed robust accuracy is off by that much.
    """
    h = r.health
    failed = [c for c in r.checks if not c.passed]
    bad_grad = h.zero_frac + h.nonfinite_frac
    if not failed and bad_grad <= th.zero_grad_above:
        return []
    evidence = [f"failed: {c.name} ({c.evidence})" for c in failed]
    evidence.append(str(h).replace("\n", "; "))
    keys = ["margin_loss"] if h.logit_zero_frac > 0.5 else []
    keys += ["bpda"] if h.dies_at else []
    keys += ["eot"] if h.random else []
    keys += [k for k in ("margin_loss", "bpda") if k not in keys and not h.dies_at and h.logit_zero_frac <= 0.5]
    at = [a for a in r.attacks if a.eps == r.eps]
    pgd = next((a.success for a in at if a.name == "PGD (CE)"), None)
    best = max(at, key=lambda a: a.success, default=None)
    severe = pgd is not None and best is not None and best.success - pgd >= SEVERE_GAP
    summary = (f"gradient masking suspected: {len(failed)} of {len(r.checks)} sanity checks failed" if failed
               else f"gradient masking suspected: ∂CE/∂{h.wrt} is zero or non-finite on {bad_grad:.0%} of the samples")
    if severe and best is not None:
        summary += (f"; {best.name} leaves {best.robust_accuracy:.0%} robust accuracy where PGD (CE) "
                    f"claims {r.robust_accuracy('PGD (CE)'):.0%}")
    numbers = {"zero_frac": h.zero_frac, "nonfinite_frac": h.nonfinite_frac, "logit_zero_frac": h.logit_zero_frac}
    numbers.update({f"success {a.name} @ {a.eps:g}": a.success for a in r.attacks})
    return [Finding(
        kind="gradient_masking", severity="critical" if severe else "warning", layers=h.dies_at, steps=(0, 0),
        summary=summary, evidence="\n            ".join(evidence), cause=h.cause(),
        remedies=remedies(*keys, "autoattack"), numbers=numbers,
        sources=(f"check_attack: ∂CE/∂{h.wrt} and ∂margin/∂{h.wrt} on {h.n} samples"
                 + (f"; ART's attacks at {r.norm} ε = {r.eps:g}" if r.attacks else ""),))]
