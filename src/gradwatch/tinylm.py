"""A small decoder-only Transformer and a synthetic language with structure: the instability proxy's set-up.

Wortsman et al. (2023, "Small-scale proxies for large-scale Transformer
training instabilities") show that the instabilities of large runs appear in
small models at high learning rates. This module holds the small model
(pre-LN blocks, no biases, causal attention through
``scaled_dot_product_attention``, Llama-style attribute names so the attention
probe and the qk-layernorm remedy read it as they read Hugging Face Llama) and
a language that needs both local statistics and in-context copying, generated
on the fly from a seed: nothing is downloaded.
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from gradwatch._errors import bad_argument


class Attention(nn.Module):
    """Causal multi-head self-attention: q, k, v, o projections and one SDPA call."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(bad_argument("Attention", "heads", f"a divisor of width={width}", heads))
        self.head_dim = width // heads
        self.scaling = self.head_dim ** -0.5
        self.is_causal = True
        self.q_proj = nn.Linear(width, width, bias=False)
        self.k_proj = nn.Linear(width, width, bias=False)
        self.v_proj = nn.Linear(width, width, bias=False)
        self.o_proj = nn.Linear(width, width, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        B, T, C = x.shape
        q = self.q_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scaling)  # (B, H, T, D)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, C))


class Block(nn.Module):
    """Pre-LN Transformer block: x + attn(LN(x)), then x + MLP(LN(x)) with a 4× GELU MLP."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(width, bias=False)
        self.attn = Attention(width, heads)
        self.ln2 = nn.LayerNorm(width, bias=False)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width, bias=False), nn.GELU(), nn.Linear(4 * width, width, bias=False))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class TinyLM(nn.Module):
    """Token and position embeddings, ``depth`` pre-LN blocks, a final LayerNorm and an untied LM head."""

    def __init__(self, vocab: int = 64, width: int = 128, depth: int = 4, heads: int = 4, seq_len: int = 64) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, width)
        self.pos = nn.Embedding(seq_len, width)
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(depth))
        self.ln_f = nn.LayerNorm(width, bias=False)
        self.lm_head = nn.Linear(width, vocab, bias=False)
        for name, p in self.named_parameters():
            if p.dim() == 2:  # GPT-2's N(0, 0.02), the residual outputs scaled by 1/√(2·depth) (Radford et al. 2019)
                std = 0.02 / math.sqrt(2 * depth) if name.endswith(("o_proj.weight", "mlp.2.weight")) else 0.02
                nn.init.normal_(p, std=std)

    def forward(self, idx: Tensor) -> Tensor:
        """Logits (B, T, vocab) for token ids (B, T)."""
        T = idx.shape[1]
        x = self.tok(idx) + self.pos(torch.arange(T, device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))


class MarkovCopyLanguage:
    """Sequences of a sparse Markov chain, a separator, then a copy of an earlier span of the same sequence.

    Each sequence of ``seq_len + 1`` tokens: ``markov`` tokens from a fixed
    random chain (each row a Dirichlet(``concentration``) over the ordinary
    tokens, so a few successors carry most of the mass: local statistics to
    learn), the separator (token ``vocab − 1``), then the tokens from a
    random start r < ``markov − copy`` onwards, copied (in-context retrieval:
    the induction-head mechanism, which attention must learn). ``batch``
    returns (inputs, targets), each (n, seq_len).
    """

    def __init__(self, vocab: int = 64, seq_len: int = 64, markov: int = 40, concentration: float = 0.1,
                 seed: int = 0) -> None:
        copy = seq_len - markov  # tokens after the separator
        if not 0 < copy < markov:
            raise ValueError(bad_argument("MarkovCopyLanguage", "markov", f"an int in ({seq_len // 2}, {seq_len})", markov))
        self.vocab, self.seq_len, self.markov, self.copy = vocab, seq_len, markov, copy
        self.sep = vocab - 1
        g = torch.Generator().manual_seed(seed)
        alpha = torch.full((vocab - 1, vocab - 1), concentration)
        self.transitions = torch._standard_gamma(alpha, generator=g)  # Dirichlet rows: normalised gammas
        self.transitions /= self.transitions.sum(1, keepdim=True)

    def batch(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """(inputs, targets): (n, seq_len) token ids; targets are the inputs shifted by one."""
        seq = torch.empty(n, self.seq_len + 1, dtype=torch.long)
        seq[:, 0] = torch.randint(0, self.vocab - 1, (n,), generator=generator)
        for t in range(1, self.markov):
            seq[:, t] = torch.multinomial(self.transitions[seq[:, t - 1]], 1, generator=generator)[:, 0]
        seq[:, self.markov] = self.sep
        start = torch.randint(0, self.markov - self.copy, (n, 1), generator=generator)
        seq[:, self.markov + 1:] = seq.gather(1, start + torch.arange(self.copy))
        return seq[:, :-1], seq[:, 1:]

    def loss_floor(self) -> float:
        """Cross-entropy (nats per token) of an ideal predictor, about: the chain's entropy rate on the Markov
        targets, 0 on the separator and the copies, log(#starts) bounding the first copied token."""
        P = self.transitions.double()
        pi = torch.ones(len(P), dtype=torch.float64) / len(P)
        for _ in range(200):  # the chain's stationary distribution
            pi = pi @ P
        rate = float(-(pi[:, None] * P * P.clamp_min(1e-300).log()).sum())
        return ((self.markov - 1) * rate + math.log(self.markov - self.copy)) / self.seq_len


@dataclass
class ProxyRun:
    """One watched training run of :func:`train_proxy`: the stored run, the attention series, the losses."""

    path: Path  # the run directory (gw.open_run(path))
    probes: dict[int, dict[tuple[str, str, int | None], float]]  # {step: AttentionProbe.collect()}, as numbers
    losses: list[float]  # training cross-entropy per step (without the z-loss); stops at the first non-finite
    final_loss: float  # held-out cross-entropy after training (4 batches of 32, a fixed generator)
    seconds: float


def _probe_step(every: int, steps: int, step: int) -> bool:
    return step % every == 0 or step == steps - 1


def probe_records(path: str | Path) -> dict[int, dict[tuple[str, str, int | None], float]]:
    """The attention and log-Z records of a stored run as ``{step: {(module, quantity, head): value}}``."""
    from gradwatch.probes.attention_read import ATTENTION_QUANTITIES, LOGZ_QUANTITIES
    from gradwatch.store import open_run

    out: dict[int, dict[tuple[str, str, int | None], float]] = {}
    with open_run(path) as run:
        for quantity in (*ATTENTION_QUANTITIES, *LOGZ_QUANTITIES):
            if quantity in run.quantities:
                r = run.records(quantity)
                for step, layer, pos, v in zip(r["step"].tolist(), r["layer"], r["pos"].tolist(), r["value"].tolist()):
                    out.setdefault(step, {})[(str(layer), quantity, None if pos < 0 else pos)] = v
    return out


def lr_multiplier(step: int, warmup: int, steps: int) -> float:
    """Linear warm-up to 1 over ``warmup`` steps, then cosine decay to 0 at ``steps`` (Wortsman et al.'s schedule)."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def train_proxy(lr: float, seed: int = 0, qk_norm: bool = False, z_loss_coef: float = 0.0, vocab: int = 64,
                width: int = 128, depth: int = 4, heads: int = 4, seq_len: int = 64, batch: int = 8, steps: int = 300,
                warmup: int = 30, probe_every: int = 10, store: str | Path = "runs", name: str | None = None) -> ProxyRun:
    """Train :class:`TinyLM` on :class:`MarkovCopyLanguage` under a watch, as Wortsman et al.'s small-scale proxy.

    AdamW (β = 0.9, 0.95; decoupled weight decay 10⁻⁴ independent of the
    learning rate, so ``weight_decay = 1e-4 / lr``, on matrices only), linear
    warm-up then cosine decay; ``qk_norm``: :func:`~gradwatch.remedies.transformer.add_qk_norm`;
    ``z_loss_coef`` > 0 adds ``coef·log²Z``. The watch records the loss, the
    per-layer gradient norms and update ratios every step; the attention probe
    records every ``probe_every``-th step (and the last; every step of the
    flight recorder's detail windows), read back into :attr:`ProxyRun.probes`.
    Stops at the first non-finite loss.
    """
    import gradwatch as gw
    from gradwatch.remedies.transformer import add_qk_norm, z_loss

    torch.manual_seed(seed)
    lang = MarkovCopyLanguage(vocab, seq_len, markov=seq_len * 5 // 8, seed=0)  # one language for every run
    model = TinyLM(vocab, width, depth, heads, seq_len)
    if qk_norm:
        add_qk_norm(model, inplace=True)
    matrices = [p for p in model.parameters() if p.dim() == 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": matrices, "weight_decay": 1e-4 / lr}, {"params": rest, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95), eps=1e-8)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_multiplier(s, warmup, steps))
    g = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    t0 = time.perf_counter()
    name = name or f"proxy-lr{lr:g}-s{seed}{'-qk' if qk_norm else ''}{'-z' if z_loss_coef else ''}"
    probed = functools.partial(_probe_step, probe_every, steps)
    with gw.watch(model, opt, activations=False, update_every=1, attention=probed, store=store, name=name,
                  overwrite=True) as watch:
        for step in range(steps):
            x, y = lang.batch(batch, g)
            logits = model(x)  # (B, T, vocab)
            loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
            total = loss + z_loss(logits, z_loss_coef) if z_loss_coef else loss
            opt.zero_grad(set_to_none=True)
            total.backward()
            opt.step()
            sched.step()
            watch.log(loss=loss.detach())
            losses.append(float(loss.detach()))
            if not math.isfinite(losses[-1]):
                break
    collected = probe_records(watch.path)
    seconds = time.perf_counter() - t0
    held = torch.Generator().manual_seed(10_000)
    with torch.no_grad():
        final = torch.stack([F.cross_entropy(model(x).flatten(0, 1), y.flatten())
                             for x, y in (lang.batch(32, held) for _ in range(4))]).mean()
    return ProxyRun(watch.path, collected, losses, float(final), seconds)
