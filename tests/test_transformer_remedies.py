"""Transformer remedies, each on a model built for it: qk-layernorm, σReparam, z-loss, skip-step."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from gradwatch.probes.attention import AttentionProbe
from gradwatch.remedies.transformer import (
    QKNormMultiheadAttention,
    add_qk_norm,
    sigma_reparam,
    skip_step_on_spike,
    with_z_loss,
    z_loss,
)
from gradwatch.tinylm import TinyLM

transformers = pytest.importorskip("transformers")
from transformers import GPT2LMHeadModel, LlamaForCausalLM  # noqa: E402

VOCAB, T = 32, 12


class EncoderLM(nn.Module):
    """A causal LM from nn.TransformerEncoderLayer (its self_attn is nn.MultiheadAttention)."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, width)
        self.enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(width, 4, 64, dropout=0.0, batch_first=True,
                                                                    norm_first=True), 2, enable_nested_tensor=False)
        self.lm_head = nn.Linear(width, VOCAB)

    def forward(self, idx):
        mask = nn.Transformer.generate_square_subsequent_mask(idx.shape[1])
        return self.lm_head(self.enc(self.emb(idx), mask=mask, is_causal=True))


def _gpt2():
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=VOCAB, n_positions=T, attn_pdrop=0.0,
                                  resid_pdrop=0.0, embd_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg)


def _llama():
    cfg = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                                   intermediate_size=64, vocab_size=VOCAB, max_position_embeddings=T,
                                   bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return LlamaForCausalLM(cfg)


MAKERS = {"encoder_layer": EncoderLM, "gpt2": _gpt2, "llama": _llama,
          "tinylm": lambda: TinyLM(vocab=VOCAB, width=32, depth=2, heads=4, seq_len=T)}


def _logits(model, ids):
    out = model(ids)
    return out if isinstance(out, torch.Tensor) else out.logits


