"""Attention probes against a naive reference: the materialised softmax(q·kᵀ·scale) with its own max/rms/entropy.

The reference takes q and k where the model hands them to its attention kernel
(HF's attention-function registry; MHA's own inputs, projected by hand in
float64) and the probabilities from the model's own kernel (MHA's
``need_weights=True``; HF's kernel applied to an identity value matrix, whose
output *is* the probability matrix), so masks are read by the model, not by
the probe's code.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from gradwatch.probes.attention import AttentionProbe, finish, head_stats
from gradwatch.probes.attention_read import AttentionInputs

TOL = dict(rtol=1e-5, atol=1e-5)


def reference(s: torch.Tensor, p: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per head, from materialised logits s and probabilities p (B, H, Tq, Tk): allowed = p > 0; entropy
    averaged over the query rows with an allowed key."""
    s, p = s.double(), p.double()
    ok = p > 0
    H = s.shape[1]
    out = {"attn_logit_max": torch.empty(H, dtype=torch.float64),
           "attn_logit_rms": torch.empty(H, dtype=torch.float64), "attn_entropy": torch.empty(H, dtype=torch.float64)}
    for h in range(H):
        vals = s[:, h][ok[:, h]]
        out["attn_logit_max"][h] = vals.max()
        out["attn_logit_rms"][h] = vals.pow(2).mean().sqrt()
        ph = p[:, h]
        plogp = torch.where(ph > 0, ph * ph.clamp_min(1e-300).log(), torch.zeros_like(ph))
        live = ok[:, h].any(-1)  # a query row with no allowed key (left padding) is left out
        out["attn_entropy"][h] = (-plogp.sum(-1))[live].mean()
    return out


def assert_matches(got: dict, name: str, ref: dict[str, torch.Tensor]) -> None:
    for quantity, values in ref.items():
        measured = torch.stack([got[(name, quantity, h)] for h in range(len(values))]).double()
        torch.testing.assert_close(measured, values, **TOL, msg=f"{name} {quantity}")


# -- nn.MultiheadAttention and the Transformer layers ------------------------------------------------------


class MHARef:
    """Captures each MHA call's inputs; recomputes its logits by hand (float64) and asks the module for p."""

    def __init__(self, model: nn.Module) -> None:
        self.calls: dict[str, list] = {}
        self.handles = [m.register_forward_pre_hook(self._hook(n), with_kwargs=True)
                        for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)]
        self.modules = dict(model.named_modules())

    def _hook(self, name):
        def hook(module, args, kwargs):
            self.calls.setdefault(name, []).append((args, dict(kwargs)))
        return hook

    @torch.no_grad()
    def stats(self, name: str) -> dict[str, torch.Tensor]:
        m = self.modules[name]
        (args, kwargs), = self.calls[name]
        query, key, value = (args + (kwargs.get("query"), kwargs.get("key"), kwargs.get("value")))[:3]
        kw = {k: v for k, v in kwargs.items() if k in ("attn_mask", "key_padding_mask")}
        _, p = m(query, key, value, need_weights=True, average_attn_weights=False, **kw)  # (N, H, L, S)
        if not m.batch_first:
            query, key = query.transpose(0, 1), key.transpose(0, 1)
        E, H, D = m.embed_dim, m.num_heads, m.head_dim
        W, b = m.in_proj_weight.double(), m.in_proj_bias.double()
        q = (query.double() @ W[:E].T + b[:E]).reshape(*query.shape[:2], H, D).transpose(1, 2)
        k = (key.double() @ W[E:2 * E].T + b[E:2 * E]).reshape(*key.shape[:2], H, D).transpose(1, 2)
        return reference(q @ k.transpose(-1, -2) / math.sqrt(D), p)


def _causal(T: int) -> torch.Tensor:
    return torch.triu(torch.ones(T, T, dtype=torch.bool), 1)  # True: not allowed (MHA's convention)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("mask", ["none", "causal_bool", "causal_float", "padding"])
