"""Reading q and k off attention modules, and the per-head statistics computed from them in query chunks.

The stateful probe and its documentation are in :mod:`gradwatch.probes.attention`.
"""

from __future__ import annotations

import inspect
import math
import sys
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.nn import functional as F

ATTENTION_QUANTITIES = ("attn_logit_max", "attn_logit_rms", "attn_entropy", "attn_empty_frac")
LOGZ_QUANTITIES = ("logz_mean", "logz_max")
CHUNK = 1 << 22  # logits per query chunk on the CPU (16 MiB of float32): bounded memory at any sequence length
DEVICE_CHUNK = 1 << 27  # at most this many on a CUDA device (512 MiB of float32), where each chunk costs ~25 kernel
# launches: on an H200, GPT-2 small at 16 × 1024 tokens took 8.3× its step with the CPU's chunk (49 chunks per
# layer; benchmarks/RESULTS.md); with this one, 2 per layer (not yet measured there)
TEMPORARIES = 16  # chunk-sized float32 tensors a chunk's statistics may hold at once, with room to spare
FREE_SHARE = 4  # a chunk's temporaries take at most 1/FREE_SHARE of the device's free memory


def chunk_size(device: torch.device, chunk: int | None) -> int:
    """Logits per query chunk: ``chunk`` as given, else ``CHUNK`` on the CPU and on a CUDA device as many as
    ``TEMPORARIES`` float32 copies fit in a quarter of its free memory, between ``CHUNK`` and ``DEVICE_CHUNK``."""
    if chunk is not None:
        return chunk
    if device.type != "cuda":
        return CHUNK
    free, _ = torch.cuda.mem_get_info(device)
    return int(min(DEVICE_CHUNK, max(CHUNK, free // (FREE_SHARE * TEMPORARIES * 4))))


@dataclass
class AttentionInputs:
    """q and k as the softmax sees them, with the logit scale and the mask."""

    q: Tensor  # (B, H, Tq, D): after projection, any per-head norm and the rotary embedding
    k: Tensor  # (B, H, Tk, D): key heads repeated to the query heads (grouped-query attention)
    scale: float
    causal: bool = False  # query i sees keys j ≤ i (top-left aligned, as sdpa's is_causal)
    allowed: Tensor | None = None  # bool, broadcastable to (B, H, Tq, Tk): True where a query may attend
    bias: Tensor | None = None  # float, broadcastable to (B, H, Tq, Tk): added to s before the softmax


def _masked_bias(bias: Tensor) -> Tensor:
    """Where an additive mask blocks a key: −inf, or HF's ``finfo.min`` (anything at or below half of it)."""
    return bias <= torch.finfo(bias.dtype).min / 2 if bias.is_floating_point() else torch.zeros_like(bias, dtype=torch.bool)


@torch.no_grad()
def head_stats(inp: AttentionInputs, chunk: int | None = None) -> Tensor:
    """Per head, over query chunks: max logit, Σ logit², #logits, Σ row entropy, #rows with a key, #rows; a (6, H)
    tensor.

    Sums rather than means, so that several calls (micro-batches, shared
    blocks) combine by adding (and by max for row 0).
    """
    q, k = inp.q, inp.k
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    B, H, Tq, _ = q.shape
    Tk = k.shape[2]
    kt = k.to(dtype).transpose(-1, -2)  # (B, H, D, Tk)
    rows = max(1, chunk_size(q.device, chunk) // max(1, B * H * Tk))
    out = torch.zeros(6, H, dtype=dtype, device=q.device)
    out[0] = -math.inf
    keys = torch.arange(Tk, device=q.device)
    for a in range(0, Tq, rows):
        b = min(Tq, a + rows)
        s = torch.matmul(q[:, :, a:b].to(dtype), kt) * inp.scale  # (B, H, c, Tk)
        ok = torch.ones(1, 1, b - a, Tk, dtype=torch.bool, device=q.device)
        if inp.causal:
            ok = ok & (keys[None, :] <= torch.arange(a, b, device=q.device)[:, None])
        if inp.allowed is not None:
            ok = ok & _rows(inp.allowed, a, b, Tq)
        z = s
        if inp.bias is not None:
            bias = _rows(inp.bias, a, b, Tq)
            ok = ok & ~_masked_bias(bias)
            z = s + bias.to(dtype)
        _add_sums(out, s, ok.expand_as(s), z)
    return out


def _add_sums(out: Tensor, s: Tensor, ok: Tensor, z: Tensor) -> None:
    """Add one chunk's sums to ``out`` (6, H): logits ``s`` (B, H, c, Tk), where a query may attend ``ok`` (same
    shape), and what the softmax reads ``z`` (s plus any additive bias)."""
    out[0] = torch.maximum(out[0], s.masked_fill(~ok, -math.inf).amax(dim=(0, 2, 3)))
    out[1] += (s * s).masked_fill(~ok, 0).sum(dim=(0, 2, 3))
    out[2] += ok.sum(dim=(0, 2, 3))
    live = ok.any(dim=-1)  # (B, H, c)
    zm = z.masked_fill(~ok, -math.inf)
    top = zm.amax(dim=-1, keepdim=True)
    # shifted by the row's max, so that log Z and Σ p z stay O(log Tk) even when the logits are 10⁴:
    # H(p) = −Σ p log p = log Z − Σ p z, with log p = z − log Z; masked keys have p = 0
    zs = (zm - torch.where(live[..., None], top, torch.zeros_like(top))).masked_fill(~ok, 0)
    lse = torch.logsumexp(zs.masked_fill(~ok, -math.inf), dim=-1, keepdim=True)  # −inf on a row with no key
    lse = torch.where(live[..., None], lse, torch.zeros_like(lse))
    p = torch.exp(zs - lse).masked_fill(~ok, 0)
    ent = (lse[..., 0] - (p * zs).sum(dim=-1)).clamp_min(0)
    out[3] += ent.masked_fill(~live, 0).sum(dim=(0, 2))
    out[4] += live.sum(dim=(0, 2))
    out[5] += live.shape[0] * live.shape[2]


@torch.no_grad()
def softmax_stats(x: Tensor, chunk: int | None = None) -> Tensor:
    """:func:`head_stats`' sums from the logits a hand-written attention passes to its softmax: ``x`` (B, Tq, Tk),
    (B, H, Tq, Tk) or more leading dimensions (folded into B), the softmax over the last. Entries at or below half
    the dtype's minimum (a −inf or ``finfo.min`` mask) and non-finite ones are masked keys."""
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    s = x.detach().to(dtype)
    s = s.unsqueeze(1) if s.dim() == 3 else s.flatten(0, s.dim() - 4)
    B, H, Tq, Tk = s.shape
    out = torch.zeros(6, H, dtype=dtype, device=s.device)
    out[0] = -math.inf
    rows = max(1, chunk_size(s.device, chunk) // max(1, B * H * Tk))
    floor = torch.finfo(x.dtype).min / 2 if x.is_floating_point() else -math.inf
    for a in range(0, Tq, rows):
        c = s[:, :, a:a + rows]
        ok = torch.isfinite(c) & (c > floor)
        c = torch.where(ok, c, torch.zeros_like(c))
        _add_sums(out, c, ok, c)
    return out


def _rows(mask: Tensor, a: int, b: int, tq: int) -> Tensor:
    """Rows a:b (queries) of a mask broadcastable to (B, H, Tq, Tk)."""
    while mask.dim() < 4:
        mask = mask.unsqueeze(0)
    return mask[:, :, a:b] if mask.shape[2] == tq else mask


def finish(stats: Tensor) -> dict[str, Tensor]:
    """The per-head quantities from :func:`head_stats` sums: max, rms, mean entropy, share of rows without a key
    (NaN where nothing was seen)."""
    nan = torch.full_like(stats[0], math.nan)
    seen = stats[2] > 0
    return {
        "attn_logit_max": torch.where(seen, stats[0], nan),
        "attn_logit_rms": torch.where(seen, (stats[1] / stats[2].clamp_min(1)).sqrt(), nan),
        "attn_entropy": torch.where(stats[4] > 0, stats[3] / stats[4].clamp_min(1), nan),
        # the share of query rows with no key to attend (a softmax of them is NaN unless the mask is finite)
        "attn_empty_frac": torch.where(stats[5] > 0, 1 - stats[4] / stats[5].clamp_min(1), nan),
    }


# -- reading q and k off the modules --------------------------------------------------------------------


class Skip(Exception):
    """This call cannot be measured (a KV cache, cross-attention); the reason is the message."""


def _hf_mask(mask: Tensor | None, module: nn.Module, tq: int) -> tuple[bool, Tensor | None, Tensor | None]:
    """(causal, allowed, bias) from a Hugging Face attention mask: bool True = attend; float = additive."""
    if mask is None:
        impl = getattr(getattr(module, "config", None), "_attn_implementation", None)
        # sdpa/flash read a missing mask as is_causal (when q_len > 1); eager as no mask at all
        return impl != "eager" and bool(getattr(module, "is_causal", True)) and tq > 1, None, None
    if mask.dtype == torch.bool:
        return False, mask, None
    return False, None, mask


def _cache_len(bound: dict[str, Any], module: nn.Module) -> int:
    cache = bound.get("cache", bound.get("past_key_values", bound.get("layer_past")))
    if cache is None or not hasattr(cache, "get_seq_length"):
        return 0
    try:
        return int(cache.get_seq_length(getattr(module, "layer_idx", 0) or 0))
    except Exception:  # noqa: BLE001 - a cache type we do not know: measure as if there were none
        return 0


def _heads(x: Tensor, d: int) -> Tensor:
    """(B, T, H·D) or (B, T, H, D) → (B, H, T, D)."""
    return x.reshape(*x.shape[:2], -1, d).transpose(1, 2)


def _repeat_kv(q: Tensor, k: Tensor) -> Tensor:
    """Key heads repeated to the query heads, as grouped-query attention shares them (HF's repeat_kv)."""
    return k.repeat_interleave(q.shape[1] // k.shape[1], dim=1) if k.shape[1] != q.shape[1] else k


def fused_qkv_inputs(module: Any, bound: dict[str, Any], seen: dict[str, Tensor]) -> AttentionInputs:
    """GPT-2-style: q and k are the first two thirds of ``c_attn``'s output."""
    if bound.get("encoder_hidden_states") is not None:
        raise Skip("cross-attention")
    qkv = seen["qk"]
    q, k, _ = qkv.split(module.split_size, dim=2)
    q, k = _heads(q, module.head_dim), _heads(k, module.head_dim)
    return _hf_inputs(module, bound, q, k)


def split_qk_inputs(module: Any, bound: dict[str, Any], seen: dict[str, Tensor]) -> AttentionInputs:
    """Llama-style: ``q_proj``/``k_proj`` (or ``q_norm``/``k_norm``) outputs, rotary embedding, repeated key heads."""
    q, k = _heads(seen["q"], module.head_dim), _heads(seen["k"], module.head_dim)
    pe = bound.get("position_embeddings")
    if pe is not None:
        rope = getattr(sys.modules.get(type(module).__module__), "apply_rotary_pos_emb", None)
        if rope is None:
            raise Skip(f"position_embeddings given, but {type(module).__module__} has no apply_rotary_pos_emb")
        q, k = rope(q, k, *pe)
    return _hf_inputs(module, bound, q, _repeat_kv(q, k))


def _hf_inputs(module: Any, bound: dict[str, Any], q: Tensor, k: Tensor) -> AttentionInputs:
    if _cache_len(bound, module) > k.shape[2]:
        raise Skip("keys held in a KV cache")
    mask = bound.get("attention_mask")
    if mask is not None and mask.shape[-1] != k.shape[2]:
        raise Skip("a mask longer than the keys in view (a KV cache)")
    causal, allowed, bias = _hf_mask(mask, module, q.shape[2])
    scale = getattr(module, "scaling", None)
    return AttentionInputs(q, k, float(scale) if scale is not None else q.shape[-1] ** -0.5, causal, allowed, bias)


def mha_batch_first(module: nn.MultiheadAttention, *xs: Tensor) -> list[Tensor]:
    """MHA inputs as (N, L, E): (L, N, E) transposed unless ``batch_first``; an unbatched (L, E) as a batch of one."""
    if xs[0].dim() == 2:
        return [x.unsqueeze(0) for x in xs]
    return list(xs) if module.batch_first else [x.transpose(0, 1) for x in xs]


def mha_masks(n: int, heads: int, attn_mask: Tensor | None, key_padding_mask: Tensor | None, is_causal: bool,
              extra: int = 0) -> tuple[bool, Tensor | None, Tensor | None]:
    """(causal, allowed, bias) from MHA's masks: bool True = *not* allowed, float = additive.

    ``attn_mask`` is (L, S) or (N·H, L, S), ``key_padding_mask`` (N, S); ``extra`` keys appended
    to every sequence (``add_bias_kv``, ``add_zero_attn``) are allowed. ``is_causal`` is MHA's hint: it
    counts only without an ``attn_mask`` (MHA itself requires the mask with the hint).
    """
    allowed: Tensor | None = None
    bias: Tensor | None = None
    for mask, padding in ((attn_mask, False), (key_padding_mask, True)):
        if mask is None:
            continue
        if padding:
            mask = mask.reshape(n, 1, 1, -1)
        else:
            mask = mask.reshape(1, 1, *mask.shape) if mask.dim() == 2 else mask.reshape(n, heads, *mask.shape[-2:])
        if extra:
            mask = F.pad(mask, (0, extra), value=False if mask.dtype == torch.bool else 0.0)
        if mask.dtype == torch.bool:
            allowed = ~mask if allowed is None else allowed & ~mask
        else:
            bias = mask if bias is None else bias + mask
    return bool(is_causal) and attn_mask is None, allowed, bias


def mha_inputs(module: nn.MultiheadAttention, bound: dict[str, Any], seen: dict[str, Tensor]) -> AttentionInputs:
    """``nn.MultiheadAttention``: recompute q, k from its inputs and in-projection weights (masks as its forward reads them)."""
    query, key = mha_batch_first(module, bound["query"], bound["key"])
    E, D = module.embed_dim, module.head_dim
    if module._qkv_same_embed_dim:
        w_q, w_k = module.in_proj_weight[:E], module.in_proj_weight[E: 2 * E]
    else:
        w_q, w_k = module.q_proj_weight, module.k_proj_weight
    b = module.in_proj_bias
    q = F.linear(query, w_q, None if b is None else b[:E])
    k = F.linear(key, w_k, None if b is None else b[E: 2 * E])  # (N, S, E)
    N, extra = k.shape[0], 0
    if module.bias_k is not None:  # add_bias_kv: one learned key appended to every sequence
        k = torch.cat([k, module.bias_k.reshape(1, 1, E).expand(N, 1, E)], dim=1)
        extra += 1
    if module.add_zero_attn:  # one all-zero key appended (logit 0)
        k = torch.cat([k, k.new_zeros(N, 1, E)], dim=1)
        extra += 1
    causal, allowed, bias = mha_masks(N, module.num_heads, bound.get("attn_mask"), bound.get("key_padding_mask"),
                                      bool(bound.get("is_causal")), extra)
    return AttentionInputs(_heads(q, D), _heads(k, D), D ** -0.5, causal, allowed, bias)


def custom_inputs(module: Any, bound: dict[str, Any], seen: dict[str, Tensor]) -> AttentionInputs:
    """A module that says itself: ``module.gradwatch_attention_inputs(*args, **kwargs)``."""
    return module.gradwatch_attention_inputs(*bound["__args__"], **bound["__kwargs__"])


@dataclass
class _Site:
    """One attention module: how to read it, and the submodules whose outputs carry q and k."""

    name: str
    module: nn.Module
    read: Callable[[Any, dict[str, Any], dict[str, Tensor]], AttentionInputs]
    taps: dict[str, nn.Module]  # role ("q", "k", "qk") → submodule whose output it is


def find_attention(model: nn.Module) -> list[_Site]:
    """The attention modules the probe can read, in ``named_modules()`` order."""
    sites = []
    m: Any
    for name, m in model.named_modules():
        if hasattr(m, "gradwatch_attention_inputs"):
            sites.append(_Site(name, m, custom_inputs, {}))
        elif isinstance(m, nn.MultiheadAttention):
            sites.append(_Site(name, m, mha_inputs, {}))
        elif all(hasattr(m, a) for a in ("c_attn", "split_size", "head_dim")) and isinstance(m.c_attn, nn.Module):
            sites.append(_Site(name, m, fused_qkv_inputs, {"qk": m.c_attn}))
        elif all(hasattr(m, a) for a in ("q_proj", "k_proj", "head_dim")) and isinstance(m.q_proj, nn.Module):
            q = m.q_norm if isinstance(getattr(m, "q_norm", None), nn.Module) else m.q_proj
            k = m.k_norm if isinstance(getattr(m, "k_norm", None), nn.Module) else m.k_proj
            sites.append(_Site(name, m, split_qk_inputs, {"q": q, "k": k}))
    return sites


_SOFTMAX_IN_FORWARD: dict[type[nn.Module], bool] = {}


_PRODUCTS = ("@", "matmul(", "bmm(", "einsum(")  # q·kᵀ: a softmax over a product of two activations, not a head's


def _forward_calls_softmax(cls: type[nn.Module]) -> bool:
    """Whether a module class's own ``forward`` source calls a softmax and multiplies two tensors (q·kᵀ), as an
    attention does and a classifier's head does not (cached per class; no source: False)."""
    if cls not in _SOFTMAX_IN_FORWARD:
        try:
            source = inspect.getsource(cls.forward)
            _SOFTMAX_IN_FORWARD[cls] = "softmax(" in source and any(p in source for p in _PRODUCTS)
        except (OSError, TypeError):
            _SOFTMAX_IN_FORWARD[cls] = False
    return _SOFTMAX_IN_FORWARD[cls]


def find_softmax_sites(model: nn.Module, known: list[_Site] | None = None) -> list[tuple[str, nn.Module]]:
    """Attention written by hand: (name, module) of each module of the user's own classes (not torch's) whose
    ``forward`` calls a softmax on a product (:func:`_forward_calls_softmax`), the innermost where they nest, none inside or around a module that
    :func:`find_attention` reads (``known``, found if not given). The model itself, where it is the only one (its
    own ``forward`` computes the attention), is named for its class (:func:`root_site_name`). What the probe
    measures there is the logits each softmax over the last dimension of a ≥ 3-D tensor receives
    (:func:`softmax_stats`)."""
    known = find_attention(model) if known is None else known
    taken = {id(x) for s in known for x in s.module.modules()}
    around = {id(x) for s in known for name, x in model.named_modules() if s.name.startswith(name + ".") or not name}
    found = [(name, m) for name, m in model.named_modules()
             if id(m) not in taken and id(m) not in around
             and not type(m).__module__.startswith("torch.") and _forward_calls_softmax(type(m))]
    inner = [(name, m) for name, m in found if name and not any(o.startswith(name + ".") for o, _ in found if o)]
    if inner or not found or found[0][0]:
        return inner
    return [(root_site_name(model), model)]  # round 11: attention in the model's own forward went unseen


def root_site_name(model: nn.Module) -> str:
    """The name the records give a model whose own ``forward`` holds the attention: its class's, unless a
    submodule's path is that already."""
    name = type(model).__name__
    paths = {n for n, _ in model.named_modules()}
    return name if name not in paths else f"{name} (the model)"


def find_lm_head(model: nn.Module) -> str | None:
    """The LM head's name: HF's ``get_output_embeddings()``, else a module named ``lm_head``; None if neither."""
    head = None
    getter = getattr(model, "get_output_embeddings", None)
    if callable(getter):
        try:
            head = getter()
        except Exception:  # noqa: BLE001 - a model whose getter is not implemented
            head = None
    for name, m in model.named_modules():
        if (head is not None and m is head) or (head is None and name.split(".")[-1] == "lm_head"):
            return name
    return None
