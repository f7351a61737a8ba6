"""The doctor's Transformer procedures (qk-layernorm, σReparam, z-loss, skip-step) on a model built for each."""

from __future__ import annotations

import itertools
import pickle

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from gradwatch.diagnosis.findings import Finding
from gradwatch.diagnosis.instability import qk_normalised
from gradwatch.diagnosis.remedies import remedies
from gradwatch.doctor import catalogue
from gradwatch.tinylm import TinyLM
from gradwatch.trial import Trial


class MHABlock(nn.Module):
    """An nn.TransformerEncoderLayer (its nn.MultiheadAttention) between an embedding and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(16, 16)
        self.layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.lm_head = nn.Linear(16, 16)

    def forward(self, x):
        return self.lm_head(self.layer(self.emb(x)))


def _hf(kind: str) -> nn.Module:
    transformers = pytest.importorskip("transformers")
    if kind == "gpt2":
        return transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=16,
                                                                    n_positions=8))
    cfg = transformers.LlamaConfig(num_hidden_layers=1, hidden_size=16, intermediate_size=32, num_attention_heads=2,
                                   num_key_value_heads=1, vocab_size=16, max_position_embeddings=8)
    return transformers.LlamaForCausalLM(cfg)


class Logits(nn.Module):
    """An HF causal LM as a model whose output is its logits."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(input_ids=x).logits


MODELS = {"mha": MHABlock, "tinylm": lambda: TinyLM(16, 16, 1, 2, 8), "gpt2": lambda: Logits(_hf("gpt2")),
          "llama": lambda: Logits(_hf("llama"))}


def _trial(kind: str) -> Trial:
    torch.manual_seed(0)
    model = MODELS[kind]()
    g = torch.Generator().manual_seed(0)
    batches = ((x, x) for x in iter(lambda: torch.randint(0, 16, (4, 8), generator=g), None))
    return Trial(model, torch.optim.SGD(model.parameters(), lr=0.1), batches,
                 lambda logits, y: F.cross_entropy(logits.flatten(0, 1), y.flatten()))


def _entry(key: str):
    (remedy,) = catalogue.catalog()[key]
    pickle.dumps(remedy)  # trials may run in another process
    return remedy


@pytest.mark.parametrize("kind", list(MODELS))
def test_qk_layernorm_normalises_every_attention_and_the_optimizer_trains_the_norms(kind):
    trial = _entry("qk_layernorm").apply(_trial(kind), {})
    assert trial is not None
    names = [n for n, _ in trial.model.named_modules()]
    assert qk_normalised({type(m).__name__ for m in trial.model.modules()}, names)
    held = {id(p) for g in trial.optimizer.param_groups for p in g["params"]}
    assert held == {id(p) for p in trial.model.parameters()}  # the new LayerNorms' gains are trained
    before = [p.detach().clone() for p in trial.model.parameters()]
    assert torch.isfinite(trial.step())
    assert any(not torch.equal(a, b) for a, b in zip(before, trial.model.parameters()))


@pytest.mark.parametrize("kind", list(MODELS))
def test_sigma_reparam_keeps_the_function_and_trains(kind):
    trial = _trial(kind)
    x = torch.randint(0, 16, (2, 8))
    trial.model.eval()
    ref = trial.model(x).detach()
    trial = _entry("sigma_reparam").apply(trial, {})
    assert trial is not None
    torch.testing.assert_close(trial.model(x), ref, rtol=1e-4, atol=1e-4)  # γ starts at σ(W): the same function
    trial.model.train()
    assert torch.isfinite(trial.step())


def test_z_loss_wraps_the_loss_with_its_closed_form():
    trial = _trial("tinylm")
    plain = trial.loss_fn
    trial = _entry("z_loss").apply(trial, {})
    logits, y = torch.randn(2, 8, 16), torch.randint(0, 16, (2, 8))
    expect = plain(logits, y) + 1e-4 * torch.logsumexp(logits, -1).pow(2).mean()
    torch.testing.assert_close(trial.loss_fn(logits, y), expect)
    mlp = Trial(nn.Sequential(nn.Linear(2, 1)), torch.optim.SGD([nn.Parameter(torch.ones(1))], lr=0.1),
                iter([]), F.mse_loss)
    assert _entry("z_loss").apply(mlp, {}) is None  # no class logits to regularise


def test_skip_step_skips_the_spiked_batch():
    trial = _entry("skip_step").apply(_trial("tinylm"), {})
    x, y = next(trial.batches)
    trial.batches = itertools.chain([(x, y)] * 12, [(x * 0 + 3, y)], trial.batches)
    big = trial.loss_fn
    trial.loss_fn = lambda logits, t, n=itertools.count(): big(logits, t) * (1e4 if next(n) == 12 else 1)
    for _ in range(13):
        trial.step()
    assert trial.skip_step.skipped == [12]


def test_attention_logit_growth_brings_the_transformer_procedures():
    finding = Finding("exploding", "warning", ("blocks.0.attn",), (0, 10), "attention", "", "",
                      remedies("qk_layernorm", "sigma_reparam", "lower_lr"))
    keys = catalogue.finding_keys(finding, step0_overflow=False)
    assert keys[:4] == ["qk_layernorm", "sigma_reparam", "lower_lr", "warmup"]
    assert set(keys) <= set(catalogue.catalog())
