"""``gw.check``: will this network train? Signal propagation and Jacobian spectra before training.

One forward and one backward pass on an example batch, in the mode training
runs (BatchNorm normalises with the batch's statistics) but with dropout off,
measure the forward signal (each layer's output mean/std, saturated and dead
units) and the backward signal (‖∂L/∂a‖ at each layer's output, with the given
loss or a random Gaussian cotangent at the output). Per-sample input–output
Jacobians give the spectrum; with BatchNorm a sample's output depends on the
rest of the batch, so its Jacobian is taken with the other samples held fixed.
Nothing about the model changes: gradients are taken with
``torch.autograd.grad`` (no ``.grad`` is written), BatchNorm runs with
``track_running_stats`` off (its running statistics and ``num_batches_tracked``
are not touched), the RNG state is restored, and every module's ``training``
flag is put back.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor, nn

from gradwatch._errors import bad_argument
from gradwatch.diagnosis.findings import layer_name, sci, span
from gradwatch.diagnosis.measures import (
    Between, Cause, affected_upto, cause_split, depth_ratio, depth_verdict, layers_per_halving, pascanu, pascanu_gamma,
)
from gradwatch.diagnosis.remedies import remedies
from gradwatch.diagnosis.thresholds import Thresholds
from gradwatch.layers import anatomy
from gradwatch.probes import activations as act_probe
from gradwatch.probes.backprop import grad_tensors
from gradwatch.spectrum import SpectrumSummary, full_spectrum, lanczos_extremes, summarize, top_singular_value

FULL_SPECTRUM_UP_TO = 1024  # min(input, output) size per sample up to which every singular value is computed


@dataclass(frozen=True)
class LayerCheck:
    """One layer on the example batch."""

    name: str
    module: str
    out_mean: float  # mean of the layer's output
    out_std: float  # its standard deviation: the forward signal
    activation: str  # the activation module after the layer, if any
    saturated: float  # that activation's saturated fraction (bounded units)
    dead: float  # its dead fraction (ReLU-likes)
    deriv_rms: float  # its rms derivative
    out_grad_norm: float  # ‖∂L/∂a‖ at the layer's output: the backward signal (NaN: no gradient reached it)
    weight_grad_norm: float  # ‖∂L/∂W‖ of its own parameters
    gain: float  # out_grad_norm over the next layer's: what the next layer (and activation) does to the gradient


@dataclass(frozen=True)
class RecurrentCheck:
    """Pascanu et al. (2013) for one recurrent weight matrix."""

    name: str  # e.g. "rnn.weight_hh_l0"
    cell: str  # RNN_TANH, RNN_RELU, LSTM, GRU
    lambda1: float  # largest singular value of W_hh
    gamma: float  # bound on the activation's derivative (NaN for gated cells)
    verdict: str  # Pascanu's, in words
    condition: str = ""  # which of Pascanu's conditions holds: "vanishing", "exploding" or "none" (gated cell)


@dataclass(frozen=True)
class SpectrumCheck:
    """Singular values of per-sample input–output Jacobians."""

    method: str
    samples: int
    summary: SpectrumSummary
    singular_values: Tensor | None  # all of them, pooled over samples (full method only)
    tolerance: str


@dataclass
class CheckReport:
    """What ``gw.check`` found. Its ``str`` is the report."""

    verdict: str  # "trainable", "vanishing" or "exploding"
    reasons: list[str]
    remedies: tuple[str, ...]
    ratio: float  # ‖∂L/∂a‖ at the first layer over the last
    per_layer: float  # the fitted factor per layer (towards the input)
    layers: list[LayerCheck]
    spectrum: SpectrumCheck | None
    recurrent: list[RecurrentCheck] = field(default_factory=list)
    objective: str = ""
    mode: str = ""  # how the forward pass ran: dropout, BatchNorm
    cause: Cause | None = None  # why the gradient vanishes or explodes across depth, as diagnose judges it

    def _repr_html_(self) -> str:
        """In a notebook: the verdict, its reasons and remedies, ‖∂L/∂a‖ against depth, and the per-layer table."""
        import html

        import numpy as np

        from gradwatch.plots import depth_profile
        from gradwatch.store import Series

        e = html.escape
        rows = "".join(
            f"<tr><td>{e(layer_name(l.name))}</td><td>{e(l.module)}</td><td>{sci(l.out_std)}</td>"
            f"<td>{e(l.activation)}</td><td>{'–' if l.out_grad_norm != l.out_grad_norm else sci(l.out_grad_norm)}</td>"
            f"<td>{'' if l.gain != l.gain else '×' + sci(l.gain)}</td></tr>" for l in self.layers)
        figure = ""
        if self.layers:
            out = Series("out_grad_norm", [l.name for l in self.layers], np.zeros(1, dtype=np.int64),
                         np.array([[l.out_grad_norm] for l in self.layers]))
            figure = f"<figure>{depth_profile(out, None, title='‖∂L/∂a‖ on the example batch', legend=False)}</figure>"
        remedies = f"<p>remedies: {e('; '.join(self.remedies))}</p>" if self.remedies else ""
        return (f"<div><h3>gw.check: {e(self.verdict.upper())}</h3><ul>{''.join(f'<li>{e(r)}</li>' for r in self.reasons)}"
                f"</ul>{remedies}<p>backward signal: {e(self.objective)}{'; ' + e(self.mode) if self.mode else ''}</p>"
                f"{figure}<table><tr><th>layer</th><th>module</th><th>out std</th><th>activation</th><th>‖∂L/∂a‖</th>"
                f"<th>gain</th></tr>{rows}</table></div>")

    def __str__(self) -> str:
        lines = [f"gw.check: {self.verdict.upper()}"]
        lines += [f"  - {r}" for r in self.reasons]
        if self.remedies:
            lines.append("  remedies: " + "; ".join(self.remedies))
        lines.append("")
        lines.append(f"backward signal: {self.objective}")
        if self.mode:
            lines.append(f"note: {self.mode}")
        head = f"{'layer':<24} {'module':<14} {'out std':>8} {'activation':<16} {'‖∂L/∂a‖':>9} {'gain':>7}"
        lines += [head, "-" * len(head)]
        for l in self.layers:
            act = l.activation
            if l.saturated == l.saturated:
                act += f" sat {l.saturated:.0%}"
            elif l.dead == l.dead:
                act += f" dead {l.dead:.0%}"
            lines.append(f"{layer_name(l.name)[:24]:<24} {l.module[:14]:<14} {sci(l.out_std):>8} {act[:16]:<16} "
                         f"{'–' if l.out_grad_norm != l.out_grad_norm else sci(l.out_grad_norm):>9} "
                         f"{'' if l.gain != l.gain else '×' + sci(l.gain):>7}")
        if self.spectrum is not None:
            s = self.spectrum.summary
            lines += ["", f"input–output Jacobian ({self.spectrum.method}, {self.spectrum.samples} samples; "
                          f"{self.spectrum.tolerance}):",
                      f"  σ_max {sci(s.sigma_max)}, σ_min {sci(s.sigma_min)}, spread {sci(s.spread)}, "
                      f"mean σ² {sci(s.mean_sq)}, isometry gap (rms ln σ) {sci(s.isometry_gap)}"]
        for r in self.recurrent:
            lines.append(f"recurrent {r.name} ({r.cell}): λ₁ = {r.lambda1:.3g} — {r.verdict}")
        return "\n".join(lines)


def _first_tensor(out: Any) -> Tensor:
    if isinstance(out, Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    raise TypeError(
        f"`check(model=…)`: the model's output must be a tensor, or a tuple whose first element is one; "
        f"got {type(out).__name__} (pass loss_fn=… to reduce it yourself)"
    )


def _recurrent(model: nn.Module) -> list[RecurrentCheck]:
    """Pascanu's verdict on every recurrent weight matrix W_hh of the model."""
    found = []
    for name, m in model.named_modules():
        if not isinstance(m, nn.RNNBase):
            continue
        for pname, w in m.named_parameters(recurse=False):
            if not pname.startswith("weight_hh"):
                continue
            lam = float(torch.linalg.svdvals(w.detach().double())[0])
            gamma = pascanu_gamma(m.mode)
            said = pascanu(lam, gamma)
            found.append(RecurrentCheck(f"{name}.{pname}" if name else pname, m.mode, lam,
                                        math.nan if gamma is None else gamma, said.words, said.key))
    return found


