"""Gradient statistics: per-layer and per-parameter norms, non-finite counts, update ratios.

Everything is computed on the parameters' device with fused ops and handed
back as tensors; nothing here copies to the host.

- ``grad_norm``: L2 norm of the gradient; a layer's is over every trainable
  parameter it directly owns (a tied parameter counts in each owner).
- ``nonfinite``: per layer, how many of its parameter tensors have a gradient
  whose norm is not finite (a NaN or Inf entry, or entries so large that the
  norm overflows). It is read off the norms already computed, on the device:
  no second pass over the gradients and no host synchronisation, so it costs
  nothing on a GPU step.
- ``weight_norm``: L2 norm of the weights before the optimizer step.
- ``update_ratio``: ‖w_after − w_before‖ / ‖w_before‖ across the real
  optimizer step, so it is right for Adam as well as SGD. It needs a copy of
  the weights taken before the step (memory: one more copy of the trainable
  parameters, held only during that step), hence its sparser schedule.
  Undefined, and not recorded, where ‖w_before‖ = 0.

Sharded parameters (FSDP2's ``fully_shard``, DTensor with ``Shard``
placements): each rank holds a slice of every tensor, so each rank takes the
squared norms of its own slices and one all-reduce per step sums them across
the mesh dimensions that shard, before the square root. Every rank must take
part, on the same steps; ``Replicate`` dimensions hold copies and are not
summed.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple, Protocol, Sequence

import torch
from torch import Tensor

from gradwatch.probes.hostcopy import device_scalar, device_tensor
from gradwatch.probes.stacked import StackedNorms


class Layer(Protocol):
    """What the probe reads of a layer: its name and its trainable parameters (a :class:`gradwatch.layers.Layer`)."""

    name: str  # its named_modules() path; "" is the model itself
    params: list[tuple[str, torch.nn.Parameter]]  # (attribute name, parameter)


def param_name(layer: str, attr: str) -> str:
    """Qualified parameter name, as in named_parameters()."""
    return f"{layer}.{attr}" if layer else attr


_LOW_PRECISION = (torch.float16, torch.bfloat16)


def fused_norms(tensors: list[Tensor], device: torch.device) -> Tensor:
    """L2 norm of each tensor, as one float64 vector on ``device``; one fused kernel per (device, dtype)."""
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    sparse: list[int] = []
    for i, t in enumerate(tensors):
        if t.is_sparse:
            sparse.append(i)
        else:
            groups.setdefault((t.device, t.dtype), []).append(i)
    parts: list[Tensor] = []
    order: list[int] = []
    for (_, dtype), idx in groups.items():
        ts = [tensors[i] for i in idx]
        if dtype in _LOW_PRECISION:  # accumulate in float32, never in half precision
            res = torch._foreach_norm(ts, 2, dtype=torch.float32)
        else:
            res = torch._foreach_norm(ts, 2)
        parts.append(torch.stack(res).to(device=device, dtype=torch.float64))
        order.extend(idx)
    for i in sparse:
        parts.append(torch.linalg.vector_norm(tensors[i].coalesce().values().double()).to(device).reshape(1))
        order.append(i)
    out = torch.cat(parts) if len(parts) > 1 else parts[0]
    if order != list(range(len(tensors))):
        out = torch.empty_like(out).index_copy_(0, device_tensor(order, torch.long, device), out)
    return out


@functools.cache
def _dtensor_type() -> type | None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a build without torch.distributed
        return None
    return DTensor


def _is_dtensor(t: Tensor) -> bool:
    dtensor = _dtensor_type()
    return dtensor is not None and isinstance(t, dtensor)


def _local(t: Tensor) -> Tensor:
    """A DTensor's own slice (no communication for sharded tensors); any other tensor as it is."""
    return t.to_local() if _is_dtensor(t) else t  # type: ignore[attr-defined]


def _shard_groups(params: list[torch.nn.Parameter]) -> list[tuple[list[Any], list[int]]]:
    """(process groups to sum over, indices of the parameters sharded that way), for DTensor parameters."""
    by_key: dict[tuple, tuple[list[Any], list[int]]] = {}
    for i, p in enumerate(params):
        if not _is_dtensor(p):
            continue
        mesh, placements = p.device_mesh, p.placements  # type: ignore[attr-defined]
        for pl in placements:
            if not (pl.is_shard() or pl.is_replicate()):
                raise NotImplementedError(f"gradwatch reads sharded (Shard) and replicated DTensor parameters; "
                                          f"got placement {pl} on parameter {i}")
        dims = tuple(d for d, pl in enumerate(placements) if pl.is_shard())
        if not dims:
            continue
        key = (id(mesh), dims)
        if key not in by_key:
            by_key[key] = ([mesh.get_group(d) for d in dims], [])
        by_key[key][1].append(i)
    return list(by_key.values())