def _blow_up_qk(model, factor=30.0):
    """Scale every q/k projection weight: the attention logits of the plain model grow by factor²."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(k in name for k in ("in_proj_weight", "c_attn.weight", "q_proj.weight", "k_proj.weight")):
                p.mul_(factor)


def _max_logit(model, ids):
    with AttentionProbe(model) as probe:
        _logits(model, ids)
        got = probe.collect()
    assert probe.error is None and not probe.skipped
    return max(float(v) for (_, q, _), v in got.items() if q == "attn_logit_max"), probe.names


@pytest.mark.parametrize("kind", list(MAKERS))
def test_qk_norm_bounds_the_attention_logits_and_the_model_still_trains(kind):
    """With unit-gain norms, |q·k|/√d ≤ ‖q‖‖k‖/√d = √d whatever the weights; the plain twin's logits are far above."""
    torch.manual_seed(0)
    model = MAKERS[kind]()
    _blow_up_qk(model)
    ids = torch.randint(0, VOCAB, (4, T), generator=torch.Generator().manual_seed(0))
    plain, names = _max_logit(model, ids)
    normed = add_qk_norm(model)
    bounded, names_after = _max_logit(normed, ids)
    d = 8  # head width: 32 / 4
    assert plain > 10 * math.sqrt(d) and bounded <= math.sqrt(d) * (1 + 1e-5)
    assert len(names_after) == len(names) == 2
    assert _max_logit(model, ids)[0] == plain  # a copy: the original is untouched
    # it trains: 30 Adam steps on one batch of next-token prediction cut the loss by half
    opt = torch.optim.Adam(normed.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss = F.cross_entropy(_logits(normed, ids)[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert math.isfinite(losses[-1]) and losses[-1] < 0.5 * losses[0]
    norm_params = [n for n, p in normed.named_parameters() if "norm.norm" in n]
    assert norm_params and all(normed.get_parameter(n).grad is not None for n in norm_params)


def _naive_qknorm_mha(m: QKNormMultiheadAttention, x, attn_mask, pad):
    """Per batch element and head, by hand: LN(x W_q + b_q)·LN(x W_k + b_k)ᵀ/√d, masks, softmax, · (x W_v + b_v)."""
    E, H, D = m.embed_dim, m.num_heads, m.head_dim
    W, b = m.in_proj_weight, m.in_proj_bias
    out = torch.zeros_like(x)
    for n in range(x.shape[0]):
        heads = []
        for h in range(H):
            sl = slice(h * D, (h + 1) * D)
            q = F.layer_norm(x[n] @ W[:E][sl].T + b[:E][sl], (D,), m.q_norm.norm.weight, m.q_norm.norm.bias)
            k = F.layer_norm(x[n] @ W[E:2 * E][sl].T + b[E:2 * E][sl], (D,), m.k_norm.norm.weight, m.k_norm.norm.bias)
            v = x[n] @ W[2 * E:][sl].T + b[2 * E:][sl]
            s = q @ k.T / math.sqrt(D)
            s = s.masked_fill(attn_mask | pad[n][None, :], -math.inf)
            heads.append(torch.softmax(s, -1) @ v)
        out[n] = m.out_proj(torch.cat(heads, -1))
    return out


def test_qk_norm_mha_matches_a_naive_computation_in_train_and_eval():
    """Also in eval under no_grad, where nn.TransformerEncoderLayer would take its fused path and skip the norms."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    layer = add_qk_norm(layer)
    m = layer.self_attn
    assert isinstance(m, QKNormMultiheadAttention)
    with torch.no_grad():
        m.q_norm.norm.weight.uniform_(0.5, 2)
        m.k_norm.norm.bias.uniform_(-1, 1)
    x = torch.randn(3, 6, 16)
    causal = torch.ones(6, 6, dtype=torch.bool).triu(1)
    pad = torch.arange(6)[None, :] >= torch.tensor([6, 4, 2])[:, None]
    with torch.no_grad():
        ref = _naive_qknorm_mha(m, x, causal, pad)
        for need_weights in (False, True):
            y, _ = m(x, x, x, attn_mask=causal, key_padding_mask=pad, need_weights=need_weights)
            torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
        train_out = layer(x, src_mask=causal, src_key_padding_mask=pad)
        layer.eval()
        eval_out = layer(x, src_mask=causal, src_key_padding_mask=pad)
    torch.testing.assert_close(eval_out, train_out, rtol=1e-5, atol=1e-5)


def test_qk_norm_needs_attention():
    with pytest.raises(ValueError, match=r"`add_qk_norm\(model=…\)` expects a model with attention modules"):
        add_qk_norm(nn.Linear(3, 3))


@pytest.mark.parametrize("kind", list(MAKERS))
def test_sigma_reparam_keeps_the_function_and_normalises_each_projection(kind):
    torch.manual_seed(0)
    model = MAKERS[kind]().eval()
    ids = torch.randint(0, VOCAB, (2, T), generator=torch.Generator().manual_seed(1))
    before = _logits(model, ids)
    rep = sigma_reparam(model)
    torch.testing.assert_close(_logits(rep, ids), before, rtol=1e-4, atol=1e-5)  # γ = σ(W) at insertion
    reps = [(owner, name, p) for owner in rep.modules() if hasattr(owner, "parametrizations")
            for name, p in owner.parametrizations.items()]
    assert len(reps) == 4 if kind in ("encoder_layer", "gpt2") else len(reps) == 8
    # reading the weight (as a probe does) changes nothing; each forward pass in training steps the iteration
    owner, name, p = reps[0]
    u = p[0].u.clone()
    getattr(owner, name)
    assert torch.equal(p[0].u, u)
    rep.train()
    with torch.no_grad():
        _logits(rep, ids)
    assert not torch.equal(p[0].u, u)
    for owner, name, p in reps:  # every block's spectral norm is its γ once the power iteration has converged
        for _ in range(300):
            p[0].power_step(p.original)
        w = getattr(owner, name).detach()
        for i, block in enumerate(w.chunk(p[0].blocks, dim=p[0].dim)):
            torch.testing.assert_close(torch.linalg.matrix_norm(block, 2), p[0].gamma[i].detach(), rtol=1e-3, atol=0)
    loss = F.cross_entropy(_logits(rep, ids)[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    assert all(p[0].gamma.grad is not None and p.original.grad is not None for _, _, p in reps)


def test_z_loss_against_its_closed_form():
    c, V = 3.0, 10
    logits = torch.full((2, 5, V), c)  # log Z = c + log V at every position
    assert float(z_loss(logits)) == pytest.approx(1e-4 * (c + math.log(V)) ** 2, rel=1e-6)
    logits = torch.randn(4, 7, V, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, V, (4, 7))
    ce = lambda lg, y: F.cross_entropy(lg.flatten(0, 1), y.flatten())  # noqa: E731
    total = with_z_loss(ce, coef=1e-2)(logits, target)
    log_z = torch.logsumexp(logits.detach(), -1)
    assert float((total - ce(logits, target)).detach()) == pytest.approx(1e-2 * float((log_z ** 2).mean()), rel=1e-12)
    (grad,) = torch.autograd.grad(z_loss(logits, 1e-2), logits)
    # ∂/∂y of mean (log Z)²: 2 log Z softmax(y) / #positions
    torch.testing.assert_close(grad, 1e-2 * 2 * log_z[..., None] * torch.softmax(logits.detach(), -1) / 28)
    with pytest.raises(ValueError, match=r"`with_z_loss\(coef=…\)` expects a positive number"):
        with_z_loss(ce, coef=0)


def _regression(scale_at: int | None, skip: bool, steps: int = 40, nan_at: int | None = None,
                warmup_after: bool = False, warmup_before: bool = False):
    """SGD on a linear regression; the batch of step ``scale_at`` scaled ×1000 (its gradient ×~10⁶).
    ``warmup_after``: a LinearLR warm-up made after the skip (it wraps ``optimizer.step`` again), stepped each step;
    ``warmup_before``: made before it (the skip wraps the scheduler's wrapper)."""
    torch.manual_seed(0)
    model = nn.Linear(8, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    sched = torch.optim.lr_scheduler.LinearLR(opt, 0.1, total_iters=10) if warmup_before else None
    handle = skip_step_on_spike(opt) if skip else None
    if warmup_after:
        sched = torch.optim.lr_scheduler.LinearLR(opt, 0.1, total_iters=10)
    g = torch.Generator().manual_seed(1)
    w_true = torch.randn(8, 1, generator=g)
    for i in range(steps):
        x = torch.randn(16, 8, generator=g)
        y = x @ w_true
        if i == scale_at:
            x, y = x * 1000, y * 1000
        loss = F.mse_loss(model(x), y)
        if i == nan_at:
            loss = loss * torch.tensor(math.nan)
        opt.zero_grad()
        loss.backward()
        if handle is not None or i != scale_at:  # the reference simply leaves that step out
            opt.step()
        if sched is not None:
            sched.step()
    return model, handle


def test_skip_step_skips_exactly_the_injected_outlier():
    skipped_model, handle = _regression(scale_at=25, skip=True)
    reference, _ = _regression(scale_at=25, skip=False)
    assert handle.skipped == [25] and handle.calls == 40
    for p, q in zip(skipped_model.parameters(), reference.parameters()):
        assert torch.equal(p, q)
    _, handle = _regression(scale_at=None, skip=True, nan_at=30)
    assert handle.skipped == [30]
    _, handle = _regression(scale_at=None, skip=True)
    assert handle.skipped == []  # an ordinary run loses no step
    opt = handle.optimizer
    handle.remove()
    assert "step" not in vars(opt)  # the class's own step again


def test_skip_step_under_a_scheduler_made_before_it_raises_no_false_warning():
    """Round 10: a set-up with its own scheduler got PyTorch's "optimizer.step() has been overridden after learning
    rate scheduler initialization" from every doctor row that skips steps, though the scheduler's wrapper still
    ran on every step taken. The reference: the same warm-up without the skip, the outlier's step left out by hand."""
    import warnings

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        skipped_model, handle = _regression(scale_at=25, skip=True, warmup_before=True)
    assert not [w for w in seen if "lr_scheduler" in str(w.message) or "learning rate scheduler" in str(w.message)]
    reference, _ = _regression(scale_at=25, skip=False, warmup_before=True)
    assert handle.skipped == [25] and handle.calls == 40
    for p, q in zip(skipped_model.parameters(), reference.parameters()):
        assert torch.equal(p, q)


def test_skip_step_under_a_scheduler_made_after_it():
    """Bug (the doctor's skip-step + warm-up rows, on a regression with raw targets): an LR scheduler made after
    skip_step_on_spike rewraps ``optimizer.step`` and calls its function with the optimizer as ``self``; the skip's
    step read ``self._params`` off the SGD object and raised AttributeError. The reference: the same warm-up without
    the skip, leaving the outlier's step out by hand."""
    skipped_model, handle = _regression(scale_at=25, skip=True, warmup_after=True)
    reference, _ = _regression(scale_at=25, skip=False, warmup_after=True)
    assert handle.skipped == [25] and handle.calls == 40
    for p, q in zip(skipped_model.parameters(), reference.parameters()):
        assert torch.equal(p, q)