def test_multihead_attention_matches_reference(batch_first, mask):
    torch.manual_seed(0)
    N, T, E = 3, 7, 16
    m = nn.MultiheadAttention(E, 4, batch_first=batch_first)
    x = torch.randn(N, T, E) * 3
    kw = {}
    if mask == "causal_bool":
        kw["attn_mask"] = _causal(T)
    elif mask == "causal_float":
        kw["attn_mask"] = torch.zeros(T, T).masked_fill(_causal(T), -math.inf)
    elif mask == "padding":
        kw["key_padding_mask"] = torch.arange(T)[None, :] >= torch.tensor([7, 4, 2])[:, None]
    inp = x if batch_first else x.transpose(0, 1)
    ref = MHARef(m)
    with AttentionProbe(m) as probe:
        m(inp, inp, inp, need_weights=False, **kw)
        got = probe.collect()
    assert_matches(got, "", ref.stats(""))


@pytest.mark.parametrize("norm_first", [True, False])
def test_encoder_layer_with_causal_and_padding_masks(norm_first):
    torch.manual_seed(1)
    T = 6
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True, norm_first=norm_first),
                                num_layers=2, enable_nested_tensor=False)
    x = torch.randn(2, T, 16)
    pad = torch.tensor([[False] * T, [False] * 4 + [True] * 2])
    _probe_matches_mha_reference(enc, lambda: enc(x, mask=_causal(T), src_key_padding_mask=pad, is_causal=True),
                                 ["layers.0.self_attn", "layers.1.self_attn"])


def _probe_matches_mha_reference(model, forward, names):
    """Run ``forward`` with the probe and the MHA reference attached; every named module matches."""
    ref = MHARef(model)
    with AttentionProbe(model) as probe:
        forward()
        got = probe.collect()
    assert probe.names == names
    for name in names:
        assert_matches(got, name, ref.stats(name))


def test_decoder_layer_self_and_cross_attention():
    torch.manual_seed(2)
    dec = nn.TransformerDecoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    x, memory = torch.randn(2, 5, 16), torch.randn(2, 9, 16)
    pad = torch.arange(9)[None, :] >= torch.tensor([9, 6])[:, None]
    _probe_matches_mha_reference(dec, lambda: dec(x, memory, tgt_mask=nn.Transformer.generate_square_subsequent_mask(5),
                                                  tgt_is_causal=True, memory_key_padding_mask=pad),
                                 ["self_attn", "multihead_attn"])


def test_chunks_give_the_same_statistics_as_one_pass():
    """Query chunks bound the memory: 3 queries at a time (chunk = 3·B·H·Tk logits) give the one-pass numbers."""
    torch.manual_seed(3)
    B, H, T, D = 2, 3, 11, 8
    inp = AttentionInputs(torch.randn(B, H, T, D) * 4, torch.randn(B, H, T, D), D ** -0.5, causal=True,
                          bias=torch.randn(B, 1, T, T).masked_fill(torch.rand(B, 1, T, T) < 0.2, -math.inf))
    one = head_stats(inp, chunk=1 << 30)
    chunked = head_stats(inp, chunk=3 * B * H * T)
    torch.testing.assert_close(chunked, one, rtol=1e-6, atol=1e-6)
    s = inp.q @ inp.k.transpose(-1, -2) * D ** -0.5  # the materialised reference, with the same masks
    ok = torch.ones(T, T, dtype=torch.bool).tril() & (inp.bias > -math.inf)
    p = torch.softmax((s + inp.bias).masked_fill(~ok, -math.inf), -1).nan_to_num(0.0)
    assert not ok.any(-1).all()  # this draw has a query row with no allowed key: it must be left out
    got = finish(chunked)
    for quantity, values in reference(s, p).items():
        torch.testing.assert_close(got[quantity].double(), values, **TOL, msg=quantity)