@dataclass
class _Plan:
    """Index tensors for one set of parameters that have gradients."""

    pairs: list[int]  # (layer, param) pairs whose param has a gradient
    layers: list[int]  # layers with at least one gradient
    pair_pos: Tensor | None  # each pair's param, as a position in the norms as read; None: identity
    row: Tensor  # (len(pairs),) each pair's row among ``layers``
    shards: list[tuple[list[Any], Tensor]]  # (process groups, positions among the present params) to all-reduce
    stacks: list[list[int]]  # small same-shape gradients read as one stack each (positions among the present)
    rest: list[int]  # the others, read by one fused call; the norms come in the order stacks, then rest
    read_order: Tensor | None  # that order as positions among the present; None: the present order
    reader: StackedNorms | None  # reads them in that order with no allocation (one device and dtype); None: fused_norms
    derive: Derive = field(init=False)  # raw norms (k, n_present) -> Stats (k, ·): the step's records, derived later


# quantity: (layers, values, pairs, values); values are (k, ·) for k steps, or (·,) for one
Stats = dict[str, tuple[list[int], Tensor, list[int], Tensor]]
Derive = Callable[[Tensor], Stats]


class Pending(NamedTuple):
    """A step's gradient norms as read (one per present parameter), and how its records follow from them."""

    plan: _Plan  # the same object for every step with the same parameters present: steps batch together
    norms: Tensor  # (n_present,)

    @property
    def derive(self) -> Derive:
        """How the step's records follow from its norms (the plan's; one object per plan)."""
        return self.plan.derive


