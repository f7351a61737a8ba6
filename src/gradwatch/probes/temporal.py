"""Gradients through time: ‖∂L/∂h_t‖ at every time step, and the one-step Jacobian norm.

``∂L/∂h_t`` here is the *total* derivative: every path from h_t to the loss,
through all later states, not only the direct one through that step's output.

PyTorch's fused ``nn.RNN``/``nn.GRU``/``nn.LSTM`` keep their per-step states
inside one kernel. On a sampled step the watch therefore re-runs the same
weights unrolled in Python, from the same input and initial state, and feeds
it the gradients that the real backward pass delivered to the module's
outputs (``output``, ``h_n``, ``c_n``); the unrolled graph then gives the
gradient at every hidden state. Cost: one more forward and backward pass of
the recurrent layers, step by step (slower than the fused kernel), on the
sampled steps only. Dropout between stacked layers is not re-applied (the
re-run uses the weights as in eval mode), and packed sequences and LSTM
projections (``proj_size``) are not supported.

The one-step Jacobian norm ‖∂h_{t+1}/∂h_t‖₂ (the state is (h, c) for an LSTM)
is estimated per sample by 20 batched power iterations on Jᵀ J, all time
steps at once, and averaged over (at most 8) samples of the batch. For a ReLU
``nn.RNN`` the re-run's states also give the share of hidden units that are 0
for every sample at every time step (``recurrent_dead_frac``): dead units,
which no module hook inside the fused kernel could see.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from gradwatch._errors import bad_argument
from gradwatch.probes.weakhook import WeakHook

POWER_ITERATIONS = 20
JACOBIAN_SAMPLES = 8


@dataclass
class LayerRun:
    """One layer and direction of an unrolled recurrent module."""

    name: str  # "l0", "l1_reverse", …
    inputs: list[Tensor]  # x_t fed to this layer, in its own time order, (B, D) each
    states: list[Tensor]  # s_0 … s_T in its own time order, (B, S) each: h, or (h, c) for an LSTM
    hidden: int  # H: the first H columns of a state are h
    step: Callable[[Tensor, Tensor], Tensor]  # (x (N, D), state (N, S)) -> next state (N, S)


def _weights(module: nn.RNNBase, layer: int, suffix: str, detach: bool) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    get = lambda n: getattr(module, f"{n}_l{layer}{suffix}", None)  # noqa: E731
    w = [get("weight_ih"), get("weight_hh"), get("bias_ih"), get("bias_hh")]
    return tuple(t.detach() if (detach and t is not None) else t for t in w)  # type: ignore[return-value]


def _cell(mode: str, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor | None, b_hh: Tensor | None,
          hidden: int) -> Callable[[Tensor, Tensor], Tensor]:
    """One step of the module's cell on a flat state ((N, H), or (N, 2H) = (h, c) for an LSTM)."""

    def lin(x: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        gi = x @ w_ih.T + (b_ih if b_ih is not None else 0)
        gh = h @ w_hh.T + (b_hh if b_hh is not None else 0)
        return gi, gh

    if mode == "RNN_TANH":
        return lambda x, s: torch.tanh(sum(lin(x, s)))  # type: ignore[arg-type]
    if mode == "RNN_RELU":
        return lambda x, s: torch.relu(sum(lin(x, s)))  # type: ignore[arg-type]
    if mode == "GRU":
        def gru(x: Tensor, h: Tensor) -> Tensor:
            gi, gh = lin(x, h)
            ir, iz, in_ = gi.chunk(3, 1)
            hr, hz, hn = gh.chunk(3, 1)
            r, z = torch.sigmoid(ir + hr), torch.sigmoid(iz + hz)
            n = torch.tanh(in_ + r * hn)
            return (1 - z) * n + z * h
        return gru
    if mode == "LSTM":
        def lstm(x: Tensor, s: Tensor) -> Tensor:
            h, c = s[:, :hidden], s[:, hidden:]
            gi, gh = lin(x, h)
            i, f, g, o = (gi + gh).chunk(4, 1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            return torch.cat([torch.sigmoid(o) * torch.tanh(c), c], 1)
        return lstm
    raise ValueError(f"unsupported recurrent mode {mode!r}")


def unroll(module: nn.RNNBase, x: Tensor, hx: Tensor | tuple[Tensor, Tensor] | None = None,
           detach_weights: bool = False) -> tuple[Tensor, Tensor, Tensor | None, list[LayerRun]]:
    """Run ``module`` step by step: (output, h_n, c_n, per-layer runs), equal to ``module(x, hx)``."""
    if getattr(module, "proj_size", 0):
        raise NotImplementedError("LSTM with proj_size is not supported by the temporal probe")
    batched = x.dim() == 3
    if not batched:
        x = x.unsqueeze(1 if not module.batch_first else 0)
    if module.batch_first:
        x = x.transpose(0, 1)  # (T, B, D)
    T, B, _ = x.shape
    H, L = module.hidden_size, module.num_layers
    dirs = 2 if module.bidirectional else 1
    lstm = module.mode == "LSTM"
    if hx is None:
        h0 = x.new_zeros(L * dirs, B, H)
        c0 = x.new_zeros(L * dirs, B, H) if lstm else None
    elif lstm:
        assert isinstance(hx, tuple)
        h0, c0 = hx
        if not batched:
            h0, c0 = h0.unsqueeze(1), c0.unsqueeze(1)
    else:
        assert isinstance(hx, Tensor)
        h0, c0 = (hx if batched else hx.unsqueeze(1)), None
    layer_in = list(x.unbind(0))
    runs: list[LayerRun] = []
    h_n, c_n = [], []
    for layer in range(L):
        outs = []
        for d in range(dirs):
            suffix = "_reverse" if d else ""
            step = _cell(module.mode, *_weights(module, layer, suffix, detach_weights), hidden=H)
            k = layer * dirs + d
            state = torch.cat([h0[k], c0[k]], 1) if c0 is not None else h0[k]
            seq = layer_in[::-1] if d else layer_in
            states = [state]
            for xt in seq:
                states.append(step(xt, states[-1]))
            hs = [s[:, :H] for s in states]
            runs.append(LayerRun(f"l{layer}{suffix}", seq, states, H, step))
            h_n.append(hs[-1])
            if lstm:
                c_n.append(states[-1][:, H:])
            outs.append(hs[1:][::-1] if d else hs[1:])
        layer_in = [torch.cat([o[t] for o in outs], 1) for t in range(T)]
    output = torch.stack(layer_in)  # (T, B, dirs·H)
    if module.batch_first:
        output = output.transpose(0, 1)
    hn, cn = torch.stack(h_n), (torch.stack(c_n) if lstm else None)
    if not batched:
        output = output.squeeze(0 if module.batch_first else 1)
        hn, cn = hn.squeeze(1), (cn.squeeze(1) if cn is not None else None)
    return output, hn, cn, runs


@dataclass
class TemporalGrads:
    """Per layer run: ‖∂L/∂h_t‖ for t = 0 … T (h_0 the initial state), and ‖∂h_{t+1}/∂h_t‖ for t = 0 … T−1."""

    name: str
    grad_norm: Tensor  # (T + 1,)
    jacobian_norm: Tensor  # (T,)
    dead_frac: Tensor | None = None  # (1,): a ReLU layer's share of hidden units 0 for every sample and time step


def temporal_grads(module: nn.RNNBase, x: Tensor, hx: Tensor | tuple[Tensor, Tensor] | None, grad_output: Tensor | None,
                   grad_h: Tensor | None, grad_c: Tensor | None, jacobian: bool = True) -> list[TemporalGrads]:
    """Re-run ``module`` unrolled and back-propagate the gradients its outputs received."""
    with torch.enable_grad():
        output, hn, cn, runs = unroll(module, x.detach(), _initial_state(module, x, hx), detach_weights=True)
        roots, grads = [], []
        for t, g in ((output, grad_output), (hn, grad_h), (cn, grad_c)):
            if t is not None and g is not None:
                roots.append(t)
                grads.append(g)
        states = [s for r in runs for s in r.states]
        if not roots:
            return []
        need = [s for s in states if s.requires_grad]
        got = torch.autograd.grad(roots, need, grads, allow_unused=True) if need else []
    by_state = {id(s): g for s, g in zip(need, got)}
    found, k = [], 0
    for r in runs:
        norms = []
        for s in r.states:
            g = by_state.get(id(s))
            norms.append(torch.zeros((), dtype=torch.float64) if g is None else g[:, : r.hidden].detach().double().norm())
        order = torch.stack(norms)
        if r.name.endswith("_reverse"):  # its own time order runs backwards: report in input time
            order = order.flip(0)
        jac = step_jacobian_norms(r) if jacobian else torch.full((len(r.states) - 1,), float("nan"))
        if r.name.endswith("_reverse"):
            jac = jac.flip(0)
        dead = None
        if module.mode == "RNN_RELU" and len(r.states) > 1:  # a unit 0 at every step of every sample passes nothing on
            alive = torch.stack([s[:, : r.hidden] for s in r.states[1:]]).detach().gt(0).flatten(0, 1).any(0)
            dead = 1.0 - alive.double().mean().reshape(1)
        found.append(TemporalGrads(r.name, order, jac, dead))
        k += 1
    return found


def _initial_state(module: nn.RNNBase, x: Tensor,
                   hx: Tensor | tuple[Tensor, Tensor] | None) -> Tensor | tuple[Tensor, Tensor]:
    """Detached copies of the initial state (zeros if none was given) that require grad: the roots of the unrolled graph."""
    if hx is None:
        batch = x.shape[0 if module.batch_first else 1] if x.dim() == 3 else None
        shape = (module.num_layers * (2 if module.bidirectional else 1),) + ((batch,) if batch else ()) + (module.hidden_size,)
        zeros = x.new_zeros(shape)
        hx = (zeros, zeros.clone()) if module.mode == "LSTM" else zeros
    if isinstance(hx, tuple):
        return (hx[0].detach().clone().requires_grad_(True), hx[1].detach().clone().requires_grad_(True))
    return hx.detach().clone().requires_grad_(True)


def _detach(hx: Tensor | tuple[Tensor, Tensor] | None) -> Tensor | tuple[Tensor, Tensor] | None:
    if isinstance(hx, Tensor):
        return hx.detach()
    if isinstance(hx, tuple):
        return (hx[0].detach(), hx[1].detach())
    return hx


def step_jacobian_norms(run: LayerRun, iterations: int = POWER_ITERATIONS, samples: int = JACOBIAN_SAMPLES) -> Tensor:
    """Mean over samples of ‖∂s_{t+1}/∂s_t‖₂ for every t, by batched power iteration on Jᵀ J."""
    with torch.no_grad():
        states = run.states
        T = len(run.inputs)
        n = min(samples, states[0].shape[0])
        S = torch.stack([s[:n] for s in states[:-1]]).reshape(T * n, -1).detach()  # (T·n, S)
        X = torch.stack([x[:n] for x in run.inputs]).reshape(T * n, -1).detach()
        f = lambda s: run.step(X, s)  # noqa: E731
        g = torch.Generator(device="cpu").manual_seed(0)
        v = torch.randn(S.shape, generator=g, dtype=S.dtype).to(S.device)
        v = v / v.norm(dim=1, keepdim=True)
        sigma = torch.zeros(T * n, dtype=S.dtype, device=S.device)
        vjp_fn = torch.func.vjp(f, S)[1]
        for _ in range(iterations):
            jv = torch.func.jvp(f, (S,), (v,))[1]
            (w,) = vjp_fn(jv)
            norm = w.norm(dim=1, keepdim=True).clamp_min(1e-30)
            sigma = (v * w).sum(1).clamp_min(0).sqrt()  # Rayleigh quotient of Jᵀ J, then √
            v = w / norm
    return sigma.reshape(T, n).double().mean(1)


# -- the probe the watch drives ---------------------------------------------------------

def find_recurrent(model: nn.Module, temporal: object, caller: str = "watch") -> list[tuple[str, nn.Module]]:
    """The modules ``watch(temporal=…)`` follows; raises on a bad argument (before any hook)."""
    if temporal is False:
        return []
    modules = dict(model.named_modules())
    if temporal == "auto":  # the default: fused modules, and cells followed where one forward pass calls them more
        # than once (a cell called once per pass is a layer, not a recurrence)
        # (not an LSTM with proj_size, which the re-run does not support: asked for by name or True, it says so)
        return [(n, m) for n, m in modules.items()
                if isinstance(m, nn.RNNCellBase) or (isinstance(m, nn.RNNBase) and not getattr(m, "proj_size", 0))]
    if temporal is True:
        found: list[tuple[str, nn.Module]] = [(n, m) for n, m in modules.items() if isinstance(m, (nn.RNNBase, nn.RNNCellBase))]
        if not found:
            raise ValueError(
                f"`{caller}(temporal=True)` found no nn.RNN/GRU/LSTM or nn.*Cell in the model; "
                "for a cell of your own pass its name: temporal=['cell']"
            )
        return found
    if isinstance(temporal, (list, tuple)) and temporal and all(isinstance(t, str) for t in temporal):
        missing = [t for t in temporal if t not in modules]
        if missing:
            raise ValueError(f"`{caller}(temporal=…)`: no module named {missing[0]!r} in the model "
                             f"(names as in named_modules())")
        return [(t, modules[t]) for t in temporal]
    raise TypeError(bad_argument(caller, "temporal", "True, False or a list of module names (or \"auto\", the default)", temporal))


def _gamma(module: nn.Module) -> float | None:
    """Bound on the recurrent nonlinearity's derivative (Pascanu's γ); None where it gives no verdict."""
    mode = getattr(module, "mode", None) or ("RNN_" + module.nonlinearity.upper() if isinstance(module, nn.RNNCell) else None)
    return 1.0 if mode in ("RNN_TANH", "RNN_RELU") else None


def forget_bias(module: nn.Module, entity: str) -> float | None:
    """The mean forget-gate bias (b_ih + b_hh over the forget slice, PyTorch's gate order i, f, g, o) of an LSTM's
    layer and direction that ``entity`` names ("lstm.l0", "lstm.l1_reverse"), or of an ``nn.LSTMCell``; None for
    other cells. 0 without biases."""
    if isinstance(module, nn.LSTMCell):
        suffix = ""
    elif isinstance(module, nn.LSTM):
        suffix = entity.rsplit(".", 1)[-1]  # "l0", "l0_reverse"
    else:
        return None
    h = module.hidden_size
    total = 0.0
    for kind in ("ih", "hh"):
        b = getattr(module, f"bias_{kind}" + (f"_{suffix}" if suffix else ""), None)
        if isinstance(b, torch.Tensor):
            total += float(b.detach()[h:2 * h].float().mean())
    return total


@dataclass
class _Capture:
    module: nn.RNNBase
    x: Tensor
    hx: Tensor | tuple[Tensor, Tensor] | None
    grads: dict[str, Tensor]


class TemporalProbe:
    """Captures recurrent calls on sampled steps; after backward, turns them into per-time-step records."""

    def __init__(self, modules: list[tuple[str, nn.Module]], device: torch.device, repeated_only: bool = False) -> None:
        self.modules = modules
        self.device = device
        # temporal="auto": a cell's records are kept only on steps whose forward pass called it more than once
        # (a cell in a Python loop over time steps); one call per pass is a layer, not a recurrence.
        self.repeated_only = repeated_only
        self._name = {m: n for n, m in modules}
        self._captures: list[tuple[str, _Capture]] = []
        self._cell_calls: dict[str, int] = {}
        self._cell_norms: dict[tuple[str, int], Tensor] = {}
        # a cell's calls after the first of a pass, and those of them given a state cut from the graph (no gradient)
        self._cell_cut: dict[str, tuple[int, int]] = {}

    def entities(self) -> list[tuple[str, str]]:
        """(entity name, cell type): one per layer and direction of a fused module, one per cell."""
        out = []
        for name, m in self.modules:
            if isinstance(m, nn.RNNBase):
                for layer in range(m.num_layers):
                    for suffix in ([""] + (["_reverse"] if m.bidirectional else [])):
                        out.append((f"{name}.l{layer}{suffix}", m.mode))
            else:
                out.append((name, type(m).__name__))
        return out

    def describe(self) -> list[dict]:
        rows = []
        for name, m in self.modules:
            for entity, cell in (self.entities_of(name, m)):
                rows.append({"name": entity, "cell": cell, "gamma": _gamma(m), "forget_bias": forget_bias(m, entity)})
        return rows

    def entities_of(self, name: str, m: nn.Module) -> list[tuple[str, str]]:
        return [(e, c) for e, c in self.entities() if e == name or e.startswith(name + ".l")]

    def capture(self, module: nn.Module, args: tuple, output: object, guard: Callable[[Callable[[], None]], None]) -> None:
        name = self._name[module]
        if isinstance(module, nn.RNNBase):
            x = args[0] if args else None
            if not isinstance(x, Tensor):  # a PackedSequence: not supported
                return
            hx = args[1] if len(args) > 1 else None
            cap = _Capture(module, x.detach(), _detach(hx), {})  # type: ignore[arg-type]
            assert isinstance(output, tuple), "nn.RNNBase returns (output, h_n)"
            out: object = output[0]
            h: object = output[1]
            hn, cn = (h if isinstance(h, tuple) else (h, None))
            for key, t in (("out", out), ("h", hn), ("c", cn)):
                if isinstance(t, Tensor) and t.requires_grad:
                    # (the hook holds the capture's grads, not the capture: that holds the module, and the module's
                    # hooks the watch — a cycle through the graph's C++ nodes, :mod:`gradwatch.probes.weakhook`)
                    t.register_hook(lambda g, key=key, grads=cap.grads: guard(lambda: _accumulate(grads, key, g)))
            self._captures.append((name, cap))
            return
        h = output[0] if isinstance(output, (tuple, list)) else output
        if isinstance(h, Tensor) and h.requires_grad:
            pos = self._cell_calls.get(name, 0) + 1  # the state this call produces: h_1, h_2, …
            self._cell_calls[name] = pos
            if pos > 1:  # a later call: is the state it was given cut from the graph? (h = h.detach() in the loop)
                state = args[1] if len(args) > 1 else None
                state = state[0] if isinstance(state, (tuple, list)) and state else state
                cut = not isinstance(state, Tensor) or not state.requires_grad
                later, detached = self._cell_cut.get(name, (0, 0))
                self._cell_cut[name] = (later + 1, detached + int(cut))
            h.register_hook(WeakHook(self, "_cell_hook", guard, name, pos))

    def _cell_hook(self, guard: Callable[[Callable[[], None]], None], name: str, pos: int, g: Tensor) -> None:
        guard(lambda: self._cell_grad(name, pos, g))

    def _cell_grad(self, name: str, pos: int, g: Tensor | None) -> None:
        if g is None:  # a state the loss does not read, where another output of the cell's call is read
            return
        sq = g.detach().double().pow(2).sum().to(self.device)
        key = (name, pos)
        self._cell_norms[key] = self._cell_norms[key] + sq if key in self._cell_norms else sq

    def take(self) -> list[tuple[str, str, list[int], Tensor]]:
        """Records of the step: (entity, quantity, positions, values); forgets the captures."""
        out: list[tuple[str, str, list[int], Tensor]] = []
        pooled: dict[str, Tensor] = {}
        jac: dict[str, Tensor] = {}
        dead: dict[str, Tensor] = {}
        padded: dict[str, Tensor] = {}
        for name, cap in self._captures:
            if not cap.grads:
                continue
            padded.setdefault(f"{name}.l0", trailing_repeats(cap.x, cap.module.batch_first).to(self.device))
            found = temporal_grads(cap.module, cap.x, cap.hx, cap.grads.get("out"), cap.grads.get("h"), cap.grads.get("c"))
            for r in found:
                entity = f"{name}.{r.name}"
                sq = r.grad_norm.to(self.device) ** 2
                pooled[entity] = pooled[entity] + sq if entity in pooled and len(pooled[entity]) == len(sq) else sq
                jac.setdefault(entity, r.jacobian_norm.to(self.device))
                if r.dead_frac is not None:
                    dead.setdefault(entity, r.dead_frac.to(self.device))
        for name, module in self.modules:
            if isinstance(module, nn.RNNBase) and any(e.startswith(name + ".l") for e in pooled):
                for entity, _ in self.entities_of(name, module):
                    layer, _, suffix = entity[len(name) + 2:].partition("_")
                    w = getattr(module, f"weight_hh_l{layer}{'_' + suffix if suffix else ''}")
                    out.append((entity, "lambda1", [-1], lambda1(w).to(self.device)))
        for entity, runs in padded.items():
            if entity in pooled:
                out.append((entity, "pad_steps", [0, 1, 2], runs))
        for entity, sq in pooled.items():
            out.append((entity, "temporal_grad_norm", list(range(len(sq))), sq.sqrt()))
            out.append((entity, "step_jacobian_norm", list(range(len(jac[entity]))), jac[entity]))
            if entity in dead:
                out.append((entity, "recurrent_dead_frac", [-1], dead[entity]))
        for name, (later, detached) in self._cell_cut.items():
            # the share of a cell's later calls whose state carried no gradient: 1 where the loop detaches it at every
            # step, 1/k under truncated backpropagation through time every k steps, 0 where the state flows
            out.append((name, "state_cut_frac", [-1], torch.tensor(detached / later, device=self.device)))
        by_cell: dict[str, list[tuple[int, Tensor]]] = {}
        for (name, pos), sq in sorted(self._cell_norms.items()):
            by_cell.setdefault(name, []).append((pos, sq))
        for name, rows in by_cell.items():
            if self.repeated_only and len(rows) < 2:
                continue
            out.append((name, "temporal_grad_norm", [p for p, _ in rows], torch.stack([v for _, v in rows]).sqrt()))
            module = dict(self.modules)[name]
            if isinstance(module, nn.RNNCellBase):
                out.append((name, "lambda1", [-1], lambda1(module.weight_hh).to(self.device)))
        self.clear()
        return out

    def clear(self) -> None:
        self._captures, self._cell_calls, self._cell_norms, self._cell_cut = [], {}, {}, {}


def trailing_repeats(x: Tensor, batch_first: bool) -> Tensor:
    """How many of a batch's last time steps repeat each sequence's last input (padding after its end, counting
    that last step): (median, least, most) over the sequences, float64, (3,). An unbatched (T, F) input is one
    sequence."""
    x = x.detach()
    if x.dim() == 2:
        x = x.unsqueeze(0 if batch_first else 1)
    if not batch_first:
        x = x.transpose(0, 1)
    same = (x == x[:, -1:]).reshape(x.shape[0], x.shape[1], -1).all(-1)  # (B, T): the step's input is the last one's
    runs = same.flip(1).int().cumprod(1).sum(1).double()
    return torch.stack([runs.median(), runs.min(), runs.max()])


def lambda1(w: Tensor) -> Tensor:
    """Largest singular value of a recurrent weight, (1,); NaN once the weight itself is not finite."""
    w = w.detach().double()
    if not bool(torch.isfinite(w).all()):  # a diverged run: the SVD would fail
        return torch.full((1,), float("nan"), dtype=torch.float64, device=w.device)
    return torch.linalg.svdvals(w)[:1]


def _accumulate(grads: dict[str, Tensor], key: str, g: Tensor | None) -> None:
    if g is None:  # an output the loss does not read, where another of the module's does (an LSTM read at h_n only)
        return
    g = g.detach()
    grads[key] = grads[key] + g if key in grads else g
