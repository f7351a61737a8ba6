"""Ground truth for the ported set-ups, by plain measurement: forward hooks, tensor hooks, retain_grad. No gradwatch.

One run of a set-up (its own ``trial.step()``, its own step count) with
plain PyTorch hooks gives:

- the back-propagated gradient ‖∂L/∂a‖ at the output of every module that
  owns parameters, in the order the forward pass first produces them, every
  ``EVERY``-th step; its first/last ratio across depth is the quantity that
  vanishes or explodes (Glorot & Bengio 2010, §4.2; He et al. 2015, §2.2);
- across time for recurrent nets: ‖∂L/∂h_t‖ at every call of an
  ``nn.RNNCell`` (a tensor hook on each call's output is the total derivative),
  or for a fused one-layer ``nn.RNN`` the same weights unrolled in Python
  with ``retain_grad`` on every h_t, fed the gradient the real backward pass
  delivered to its output (Pascanu et al. 2013, eq. 3–5);
- the loss at start and end, the held-out score, the first non-finite step,
  the total gradient norm's growth and decay over the run, the saturated
  fraction of tanh/sigmoid outputs (derivative below 2 % of its peak:
  |tanh| > 0.99, sigmoid outside (0.005, 0.995)), the fraction of ReLU units
  that are zero on the whole batch, and whether every gradient is exactly zero.

:func:`Truth.holds` turns these into the set of labels the run shows, with
thresholds of its own (below), chosen as orders of magnitude a practitioner
would call broken, not tuned to any one set-up.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor, nn

EVERY = 5  # sampled steps for the hooked quantities
RATIO_VANISH = 1e-3  # first/last ‖∂L/∂a‖ (median over the run) below this: vanishing
RATIO_EXPLODE = 1e3  # ... above this on any sampled step before the first non-finite one: exploding
GROWTH_EXPLODE = 1e3  # total gradient norm peak / its median over the first 5 steps: exploding over steps
DECAY_VANISH = 1e-3  # total gradient norm, last fifth / first 5 steps, in a run that does not learn: vanishing
FRACTION = 0.5  # saturated or dead fraction of some activation's outputs (median over the second half)
HEALTHY_BAND = (1e-2, 1e2)  # a healthy run's median first/last ratio lies in here
LEARNED_LOSS = 0.5  # final loss (mean of the last 10 % of steps) at most this × the first: it learns
LEARNED_SCORE = 0.8  # where the set-up has a held-out score (accuracy, R²): it learns when the score is at least this

_SATURATING = (nn.Tanh, nn.Sigmoid)
_RELU = (nn.ReLU, nn.ReLU6)


@dataclass
class Truth:
    """What one plainly measured run shows (ratios are first/last ‖∂L/∂a‖, per sampled step)."""

    depth: list[float] = field(default_factory=list)
    time: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    score: float = math.nan
    nonfinite_step: int | None = None
    grad_growth: float = math.nan
    grad_decay: float = math.nan
    saturated: float = 0.0
    dead: float = 0.0
    zero_grad: bool = False

    @property
    def first_loss(self) -> float:
        finite = [v for v in self.losses if math.isfinite(v)]
        return finite[0] if finite else math.inf

    @property
    def final_loss(self) -> float:
        tail = self.losses[-max(1, len(self.losses) // 10):]
        return statistics.fmean(tail) if all(math.isfinite(v) for v in tail) else math.inf

    @property
    def learned(self) -> bool:
        if self.nonfinite_step is not None:
            return False
        if math.isfinite(self.score):  # a held-out score, where the set-up has one, is the better witness
            return self.score >= LEARNED_SCORE
        return math.isfinite(self.final_loss) and self.first_loss > 0 and self.final_loss <= LEARNED_LOSS * self.first_loss

    @staticmethod
    def _median(xs: list[float]) -> float:
        xs = [x for x in xs if not math.isnan(x)]
        return statistics.median(xs) if xs else math.nan

    def ratio(self) -> float:
        """The median first/last ratio: across time where the run has a recurrent profile, else across depth."""
        return self._median(self.time) if self.time else self._median(self.depth)

    def holds(self) -> set[str]:
        """The labels this run shows: "fails" whenever it does not learn; "healthy" when it learns and nothing else holds."""
        got: set[str] = set()
        if self.nonfinite_step is not None:
            got.add("nonfinite")
        profiles = [p for p in (self.depth, self.time) if p]
        if any(max((x for x in p if math.isfinite(x)), default=0.0) > RATIO_EXPLODE for p in profiles) \
                or self.grad_growth > GROWTH_EXPLODE:
            got.add("exploding")
        if any(self._median(p) < RATIO_VANISH for p in profiles) \
                or (self.grad_decay < DECAY_VANISH and not self.learned):
            got.add("vanishing")
        if self.saturated > FRACTION and not self.learned:
            got.add("saturation")
        if self.dead > FRACTION and not self.learned:
            got.add("dead_units")
        if self.zero_grad:
            got.add("stalled")
        if not self.learned:
            got.add("fails")
        lo, hi = HEALTHY_BAND
        if got == set() and self.learned and all(lo <= self._median(p) <= hi for p in profiles):
            got.add("healthy")
        return got

    def describe(self) -> str:
        """One line of the numbers behind :meth:`holds`."""
        def fmt(x: float) -> str:
            return f"{x:.2g}"

        parts = [f"loss {fmt(self.first_loss)}→{fmt(self.final_loss)}"]
        if math.isfinite(self.score):
            parts.append(f"score {self.score:.2f}")
        if self.depth:
            parts.append(f"depth ratio med {fmt(self._median(self.depth))} "
                         f"max {fmt(max((x for x in self.depth if math.isfinite(x)), default=math.nan))}")
        if self.time:
            parts.append(f"time ratio med {fmt(self._median(self.time))}")
        parts.append(f"growth {fmt(self.grad_growth)} decay {fmt(self.grad_decay)}")
        parts.append(f"sat {self.saturated:.2f} dead {self.dead:.2f}")
        if self.nonfinite_step is not None:
            parts.append(f"non-finite at step {self.nonfinite_step}")
        if self.zero_grad:
            parts.append("all gradients zero")
        return ", ".join(parts)


def _first_tensor(out: Any) -> Tensor | None:
    while isinstance(out, (tuple, list)) and out:
        out = out[0]
    if hasattr(out, "logits"):  # a transformers ModelOutput
        out = out.logits
    return out if isinstance(out, Tensor) and out.is_floating_point() else None


class _Probe:
    """The hooks of one run; they record only while ``sampling`` is set."""

    def __init__(self, model: nn.Module) -> None:
        self.sampling = False
        self.order: list[str] = []  # modules with parameters, by first output
        self.norms: dict[str, float] = {}
        self.cell_norms: list[Tensor] = []  # one 0-d tensor per cell call, filled by backward
        self.cell_calls: list[Tensor] = []
        self.rnn: dict[str, Any] = {}
        self.fractions: dict[str, list[float]] = {}
        self.saturating = {n for n, m in model.named_modules() if isinstance(m, _SATURATING)}
        self.handles: list[Any] = []
        for name, m in model.named_modules():
            if isinstance(m, nn.RNNCell):
                self.handles.append(m.register_forward_hook(self._cell))
            elif isinstance(m, nn.RNN) and m.num_layers == 1 and not m.bidirectional:
                self.handles.append(m.register_forward_pre_hook(self._rnn_in, with_kwargs=True))
                self.handles.append(m.register_forward_hook(self._rnn_out))
            if isinstance(m, _SATURATING + _RELU):
                self.handles.append(m.register_forward_hook(self._activation(name)))
            if any(True for _ in m.parameters(recurse=False)) and not isinstance(m, nn.RNNCell):
                self.handles.append(m.register_forward_hook(self._layer(name)))

    def close(self) -> None:
        for h in self.handles:
            h.remove()

    def _layer(self, name: str) -> Callable[..., None]:
        def hook(mod: nn.Module, args: Any, out: Any) -> None:
            t = _first_tensor(out)
            if not self.sampling or t is None or not t.requires_grad:
                return
            if name not in self.order:
                self.order.append(name)

            def grad(g: Tensor) -> None:  # a module called more than once: the root of the summed squares
                self.norms[name] = math.hypot(self.norms.get(name, 0.0), float(g.detach().double().norm()))

            t.register_hook(grad)

        return hook

    def _activation(self, name: str) -> Callable[..., None]:
        def hook(mod: nn.Module, args: Any, out: Any) -> None:
            if not self.sampling or not isinstance(out, Tensor):
                return
            y = out.detach().float()
            if isinstance(mod, nn.Tanh):
                frac = float((y.abs() > 0.99).float().mean())
            elif isinstance(mod, nn.Sigmoid):
                frac = float(((y < 0.005) | (y > 0.995)).float().mean())
            else:  # ReLU: a unit (feature, or channel × position) that is zero on every sample of the batch
                frac = float((y.reshape(y.shape[0], -1) <= 0).all(0).float().mean()) if y.dim() > 1 else 0.0
            self.fractions.setdefault(name, []).append(frac)

        return hook

    def _cell(self, mod: nn.Module, args: Any, out: Any) -> None:
        if self.sampling and isinstance(out, Tensor) and out.requires_grad:
            slot = len(self.cell_norms)
            self.cell_norms.append(torch.tensor(math.nan))

            def grad(g: Tensor) -> None:
                self.cell_norms[slot] = g.detach().double().norm()

            out.register_hook(grad)

    def _rnn_in(self, mod: nn.Module, args: tuple, kwargs: dict) -> None:
        if self.sampling:
            hx = args[1] if len(args) > 1 else kwargs.get("hx")
            self.rnn = {"mod": mod, "x": args[0].detach(), "hx": None if hx is None else hx.detach(),
                        "w": [p.detach().clone() for p in mod._flat_weights]}

    def _rnn_out(self, mod: nn.Module, args: Any, out: Any) -> None:
        if self.sampling and self.rnn and out[0].requires_grad:
            def keep(key: str) -> Callable[[Tensor], None]:
                def grad(g: Tensor) -> None:
                    self.rnn[key] = g.detach()
                return grad

            out[0].register_hook(keep("g_out"))
            out[1].register_hook(keep("g_h"))

    def begin(self) -> None:
        self.norms, self.cell_norms, self.rnn = {}, [], {}

    def depth_ratio(self) -> float:
        got = [self.norms[n] for n in self.order if n in self.norms]
        if len(got) < 2 or got[-1] == 0:
            return math.nan
        return got[0] / got[-1]

    def time_ratio(self) -> float:
        if len(self.cell_norms) >= 2:
            last = float(self.cell_norms[-1])
            return float(self.cell_norms[0]) / last if last > 0 else math.nan
        if "g_out" in self.rnn:
            return _unrolled_ratio(self.rnn)
        return math.nan


def _unrolled_ratio(r: dict[str, Any]) -> float:
    """‖∂L/∂h_0‖ / ‖∂L/∂h_{T−1}‖ of a one-layer nn.RNN, re-run in Python with the weights of that step."""
    mod: nn.RNN = r["mod"]
    w_ih, w_hh, *rest = [w.requires_grad_() for w in r["w"]]
    b_ih, b_hh = rest if rest else (0.0, 0.0)
    x = r["x"].transpose(0, 1) if mod.batch_first else r["x"]  # (T, B, in)
    h = r["hx"][0] if r["hx"] is not None else x.new_zeros(x.shape[1], mod.hidden_size)
    states = []
    with torch.enable_grad():
        for t in range(x.shape[0]):
            pre = x[t] @ w_ih.T + b_ih + h @ w_hh.T + b_hh  # (B, H): Elman's recurrence, as nn.RNN
            h = torch.tanh(pre) if mod.mode == "RNN_TANH" else torch.relu(pre)
            h.retain_grad()
            states.append(h)
        out = torch.stack(states, 1 if mod.batch_first else 0)
        surrogate = (out * r["g_out"]).sum() + (states[-1] * r.get("g_h", torch.zeros(1, *h.shape))[0]).sum()
        surrogate.backward()
    first, last = states[0].grad, states[-1].grad
    if first is None or last is None or float(last.norm()) == 0:
        return math.nan
    return float(first.double().norm() / last.double().norm())


def measure(make: Callable[[int], Any], seed: int, steps: int) -> Truth:
    """Train ``make(seed)`` for ``steps`` steps with plain hooks; what the run shows."""
    torch.manual_seed(seed)
    trial = make(seed)
    probe = _Probe(trial.model)
    truth = Truth()
    totals: list[float] = []
    zero = True
    params = [p for p in trial.model.parameters() if p.requires_grad]
    try:
        for step in range(steps):
            probe.sampling = step % EVERY == 0 or step == steps - 1
            probe.begin()
            loss = float(trial.step())
            truth.losses.append(loss)
            grads = [p.grad for p in params if p.grad is not None]
            total = float(torch.sqrt(sum((g.double() ** 2).sum() for g in grads))) if grads else 0.0
            zero = zero and total == 0.0
            if truth.nonfinite_step is None and not (math.isfinite(loss) and math.isfinite(total)):
                truth.nonfinite_step = step
            if truth.nonfinite_step is None:
                totals.append(total)
                if probe.sampling:
                    truth.depth.append(probe.depth_ratio())
                    truth.time.append(probe.time_ratio())
        truth.time = truth.time if any(not math.isnan(x) for x in truth.time) else []
        truth.depth = truth.depth if any(not math.isnan(x) for x in truth.depth) else []
        if trial.evaluate is not None and truth.nonfinite_step is None:
            truth.score = float(trial.evaluate(trial.model))
    finally:
        probe.close()
    if totals:
        early = statistics.median(totals[: max(1, min(5, len(totals)))])  # the first 5 steps
        truth.grad_growth = max(totals) / early if early > 0 else math.nan
        end = statistics.median(totals[-max(1, len(totals) // 5):])  # the last fifth
        truth.grad_decay = end / early if early > 0 else math.nan
    for name, fracs in probe.fractions.items():
        value = statistics.median(fracs[len(fracs) // 2:] or fracs)  # the second half of the run
        if name in probe.saturating:
            truth.saturated = max(truth.saturated, value)
        else:
            truth.dead = max(truth.dead, value)
    truth.zero_grad = zero
    return truth
