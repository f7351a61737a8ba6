"""Attention probes: per-head attention logits and entropy, and the output logits' log Z at the LM head.

On the steps it is armed for, :class:`AttentionProbe` measures, for every
attention module it recognises and every head h:

- ``attn_logit_max``: max over batch, queries and allowed keys of the logit
  s = q·k · scale (scale = 1/√d_head unless the module says otherwise);
- ``attn_logit_rms``: √mean s² over the same allowed (query, key) pairs;
- ``attn_entropy``: the entropy −Σ_j p_j log p_j (nats) of each query's
  attention row p = softmax(s + bias), averaged over batch and queries;
- ``attn_empty_frac``: the share of query rows with no key allowed (every
  key masked: a left-padding token, or an all-padding sequence, whose
  softmax over a −inf mask is NaN).

and at the LM head (the module producing the vocabulary logits y), of
log Z = logsumexp_v y_v over every position: ``logz_mean`` and ``logz_max``.

Attention-logit growth (max logit rising by orders of magnitude while the
attention goes one-hot) is the instability Dehghani et al. (2023) and
Wortsman et al. (2023, "Small-scale proxies for large-scale Transformer
training instabilities", §3.1) cure with qk-layernorm; entropy collapse is
Zhai et al.'s (2023, σReparam); a drifting log Z is Wortsman's output-logit
divergence, cured by the z-loss (§3.2; PaLM).

**How.** q and k are taken as the module's own hooks see them and the
logits are recomputed from them: for ``nn.MultiheadAttention`` (also inside
``nn.TransformerEncoderLayer``/``DecoderLayer``) from the module's inputs and
its in-projection weights; for Hugging Face GPT-2-style attention from the
output of ``c_attn``; for Llama-style attention (``q_proj``/``k_proj``, also
Mistral, Qwen2, and Qwen3/OLMo2 with their ``q_norm``/``k_norm``) from the
outputs of the projections (or norms), with the module file's own
``apply_rotary_pos_emb`` and the key heads repeated for grouped-query
attention. Any other module can offer ``gradwatch_attention_inputs(*args,
**kwargs) -> AttentionInputs``. Attention written by hand — a module of the
user's own class whose ``forward`` calls a softmax on a product (``@``,
``matmul``, ``bmm``, ``einsum``) — is read from the logits that softmax
receives, under a :class:`torch.overrides.TorchFunctionMode` held while the
module runs on an armed pass (``probe.softmax_sites``; the model itself where
its own ``forward`` holds the attention): the softmax over the last dimension
of a ≥ 3-D tensor, square in its last two (self-attention), made from a
product of two activations (q·kᵀ, scaled or masked), or any shape in a module
named for attention. The statistics are computed in chunks of
queries (at most ``chunk`` logits at a time: by default 4 M on the CPU and, on a
CUDA device, as many as fit a quarter of its free memory, up to 128 M), so
memory stays bounded however long the sequence; log Z likewise, in chunks of positions.

**What fused kernels hide.** ``scaled_dot_product_attention`` (flash,
memory-efficient and cuDNN kernels) never writes the logits or the
probabilities out; nothing a hook can read holds them. The probe therefore
measures the logits the kernel *would* compute from the same q and k, in
float32 (or the inputs' float64), not the kernel's own lower-precision
arithmetic: a kernel's bf16/fp16 rounding of s, its online-softmax rescaling
and a dropout on p are not seen. Masks are read from the call (HF's 4-D
boolean or additive masks, ``is_causal`` implied by a missing mask under
sdpa, MHA's ``attn_mask``/``key_padding_mask``); additive entries at or below
half the dtype's minimum count as masked. A query row with no allowed key
(a left-padding token) is left out of the entropy mean. Logits from keys
held in a KV cache are not in the hook's view: such calls are skipped (see
:attr:`AttentionProbe.skipped`). Cross-attention in GPT-2 is skipped.

**Cost.** On an armed step: one more q·k product and softmax per attention
module, in float32, under ``no_grad``; nothing on other steps. The
recomputation reads no random state and changes no tensor the model uses.

**How the watch drives it** (:mod:`gradwatch.watching.sampled`): the
``attention`` family of the budget, ``gw.watch(attention=…)``. Its hooks are
placed on the steps that record attention only (armed), graph-building
passes only; at the step's end ``probe.records(probe.collect(), writer)``
joins the step's one host copy, as ``attention`` entities with the head in
``pos`` and log Z on the LM head's ``layer``, which
:meth:`gradwatch.diagnosis.mechanisms.ProbeSeries.from_run` reads back. A
non-None ``probe.error`` is a failed hook (a ``GradwatchWarning`` was given;
the watch stops arming it, recording of the rest goes on).
"""

