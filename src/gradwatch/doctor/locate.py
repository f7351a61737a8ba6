"""Where the first NaN/Inf of a set-up is made: the operation and the line of the user's code.

A NaN from the first step is most often the user's own arithmetic — a square root of a distance that is exactly
0 (finite forward, infinite gradient), a ``torch.where`` whose unused branch is NaN (its gradient is not
masked), a log of a softmax that underflowed to 0, a variance of 0 divided by. No remedy the doctor can apply
reaches that code, so the most useful answer is its address. :func:`locate_nonfinite` trains a fresh trial
step by step up to the step the baseline went non-finite, watching two things:

- the forward pass and the optimizer step, under a :class:`torch.overrides.TorchFunctionMode`: the first
  operation of the step that went non-finite whose floating-point output holds a NaN/Inf while every tensor it
  was given was finite, and no argument was an infinity itself (an attention mask filled with −inf is meant);
  or, failing that, whose output holds a NaN while no tensor it was given held one (a softmax over a row that is
  −inf throughout: a fully masked attention row, round 16; inf − inf; 0·inf);
- the backward pass, under ``torch.autograd.detect_anomaly(check_nan=True)``: the first backward function that
  returns NaN, with the forward call that created it.

Each is reported at the innermost frame outside torch and gradwatch: the user's line.
"""

from __future__ import annotations

import math
import os
import re
import traceback
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch.overrides import TorchFunctionMode

from gradwatch.remedies.structure import RECIPROCALS, VARIANCES
from gradwatch.trial import Trial, peek

# a layer's products: an Inf they make from finite inputs is an overflow of values grown too large
PRODUCTS = frozenset({"linear", "bilinear", "matmul", "mm", "bmm", "addmm", "baddbmm", "einsum", "conv1d", "conv2d",
                      "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d"})