def _spectrum(model: nn.Module, x: Tensor, samples: int, in_batch: bool) -> SpectrumCheck:
    with warnings.catch_warnings():
        # torch.func falls back to a loop for ops without a batching rule (attention, fused RNNs) and says so
        warnings.filterwarnings("ignore", message="There is a performance drop")
        return _spectrum_of(model, x, samples, in_batch)


def _sample_fn(model: nn.Module, x: Tensor, i: int, in_batch: bool) -> Callable[[Tensor], Tensor]:
    """Sample i's flattened output as a function of its input: alone, or in its batch with the others fixed.

    Batch statistics (BatchNorm in train mode) couple the samples, so there ``∂f_i/∂x_i`` is taken within
    the batch; a net without them gives the same Jacobian from a batch of one, at a batch's fraction of the cost.
    """
    if not in_batch:
        return lambda xi: _first_tensor(model(xi.unsqueeze(0))).reshape(-1)
    before, after = x[:i], x[i + 1:]
    return lambda xi: _first_tensor(model(torch.cat([before, xi.unsqueeze(0), after])))[i].reshape(-1)


_IN_BATCH = "; each sample within its batch, the rest held fixed: BatchNorm couples them"


def _spectrum_of(model: nn.Module, x: Tensor, samples: int, in_batch: bool) -> SpectrumCheck:
    n = min(samples, x.shape[0])
    fns = [_sample_fn(model, x, i, in_batch) for i in range(n)]
    with torch.no_grad():
        m_out = fns[0](x[0]).numel()
    size = min(m_out, x[0].numel())
    if size <= FULL_SPECTRUM_UP_TO:
        try:
            svs = [full_spectrum(fns[i], x[i]) for i in range(n)]
            method = "every singular value, torch.func.jacrev/jacfwd"
        except Exception as exc:  # noqa: BLE001 - torch.func cannot trace every model; say so and use autograd
            svs = []
            for i in range(n):
                jac = torch.autograd.functional.jacobian(fns[i], x[i].detach())
                svs.append(torch.linalg.svdvals(jac.reshape(m_out, -1).double()))
            method = f"every singular value, torch.autograd.functional.jacobian (torch.func failed: {type(exc).__name__})"
        sv = torch.cat(svs)
        method += _IN_BATCH if in_batch else ""
        return SpectrumCheck(method, n, summarize(sv), sv, "exact up to float64 SVD")
    tops, lows, errs = [], [], []
    for i in range(n):
        top = top_singular_value(fns[i], x[i], tol=1e-5)
        ext = lanczos_extremes(fns[i], x[i], k=64)
        tops.append(top.sigma_max)
        lows.append(ext.sigma_min)
        errs.append(max(top.error, ext.min_error))
    s = SpectrumSummary(math.nan, max(tops) / min(lows) if min(lows) > 0 else math.inf, math.nan, max(tops), min(lows))
    return SpectrumCheck("σ_max by power iteration, σ_min by 64-step Lanczos" + (_IN_BATCH if in_batch else ""),
                         n, s, None,
                         f"power iteration to a residual of 1e-5·λ; largest error bound {sci(max(errs))}")


