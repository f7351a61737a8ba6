"""Transformers: Post-LN against Pre-LN, a small ViT at two learning rates, GPT-2 and BERT from transformers configs.

- Xiong et al. (2020), "On layer normalization in the Transformer
  architecture", §3.2–3.3 and Fig. 3: a Post-LN Transformer trained with Adam
  without the learning-rate warm-up stage fails; Pre-LN (``norm_first=True``,
  with a final LayerNorm, their Fig. 1b) trains without warm-up. Here: 24
  ``nn.TransformerEncoderLayer`` at d = 32 as a causal language model.
- Dosovitskiy et al. (2021), "An image is worth 16×16 words", §3.1 and
  Table 3 (AdamW with linear warm-up): a Pre-LN ViT on 2×2 patches of the
  8×8 digits; with warm-up at 1e-3 it trains; at 1e-2 without warm-up (a
  learning-rate mistake) it does not.
- Radford et al. (2019) GPT-2 and Devlin et al. (2019) BERT, built from
  ``transformers.GPT2Config`` / ``BertConfig`` at 2 layers, width 32 (no
  weights downloaded), as a causal language model and a token tagger.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch import nn

from .common import BenchSetup, Trial, accuracy, batches, digits, lm_loss, lm_score, markov_tokens

VOCAB, LENGTH = 32, 16


class EncoderLM(nn.Module):
    """Token + learned position embeddings → nn.TransformerEncoder (causal mask) → linear head: (B, T) → (B, T, V)."""

    def __init__(self, layers: int, d: int, norm_first: bool) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, d)
        self.pos = nn.Parameter(torch.randn(1, LENGTH, d) * 0.02)
        layer = nn.TransformerEncoderLayer(d, 2, 2 * d, dropout=0.0, batch_first=True, norm_first=norm_first)
        self.encoder = nn.TransformerEncoder(layer, layers, norm=nn.LayerNorm(d) if norm_first else None,
                                             enable_nested_tensor=False)
        self.head = nn.Linear(d, VOCAB)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(LENGTH), persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        t = tokens.shape[1]
        h = self.encoder(self.embed(tokens) + self.pos[:, :t], mask=self.mask[:t, :t], is_causal=True)  # (B, T, d)
        return self.head(h)


def _encoder_lm(seed: int, norm_first: bool) -> Trial:
    torch.manual_seed(seed)
    model = EncoderLM(24, 32, norm_first)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.9, 0.98))  # Xiong et al.'s Adam, no warm-up
    return Trial(model, opt, markov_tokens(seed, VOCAB, LENGTH, 8), lm_loss, lm_score(seed, VOCAB, LENGTH))


def post_ln_24(seed: int) -> Trial:
    """Xiong et al. 2020 §3: 24 Post-LN encoder layers, Adam 1e-3 from step 0 (no warm-up): it does not learn.

    Plain hooks put its first/last ‖∂L/∂a‖ between 2·10⁻⁴ and 2·10⁻² depending on seed and rate (Pre-LN: ~0.8),
    not beyond 10⁻³ on every seed, so its label is "fails" (does not learn), not "vanishing".
    """
    return _encoder_lm(seed, norm_first=False)


def pre_ln_24(seed: int) -> Trial:
    """Xiong et al. 2020 §3.3, Fig. 1b: the same 24 layers as Pre-LN with a final LayerNorm, no warm-up."""
    return _encoder_lm(seed, norm_first=True)


class ViT(nn.Module):
    """Dosovitskiy et al. §3.1 at toy size: 2×2 patches of an 8×8 image (16 tokens), a class token, Pre-LN encoder."""

    def __init__(self, d: int = 32, layers: int = 4) -> None:
        super().__init__()
        self.patch = nn.Linear(4, d)
        self.cls = nn.Parameter(torch.zeros(1, 1, d))
        self.pos = nn.Parameter(torch.randn(1, 17, d) * 0.02)
        layer = nn.TransformerEncoderLayer(d, 4, 2 * d, dropout=0.0, activation="gelu", batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, norm=nn.LayerNorm(d), enable_nested_tensor=False)
        self.head = nn.Linear(d, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        patches = x.reshape(b, 4, 2, 4, 2).permute(0, 1, 3, 2, 4).reshape(b, 16, 4)  # (B, 16 patches, 2·2 pixels)
        h = torch.cat([self.cls.expand(b, -1, -1), self.patch(patches)], 1) + self.pos  # (B, 17, d)
        return self.head(self.encoder(h)[:, 0])


def _vit(seed: int, lr: float, warmup: int) -> Trial:
    torch.manual_seed(seed)
    model = ViT()
    x, y, xt, yt = digits("standard")
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    if warmup:  # linear warm-up, stepped after every optimizer step (Table 3's recipe)
        sched = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.01, total_iters=warmup)
        opt.register_step_post_hook(lambda o, a, k: sched.step())
    return Trial(model, opt, batches(x, y, 64, seed), nn.functional.cross_entropy, accuracy(xt, yt))


def vit_warmup(seed: int) -> Trial:
    """A 4-layer ViT, AdamW 1e-3 with 30 warm-up steps: it trains."""
    return _vit(seed, 1e-3, 30)


def vit_lr_high(seed: int) -> Trial:
    """The same ViT at AdamW 1e-2 with no warm-up (issue 20's complaint; not in SETUPS: at this size it trains)."""
    return _vit(seed, 1e-2, 0)


def _hf_trial(model: nn.Module, seed: int, data: Iterator, score, lr: float = 3e-3, warmup: int = 0) -> Trial:
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    if warmup:  # BERT's recipe: linear warm-up (Devlin et al. 2019, §A.2)
        sched = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.01, total_iters=warmup)
        opt.register_step_post_hook(lambda o, a, k: sched.step())

    def loss(out, target: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(out.logits.reshape(-1, out.logits.shape[-1]), target.reshape(-1),
                                           ignore_index=-100)

    return Trial(model, opt, data, loss, score)


def gpt2_tiny(seed: int) -> Trial:
    """GPT-2 from a ``GPT2Config`` (2 layers, width 32, 2 heads), AdamW 3e-3, next-token loss on the chain."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=LENGTH,
                                     bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config)
    score = lm_score(seed, VOCAB, LENGTH)
    return _hf_trial(model, seed, markov_tokens(seed, VOCAB, LENGTH, 16), lambda m: score(_logits_of(m)))


def _logits_of(model: nn.Module) -> nn.Module:
    """A view of a transformers model that returns plain logits (for :func:`lm_score`)."""

    class Wrapped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = model

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner(x).logits

    return Wrapped()


def bert_tiny(seed: int) -> Trial:
    """BERT from a ``BertConfig`` (2 layers, width 32, 2 heads) as a token tagger (``BertForTokenClassification``):
    each position is tagged with the chain's next token; AdamW 3e-3 after 30 warm-up steps (Devlin et al. §A.2)."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=LENGTH, num_labels=VOCAB)
    model = transformers.BertForTokenClassification(config)
    score = lm_score(seed, VOCAB, LENGTH)
    return _hf_trial(model, seed, markov_tokens(seed, VOCAB, LENGTH, 16), lambda m: score(_logits_of(m)),
                     lr=3e-3, warmup=30)


_XIONG = "Xiong et al. 2020, ICML, "
_VIT = "Dosovitskiy et al. 2021, ICLR, §3.1, Table 3"
SETUPS = [
    BenchSetup("xiong_post_ln24", "fails", 150, post_ln_24, _XIONG + "§3.2–3.3, Fig. 3 (Post-LN, no warm-up)", slow=True),
    BenchSetup("xiong_pre_ln24", "healthy", 150, pre_ln_24, _XIONG + "§3.3, Fig. 1b (Pre-LN)", slow=True),
    BenchSetup("vit_warmup", "healthy", 200, vit_warmup, _VIT),
    BenchSetup("gpt2_tiny", "healthy", 200, gpt2_tiny, "Radford et al. 2019; transformers GPT2Config"),
    BenchSetup("bert_tiny", "healthy", 200, bert_tiny, "Devlin et al. 2019; transformers BertConfig"),
]