_OURS = (os.path.dirname(torch.__file__), os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@dataclass(frozen=True)
class Origin:
    """The first non-finite value of a run: at which step, in which pass, made by which operation, where."""

    step: int
    # "forward" (forward, loss and optimizer step, as the trial's step() runs them), "backward", or "input" (the
    # batch the step read held NaN/Inf already: ``op`` says how many of its entries)
    phase: str
    op: str  # the torch function (forward) or the backward function (``SqrtBackward0``)
    # "file.py:123" of the user's code; words where torch's own code, as the default Trial.step() calls it, made the
    # value (the set-up's model or loss_fn); "" when no frame outside torch was found
    where: str
    code: str  # that line's source, stripped
    from_inf: bool = False  # forward: a NaN made from inputs that held ±inf but no NaN (else from finite inputs)
    nan: bool = False  # forward, from finite inputs: the value made holds a NaN (0/0), not only ±inf (1/0)
    inf_factor: bool = False  # forward: a NaN made from finite tensors and an argument ±inf itself (0·(−inf))
    negative_base: bool = False  # forward: a NaN made by a power of a negative base to a non-integer exponent

    @property
    def overflowed(self) -> bool:
        """A product of a layer (linear, matmul, convolution) that made an Inf from finite inputs: an overflow of
        values grown too large, not an operation undefined at its input (round 29: a cross-entropy summed over a
        batch of 256 diverged, and ``torch._C._nn.linear`` was told as a line to mend)."""
        return self.phase == "forward" and not self.from_inf and self.op.rpartition(".")[2] in PRODUCTS

    def __str__(self) -> str:
        if self.phase == "input":
            return (f"the first NaN/Inf is in the inputs: the batch of step {self.step} holds {self.op} that are NaN "
                    f"or Inf (missing values), which every layer passes on — impute or drop them before training")
        at = "" if not self.where else f" at {self.where}" if self.where[-1].isdigit() else f" in {self.where}"
        line = f" (`{self.code}`)" if self.code else ""
        if self.phase == "backward":
            return (f"the first NaN is made in the backward pass of {self.op} at step {self.step}, created{at}{line}: "
                    f"its gradient there is not finite{singular_words(self.op)}")
        if self.from_inf and "softmax" in self.op:
            return (f"the first NaN is made by {self.op}{at}{line} at step {self.step}, from inputs holding −inf but "
                    f"no NaN: a row that is −inf throughout (every key masked) has no softmax; give every row one "
                    f"entry it may keep (a [CLS] token never masked), or mask with a large finite negative "
                    f"(torch.finfo(dtype).min) in place of −inf")
        if self.from_inf:
            return (f"the first NaN is made by {self.op}{at}{line} at step {self.step}, from inputs holding ±inf but "
                    f"no NaN (inf − inf, 0·inf)")
        if self.inf_factor:
            # round 46: a key-padding mask applied as s·m + (1 − m)·float('-inf') (cerebroai/reformers#3): every kept
            # score 0·(−inf), NaN from step 0; the NaN was placed at the cross-entropy's backward
            return (f"the first NaN is made by {self.op}{at}{line} at step {self.step}, from finite tensors and an "
                    f"argument that is ±inf itself: 0·(−inf) is NaN — a mask applied by multiplying, (1 − m)·(−inf), "
                    f"is NaN wherever m = 1; fill in place of multiplying (scores.masked_fill(m == 0, float('-inf'))) "
                    f"or multiply by a large finite negative (torch.finfo(dtype).min, −1e9)")
        made = f"the first NaN/Inf is made by {self.op}{at}{line} at step {self.step}, from finite inputs"
        if self.op.rpartition(".")[2] in ("log", "log2", "log10"):
            made += (": the logarithm of an entry that is 0 — a probability or density computed outside log space "
                     "that underflowed, or 1 − p where p rounded to 1 — is −inf (and 0·log 0 is NaN) — compute it in log space: torch.logsumexp over log-densities (a mixture's "
                     "likelihood), F.log_softmax, F.logsigmoid, torch.log1p")
        if self.overflowed:
            made += (": a layer's product overflowed the float range, as it does once the weights or the inputs "
                     "have grown without bound — the divergence the findings name, not a line to mend")
        if self.op.rpartition(".")[2] == "_weight_norm" and self.nan:
            made += (": weight normalisation, g·v/‖v‖, of a weight with rows at 0 is 0/0 — initialise the layer "
                     "before wrapping it (to start it at 0, zero g alone)")
        elif self.op.rpartition(".")[2] in VARIANCES and self.nan:
            # round 36: EvoNorm-B0's instance std by torch.var over a 1×1 map, whose line alone was named
            made += (": a variance over a single element with Bessel's correction (n − 1, torch.var's and "
                     "torch.std's default) is 0/0 — pass correction=0 (unbiased=False), or reduce over more elements")
        elif self.negative_base:
            # round 49: a Tweedie loss, μ^(1−p)/(1−p) at p = 1.5, on a raw linear output (discuss.pytorch.org/t/76349),
            # NaN from step 0 — 47 of 64 outputs negative, none 0 — was told "0/0 … clamp the divisor"
            made += (": a negative number to a non-integer power is NaN (μ^(−0.5) of μ < 0) — keep the base "
                     "positive: a mean through exp or softplus (a Tweedie or Poisson μ = exp(f(x)), as a log link "
                     "gives), or clamp it (μ.clamp(min=1e-6)) before the power")
        elif self.op.rpartition(".")[2] in RECIPROCALS and self.nan:
            # round 35: a masked mean written by hand, sum(l·m) / m.sum(), on a batch with no labelled token
            # round 40: a batch norm written by hand without eps, (x − μ)/σ over a feature that is 0 on the batch
            made += (": 0/0 is NaN — a sum divided by a count or a norm that is 0 on this batch: a mean over a "
                     "mask with no entry (sum(l·m) / m.sum()), or a standardisation (x − μ)/σ without an eps over a "
                     "feature constant on the batch — clamp the divisor away from 0 (m.sum().clamp(min=1), "
                     "σ + eps or √(σ² + eps)), or skip a batch with nothing to average")
        elif self.op.rpartition(".")[2] in RECIPROCALS:
            made += (": 1/x of an entry that is 0 (a power with a negative exponent, rsqrt, a division) is ±inf — "
                     "set those entries to 0 after it (pygcn's r_inv[isinf(r_inv)] = 0), clamp the base away from "
                     "0, or, for a graph's degree, add self-loops (Kipf & Welling's Ã = A + I)")
        return made


# Backward functions whose derivative is infinite or undefined at some inputs, and the words for each (round 32: the
# NaN of a whitening's torch.linalg.eigh of a rank-deficient covariance, and of an arccos of a Gram matrix's diagonal,
# were both given "keep the arguments of sqrt off 0 … take logarithms in log space" alone).
SINGULAR_BACKWARDS = (
    (("LinalgEighBackward", "LinalgEigBackward", "LinalgSvdBackward", "SvdBackward", "SymeigBackward",
      "LinalgEigvalshBackward"),
     "an eigen- or singular-vector gradient divides by the gaps between eigenvalues, 1/(λᵢ − λⱼ), infinite where two "
     "are equal, as the repeated zero eigenvalues of a rank-deficient matrix (a covariance of fewer samples than "
     "features) are: add εI to the matrix before the decomposition, or use one whose gradient needs no gaps (a "
     "Cholesky factor, Newton–Schulz iterations)"),
    (("AcosBackward", "AsinBackward"),
     "acos and asin have the derivative ∓1/√(1 − x²), infinite at ±1 (a vector's cosine with itself is 1, and a clamp "
     "to [−1, 1] keeps it there): leave those entries out before the call (mask the diagonal), or clamp to "
     "±(1 − 1e-6)"),
    (("SqrtBackward", "NormBackward", "LinalgVectorNormBackward", "PowBackward", "CdistBackward"),
     "a square root, a norm or a power below 1 has an infinite derivative at 0: keep its argument off 0 (+ 1e-8, or "
     "the squared distance), or leave those entries out before the call, not after it"),
)


def singular_words(op: str) -> str:
    """The words for the backward function ``op`` (``LinalgEighBackward0``) from :data:`SINGULAR_BACKWARDS`, after a
    dash; '' for one not listed."""
    for names, words in SINGULAR_BACKWARDS:
        if op.startswith(names):
            return f" — {words}"
    return ""


def _user_frame(frames: list[traceback.FrameSummary]) -> tuple[str, str]:
    """The innermost frame outside torch and gradwatch: ("file.py:123", its code). Where the innermost one outside
    torch is the default :meth:`gradwatch.Trial.step`, no line of the user's made the value — torch's own modules
    or a torch function given as ``loss_fn`` did, as the trial called them (round 15: ``F.mse_loss`` as the loss
    was placed at the line that called ``gw.doctor``): the words say which."""
    for i in range(len(frames) - 1, -1, -1):
        f = frames[i]
        path = os.path.abspath(f.filename)
        if "<frozen" in f.filename or path.startswith(_OURS[0]):
            continue
        if path.startswith(_OURS[1]):
            if f.name == "step" and os.path.basename(path) == "trial.py":
                in_module = any(os.sep + os.path.join("nn", "modules") + os.sep in g.filename for g in frames[i + 1:])
                return ("the set-up's model (torch's own modules, run by gradwatch's Trial.step())" if in_module
                        else "the set-up's loss_fn (called by gradwatch's Trial.step())"), ""
            continue
        return f"{os.path.basename(f.filename)}:{f.lineno}", (f.line or "").strip()
    return "", ""


def _floats(values: Any) -> list[torch.Tensor]:
    if isinstance(values, torch.Tensor):
        return [values] if values.is_floating_point() or values.is_complex() else []
    if isinstance(values, (tuple, list)):
        return [t for v in values for t in _floats(v)]
    if isinstance(values, dict):
        return [t for v in values.values() for t in _floats(v)]
    return []


def _infinite_argument(values: Any) -> bool:
    """An argument that is an infinity or NaN itself (``masked_fill(mask, -inf)``): a non-finite output is meant."""
    if isinstance(values, float):
        return not math.isfinite(values)
    if isinstance(values, (tuple, list)):
        return any(_infinite_argument(v) for v in values)
    if isinstance(values, dict):
        return any(_infinite_argument(v) for v in values.values())
    return False


_POWERS = frozenset({"pow", "pow_", "__pow__", "__ipow__", "float_power"})


def _negative_base(func: Callable, args: tuple) -> bool:
    """Whether a power call raises a base with a negative entry to an exponent that is not an integer (a number, or a
    tensor with such an entry): NaN in real arithmetic."""
    if _name(func).rpartition(".")[2] not in _POWERS or len(args) < 2 or not isinstance(args[0], torch.Tensor):
        return False
    base, exponent = args[0], args[1]
    if isinstance(exponent, torch.Tensor):
        fractional = bool((exponent != torch.round(exponent)).any()) if exponent.is_floating_point() else False
    else:
        fractional = isinstance(exponent, float) and not float(exponent).is_integer()
    return fractional and base.is_floating_point() and bool((base < 0).any())


class _FirstNonFinite(TorchFunctionMode):
    """Records the first operation that makes a non-finite float tensor out of finite ones (and its user frame);
    failing that, the first that makes a NaN out of tensors without one (``from_inf``)."""

    def __init__(self) -> None:
        super().__init__()
        self.found: tuple[str, str, str] | None = None
        self.from_inf: tuple[str, str, str] | None = None  # the first NaN made from ±inf (no NaN given)
        self.found_nan = False  # the first value made from finite inputs holds a NaN (0/0), not only ±inf
        self.inf_factor = False  # ... made with an argument that is ±inf itself: 0·(−inf)
        self.negative_base = False  # ... made by a negative base to a non-integer power

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.found is None:
            infinite = _infinite_argument((args, kwargs))  # a mask filled with −inf: its ±inf is meant, a NaN not
            made = [t for t in _floats(out) if t.numel()]
            if made and not all(bool(torch.isfinite(t).all()) for t in made):
                given = [t for t in _floats((args, kwargs)) if t.numel()]
                nan = any(bool(torch.isnan(t).any()) for t in made)
                # (a NaN from an infinity times finite tensors: given none, a fill with NaN or inf is meant)
                if (not infinite or nan and bool(given)) and all(bool(torch.isfinite(t).all()) for t in given):
                    self.found = (_name(func), *_user_frame(traceback.extract_stack()[:-1]))
                    self.found_nan, self.inf_factor = nan, infinite
                    self.negative_base = nan and _negative_base(func, args)
                elif (not infinite and self.from_inf is None and any(bool(torch.isnan(t).any()) for t in made)
                      and not any(bool(torch.isnan(t).any()) for t in given)):
                    self.from_inf = (_name(func), *_user_frame(traceback.extract_stack()[:-1]))
        return out

    def origin(self, step: int) -> "Origin | None":
        """The forward origin found at ``step``: a value made from finite inputs first, else a NaN made from ±inf."""
        if self.found is not None:
            return Origin(step, "forward", *self.found, nan=self.found_nan, inf_factor=self.inf_factor,
                          negative_base=self.negative_base)
        if self.from_inf is not None:
            return Origin(step, "forward", *self.from_inf, from_inf=True)
        return None


def _name(func: Callable) -> str:
    """``torch.sqrt``, ``Tensor.div``, ``torch.nn.functional.softmax``: a torch function as users write it."""
    name = getattr(func, "__name__", None) or str(func)
    owner = (getattr(func, "__qualname__", "") or "").rpartition(".")[0]
    if owner in ("TensorBase", "Tensor", "_TensorBase"):
        return f"Tensor.{name}"
    module = getattr(func, "__module__", None)
    if module and module.startswith("torch.") and not owner:
        return f"{module}.{name}"
    return f"torch.{name}"


_ANOMALY = re.compile(r"Function '(\w+)' returned nan values")


def locate_nonfinite(setup: Callable[[int], Trial], seed: int, until: int) -> Origin | None:
    """Train ``setup(seed)`` for at most ``until`` + 1 steps, and return where its first NaN/Inf was made
    (None when no step made one, or the set-up's step() cannot be followed)."""
    trial = setup(seed)
    for step in range(until + 1):
        given = [t for b in peek(trial, 1) for t in _floats(b) if t.numel()]
        bad = sum(int((~torch.isfinite(t)).sum()) for t in given)
        if bad:
            return Origin(step, "input", f"{bad} of {sum(t.numel() for t in given)} entries", "", "")
        mode = _FirstNonFinite()
        caught: list[warnings.WarningMessage] = []
        try:
            with warnings.catch_warnings(record=True) as caught, torch.autograd.detect_anomaly(check_nan=True), mode:
                warnings.simplefilter("always")
                loss = trial.step()
        except RuntimeError as exc:
            hit = _ANOMALY.search(str(exc))
            if hit is None:
                raise
            found = mode.origin(step)
            if found is not None:  # the forward made it first; the backward only carried it on
                return found
            trace = "\n".join(str(w.message) for w in caught if "Traceback of forward call" in str(w.message))
            return Origin(step, "backward", hit.group(1), *_forward_line(trace))
        if not _went_nonfinite(trial, loss):
            continue  # an Inf made and absorbed (a mask built without an explicit inf): not the run's NaN
        found = mode.origin(step)
        if found is not None:
            return found
        return None  # non-finite, yet made by nothing the mode sees (a C++ extension): no address to give
    return None


def _went_nonfinite(trial: Trial, loss: Any) -> bool:
    """The step's loss, a gradient or a parameter is not finite."""
    if isinstance(loss, torch.Tensor) and not bool(torch.isfinite(loss).all()):
        return True
    for p in trial.model.parameters():
        if not bool(torch.isfinite(p).all()) or (p.grad is not None and not bool(torch.isfinite(p.grad).all())):
            return True
    return False


_FILE = re.compile(r'File "([^"]+)", line (\d+), in ([^\n]*)\n\s*([^\n]*)')


def _forward_line(trace: str) -> tuple[str, str]:
    """The innermost user frame of anomaly mode's "Traceback of forward call" text: ("file.py:123", code). The
    functions' names are read too: the default Trial.step() is told by its name (round 46: a cross-entropy that the
    default step called was placed at the line that called ``gw.doctor``)."""
    frames = [traceback.FrameSummary(f, int(n), name.strip(), line=code) for f, n, name, code in _FILE.findall(trace)]
    return _user_frame(frames)