# -- Hugging Face GPT-2 and Llama-style attention ----------------------------------------------------------


transformers = pytest.importorskip("transformers")
from transformers import GPT2LMHeadModel, LlamaForCausalLM  # noqa: E402  (the modelling files load here, not in a test)


class HFRef:
    """Wraps an HF attention function: records q, k, scaling and p = kernel(q, k, V = identity) per module."""

    def __init__(self, monkeypatch, impl: str) -> None:
        import sys

        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]
        self.seen: dict[int, tuple] = {}

        def wrapper(module, query, key, value, attention_mask, **kw):
            # the model's own kernel: sdpa, or its modelling file's eager attention
            original = sdpa if impl == "sdpa" else sys.modules[type(module).__module__].eager_attention_forward
            with torch.no_grad():
                B, Hkv, Tk, _ = key.shape
                eye = torch.eye(Tk).expand(B, Hkv, Tk, Tk)
                p, _ = original(module, query, key, eye, attention_mask, **{**kw, "dropout": 0.0})  # (B, Tq, H, Tk)
                k = key.repeat_interleave(query.shape[1] // Hkv, dim=1)
                s = query.double() @ k.double().transpose(-1, -2) * kw["scaling"]
                self.seen[id(module)] = (s, p.transpose(1, 2))
            return original(module, query, key, value, attention_mask, **kw)

        monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS._local_mapping, impl, wrapper)

    def stats(self, module) -> dict[str, torch.Tensor]:
        return reference(*self.seen[id(module)])


def _gpt2(impl):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=50, n_positions=16, attn_pdrop=0.0,
                                  resid_pdrop=0.0, embd_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    cfg._attn_implementation = impl
    model = GPT2LMHeadModel(cfg)
    with torch.no_grad():  # logits well away from 0, so the statistics are not all near-uniform
        for block in model.transformer.h:
            block.attn.c_attn.weight.mul_(8)
    return model


def _llama(impl):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                                   intermediate_size=64, vocab_size=50, max_position_embeddings=16,
                                   bos_token_id=0, eos_token_id=0, pad_token_id=0)
    cfg._attn_implementation = impl
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(8)
    return model


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("make", [_gpt2, _llama], ids=["gpt2", "llama"])
@pytest.mark.parametrize("padded", [False, True])
def test_hf_attention_matches_reference(monkeypatch, make, impl, padded):
    model = make(impl)
    ids = torch.randint(1, 50, (3, 9), generator=torch.Generator().manual_seed(1))
    mask = (torch.arange(9)[None, :] < torch.tensor([9, 6, 3])[:, None]).long() if padded else None  # right padding
    ref = HFRef(monkeypatch, impl)
    with AttentionProbe(model) as probe:
        out = model(ids, attention_mask=mask)
        got = probe.collect()
    assert len(probe.names) == 2 and not probe.skipped and probe.error is None
    for name in probe.names:
        assert_matches(got, name, ref.stats(model.get_submodule(name)))
    lse = torch.logsumexp(out.logits.double(), -1)  # the LM head's log Z, naively
    torch.testing.assert_close(got[(probe.lm_head, "logz_mean", None)].double(), lse.mean(), **TOL)
    torch.testing.assert_close(got[(probe.lm_head, "logz_max", None)].double(), lse.max(), **TOL)
    assert probe.lm_head == "lm_head"


def test_probe_never_changes_training_and_leaves_no_hooks():
    """Parameters after 3 Adam steps are bit-identical with the probe armed and without it."""
    def train(probe_on: bool):
        model = _gpt2("sdpa")
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        ids = torch.randint(0, 50, (4, 12), generator=torch.Generator().manual_seed(0))
        probe = AttentionProbe(model).attach(armed=probe_on)
        for _ in range(3):
            opt.zero_grad()
            model(ids, labels=ids).loss.backward()
            opt.step()
            probe.collect()
        probe.detach()
        return model

    a, b = train(False), train(True)
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), n
    assert all(not m._forward_hooks for m in b.modules())