from __future__ import annotations

import inspect
import warnings
import weakref
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from gradwatch._errors import GradwatchWarning, bad_argument
from gradwatch.probes.attention_read import (
    ATTENTION_QUANTITIES,
    CHUNK,
    LOGZ_QUANTITIES,
    chunk_size,
    AttentionInputs,
    Skip,
    find_attention,
    find_lm_head,
    find_softmax_sites,
    finish,
    head_stats,
    softmax_stats,
)

Key = tuple[str, str, "int | None"]  # (layer, quantity, head); head is None for the LM head's log Z


class AttentionProbe:
    """Per-head attention logits and entropy, and the LM head's log Z, on the forward passes it is armed for.

    ``probe = AttentionProbe(model)`` finds the attention modules and the LM
    head; ``attach()`` places the hooks (armed: every forward pass measures
    until ``probe.armed = False``); ``collect()`` returns
    ``{(layer, quantity, head): 0-d tensor}`` on the model's device and starts
    over; ``detach()`` removes every hook. Several forward passes before one
    ``collect()`` (micro-batches) pool: max of maxima, rms and entropy over
    every logit and row seen. A hook that fails stops the probe with a
    :class:`~gradwatch.GradwatchWarning` (``probe.error``); the model's
    forward pass always goes on.
    """

    def __init__(self, model: nn.Module, lm_head: str | nn.Module | None = "auto", chunk: int | None = None) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(bad_argument("AttentionProbe", "model", "a torch.nn.Module", model))
        if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
            raise ValueError(bad_argument("AttentionProbe", "chunk", "a positive int (logits per query chunk), or "
                                          "None (by the device: attention_read.chunk_size)", chunk))
        self.model, self.chunk = model, chunk
        self.sites = find_attention(model)
        self.softmax_sites = find_softmax_sites(model, self.sites)  # attention written by hand
        self.lm_head = self._head_name(model, lm_head)
        self.armed = False
        self.skipped: dict[str, str] = {}  # attention module → why a call of it was not measured
        self.error: BaseException | None = None
        self._stats: dict[str, Tensor] = {}  # module name → (6, H) sums (head_stats)
        self._logz: Tensor | None = None  # (Σ log Z, #positions, max log Z)
        self._seen: dict[int, dict[str, Tensor]] = {}
        self._signatures: dict[int, inspect.Signature] = {}
        self._handles: list[Any] = []

    @staticmethod
    def _head_name(model: nn.Module, lm_head: str | nn.Module | None) -> str | None:
        if lm_head is None:
            return None
        if isinstance(lm_head, str) and lm_head == "auto":
            return find_lm_head(model)
        for name, m in model.named_modules():
            if (isinstance(lm_head, nn.Module) and m is lm_head) or (isinstance(lm_head, str) and name == lm_head):
                return name
        raise ValueError(bad_argument("AttentionProbe", "lm_head", "'auto', None, or a module (or its name) in the model",
                                      lm_head))

    # -- public --------------------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        """The attention modules measured, by ``named_modules()`` path (those read by their softmax's logits last)."""
        return [s.name for s in self.sites] + [name for name, _ in self.softmax_sites]

    @property
    def measures(self) -> bool:
        """Whether there is anything to measure: an attention module, read or written by hand."""
        return bool(self.sites or self.softmax_sites)

    def entities(self) -> list[tuple[str, str, str]]:
        """(name, kind, module class) of everything the records are about: ``attention`` modules, the LM head's ``layer``."""
        out = [(s.name, "attention", type(s.module).__name__) for s in self.sites]
        out += [(name, "attention", type(m).__name__) for name, m in self.softmax_sites]
        if self.lm_head is not None:
            out.append((self.lm_head, "layer", type(self.model.get_submodule(self.lm_head)).__name__))
        return out

    def records(self, stats: dict[Key, Tensor], writer: Any) -> tuple[np.ndarray, Tensor]:
        """``collect()``'s statistics as one step's records for ``StoreWriter.records``: (keys, values).

        ``keys`` is (n, 3) of (entity id, quantity id, pos): attention modules as
        ``attention`` entities with the head in ``pos``, the LM head's log Z on its
        ``layer`` entity without one (−1); ``values`` (n,) float64 on the
        statistics' device (one stack, no host copy). ``writer`` allocates the ids
        (``StoreWriter.entity``/``quantity``).
        """
        kinds = {name: (kind, module) for name, kind, module in self.entities()}
        keys = []
        for name, quantity, head in stats:
            kind, module = kinds[name]
            keys.append((writer.entity(name, kind, module), writer.quantity(quantity), -1 if head is None else head))
        values = torch.stack([v.reshape(()).to(torch.float64) for v in stats.values()]) if stats else torch.zeros(0)
        return np.array(keys, dtype=np.int64).reshape(-1, 3), values

    def attach(self, armed: bool = True) -> AttentionProbe:
        """Place the hooks (idempotent); measure from the next forward pass on if ``armed``."""
        self.armed = armed
        if self._handles:
            return self
        for i, site in enumerate(self.sites):
            for role, tap in site.taps.items():
                self._handles.append(tap.register_forward_hook(self._tap_hook(i, role)))
            self._handles.append(site.module.register_forward_hook(self._site_hook(i), with_kwargs=True))
        for name, module in self.softmax_sites:
            named = "att" in name.lower() or "att" in type(module).__name__.lower()
            spy = _SoftmaxTap(lambda x, name=name: self._guarded(lambda: self._add_softmax(name, x)), named)
            self._handles.append(module.register_forward_pre_hook(lambda m, a, spy=spy: spy.enter(self.armed)))
            self._handles.append(module.register_forward_hook(lambda m, a, o, spy=spy: spy.leave(), always_call=True))
        if self.lm_head is not None:
            self._handles.append(self.model.get_submodule(self.lm_head).register_forward_hook(self._on_head))
        return self

    def detach(self) -> None:
        """Remove every hook; collected statistics not yet read are dropped."""
        for h in self._handles:
            h.remove()
        self._handles, self._seen, self.armed = [], {}, False
        self._stats, self._logz = {}, None

    def collect(self) -> dict[Key, Tensor]:
        """The statistics since the last collect, ``{(layer, quantity, head): 0-d tensor}``, and start over.

        Attention quantities (:data:`ATTENTION_QUANTITIES`) have a head index;
        ``logz_mean``/``logz_max`` (:data:`LOGZ_QUANTITIES`) are keyed by the
        LM head's name with head ``None``. Nothing is copied to the host.
        """
        out: dict[Key, Tensor] = {}
        for name, stats in self._stats.items():
            per_head = finish(stats)
            for quantity in ATTENTION_QUANTITIES:
                for h, v in enumerate(per_head[quantity]):
                    out[(name, quantity, h)] = v
        if self._logz is not None and self.lm_head is not None:
            s, n, top = self._logz
            out[(self.lm_head, LOGZ_QUANTITIES[0], None)] = s / n
            out[(self.lm_head, LOGZ_QUANTITIES[1], None)] = top
        self._stats, self._logz = {}, None
        return out

    def __enter__(self) -> AttentionProbe:
        return self.attach()

    def __exit__(self, *exc: object) -> None:
        self.detach()

    def __repr__(self) -> str:
        return (f"AttentionProbe({len(self.sites)} attention modules, lm_head={self.lm_head!r}, "
                f"{'attached' if self._handles else 'detached'}{', armed' if self.armed else ''})")

    # -- hooks ---------------------------------------------------------------------------------------
    def _tap_hook(self, i: int, role: str) -> Any:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            if self.armed and isinstance(output, Tensor):
                self._seen.setdefault(i, {})[role] = output.detach()
        return hook

    def _site_hook(self, i: int) -> Any:
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            seen = self._seen.pop(i, {})
            if self.armed:
                self._guarded(lambda: self._measure(i, args, kwargs, seen))
        return hook

    def _on_head(self, module: nn.Module, args: tuple, output: Any) -> None:
        if self.armed and isinstance(output, Tensor):
            self._guarded(lambda: self._add_logz(output))

    def _guarded(self, fn: Any) -> None:
        try:
            with torch.no_grad():
                fn()
        except Exception as exc:  # noqa: BLE001 - the user's forward pass must go on
            self.error, self.armed = exc, False
            warnings.warn(f"gradwatch attention probe stopped: {type(exc).__name__}: {exc}", GradwatchWarning,
                          stacklevel=2)

    def _bind(self, i: int, module: nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
        sig = self._signatures.get(i)
        if sig is None:
            sig = self._signatures[i] = inspect.signature(module.forward)
        try:
            bound = dict(sig.bind_partial(*args, **kwargs).arguments)
        except TypeError as exc:
            raise Skip(f"arguments not understood: {exc}") from None
        for p in sig.parameters.values():  # **kwargs: flatten into the mapping
            if p.kind is inspect.Parameter.VAR_KEYWORD:
                bound.update(bound.pop(p.name, {}))
        bound["__args__"], bound["__kwargs__"] = args, kwargs
        return bound

    def _measure(self, i: int, args: tuple, kwargs: dict, seen: dict[str, Tensor]) -> None:
        site = self.sites[i]
        try:
            inputs: AttentionInputs = site.read(site.module, self._bind(i, site.module, args, kwargs), seen)
        except Skip as why:
            self.skipped[site.name] = str(why)
            return
        self._pool(site.name, head_stats(inputs, self.chunk))

    def _add_softmax(self, name: str, x: Tensor) -> None:
        self._pool(name, softmax_stats(x, self.chunk))

    def _pool(self, name: str, stats: Tensor) -> None:
        """Add one call's (6, H) sums to the module's: max of the maxima, sums of the rest (a call with another
        number of heads starts over)."""
        old = self._stats.get(name)
        if old is not None and old.shape == stats.shape:
            stats = torch.cat([torch.maximum(old[:1], stats[:1]), old[1:] + stats[1:]])
        self._stats[name] = stats

    def _add_logz(self, logits: Tensor) -> None:
        dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
        rows = logits.detach().reshape(-1, logits.shape[-1])  # a position per row
        step = max(1, chunk_size(rows.device, self.chunk) // max(1, rows.shape[1]))  # a float32 copy of a chunk only
        lse = torch.cat([torch.logsumexp(rows[a:a + step].to(dtype), dim=-1) for a in range(0, len(rows), step)])
        count = torch.full((), float(lse.numel()), dtype=dtype, device=lse.device)  # (filled: no host copy)
        now = torch.stack([lse.sum(), count, lse.max()])
        if self._logz is not None:
            now = torch.stack([self._logz[0] + now[0], self._logz[1] + now[1], torch.maximum(self._logz[2], now[2])])
        self._logz = now


_PRODUCT_CALLS = frozenset({"matmul", "__matmul__", "__rmatmul__", "bmm", "einsum", "baddbmm"})
# what a forward does to q·kᵀ before its softmax: a scale, a mask, a bias, a cast
_CARRY_CALLS = frozenset({"mul", "__mul__", "__rmul__", "div", "__truediv__", "add", "__add__", "__radd__", "sub",
                          "__sub__", "masked_fill", "masked_fill_", "where", "to", "float", "contiguous", "clamp"})


def _weights(t: Any) -> bool:
    """A parameter, or a view of one (``self.emb.weight.T``): a product with it is a layer, not q·kᵀ."""
    return isinstance(t, nn.Parameter) or isinstance(getattr(t, "_base", None), nn.Parameter)


class _SoftmaxTap(TorchFunctionMode):
    """Inside one hand-written attention module's forward, on armed passes: hands each softmax's input over the
    last dimension of a ≥ 3-D float tensor (the attention logits) to ``seen``, and computes the softmax as asked.
    Square in its last two dimensions (queries × keys of self-attention), or made from a product of two
    activations (q·kᵀ, then scaled or masked: a single query's (batch, 1, keys) logits), unless the module is
    ``named`` for attention (cross-attention: as many keys as it has): a softmax over a vocabulary (a product
    with a weight) or over experts is not one."""

    def __init__(self, seen: Any, named: bool = False) -> None:
        super().__init__()
        self.seen, self.named, self.depth = seen, named, 0  # depth: nested calls of the module
        self.products: dict[int, Any] = {}  # id → weak reference of each tensor made from q·kᵀ in this pass

    def enter(self, armed: bool) -> None:
        if armed or self.depth:  # re-entered while in use: count it, so that leave() pops only its own push
            self.depth += 1
            if self.depth == 1:
                self.__enter__()

    def leave(self) -> None:
        if self.depth:
            self.depth -= 1
            if self.depth == 0:
                self.__exit__(None, None, None)
                self.products.clear()

    def _from_product(self, t: Any) -> bool:
        ref = self.products.get(id(t))
        return ref is not None and ref() is t

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", None)
        if name == "softmax" and args and isinstance(args[0], Tensor):
            x = args[0]
            dim = args[1] if len(args) > 1 else kwargs.get("dim")
            if (isinstance(dim, int) and x.is_floating_point() and x.dim() >= 3 and dim % x.dim() == x.dim() - 1
                    and (self.named or x.shape[-1] == x.shape[-2] or self._from_product(x))):
                self.seen(x)
        out = func(*args, **kwargs)
        if isinstance(out, Tensor) and (name in _PRODUCT_CALLS or name in _CARRY_CALLS):
            tensors = [a for a in args if isinstance(a, Tensor)]
            if (len(tensors) >= 2 and not any(_weights(t) for t in tensors) if name in _PRODUCT_CALLS
                    else any(self._from_product(t) for t in tensors)):
                self.products[id(out)] = weakref.ref(out)
        return out


__all__ = ["ATTENTION_QUANTITIES", "CHUNK", "LOGZ_QUANTITIES", "AttentionInputs", "AttentionProbe", "Key",
           "find_attention", "find_lm_head", "finish", "head_stats"]