class GradProbe:
    """Reads ``param.grad`` and the weights of the watched layers."""

    def __init__(self, layers: Sequence[Layer]) -> None:
        self.params: list[torch.nn.Parameter] = []
        position: dict[int, int] = {}
        self.pair_param: list[int] = []  # one entry per (layer, attribute)
        self.pair_layer: list[int] = []
        self.pair_names: list[str] = []
        self.layers_all = list(range(len(layers)))
        for li, layer in enumerate(layers):
            for attr, p in layer.params:
                if id(p) not in position:
                    position[id(p)] = len(self.params)
                    self.params.append(p)
                self.pair_param.append(position[id(p)])
                self.pair_layer.append(li)
                self.pair_names.append(param_name(layer.name, attr))
        self.device = self.params[0].device
        self._shards = _shard_groups(self.params)
        self.sharded = any(_is_dtensor(p) for p in self.params)
        # One fused call reads every gradient when they share a device and a dtype (gradients have their
        # parameter's); the dtype argument accumulates half precision in float32. Otherwise fused_norms groups.
        kinds = {(p.device, p.dtype) for p in self.params}
        self._fused: tuple[torch.dtype | None] | None = None
        if len(kinds) == 1 and not self.sharded:
            dtype = next(iter(kinds))[1]
            self._fused = (torch.float32 if dtype in _LOW_PRECISION else None,)
        # On the CPU, where every norm is a kernel call of its own, small gradients of one shape are read as one
        # stack: a 20-layer MLP's 40 norms take 6 calls (benchmarks/overhead.py --norms: ~40 µs against ~80 µs for
        # one _foreach_norm, in a loop; inside a real step, caches cold, every way costs about the same).
        self._stack = self._fused is not None and self.device.type == "cpu"
        self._plans: dict[tuple[int, ...], _Plan] = {}
        self._rows: dict[int, Tensor] = {}  # id of a plan (kept in _plans) -> each pair's layer, for _all_layers
        self._before: list[Tensor] | None = None
        self._all_present = tuple(range(len(self.params)))
        self._all = self._plan(self._all_present)

    def _plan(self, present: tuple[int, ...]) -> _Plan:
        plan = self._plans.get(present)
        if plan is None:
            pos = {p: k for k, p in enumerate(present)}
            pairs = [j for j, p in enumerate(self.pair_param) if p in pos]
            layers = sorted({self.pair_layer[j] for j in pairs})
            row = {li: r for r, li in enumerate(layers)}
            present_params = [self.params[i] for i in present]
            stacks, rest = self._stacks(present_params)
            read_at = {k: r for r, k in enumerate([k for idx in stacks for k in idx] + rest)}
            pair_pos = [read_at[pos[self.pair_param[j]]] for j in pairs]
            plan = _Plan(
                pairs=pairs,
                layers=layers,
                pair_pos=None if pair_pos == list(range(len(present))) else torch.tensor(pair_pos, device=self.device),
                row=torch.tensor([row[self.pair_layer[j]] for j in pairs], device=self.device),
                shards=[(groups, torch.tensor([pos[i] for i in idx if i in pos], device=self.device))
                        for groups, idx in self._shards if any(i in pos for i in idx)],
                stacks=stacks,
                rest=rest,
                read_order=None if not stacks else torch.tensor(list(read_at), device=self.device),
                reader=None if self._fused is None else StackedNorms(
                    [tuple(p.shape) for p in present_params], stacks, rest, present_params[0].dtype, self._fused[0],
                    self.device),
            )
            plan.derive = functools.partial(self._grad_stats, plan)
            self._plans[present] = plan
        return plan

    @staticmethod
    def _sum_shards(plan: _Plan, norms: Tensor) -> Tensor:
        """Norms of whole tensors from the norms of this rank's slices: √(all-reduced Σ slice²).

        ``norms``: (k, n_present), k sets of norms reduced together (one all-reduce per process group).
        """
        if not plan.shards:
            return norms
        import torch.distributed as dist

        sq = norms * norms
        for groups, pos in plan.shards:
            part = sq[:, pos]
            for group in groups:
                dist.all_reduce(part, op=dist.ReduceOp.SUM, group=group)
            sq[:, pos] = part
        return sq.sqrt()

    @staticmethod
    def _per_pair(plan: _Plan, per_param: Tensor) -> Tensor:
        """(k, n_present) -> (k, pairs): a tied parameter once per owner."""
        return per_param if plan.pair_pos is None else per_param[:, plan.pair_pos]

    @staticmethod
    def _layer_sum(plan: _Plan, per_pair: Tensor) -> Tensor:
        """(k, pairs) -> (k, layers): sum over each layer's own parameters (a scatter-add: a NaN stays in its layer)."""
        return per_pair.new_zeros(per_pair.shape[0], len(plan.layers)).index_add_(1, plan.row, per_pair)

    SMALL = 8192  # elements: below this a stack and one reduction beat a norm call each (CPU, measured)

    def _stacks(self, params: list[torch.nn.Parameter]) -> tuple[list[list[int]], list[int]]:
        """(groups of positions of small same-shape parameters, the other positions), for reading their norms."""
        by_shape: dict[tuple[int, ...], list[int]] = {}
        if self._stack:
            for k, p in enumerate(params):
                if p.numel() <= self.SMALL:
                    by_shape.setdefault(tuple(p.shape), []).append(k)
        stacks = [idx for idx in by_shape.values() if len(idx) > 1]
        stacked = {k for idx in stacks for k in idx}
        return stacks, [k for k in range(len(params)) if k not in stacked]

    def _norms(self, tensors: list[Tensor], plan: _Plan | None = None) -> Tensor:
        """L2 norm of each tensor, (n,), in ``plan``'s reading order (small same-shape tensors as stacks, then the
        rest: :class:`~gradwatch.probes.stacked.StackedNorms`); else one fused call where they share device and dtype,
        else :func:`fused_norms` (in the given order). Call it under ``no_grad``."""
        if plan is not None and plan.reader is not None:
            try:
                return plan.reader.read(tensors)
            except (NotImplementedError, RuntimeError):
                if not any(t.is_sparse for t in tensors):
                    raise
                plan.reader = None  # a sparse gradient (nn.Embedding(sparse=True)): the general path from now on
        if self._fused is None or any(t.is_sparse for t in tensors):
            out = fused_norms(tensors, self.device)
        else:
            out = torch.stack(torch._foreach_norm(tensors, 2, dtype=self._fused[0]))
        return out if plan is None or plan.read_order is None else out[plan.read_order]

    def gradients(self, scale: Tensor | None = None) -> Pending | None:
        """The norms of the gradients present now (their records derived later, in a batch), or None if none.

        ``scale``: a loss scale still on the gradients (a GradScaler has not
        unscaled them yet); the norms are divided by it.
        """
        # no_grad by hand: the decorator costs ~12 µs a call, a tenth of this read on a small model's CPU step
        enabled = torch.is_grad_enabled()
        torch._C._set_grad_enabled(False)
        try:
            return self._gradients(scale)
        finally:
            torch._C._set_grad_enabled(enabled)

    def _gradients(self, scale: Tensor | None) -> Pending | None:
        grads: list[Tensor] = [p.grad for p in self.params]  # type: ignore[misc]
        present = self._all_present
        if any(g is None for g in grads):
            present = tuple(i for i, g in enumerate(grads) if g is not None)
            if not present:
                return None
            grads = [grads[i] for i in present]
        plan = self._plan(present)
        if self.sharded:
            grads = [_local(g) for g in grads]
        norms = self._norms(grads, plan)  # (n_present,), in the plan's reading order
        if plan.shards:
            norms = self._sum_shards(plan, norms.double()[None])[0]
        return Pending(plan, norms if scale is None else norms / scale)

    def _grad_stats(self, plan: _Plan, norms: Tensor) -> Stats:
        """``grad_norm`` and ``nonfinite`` of k steps from their norms, (k, n_present)."""
        norms = norms.to(torch.float64)
        per_pair = self._per_pair(plan, norms)
        per_layer = self._layer_sum(plan, per_pair * per_pair).sqrt()
        flags = self._layer_sum(plan, (~torch.isfinite(per_pair)).to(torch.float64))
        return {"grad_norm": (plan.layers, per_layer, plan.pairs, per_pair),
                "nonfinite": (plan.layers, flags, [], per_pair[:, :0])}

    @torch.no_grad()
    def layer_norms(self, pending: Pending, weights: bool) -> Tensor:
        """(layers, 2) on the device: each layer's gradient norm from ``pending`` (0 where no gradient) and, if
        ``weights``, its weight norm (one fused read of the weights; NaN otherwise). For the flight recorder."""
        out = torch.full((len(self.layers_all), 2), float("nan"), dtype=torch.float64, device=self.device)
        out[:, 0] = self._all_layers(pending.plan, pending.norms.to(torch.float64))  # 0 where a layer has no gradient
        if weights:  # (sharded: every rank's recorder pushes every step, so every rank joins the all-reduce)
            plan = self._all
            weights_now = [_local(p.detach()) for p in self.params] if self.sharded else [p.detach() for p in self.params]
            norms = self._sum_shards(plan, self._norms(weights_now, plan).to(torch.float64)[None])[0]
            out[:, 1] = self._all_layers(plan, norms)  # (every watched layer owns a parameter)
        return out

    def _all_layers(self, plan: _Plan, norms: Tensor) -> Tensor:
        """(n_present,) norms as read -> (layers,): each watched layer's √Σ over its own parameters (0: none).

        The per-step path of the flight recorder: one index_add into every layer's slot, where the records'
        derivation (:meth:`_grad_stats`) also counts non-finite values and builds per-parameter rows."""
        rows = self._rows.get(id(plan))
        if rows is None:
            rows = self._rows[id(plan)] = torch.tensor([self.pair_layer[j] for j in plan.pairs], device=self.device)
        pair = norms if plan.pair_pos is None else norms[plan.pair_pos]
        return norms.new_zeros(len(self.layers_all)).index_add_(0, rows, pair * pair).sqrt_()

    @torch.no_grad()
    def snapshot(self) -> None:
        """Copy the weights before the optimizer step (for the update ratio)."""
        weights = [p.detach() for p in self.params]
        self._before = list(torch._foreach_mul([_local(w) for w in weights] if self.sharded else weights, 1.0))

    @property
    def has_snapshot(self) -> bool:
        return self._before is not None

    def drop_snapshot(self) -> None:
        """Forget a snapshot without using it (the watch stopped recording)."""
        self._before = None

    @torch.no_grad()
    def updates(self) -> Stats:
        """Weight norms before the step and update ratios across it, (1, ·) each; frees the snapshot."""
        before, self._before = self._before, None
        assert before is not None, "updates() without snapshot()"
        after = [_local(p.detach()) for p in self.params] if self.sharded else [p.detach() for p in self.params]
        diffs = list(torch._foreach_sub(after, before))
        plan = self._all
        # rows ‖Δw‖, ‖w‖, each in the gradients' reading order, which the plan's indices follow
        norms = torch.stack([self._norms(diffs, plan), self._norms(before, plan)]).to(torch.float64)
        delta, weight = self._sum_shards(plan, norms)
        del diffs, before
        pair_w, pair_d = self._per_pair(plan, weight[None]), self._per_pair(plan, delta[None])
        layer_w = self._layer_sum(plan, pair_w * pair_w).sqrt()
        layer_d = self._layer_sum(plan, pair_d * pair_d).sqrt()
        nan = device_scalar(float("nan"), torch.float64, self.device)
        return {
            "weight_norm": (plan.layers, layer_w, plan.pairs, pair_w),
            "update_ratio": (
                plan.layers,
                torch.where(layer_w > 0, layer_d / layer_w, nan),
                plan.pairs,
                torch.where(pair_w > 0, pair_d / pair_w, nan),
            ),
        }