def _validate(model: Any, example_input: Any, loss_fn: Any, target: Any, samples: Any, thresholds: Any) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(bad_argument("check", "model", "a torch.nn.Module", model))
    if not isinstance(example_input, Tensor):
        raise TypeError(bad_argument("check", "example_input", "a tensor whose first dimension is the batch", example_input))
    if example_input.dim() == 0 or example_input.shape[0] == 0:
        raise ValueError(bad_argument("check", "example_input", "a batch of at least one sample", tuple(example_input.shape)))
    if loss_fn is not None and not callable(loss_fn):
        raise TypeError(bad_argument("check", "loss_fn", "a callable (output, target) -> scalar, or None", loss_fn))
    if target is not None and loss_fn is None:
        raise ValueError("`check(target=…)` needs loss_fn=…: without a loss, a random cotangent drives the backward pass")
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 0:
        raise ValueError(bad_argument("check", "samples", "a non-negative int (0: no Jacobian spectrum)", samples))
    if thresholds is not None and not isinstance(thresholds, Thresholds):
        raise TypeError(bad_argument("check", "thresholds", "a gradwatch.Thresholds or None", thresholds))


def check(
    model: nn.Module,
    example_input: Tensor,
    *,
    loss_fn: Callable[..., Tensor] | None = None,
    target: Any = None,
    samples: int = 4,
    seed: int = 0,
    thresholds: Thresholds | None = None,
) -> CheckReport:
    """Will this network train? Measures signal propagation and Jacobian spectra at its current weights.

    The forward pass is the one training runs, made deterministic: BatchNorm normalises with the
    example batch's statistics, dropout is off (every other module in eval mode). The report says so.

    Args:
        model: the network, as it will start training.
        example_input: a batch (dimension 0 is the batch).
        loss_fn: ``loss_fn(output, target)`` (or ``loss_fn(output)`` without a
            target) drives the backward pass; without one, a Gaussian cotangent
            at the output does (seeded by ``seed``, outside the global RNG).
        target: the targets for ``loss_fn``.
        samples: how many samples' input–output Jacobians to take (0: none).
        seed: for the cotangent and the iterative methods' start vectors.
        thresholds: the cut-offs of the verdict (those of the diagnosis).
    """
    _validate(model, example_input, loss_fn, target, samples, thresholds)
    th = thresholds or Thresholds()
    parts = anatomy(model)
    modes = {m: m.training for m in model.modules()}
    # BatchNorm as training runs it: batch statistics. With track_running_stats off it neither reads nor
    # writes running_mean/var nor counts num_batches_tracked; everything else (dropout) is in eval mode.
    batch_norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    tracking = {bn: bn.track_running_stats for bn in batch_norms}
    mode = "dropout off; BatchNorm uses batch statistics, as in training" if batch_norms else "dropout off"
    outputs: dict[str, list[Tensor]] = {}
    acts: dict[str, list[tuple[float, act_probe.CallStats]]] = {}
    order: list[tuple[str, str]] = []
    names = {l.module: l.name for l in parts.layers}
    act_names = {a.module: a for a in parts.activations}

    def on_layer(module: nn.Module, args: tuple, out: Any) -> None:
        name = names[module]
        if name not in outputs:
            order.append((name, "layer"))
        outputs.setdefault(name, []).extend(grad_tensors(out))

    def on_act(module: nn.Module, args: tuple, out: Any) -> None:
        a = act_names[module]
        x = act_probe.first_tensor(args)
        if a.name not in acts:
            order.append((a.name, "activation"))
        if x is not None and isinstance(out, Tensor) and out.numel():
            acts.setdefault(a.name, []).append((float(out.numel()), act_probe.call_stats(a.spec, module, x, out)))

    handles = [l.module.register_forward_hook(on_layer) for l in parts.layers]
    handles += [a.module.register_forward_hook(on_act) for a in parts.activations]
    devices = [example_input.device] if example_input.device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            model.eval()
            for bn in batch_norms:
                bn.train()
                bn.track_running_stats = False
            x = example_input.detach().clone()
            with torch.enable_grad():
                try:
                    out = model(x)
                except ValueError as exc:
                    if batch_norms and "more than 1 value per channel" in str(exc):
                        raise ValueError(
                            f"`check(example_input=…)`: BatchNorm normalises with the batch's statistics, as in "
                            f"training, and needs more than one value per channel; got a batch of shape "
                            f"{tuple(x.shape)} (pass at least 2 samples)") from None
                    raise
                in_batch = bool(batch_norms) and _batch_first(out, x.shape[0])
                if loss_fn is not None:
                    objective = loss_fn(out, target) if target is not None else loss_fn(out)
                    what = "the given loss"
                else:
                    y = _first_tensor(out)
                    g = torch.Generator(device="cpu").manual_seed(seed)
                    v = torch.randn(y.shape, generator=g, dtype=y.dtype).to(y.device)
                    objective = (y * v).sum()
                    what = "a Gaussian cotangent at the output (no loss given)"
                for h in handles:
                    h.remove()
                handles = []
                layer_names = [n for n, k in order if k == "layer"]
                flat = [t for n in layer_names for t in outputs[n]]
                params: list[Tensor] = [p for l in parts.layers for _, p in l.params]
                grads = torch.autograd.grad(objective, flat + params, allow_unused=True)
            spectrum = None
            if samples and x.is_floating_point():
                spectrum = _spectrum(model, x, samples, in_batch)
    finally:
        for h in handles:
            h.remove()
        for m, was_training in modes.items():
            m.training = was_training
        for bn, tracked in tracking.items():
            bn.track_running_stats = tracked

    # ‖∂L/∂a‖ per layer (pooling several outputs or calls), then ‖∂L/∂W‖ per layer: consecutive runs of `grads`.
    # An output no gradient reached is unmeasured (NaN), as in a watched run, where its hook never fires.
    n_out = len(layer_names)
    counts = [len(outputs[n]) for n in layer_names] + [len(l.params) for l in parts.layers]
    pooled_norms = _root_sum_squares(grads, counts, [math.nan] * n_out + [0.0] * len(parts.layers))
    out_norm = dict(zip(layer_names, pooled_norms[:n_out]))
    w_norm = dict(zip([l.name for l in parts.layers], pooled_norms[n_out:]))
    act_stats = {}
    if acts:
        idx = list(acts)
        _, pooled = act_probe.combine({i: acts[n] for i, n in enumerate(idx)})
        act_stats = {n: pooled[i].tolist() for i, n in enumerate(idx)}
    act_of = {a.name: a for a in parts.activations}
    depth = {key: d for d, key in enumerate(order)}
    rows, between = [], []
    for i, n in enumerate(layer_names):
        nxt = depth[(layer_names[i + 1], "layer")] if i + 1 < len(layer_names) else math.inf
        after = [a for a, kind in order if kind == "activation" and depth[(n, "layer")] < depth[(a, kind)] < nxt]
        seen = []
        for a in after:  # stats: mean, std, saturated or dead fraction (by family), rms derivative
            stats, fam = act_stats.get(a, [math.nan] * 4), act_of[a].spec.family
            seen.append(Between(a, type(act_of[a].module).__name__, stats[3],
                                stats[2] if fam == "bounded" else math.nan, stats[2] if fam == "relu" else math.nan))
        between.append(seen)
        t = torch.cat([o.detach().double().reshape(-1) for o in outputs[n]]) if outputs[n] else torch.zeros(1)
        gain = out_norm[n] / out_norm[layer_names[i + 1]] if i + 1 < len(layer_names) and out_norm[layer_names[i + 1]] > 0 else math.nan
        module = type(next(l.module for l in parts.layers if l.name == n)).__name__
        first = seen[0] if seen else Between("", "", math.nan)
        rows.append(LayerCheck(n, module, float(t.mean()), float(t.std(correction=0)), first.module,
                               first.saturated, first.dead, first.deriv_rms, out_norm[n], w_norm[n], gain))
    recurrent = _recurrent(model)
    report = _verdict(rows, between, spectrum, recurrent, th, what)
    report.mode = mode
    return report