def test_unarmed_probe_measures_nothing_and_micro_batches_pool():
    torch.manual_seed(0)
    m = nn.MultiheadAttention(8, 2, batch_first=True)
    x1, x2 = torch.randn(2, 5, 8), torch.randn(2, 5, 8) * 4
    probe = AttentionProbe(m).attach(armed=False)
    m(x1, x1, x1)
    assert probe.collect() == {}
    probe.armed = True
    m(x1, x1, x1)
    first = probe.collect()
    m(x2, x2, x2)
    second = probe.collect()
    m(x1, x1, x1)
    m(x2, x2, x2)
    pooled = probe.collect()
    probe.detach()
    for h in range(2):
        top = torch.maximum(first[("", "attn_logit_max", h)], second[("", "attn_logit_max", h)])
        assert torch.equal(pooled[("", "attn_logit_max", h)], top)
        mean_ent = (first[("", "attn_entropy", h)] + second[("", "attn_entropy", h)]) / 2  # same row counts
        torch.testing.assert_close(pooled[("", "attn_entropy", h)], mean_ent)


def test_bad_arguments_name_the_argument():
    with pytest.raises(TypeError, match=r"`AttentionProbe\(model=…\)` expects a torch.nn.Module"):
        AttentionProbe("gpt2")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"`AttentionProbe\(lm_head=…\)`"):
        AttentionProbe(nn.MultiheadAttention(8, 2), lm_head="nowhere")
    with pytest.raises(ValueError, match=r"`AttentionProbe\(chunk=…\)`"):
        AttentionProbe(nn.MultiheadAttention(8, 2), chunk=0)


def test_a_failing_read_warns_and_the_forward_pass_goes_on():
    import gradwatch as gw

    class Broken(nn.Module):
        def gradwatch_attention_inputs(self, x):
            raise RuntimeError("no q here")

        def forward(self, x):
            return F.relu(x)

    model = Broken()
    with AttentionProbe(model) as probe:
        with pytest.warns(gw.GradwatchWarning, match="no q here"):
            y = model(torch.ones(2))
    assert torch.equal(y, torch.ones(2)) and isinstance(probe.error, RuntimeError) and not probe.armed


def test_entropy_of_huge_logits_stays_exact():
    """Logits of 10⁴–10⁵ (attention-logit growth): the entropy is computed shifted by each row's max, so float32
    does not cancel log Z against Σ p z (unshifted, that gave −0.03 nats)."""
    torch.manual_seed(4)
    # keys close to one common direction: logits ≈ 3·10⁴ each, spread by only a few units, so rows are
    # neither uniform nor one-hot
    q = torch.randn(2, 3, 9, 8) * 3000
    k = torch.randn(1, 1, 1, 8) * 10 + torch.randn(2, 3, 9, 8) * 1e-3
    got = finish(head_stats(AttentionInputs(q, k, 8 ** -0.5, causal=True)))
    # the reference: the same float32 logits (their rounding, ~10⁻³ at 3·10⁴, is the input's, and differs between
    # CPU kernel sets), then softmax and entropy in float64 -- what is under test is the entropy of given logits
    s = (torch.matmul(q, k.transpose(-1, -2)) * 8 ** -0.5).double()
    ok = torch.ones(9, 9, dtype=torch.bool).tril()
    p = torch.softmax(s.masked_fill(~ok, -math.inf), -1)
    ref = reference(s, p)
    assert (got["attn_entropy"] >= 0).all() and got["attn_logit_max"].min() > 1e4
    assert ref["attn_entropy"].min() > 0.05  # neither one-hot nor trivial: the rows spread over a few keys
    torch.testing.assert_close(got["attn_entropy"].double(), ref["attn_entropy"], rtol=0, atol=1e-5)
