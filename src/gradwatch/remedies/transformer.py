"""Remedies for Transformer training instabilities: qk-layernorm, σReparam, z-loss, skip-step on a spike.

- :func:`add_qk_norm`: LayerNorm on each head's queries and keys (Dehghani et
  al. 2023, ViT-22B; Wortsman et al. 2023 §3.1): the attention logit q·k/√d is
  then bounded by the norms' gains, so it cannot grow without limit and the
  attention cannot collapse to one-hot by weight growth alone.
- :func:`sigma_reparam`: Ŵ = γ·W/σ(W) on the attention projections (Zhai et
  al. 2023, "Stabilizing Transformer training by preventing attention entropy
  collapse"): σ by power iteration, γ learned.
- :func:`z_loss` / :func:`with_z_loss`: 1e-4·log²Z added to the loss keeps
  the output logits' log-partition near 0 (PaLM; Wortsman et al. §3.2).
- :func:`skip_step_on_spike`: an optimizer step whose gradient norm is a
  robust outlier (or not finite) is not taken (PaLM and OLMo 2 skip such
  batches).

Learning-rate warm-up is ``torch.optim.lr_scheduler.LinearLR`` (the doctor's
``warmup`` entry). Model remedies return a deep copy unless ``inplace=True``;
the optimizer must then be rebuilt over the new parameters (norm gains, γ).
"""

from __future__ import annotations

import copy
import math
import types
from collections import deque
from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.nn.utils import parametrize

from gradwatch._errors import bad_argument
from gradwatch.probes.attention_read import AttentionInputs, find_attention, mha_batch_first, mha_masks


class HeadNorm(nn.Module):
    """LayerNorm over each head's d features of a (…, H·d) or (…, H, d) tensor; one gain and bias shared by the heads."""

    def __init__(self, head_dim: int, eps: float = 1e-5, device: Any = None, dtype: Any = None) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.norm = nn.LayerNorm(head_dim, eps=eps, device=device, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x.reshape(*x.shape[:-1], -1, self.head_dim)).reshape(x.shape)


class NormedProjection(nn.Module):
    """A q or k projection followed by :class:`HeadNorm`: replaces ``q_proj``/``k_proj`` in Llama-style attention."""

    def __init__(self, proj: nn.Module, head_dim: int) -> None:
        super().__init__()
        weight = getattr(proj, "weight", None)
        self.proj = proj
        self.norm = HeadNorm(head_dim, device=getattr(weight, "device", None), dtype=getattr(weight, "dtype", None))

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.proj(x))


class NormedFusedQKV(nn.Module):
    """GPT-2's fused ``c_attn`` (q | k | v along the last dimension) with :class:`HeadNorm` on the q and k thirds."""

    def __init__(self, proj: nn.Module, split_size: int, head_dim: int) -> None:
        super().__init__()
        w = proj.weight
        self.proj, self.split_size = proj, split_size
        self.q_norm = HeadNorm(head_dim, device=w.device, dtype=w.dtype)
        self.k_norm = HeadNorm(head_dim, device=w.device, dtype=w.dtype)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = self.proj(x).split(self.split_size, dim=-1)
        return torch.cat([self.q_norm(q), self.k_norm(k), v], dim=-1)


class QKNormMultiheadAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` with LayerNorm on each head's queries and keys, through SDPA.

    Same constructor, parameters (plus ``q_norm``, ``k_norm``), call signature
    and return value as ``nn.MultiheadAttention``; ``add_bias_kv``,
    ``add_zero_attn`` and separate key/value sizes are not supported.
    """

    def __init__(self, embed_dim: int, num_heads: int, *args: Any, **kwargs: Any) -> None:
        super().__init__(embed_dim, num_heads, *args, **kwargs)
        if self.bias_k is not None or self.add_zero_attn or self.in_proj_weight is None:
            raise ValueError("QKNormMultiheadAttention supports neither add_bias_kv, add_zero_attn nor kdim/vdim "
                             "other than embed_dim")
        w = self.in_proj_weight
        self.q_norm = HeadNorm(self.head_dim, device=w.device, dtype=w.dtype)
        self.k_norm = HeadNorm(self.head_dim, device=w.device, dtype=w.dtype)
        # nn.TransformerEncoderLayer's fused inference path (eval, no grad) reads in_proj_weight itself and
        # would skip the norms; it is taken only when this flag is True. This forward never reads the flag.
        self._qkv_same_embed_dim = False

    @classmethod
    def from_mha(cls, mha: nn.MultiheadAttention) -> QKNormMultiheadAttention:
        """A copy of ``mha`` (same weights, settings, device and dtype) with unit-gain q/k norms added."""
        w = mha.in_proj_weight
        if w is None:
            raise ValueError("add_qk_norm: nn.MultiheadAttention with kdim/vdim other than embed_dim is not supported")
        new = cls(mha.embed_dim, mha.num_heads, dropout=mha.dropout, bias=mha.in_proj_bias is not None,
                  add_bias_kv=mha.bias_k is not None, add_zero_attn=mha.add_zero_attn, batch_first=mha.batch_first,
                  device=w.device, dtype=w.dtype)
        new.load_state_dict(mha.state_dict(), strict=False)  # everything but the new norms
        new.train(mha.training)
        return new

    def gradwatch_attention_inputs(self, query: Tensor, key: Tensor, value: Tensor,
                                   key_padding_mask: Tensor | None = None, need_weights: bool = True,
                                   attn_mask: Tensor | None = None, average_attn_weights: bool = True,
                                   is_causal: bool = False) -> AttentionInputs:
        """Normalised q, k (B, H, T, d) and the masks, as this module's forward computes them (read by the probe)."""
        E, D = self.embed_dim, self.head_dim
        query, key = mha_batch_first(self, query, key)
        b = self.in_proj_bias
        q = F.linear(query, self.in_proj_weight[:E], None if b is None else b[:E])
        k = F.linear(key, self.in_proj_weight[E: 2 * E], None if b is None else b[E: 2 * E])
        q = self.q_norm(q).reshape(*q.shape[:2], -1, D).transpose(1, 2)
        k = self.k_norm(k).reshape(*k.shape[:2], -1, D).transpose(1, 2)
        causal, allowed, bias = mha_masks(q.shape[0], self.num_heads, attn_mask, key_padding_mask, is_causal)
        return AttentionInputs(q, k, D ** -0.5, causal, allowed, bias)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None = None,
                need_weights: bool = True, attn_mask: Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[Tensor, Tensor | None]:
        unbatched = query.dim() == 2
        a = self.gradwatch_attention_inputs(query, key, value, key_padding_mask, need_weights, attn_mask,
                                            average_attn_weights, is_causal)
        E, b = self.embed_dim, self.in_proj_bias
        (v,) = mha_batch_first(self, value)
        v = F.linear(v, self.in_proj_weight[2 * E:], None if b is None else b[2 * E:])
        v = v.reshape(*v.shape[:2], -1, self.head_dim).transpose(1, 2)  # (N, H, S, d)
        mask = a.allowed
        if a.bias is not None:
            mask = a.bias if mask is None else a.bias.masked_fill(~mask, -math.inf)
        p_drop = self.dropout if self.training else 0.0
        weights = None
        if need_weights:  # the probabilities are asked for: materialise them
            s = a.q @ a.k.transpose(-1, -2) * a.scale
            if a.causal:
                s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).triu(1), -math.inf)
            if mask is not None:
                s = s.masked_fill(~mask, -math.inf) if mask.dtype == torch.bool else s + mask
            p = torch.softmax(s, dim=-1)
            weights = p.mean(dim=1) if average_attn_weights else p
            y = F.dropout(p, p_drop, self.training) @ v
        else:
            y = F.scaled_dot_product_attention(a.q, a.k, v, attn_mask=mask, dropout_p=p_drop, is_causal=a.causal)
        y = self.out_proj(y.transpose(1, 2).reshape(y.shape[0], -1, E))  # (N, L, E)
        if unbatched:
            y, weights = y[0], None if weights is None else weights[0]
        elif not self.batch_first:
            y = y.transpose(0, 1)
        return y, weights


def _attention_of(model: nn.Module, inplace: bool, call: str) -> tuple[nn.Module, list[Any]]:
    """The model to change (a deep copy unless ``inplace``) and its attention sites; the template error without any."""
    if not isinstance(model, nn.Module):
        raise TypeError(bad_argument(call, "model", "a torch.nn.Module", model))
    m = model if inplace else copy.deepcopy(model)
    sites = find_attention(m)
    if not sites:
        raise ValueError(bad_argument(call, "model", "a model with attention modules (nn.MultiheadAttention, "
                                      "Transformer layers, HF GPT-2 or Llama-style attention)", model))
    return m, sites


def add_qk_norm(model: nn.Module, inplace: bool = False) -> nn.Module:
    """qk-layernorm: LayerNorm on each head's queries and keys in every attention module the probe recognises.

    ``nn.MultiheadAttention`` (also inside Transformer layers) becomes a
    :class:`QKNormMultiheadAttention` with the same weights; GPT-2-style
    ``c_attn`` becomes :class:`NormedFusedQKV`; Llama-style ``q_proj``/
    ``k_proj`` become :class:`NormedProjection` (the norm before the rotary
    embedding, as OLMo 2 and Qwen3 place it). Modules that already normalise
    q and k (``q_norm``/``k_norm``, or this remedy's) are left as they are.
    Raises ``ValueError`` for a model without attention.
    """
    m, sites = _attention_of(model, inplace, "add_qk_norm")
    for site in sites:
        a: Any = site.module
        if isinstance(a, QKNormMultiheadAttention) or isinstance(getattr(a, "q_norm", None), nn.Module):
            continue
        if isinstance(a, nn.MultiheadAttention):
            parent, _, attr = site.name.rpartition(".")
            setattr(m.get_submodule(parent) if parent else m, attr, QKNormMultiheadAttention.from_mha(a))
        elif "qk" in site.taps and not isinstance(a.c_attn, NormedFusedQKV):
            a.c_attn = NormedFusedQKV(a.c_attn, a.split_size, a.head_dim)
        elif "q" in site.taps and not isinstance(a.q_proj, NormedProjection):
            a.q_proj = NormedProjection(a.q_proj, a.head_dim)
            a.k_proj = NormedProjection(a.k_proj, a.head_dim)
    return m


class SigmaReparam(nn.Module):
    """Ŵ = γ·W/σ(W) per block of rows (``dim=0``) or columns (``dim=1``), for ``torch.nn.utils.parametrize``.

    σ is the block's largest singular value, estimated by power iteration
    (vectors ``u``, ``v`` kept as buffers, as ``spectral_norm`` does); γ is a
    learned scale per block, initialised to σ(W) so that the function is
    unchanged when the reparametrisation is inserted (Zhai et al. initialise
    γ = 1 when training from scratch). The power iteration runs in
    :meth:`power_step`, which :func:`sigma_reparam` calls once per forward pass
    of the owning module in training: reading the weight elsewhere (a probe)
    changes nothing.
    """

    u: Tensor  # (blocks, rows of a block): left singular vector estimates
    v: Tensor  # (blocks, columns of a block): right ones

    def __init__(self, weight: Tensor, blocks: int = 1, dim: int = 0, iterations: int = 20) -> None:
        super().__init__()
        self.blocks, self.dim = blocks, dim
        parts = self._parts(weight.detach())
        g = torch.Generator(device="cpu").manual_seed(0)  # the start vectors draw on no global random state
        self.register_buffer("u", torch.stack([F.normalize(torch.randn(p.shape[0], generator=g), dim=0) for p in parts]).to(weight))
        self.register_buffer("v", torch.stack([F.normalize(torch.randn(p.shape[1], generator=g), dim=0) for p in parts]).to(weight))
        for _ in range(iterations):
            self.power_step(weight)
        self.gamma = nn.Parameter(self._sigmas(weight.detach()).clone())

    def _parts(self, weight: Tensor) -> tuple[Tensor, ...]:
        return weight.chunk(self.blocks, dim=self.dim)

    @torch.no_grad()
    def power_step(self, weight: Tensor) -> None:
        """One power iteration per block: v ← Wᵀu/‖·‖, u ← Wv/‖·‖."""
        for i, w in enumerate(self._parts(weight.detach())):
            self.v[i] = F.normalize(w.T @ self.u[i], dim=0)
            self.u[i] = F.normalize(w @ self.v[i], dim=0)

    def _sigmas(self, weight: Tensor) -> Tensor:
        u, v = self.u.clone(), self.v.clone()  # constants for autograd: ∂σ/∂W = u vᵀ
        return torch.stack([torch.dot(u[i], w @ v[i]) for i, w in enumerate(self._parts(weight))])

    def forward(self, weight: Tensor) -> Tensor:
        scale = self.gamma / self._sigmas(weight)
        return torch.cat([w * scale[i] for i, w in enumerate(self._parts(weight))], dim=self.dim)


def _reparam(site: nn.Module, owner: nn.Module, name: str, blocks: int, dim: int) -> None:
    """σReparam on ``owner.name``; its power iteration steps once per forward pass of the attention module ``site``
    (MHA never calls its ``out_proj``, it reads the weight)."""
    weight = getattr(owner, name)
    parametrize.register_parametrization(owner, name, SigmaReparam(weight, blocks, dim))
    site.register_forward_pre_hook(_PowerStep(owner, name))


class _PowerStep:
    """Forward pre-hook: one power iteration of ``owner.name``'s σReparam in training (an object, not a closure,
    so that a deep copy of the model steps its own copy)."""

    def __init__(self, owner: nn.Module, name: str) -> None:
        self.owner, self.name = owner, name

    def __call__(self, module: nn.Module, args: tuple) -> None:
        if module.training:
            p: Any = getattr(self.owner, "parametrizations")[self.name]
            p[0].power_step(p.original)


def _inner(proj: nn.Module) -> nn.Module:
    return proj.proj if isinstance(proj, (NormedProjection, NormedFusedQKV)) else proj


def sigma_reparam(model: nn.Module, inplace: bool = False) -> nn.Module:
    """σReparam (Zhai et al. 2023) on every attention projection: q, k, v (each its own σ and γ) and the output.

    ``nn.MultiheadAttention``: ``in_proj_weight`` in three row blocks and
    ``out_proj``; GPT-2 style: ``c_attn`` (three column blocks of its Conv1D
    weight) and ``c_proj``; Llama-style: ``q_proj``, ``k_proj``, ``v_proj``,
    ``o_proj``. Raises ``ValueError`` for a model without attention.
    """
    m, sites = _attention_of(model, inplace, "sigma_reparam")
    for site in sites:
        a: Any = site.module
        if isinstance(a, nn.MultiheadAttention):
            if a.in_proj_weight is None:
                raise ValueError("sigma_reparam: nn.MultiheadAttention with kdim/vdim other than embed_dim is not supported")
            _reparam(a, a, "in_proj_weight", 3, 0)
            _reparam(a, a.out_proj, "weight", 1, 0)
        elif "qk" in site.taps:  # Conv1D: y = x W, W is (in, 3·out)
            _reparam(a, _inner(a.c_attn), "weight", 3, 1)
            _reparam(a, a.c_proj, "weight", 1, 1)
        elif "q" in site.taps:
            for proj in (a.q_proj, a.k_proj, a.v_proj, getattr(a, "o_proj", None)):
                if proj is not None:
                    _reparam(a, _inner(proj), "weight", 1, 0)
    return m


def z_loss(logits: Tensor, coef: float = 1e-4) -> Tensor:
    """coef · mean over positions of (log Z)², log Z = logsumexp of the last dimension (PaLM's auxiliary loss)."""
    log_z = torch.logsumexp(logits if logits.dtype == torch.float64 else logits.float(), dim=-1)
    return coef * log_z.pow(2).mean()


def with_z_loss(loss_fn: Callable[..., Tensor], coef: float = 1e-4) -> Callable[..., Tensor]:
    """``loss_fn(logits, target, …) + z_loss(logits, coef)``: the z-loss as a loss wrapper (logits' last dim = classes)."""
    if not callable(loss_fn):
        raise TypeError(bad_argument("with_z_loss", "loss_fn", "a callable (logits, target) -> loss", loss_fn))
    if isinstance(coef, bool) or not isinstance(coef, (int, float)) or not coef > 0:
        raise ValueError(bad_argument("with_z_loss", "coef", "a positive number", coef))

    def loss(logits: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        return loss_fn(logits, *args, **kwargs) + z_loss(logits, coef)

    loss.__wrapped__ = loss_fn  # type: ignore[attr-defined]
    return loss


class SkipStep:
    """The handle of :func:`skip_step_on_spike`: which calls were skipped; ``remove()`` restores ``optimizer.step``."""

    def __init__(self, optimizer: torch.optim.Optimizer, window: int, z_above: float, ratio_above: float,
                 warmup: int) -> None:
        self.optimizer = optimizer
        self.window, self.z_above, self.ratio_above, self.warmup = window, z_above, ratio_above, warmup
        self.calls = 0  # optimizer.step() calls seen
        self.skipped: list[int] = []  # their indices (0-based) where the update was not taken
        self._history: deque[float] = deque(maxlen=window)  # log total norms of the steps taken
        self._params = [p for g in optimizer.param_groups for p in g["params"]]
        self._step = optimizer.step
        # an LR scheduler may already have wrapped step as an instance attribute: remove() puts that back
        self._own = vars(optimizer).get("step")
        # bound to the optimizer, not to this handle: an LR scheduler made later wraps ``step.__func__`` and calls it
        # with the optimizer as its first argument
        def step(opt: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> Any:
            return self._guarded_step(*args, **kwargs)

        if hasattr(self._step, "_wrapped_by_lr_sched"):  # a scheduler's wrapper is still inside, called on every
            step._wrapped_by_lr_sched = True  # type: ignore[attr-defined]  # step taken: its "overridden" warning is false
        optimizer.step = types.MethodType(step, optimizer)  # type: ignore[method-assign]

    def outlier(self, norm: float) -> bool:
        """Non-finite, or above the median of the window by ``z_above`` robust SDs and by a factor ``ratio_above``."""
        if not math.isfinite(norm):
            return True
        if len(self._history) < self.warmup or norm <= 0:
            return False
        hist = torch.tensor(list(self._history), dtype=torch.float64)
        med = float(hist.median())
        mad = 1.4826 * float((hist - med).abs().median())  # a robust SD (Gaussian-consistent MAD)
        x = math.log(norm)
        return x - med > math.log(self.ratio_above) and (x - med) > self.z_above * mad

    def _guarded_step(self, *args: Any, **kwargs: Any) -> Any:
        # an optimizer stepped with a closure (L-BFGS) computes this step's gradient in it: evaluated once here, the
        # step is judged on that gradient, not the last step's, and a skipped step returns its loss, as step(closure)
        # does (round 27: a skipped L-BFGS step returned None to a loop that reads the loss it returns)
        closure = kwargs.get("closure", args[0] if args else None)
        loss = None
        if callable(closure):
            with torch.enable_grad():
                loss = closure()
        grads = [p.grad for p in self._params if p.grad is not None]
        norm = float(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))) if grads else 0.0
        i, self.calls = self.calls, self.calls + 1
        if self.outlier(norm):
            self.skipped.append(i)
            return loss
        if norm > 0:
            self._history.append(math.log(norm))
        return self._step(*args, **kwargs)

    def remove(self) -> None:
        """Put the optimizer's own step back."""
        if self._own is not None:
            self.optimizer.step = self._own  # type: ignore[method-assign]
        else:
            vars(self.optimizer).pop("step", None)


def skip_step_on_spike(optimizer: torch.optim.Optimizer, window: int = 128, z_above: float = 6.0,
                       ratio_above: float = 4.0, warmup: int = 10) -> SkipStep:
    """Skip ``optimizer.step()`` when the total gradient norm is non-finite or a robust outlier.

    An outlier stands ``z_above`` robust standard deviations (1.4826·MAD of
    the log norms of the last ``window`` steps taken) *and* a factor
    ``ratio_above`` above their median: OLMo's 6σ over 128 steps, on the log
    scale where norms vary multiplicatively, with a floor so that a run with
    very steady norms does not lose ordinary steps. The first ``warmup``
    steps are always taken (only non-finite ones skipped). One host sync per
    step (the decision). Skipped steps do not enter the window. Stepped with a
    closure (``optimizer.step(closure)``, L-BFGS), the closure is evaluated once
    first and the step judged on the gradient it computes; a skipped step
    returns that loss, as ``step(closure)`` does.
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(bad_argument("skip_step_on_spike", "optimizer", "a torch.optim.Optimizer", optimizer))
    for arg, value in (("window", window), ("warmup", warmup)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(bad_argument("skip_step_on_spike", arg, "a positive int", value))
    if isinstance(z_above, bool) or not isinstance(z_above, (int, float)) or not z_above > 0:
        raise ValueError(bad_argument("skip_step_on_spike", "z_above", "a positive number", z_above))
    if isinstance(ratio_above, bool) or not isinstance(ratio_above, (int, float)) or not ratio_above > 1:
        raise ValueError(bad_argument("skip_step_on_spike", "ratio_above", "a number above 1", ratio_above))
    return SkipStep(optimizer, window, float(z_above), float(ratio_above), warmup)