def _batch_first(out: Any, n: int) -> bool:
    """Whether the model's (first) output has the batch as its first dimension."""
    try:
        y = _first_tensor(out)
    except TypeError:
        return False
    return y.dim() > 0 and y.shape[0] == n


def _root_sum_squares(grads: tuple[Tensor | None, ...], counts: list[int], unreached: list[float]) -> list[float]:
    """√(Σ‖g‖²) over each consecutive run of ``counts[i]`` gradients (None: no gradient reached it);
    ``unreached[i]`` where none of the run's was reached."""
    out, k = [], 0
    for n, none in zip(counts, unreached):
        got = [g for g in grads[k : k + n] if g is not None]
        out.append(math.sqrt(sum(float(g.double().norm()) ** 2 for g in got)) if got else none)
        k += n
    return out


def _verdict(rows: list[LayerCheck], between: list[list[Between]], spectrum: SpectrumCheck | None,
             recurrent: list[RecurrentCheck], th: Thresholds, objective: str) -> CheckReport:
    """The verdict across depth and through time; ``between[i]``: the activations after layer i, before layer i+1."""
    g = np.array([r.out_grad_norm for r in rows])
    measured = [i for i in range(len(g)) if not math.isnan(g[i])]
    ratio = depth_ratio(g)
    if ratio is None:  # one measured layer is its own first and last; a last layer without gradient gives none
        ratio = 1.0 if len(measured) <= 1 else math.nan
    k = layers_per_halving(g) if len(rows) > 1 else None
    per_layer = 2 ** (-1 / k) if k else 1.0
    verdict = depth_verdict(ratio if math.isfinite(ratio) else None, th)
    names = [layer_name(r.name) for r in rows]
    reasons: list[str] = []
    fixes: tuple[str, ...] = ()
    cause = None
    if verdict == "trainable":
        reasons.append(f"the gradient reaching layer {names[0] if names else '?'} is {sci(ratio)}× the last layer's: "
                       f"within [{th.vanish_below:g}, {th.explode_above:g}]")
    else:
        vanishing = verdict == "vanishing"
        reasons.append(f"the gradient reaching layer {names[0]} is {sci(ratio)}{' of' if vanishing else '×'} the last "
                       f"layer's (×{sci(per_layer)} per layer towards the input)")
        # The cause over the affected stretch, between consecutive measured layers, as diagnose splits it.
        prof = g[measured]
        upto = affected_upto(prof / prof[-1], vanishing, th)
        pairs = [[b for i in range(measured[j], measured[j + 1]) for b in between[i]]
                 for j in range(min(upto + 1, len(measured) - 1))]
        cause = cause_split(prof[: len(pairs) + 1], pairs, th, vanishing)
        reasons.append(_cause_reason(cause))
        fixes = remedies(*cause.remedy_keys)
    for r in recurrent:
        if r.cell.startswith("RNN_") and r.condition == "vanishing":
            verdict = "vanishing" if verdict == "trainable" else verdict
            reasons.append(f"{r.name}: {r.verdict} (through time)")
            fixes = fixes or remedies("orthogonal_init", "clip_norm")
        elif r.cell.startswith("RNN_"):
            reasons.append(f"{r.name}: {r.verdict}")
    if spectrum is not None:
        s = spectrum.summary
        reasons.append(f"input–output Jacobian: σ from {sci(s.sigma_min)} to {sci(s.sigma_max)}"
                       + (f", mean σ² {sci(s.mean_sq)}" if s.mean_sq == s.mean_sq else ""))
    return CheckReport(verdict, reasons, fixes, float(ratio), float(per_layer), rows, spectrum, recurrent,
                       objective, cause=cause)


def _cause_reason(cause: Cause) -> str:
    """The cause as a reason in the check's report: its own words, after which factor explains a decay."""
    lead = {"activation": "the activations' derivative", "weights": "the weights' gain"}.get(cause.key)
    return f"{lead} explains most of the decay; {cause.words}" if lead and cause.vanishing else cause.words
